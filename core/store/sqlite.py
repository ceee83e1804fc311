"""The embedded replay store: one SQLite file in WAL mode, durable on every commit.

Durability: WAL with synchronous=FULL fsyncs the log on every commit, so a write that returned
survives a kill -9 or a power cut. Batches are one transaction each (the server's group commit):
one fsync per batch, not per row.

Threads: one connection per thread (WAL lets readers run beside the writer without blocking
it), and an in-process lock serialises writers so our own threads never meet SQLITE_BUSY; other
processes (the trainer, `feedloop store export`) wait up to busy_timeout_ms for the file lock.

Errors: SQLITE_FULL (disk or quota full) -> StoreFullError; every other sqlite3 failure (locked,
I/O, unopenable, corrupt) -> StoreUnavailableError. A failed write transaction is rolled back,
so nothing half-written remains.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from feedloop.core.errors import StoreFullError, StoreUnavailableError
from feedloop.core.store.base import (
    FeedbackRecord,
    GenerationRecord,
    ReplayStore,
    StoreCounts,
)
from feedloop.core.store.schema import (
    FEEDBACK_COLUMNS,
    GENERATION_COLUMNS,
    SQLITE_MIGRATIONS,
    export_rows,
    migrate,
    sample_seqs,
)

_SQLITE_FULL = 13
_EXPORT_PAGE_ROWS = 500
# SQLite's default limit on bound parameters is 32766; stay well under it for IN (...) lists.
_MAX_IN_PARAMS = 900


# json.dumps(value, separators=(",", ":")) without building an encoder per call.
_compact = json.JSONEncoder(separators=(",", ":")).encode


def _generation_row(record: GenerationRecord) -> tuple[Any, ...]:
    behaviour = _compact(record.behaviour_logprobs)
    # Equal whenever the request sampled from the raw policy (temperature 1, no top-k/top-p):
    # the common case, so the floats are formatted once.
    same = record.policy_logprobs == record.behaviour_logprobs
    return (
        record.generation_id,
        record.request_id,
        record.prompt,
        _compact(record.prompt_ids),
        _compact(record.output_ids),
        behaviour,
        behaviour if same else _compact(record.policy_logprobs),
        int(record.finished),
        record.text,
        _compact(record.sampling),
        record.model_version,
        record.client_id,
        record.created_at,
        record.candidate_index,
        record.num_candidates,
    )


def _generation_from_row(row: Sequence[Any]) -> GenerationRecord:
    seq, *fields = row
    values = dict(zip(GENERATION_COLUMNS, fields, strict=True))
    for key in ("prompt_ids", "output_ids", "behaviour_logprobs", "policy_logprobs", "sampling"):
        values[key] = json.loads(values[key])
    values["finished"] = bool(values["finished"])
    return GenerationRecord(**values, seq=seq)


def _feedback_row(record: FeedbackRecord) -> tuple[Any, ...]:
    return (
        record.event_id,
        record.kind,
        _compact(record.generation_ids),
        record.client_id,
        record.received_at,
        record.score,
        record.scale,
        record.text,
        record.given_at,
    )


def _feedback_from_row(row: Sequence[Any]) -> FeedbackRecord:
    seq, *fields = row
    values = dict(zip(FEEDBACK_COLUMNS, fields, strict=True))
    values["generation_ids"] = json.loads(values["generation_ids"])
    return FeedbackRecord(**values, seq=seq)


_GEN_SELECT = "SELECT seq, " + ", ".join(GENERATION_COLUMNS) + " FROM generations"
_FB_SELECT = "SELECT seq, " + ", ".join(FEEDBACK_COLUMNS) + " FROM feedback"
# Rows per multi-row INSERT: at most 500 x 15 bound parameters, under SQLite's limit (32766).
_INSERT_CHUNK_ROWS = 500


@functools.lru_cache(maxsize=256)
def _multi_row_insert(table: str, columns: tuple[str, ...], rows: int, suffix: str) -> str:
    row = f"({', '.join('?' * len(columns))})"
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([row] * rows)}{suffix}"


def _insert_rows(
    conn: sqlite3.Connection,
    table: str,
    columns: Sequence[str],
    values: list[Any],
    suffix: str = "",
) -> None:
    """Insert rows given flat (len(columns) values each) in multi-row statements.

    One statement per chunk rather than executemany's one step per row: each step gives up the
    GIL and must win it back from the busy event loop.
    """
    width = len(columns)
    step = _INSERT_CHUNK_ROWS * width
    for start in range(0, len(values), step):
        chunk = values[start : start + step]
        conn.execute(_multi_row_insert(table, tuple(columns), len(chunk) // width, suffix), chunk)


class SQLiteStore(ReplayStore):
    """A replay store in one SQLite file (created with its parent folder if missing).

    max_size_bytes: a quota; writes that would grow the database past it raise StoreFullError
    (None: only the disk's own limit). It can be changed later with set_max_size_bytes.
    """

    def __init__(
        self, path: str | Path, *, busy_timeout_ms: int = 5000, max_size_bytes: int | None = None
    ) -> None:
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self._max_size_bytes = max_size_bytes
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        with self._mapped_errors("open"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._migrate()

    # -- connections and errors ----------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise StoreUnavailableError(f"replay store {self.path} is closed")
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a batch is exactly one
        # transaction. check_same_thread=False only so close() may close every thread's handle.
        conn = sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=self.busy_timeout_ms / 1000,
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        # Statement journals in memory, not temp files: a multi-row INSERT in a transaction
        # keeps one (to undo just that statement), and as a file it cost as much system time as
        # the commit's own writes. Temp tables and sorts stay small here (reads are indexed).
        conn.execute("PRAGMA temp_store=MEMORY")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
        self._apply_quota(conn)
        self._local.conn = conn
        with self._connections_lock:
            self._connections.append(conn)
        return conn

    def _apply_quota(self, conn: sqlite3.Connection) -> None:
        if self._max_size_bytes is None:
            pages = 4294967294  # SQLite's own ceiling: no quota
        else:
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            pages = max(1, math.ceil(self._max_size_bytes / page_size))
        conn.execute(f"PRAGMA max_page_count={pages}")

    def set_max_size_bytes(self, max_size_bytes: int | None) -> None:
        """Change the size quota for every open connection (None lifts it)."""
        with self._write_lock, self._connections_lock:
            self._max_size_bytes = max_size_bytes
            for conn in self._connections:
                self._apply_quota(conn)

    @contextlib.contextmanager
    def _mapped_errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            message = f"replay store {self.path}: {action} failed: {exc}"
            if code == _SQLITE_FULL or "full" in str(exc).lower():
                raise StoreFullError(message) from exc
            raise StoreUnavailableError(message) from exc
        except OSError as exc:
            raise StoreUnavailableError(
                f"replay store {self.path}: {action} failed: {exc}"
            ) from exc

    @contextlib.contextmanager
    def _transaction(self, action: str) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed (fsynced) on success, rolled back on any failure."""
        with self._mapped_errors(action), self._write_lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _migrate(self) -> None:
        with self._transaction("migrate") as conn:
            migrate(
                conn, SQLITE_MIGRATIONS, placeholder="?", store_name=f"replay store {self.path}"
            )

    def _read(self, action: str, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._mapped_errors(action):
            return self._conn().execute(sql, params).fetchall()

    # -- writes --------------------------------------------------------------------------------

    def append_generations(self, records: Sequence[GenerationRecord]) -> None:
        if not records:
            return
        values = [value for record in records for value in _generation_row(record)]
        with self._transaction("append_generations") as conn:
            _insert_rows(
                conn,
                "generations",
                GENERATION_COLUMNS,
                values,
                " ON CONFLICT (generation_id) DO NOTHING",
            )

    def insert_feedback(self, records: Sequence[FeedbackRecord]) -> list[bool]:
        if not records:
            return []
        with self._transaction("insert_feedback") as conn:
            # Set-based rather than row by row (about 2x the rows/s at batches of 100). Safe
            # because BEGIN IMMEDIATE holds the write lock: no other writer, in this process or
            # another, can add an event_id or a seq between these statements.
            seen = self._existing_event_ids(conn, [r.event_id for r in records])
            accepted: list[bool] = []
            new_values: list[Any] = []  # the new rows' values, flat, for multi-row INSERTs
            for record in records:
                is_new = record.event_id not in seen  # a repeat inside the batch is a duplicate
                accepted.append(is_new)
                if is_new:
                    seen.add(record.event_id)
                    new_values.extend(_feedback_row(record))
            if new_values:
                (last_seq,) = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM feedback").fetchone()
                _insert_rows(conn, "feedback", FEEDBACK_COLUMNS, new_values)
                conn.execute(
                    "INSERT OR IGNORE INTO feedback_generations (generation_id, feedback_seq) "
                    "SELECT ids.value, feedback.seq "
                    "FROM feedback, json_each(feedback.generation_ids) AS ids "
                    "WHERE feedback.seq > ?",
                    (last_seq,),
                )
        return accepted

    @staticmethod
    def _existing_event_ids(conn: sqlite3.Connection, event_ids: list[str]) -> set[str]:
        found: set[str] = set()
        unique = list(dict.fromkeys(event_ids))
        for start in range(0, len(unique), _MAX_IN_PARAMS):
            chunk = unique[start : start + _MAX_IN_PARAMS]
            sql = f"SELECT event_id FROM feedback WHERE event_id IN ({', '.join('?' * len(chunk))})"
            found.update(row[0] for row in conn.execute(sql, chunk))
        return found

    def set_cursor(self, name: str, value: dict[str, Any]) -> None:
        with self._transaction("set_cursor") as conn:
            conn.execute(
                "INSERT INTO cursors (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, json.dumps(value, sort_keys=True)),
            )

    # -- reads ---------------------------------------------------------------------------------

    def get_generations(self, generation_ids: Sequence[str]) -> dict[str, GenerationRecord]:
        found: dict[str, GenerationRecord] = {}
        unique = list(dict.fromkeys(generation_ids))
        for start in range(0, len(unique), _MAX_IN_PARAMS):
            chunk = unique[start : start + _MAX_IN_PARAMS]
            sql = f"{_GEN_SELECT} WHERE generation_id IN ({', '.join('?' * len(chunk))})"
            for row in self._read("get_generations", sql, chunk):
                record = _generation_from_row(row)
                found[record.generation_id] = record
        return found

    def generations_after(self, seq: int, limit: int) -> list[GenerationRecord]:
        rows = self._read(
            "generations_after", f"{_GEN_SELECT} WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
        )
        return [_generation_from_row(row) for row in rows]

    def sample_generations(self, before_seq: int, n: int, seed: int) -> list[GenerationRecord]:
        seqs = [
            row[0]
            for row in self._read(
                "sample_generations",
                "SELECT seq FROM generations WHERE seq <= ? ORDER BY seq",
                (before_seq,),
            )
        ]
        chosen = sample_seqs(seqs, n, seed)
        records: list[GenerationRecord] = []
        for start in range(0, len(chosen), _MAX_IN_PARAMS):
            chunk = chosen[start : start + _MAX_IN_PARAMS]
            sql = f"{_GEN_SELECT} WHERE seq IN ({', '.join('?' * len(chunk))}) ORDER BY seq"
            records += [
                _generation_from_row(r) for r in self._read("sample_generations", sql, chunk)
            ]
        return records

    def feedback_after(self, seq: int, limit: int) -> list[FeedbackRecord]:
        rows = self._read(
            "feedback_after", f"{_FB_SELECT} WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
        )
        return [_feedback_from_row(row) for row in rows]

    def feedback_for(self, generation_ids: Sequence[str]) -> list[FeedbackRecord]:
        unique = list(dict.fromkeys(generation_ids))
        by_seq: dict[int, FeedbackRecord] = {}
        for start in range(0, len(unique), _MAX_IN_PARAMS):
            chunk = unique[start : start + _MAX_IN_PARAMS]
            sql = (
                f"{_FB_SELECT} WHERE seq IN (SELECT feedback_seq FROM feedback_generations "
                f"WHERE generation_id IN ({', '.join('?' * len(chunk))}))"
            )
            for row in self._read("feedback_for", sql, chunk):
                record = _feedback_from_row(row)
                by_seq[record.seq] = record
        return [by_seq[seq] for seq in sorted(by_seq)]

    def max_seq(self) -> tuple[int, int]:
        row = self._read(
            "max_seq",
            "SELECT (SELECT COALESCE(MAX(seq), 0) FROM generations), "
            "(SELECT COALESCE(MAX(seq), 0) FROM feedback)",
        )[0]
        return int(row[0]), int(row[1])

    def counts(self) -> StoreCounts:
        generations = self._read("counts", "SELECT COUNT(*) FROM generations")[0][0]
        by_kind = dict(self._read("counts", "SELECT kind, COUNT(*) FROM feedback GROUP BY kind"))
        return StoreCounts(generations, sum(by_kind.values()), by_kind)

    def get_cursor(self, name: str) -> dict[str, Any] | None:
        rows = self._read("get_cursor", "SELECT value FROM cursors WHERE name = ?", (name,))
        return json.loads(rows[0][0]) if rows else None

    def iter_export(self) -> Iterator[dict[str, Any]]:
        return export_rows(self, _EXPORT_PAGE_ROWS)

    def schema_version(self) -> int:
        return int(self._read("schema_version", "SELECT version FROM schema_version")[0][0])

    def close(self) -> None:
        with self._connections_lock:
            self._closed = True
            for conn in self._connections:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._connections.clear()
        self._local = threading.local()
