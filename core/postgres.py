"""PostgreSQL connections for the replay store and the model registry: URL, pool, reconnect.

URL: any libpq `postgresql://` URL, plus one parameter of ours, `schema=NAME`: every table lives
in that schema (created if missing), so several deployments or tests share one database without
meeting. Without it, the connection's search_path decides (e.g. `options=-csearch_path%3Dx`).
`connect_timeout` defaults to 3 s and TCP keepalives/user timeout to about 10 s, so a call
against a server that is down or unreachable fails fast instead of hanging.

Pool: a few connections, opened lazily and shared by threads (one borrower at a time each). A
connection found broken is dropped; the next borrow opens a fresh one, so the first call after
the database returns reconnects by itself. A unit of work that failed on a broken connection
before its COMMIT was sent is retried once on a fresh connection: nothing of it was committed,
so the retry cannot double-write. A failure during COMMIT is never retried (its outcome is
unknown) and surfaces as the caller's "unavailable" error.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql

from feedloop.core.errors import FeedloopError

T = TypeVar("T")
DEFAULT_CONNECT_TIMEOUT_S = 3
# libpq parameters added unless the URL sets them. connect_timeout bounds a new connection;
# keepalives and tcp_user_timeout bound a call on an open connection to a server that vanished
# without closing it (a dead host, a partition), which TCP alone would wait out for minutes.
_DEFAULT_PARAMETERS = {
    "connect_timeout": str(DEFAULT_CONNECT_TIMEOUT_S),
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "3",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",  # ms that sent data may stay unacknowledged
    "application_name": "feedloop",  # so operators can tell us apart in pg_stat_activity
}
_DISK_FULL_SQLSTATE_CLASS = "53"  # insufficient_resources: disk_full, out_of_memory, ...


def parse_url(url: str) -> tuple[str, str | None]:
    """(libpq conninfo URL without our `schema` parameter, schema or None)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((value for key, value in query if key == "schema"), None)
    kept = [(key, value) for key, value in query if key != "schema"]
    given = {key for key, _ in kept}
    kept += [(key, value) for key, value in _DEFAULT_PARAMETERS.items() if key not in given]
    return urlunsplit(parts._replace(query=urlencode(kept))), schema or None


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def is_disk_full(exc: BaseException) -> bool:
    state = getattr(exc, "sqlstate", None) or ""
    return state.startswith(_DISK_FULL_SQLSTATE_CLASS)


def advisory_xact_lock(conn: psycopg.Connection, name: str) -> None:
    """Take a transaction-scoped advisory lock named `name` in the connection's schema.

    Keyed by schema and name, so deployments in other schemas of the database never wait on us.
    """
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.' || %s))", (name,))


class Pool:
    """A small thread-safe pool of autocommit connections with reconnect on failure.

    unavailable: builds the caller's error (StoreUnavailableError, RegistryError) from a
    message and the psycopg exception.
    """

    def __init__(
        self,
        url: str,
        *,
        unavailable: Callable[[str, BaseException], FeedloopError],
        max_connections: int = 4,
    ) -> None:
        self.url = url
        self.conninfo, self.schema = parse_url(url)
        self._unavailable = unavailable
        self._max_connections = max_connections
        self._idle: list[psycopg.Connection] = []
        self._open_count = 0
        self._closed = False
        self._cond = threading.Condition()

    def connect(self) -> psycopg.Connection:
        """A new autocommit connection with search_path set to our schema (created if needed)."""
        conn = psycopg.connect(self.conninfo, autocommit=True)
        try:
            # An acknowledged write must survive a database crash, whatever the server's or
            # role's default says: COMMIT returns only after the WAL is flushed.
            conn.execute("SET synchronous_commit TO on")
            if self.schema:
                ident = sql.Identifier(self.schema)
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
                conn.execute(sql.SQL("SET search_path TO {}").format(ident))
            elif conn.execute("SELECT current_schema()").fetchone() == (None,):
                raise psycopg.OperationalError(
                    "the connection's search_path names no existing schema (add ?schema=NAME)"
                )
        except BaseException:
            conn.close()
            raise
        return conn

    def _fail(self, action: str, exc: BaseException) -> FeedloopError:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return self._unavailable(
            f"PostgreSQL at {redact(self.url)}: {action} failed: {first_line}", exc
        )

    @contextlib.contextmanager
    def _borrow(self, action: str) -> Iterator[psycopg.Connection]:
        with self._cond:
            while not self._closed and not self._idle and self._open_count >= self._max_connections:
                self._cond.wait()
            if self._closed:
                raise self._unavailable(
                    f"PostgreSQL at {redact(self.url)} is closed", RuntimeError()
                )
            conn = self._idle.pop() if self._idle else None
            if conn is None:
                self._open_count += 1
        try:
            if conn is None:
                try:
                    conn = self.connect()
                except psycopg.Error as exc:
                    raise self._fail(f"{action} (connecting)", exc) from exc
            yield conn
        finally:
            with self._cond:
                if conn is not None and not conn.broken and not conn.closed and not self._closed:
                    self._idle.append(conn)
                else:
                    self._open_count -= 1
                    if conn is not None:
                        conn.close()
                self._cond.notify()

    def run(self, action: str, work: Callable[[psycopg.Connection], T], *, transaction: bool) -> T:
        """Run work(conn), in one transaction if asked, retrying once on a stale connection."""
        for attempt in (1, 2):
            committing = False
            with self._borrow(action) as conn:
                try:
                    if not transaction:
                        return work(conn)
                    with conn.transaction():
                        result = work(conn)
                        committing = True  # the block's exit sends COMMIT
                    return result
                except psycopg.Error as exc:
                    if conn.broken and not committing and attempt == 1:
                        continue  # dropped on return; nothing was committed, so retry
                    raise self._fail(action, exc) from exc
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for conn in self._idle:
                conn.close()
            self._open_count -= len(self._idle)
            self._idle.clear()
            self._cond.notify_all()
