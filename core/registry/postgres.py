"""The shared model registry: PostgreSQL tables, so replicas on several machines see one truth.

Tables (in the URL's `?schema=`, beside the replay store's, all prefixed `registry_`):
    registry_versions   number, version name, manifest (JSON), pinned, pruned_at (set when
                        retention deleted the version's files; the row and manifest stay)
    registry_files      each checkpoint file's bytes (bytea) and sha256, per version
    registry_live       one row: the live version, the rollback stack, the trial, the pause
    registry_history    every decision (published, promoted, refused, rolled_back, ...), in order

Every change is one transaction under an advisory lock (writers are serialised like the
directory backend's flock): a publish killed at any instant leaves no trace, and the live
pointer never names a version whose files are not all there. Each pointer change sends
NOTIFY on a channel named after the schema, delivered at commit; `wait_for_change` LISTENs on
it and still re-reads the pointer every poll_interval_s, so a lost notification (a dropped
listener connection) delays a swap by at most that long instead of forever.

A prune is one transaction too: it marks the versions pruned, deletes their files and records
the decisions, or (killed midway) does none of it. Deleted rows' space is reused by later
publishes once autovacuum has passed; it goes back to the operating system only with VACUUM FULL.

`checkpoint_dir(version)` materialises a version's files into a local cache folder, verified
against the manifest's sha256, because the loader reads checkpoints from disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from feedloop.core.checkpoint import (
    Manifest,
    fsync_dir,
    needed_base,
    provided_base,
    read_manifest,
    verify_files,
    write_manifest,
)
from feedloop.core.config import default_data_dir
from feedloop.core.errors import (
    CheckpointError,
    FeedloopError,
    PrunedVersionError,
    RegistryError,
    UnknownVersionError,
)
from feedloop.core.migrations import migrate
from feedloop.core.postgres import Pool, advisory_xact_lock, redact
from feedloop.core.registry.base import ModelRegistry, Planner, version_name
from feedloop.core.registry.pointer import (
    ACTIONS,
    PINNED,
    PROMOTED,
    PUBLISHED,
    UNPINNED,
    Decision,
    LivePointer,
    Transition,
    Trial,
    now_iso,
    to_live,
)
from feedloop.core.registry.retention import (
    PrunePlan,
    RegistrySnapshot,
    VersionFacts,
    base_provider,
)

# Serialises the registry's writers (every change takes it first).
_WRITERS_LOCK = "registry"

_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE registry_versions (
            number INTEGER PRIMARY KEY,
            version TEXT NOT NULL UNIQUE,
            manifest JSONB NOT NULL
        )""",
        """CREATE TABLE registry_files (
            version TEXT NOT NULL REFERENCES registry_versions (version),
            name TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            data BYTEA NOT NULL,
            PRIMARY KEY (version, name)
        )""",
        """CREATE TABLE registry_live (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            live TEXT REFERENCES registry_versions (version),
            previous TEXT[] NOT NULL
        )""",
        """CREATE TABLE registry_history (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            version TEXT NOT NULL,
            action TEXT NOT NULL,
            reason TEXT NOT NULL,
            details JSONB NOT NULL,
            at TEXT NOT NULL
        )""",
    ),
    (
        # The version on trial beside live (Trial.to_dict), and the operator's pause.
        "ALTER TABLE registry_live ADD COLUMN trial JSONB",
        "ALTER TABLE registry_live ADD COLUMN paused BOOLEAN NOT NULL DEFAULT FALSE",
    ),
    (
        # Retention: an operator's pins, and when a version's files were deleted.
        "ALTER TABLE registry_versions ADD COLUMN pinned BOOLEAN NOT NULL DEFAULT FALSE",
        "ALTER TABLE registry_versions ADD COLUMN pruned_at TEXT",
    ),
)


def checkpoint_cache_dir(data_dir: Path, url: str) -> Path:
    """Where a registry at `url` materialises checkpoints under a data folder: a folder per URL,
    because version names repeat across registries."""
    url_key = hashlib.sha256(redact(url).encode()).hexdigest()[:16]
    return data_dir / "registry-cache" / url_key


def _registry_error(message: str, exc: BaseException) -> FeedloopError:
    return RegistryError(message)


def _pruned_error(version: str) -> PrunedVersionError:
    return PrunedVersionError(
        f"{version} was pruned by the registry's retention: its weights are deleted, so it "
        "cannot be served, tried or pinned; choose a version `feedloop models` lists"
    )


def _insert_decision(conn: psycopg.Connection, decision: Decision) -> None:
    conn.execute(
        "INSERT INTO registry_history (version, action, reason, details, at) "
        "VALUES (%s, %s, %s, %s, %s)",
        (decision.version, decision.action, decision.reason, Jsonb(decision.details), decision.at),
    )


class PostgresRegistry(ModelRegistry):
    """A model registry in a PostgreSQL schema (tables created on open).

    cache_dir: where checkpoint_dir materialises versions (default: the URL's folder under the
    default data folder, see checkpoint_cache_dir). poll_interval_s: the fallback re-read of the
    live pointer while waiting for a change, should a notification be lost.
    """

    # Only the fallback: a notification wakes a waiter as soon as the live pointer changes.
    DEFAULT_POLL_INTERVAL_S = 1.0

    def __init__(
        self,
        url: str,
        *,
        cache_dir: Path | None = None,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    ) -> None:
        self.url = url
        self.poll_interval_s = poll_interval_s
        self._pool = Pool(url, unavailable=_registry_error, max_connections=4)
        self.cache_dir = (
            Path(cache_dir) if cache_dir else checkpoint_cache_dir(default_data_dir(), url)
        )
        self._listener: psycopg.Connection | None = None
        self._listener_lock = threading.Lock()
        self._pool.run("migrate", self._migrate, transaction=True)
        schema = self._pool.schema or self._pool.run(
            "schema",
            lambda c: c.execute("SELECT current_schema()").fetchone()[0],  # type: ignore[index]
            transaction=False,
        )
        # One channel per schema (channels are database-wide); names are at most 63 bytes.
        self.channel = "feedloop_live_" + hashlib.sha256(schema.encode()).hexdigest()[:20]

    @staticmethod
    def _migrate(conn: psycopg.Connection) -> None:
        advisory_xact_lock(conn, "registry_schema_version")
        migrate(
            conn,
            _MIGRATIONS,
            placeholder="%s",
            store_name="the model registry",
            version_table="registry_schema_version",
            error=RegistryError,
        )

    def _fetch(
        self, action: str, query: str, params: tuple[Any, ...] = (), *, binary: bool = False
    ) -> list[Any]:
        return self._pool.run(
            action,
            lambda conn: conn.execute(query, params, binary=binary).fetchall(),
            transaction=False,
        )

    # -- versions ------------------------------------------------------------------------------

    def versions(self) -> list[str]:
        return self._names("versions", pruned=False)

    def pruned_versions(self) -> list[str]:
        return self._names("pruned_versions", pruned=True)

    def _names(self, action: str, *, pruned: bool) -> list[str]:
        rows = self._fetch(
            action,
            "SELECT version FROM registry_versions WHERE (pruned_at IS NOT NULL) = %s "
            "ORDER BY number",
            (pruned,),
        )
        return [row[0] for row in rows]

    def manifest(self, version: str) -> Manifest:
        return self._manifest_and_pruned(version)[0]

    def _manifest_and_pruned(self, version: str) -> tuple[Manifest, bool]:
        rows = self._fetch(
            "manifest",
            "SELECT manifest, pruned_at IS NOT NULL FROM registry_versions WHERE version = %s",
            (version,),
        )
        if not rows:
            raise self._unknown(version)
        return Manifest.from_dict(rows[0][0]), rows[0][1]

    def size_bytes(self) -> int:
        rows = self._fetch(
            "size_bytes", "SELECT COALESCE(SUM(octet_length(data)), 0) FROM registry_files"
        )
        return int(rows[0][0])

    def publish(
        self,
        checkpoint_dir: Path,
        *,
        reason: str = "",
        details: dict[str, Any] | None = None,
        make_live: bool = False,
    ) -> str:
        source = Path(checkpoint_dir)
        manifest = read_manifest(source)
        verify_files(source, manifest)
        blobs = {name: (source / name).read_bytes() for name in manifest.files}
        for name, data in blobs.items():  # the files could have changed since verify_files
            if hashlib.sha256(data).hexdigest() != manifest.files[name]:
                raise CheckpointError(f"{source / name}: changed while being published")

        needs = needed_base(manifest)

        def work(conn: psycopg.Connection) -> str:
            advisory_xact_lock(conn, _WRITERS_LOCK)
            if needs is not None and base_provider(needs, self._snapshot_tx(conn).versions) is None:
                raise RegistryError(
                    f"{source}: a LoRA adapter over base {needs[:12]}…, which is not in the "
                    "registry: publish its base (the full checkpoint) first"
                )
            (number,) = conn.execute(
                "SELECT COALESCE(MAX(number), 0) + 1 FROM registry_versions"
            ).fetchall()[0]
            version = version_name(number)
            stored = json.loads(manifest.with_version(version).to_json())
            conn.execute(
                "INSERT INTO registry_versions (number, version, manifest) VALUES (%s, %s, %s)",
                (number, version, Jsonb(stored)),
            )
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO registry_files (version, name, sha256, data) "
                    "VALUES (%s, %s, %s, %s)",
                    [(version, name, manifest.files[name], data) for name, data in blobs.items()],
                )
            _insert_decision(conn, Decision(version, PUBLISHED, reason, details or {}))
            if make_live:
                self._change_tx(
                    conn, lambda current: to_live(current, version, reason, PROMOTED, None), version
                )
            return version

        return self._pool.run("publish", work, transaction=True)

    def checkpoint_dir(self, version: str) -> Path:
        manifest, pruned = self._manifest_and_pruned(version)  # raises UnknownVersionError
        if pruned:
            shutil.rmtree(self.cache_dir / version, ignore_errors=True)
            raise _pruned_error(version)
        needs = needed_base(manifest)
        if needs is not None:
            # An adapter is loaded over the base beside it: materialise the base there too.
            snapshot = self._pool.run("checkpoint_dir", self._snapshot_tx, transaction=False)
            provider = base_provider(needs, snapshot.versions)
            if provider is not None:
                self.checkpoint_dir(provider)
        target = self.cache_dir / version
        if target.is_dir():
            try:
                verify_files(target, read_manifest(target))
                return target
            except CheckpointError:
                shutil.rmtree(target, ignore_errors=True)  # a damaged cache copy: fetch again
        # Binary results: a checkpoint's bytes as they are, not as hex text that the client must
        # decode while holding the interpreter lock: a stall that a serving event loop shows in
        # its tail latency (docs/performance.md has the measurement).
        rows = self._fetch(
            "checkpoint_dir",
            "SELECT name, sha256, data FROM registry_files WHERE version = %s",
            (version,),
            binary=True,
        )
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        staging = self.cache_dir / f".staging-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            for name, _, data in rows:
                (staging / name).write_bytes(bytes(data))
            write_manifest(staging, manifest)
            try:
                verify_files(staging, manifest)
            except CheckpointError as exc:
                raise CheckpointError(
                    f"version {version} in the registry at {redact(self.url)}: stored files "
                    f"fail verification: {exc}"
                ) from exc
            fsync_dir(staging)
            try:
                staging.rename(target)
            except OSError:
                if not target.is_dir():  # not a concurrent materialisation of the same version
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    # -- the live pointer ----------------------------------------------------------------------

    @staticmethod
    def _pointer_tx(conn: psycopg.Connection) -> LivePointer:
        row = conn.execute(
            "SELECT live, previous, trial, paused FROM registry_live WHERE id = 1"
        ).fetchone()
        if row is None:
            return LivePointer(None)
        live, previous, trial, paused = row
        return LivePointer(live, tuple(previous), Trial.from_dict(trial) if trial else None, paused)

    def pointer(self) -> LivePointer:
        return self._pool.run("pointer", self._pointer_tx, transaction=False)

    def _write_pointer_tx(self, conn: psycopg.Connection, pointer: LivePointer) -> None:
        trial = Jsonb(pointer.trial.to_dict()) if pointer.trial else None
        conn.execute(
            "INSERT INTO registry_live (id, live, previous, trial, paused) "
            "VALUES (1, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET live = EXCLUDED.live, "
            "previous = EXCLUDED.previous, trial = EXCLUDED.trial, paused = EXCLUDED.paused",
            (pointer.live, list(pointer.previous), trial, pointer.paused),
        )
        # Delivered to listeners only when this transaction commits.
        conn.execute("SELECT pg_notify(%s, %s)", (self.channel, pointer.live or ""))

    def _change_tx(
        self, conn: psycopg.Connection, transition: Transition, published: str | None
    ) -> LivePointer:
        if published is not None:
            self._require_servable_tx(conn, published)
        current = self._pointer_tx(conn)
        pointer, decisions = transition(current)
        for serving in (pointer.live, pointer.trial.version if pointer.trial else None):
            if serving is not None:
                self._require_servable_tx(conn, serving)  # a rollback to a pruned version
        if pointer != current:
            self._write_pointer_tx(conn, pointer)
        for decision in decisions:
            _insert_decision(conn, decision)
        return pointer

    def _unknown(self, version: str) -> UnknownVersionError:
        return UnknownVersionError(f"no version {version!r} in the registry at {redact(self.url)}")

    def _require_servable_tx(self, conn: psycopg.Connection, version: str) -> None:
        row = conn.execute(
            "SELECT pruned_at IS NOT NULL FROM registry_versions WHERE version = %s", (version,)
        ).fetchone()
        if row is None:
            raise self._unknown(version)
        if row[0]:
            raise _pruned_error(version)

    def _change(self, transition: Transition, *, published: str | None = None) -> LivePointer:
        def work(conn: psycopg.Connection) -> LivePointer:
            advisory_xact_lock(conn, _WRITERS_LOCK)
            return self._change_tx(conn, transition, published)

        return self._pool.run("change", work, transaction=True)

    def _listen(self) -> psycopg.Connection:
        if self._listener is None or self._listener.closed or self._listener.broken:
            conn = self._pool.connect()
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            self._listener = conn
        return self._listener

    def wait_for_change(self, last_seen: LivePointer | None, timeout_s: float) -> LivePointer:
        # One waiter at a time owns the listening connection; a concurrent waiter polls.
        if not self._listener_lock.acquire(blocking=False):
            return self._wait_polling(last_seen, timeout_s, time.sleep)
        try:
            # LISTEN before reading: a change in between wakes us. Should it fail, the fallback
            # poll still sees changes.
            with contextlib.suppress(psycopg.Error):
                self._listen()
            return self._wait_polling(last_seen, timeout_s, self._await_notification)
        finally:
            self._listener_lock.release()

    def _await_notification(self, wait_s: float) -> None:
        """Up to wait_s until a notification arrives (the caller holds the listener lock)."""
        listener = self._listener
        if listener is None or listener.closed or listener.broken:
            time.sleep(wait_s)
            return
        try:
            for _ in listener.notifies(timeout=wait_s, stop_after=1):
                pass
        except psycopg.Error:
            listener.close()
            self._listener = None

    # -- pins and retention --------------------------------------------------------------------

    def pins(self) -> list[str]:
        return [
            row[0]
            for row in self._fetch(
                "pins", "SELECT version FROM registry_versions WHERE pinned ORDER BY number"
            )
        ]

    def _set_pinned(self, version: str, pinned: bool, reason: str) -> bool:
        def work(conn: psycopg.Connection) -> bool:
            advisory_xact_lock(conn, _WRITERS_LOCK)
            if pinned:
                self._require_servable_tx(conn, version)
            row = conn.execute(
                "SELECT pinned FROM registry_versions WHERE version = %s", (version,)
            ).fetchone()
            if row is None:
                raise self._unknown(version)
            if row[0] == pinned:
                return False
            conn.execute(
                "UPDATE registry_versions SET pinned = %s WHERE version = %s", (pinned, version)
            )
            _insert_decision(conn, Decision(version, PINNED if pinned else UNPINNED, reason))
            return True

        return self._pool.run("pin", work, transaction=True)

    def _snapshot_tx(self, conn: psycopg.Connection) -> RegistrySnapshot:
        rows = conn.execute(
            "SELECT version, manifest->>'parent_version', "
            "CASE WHEN pruned_at IS NULL THEN manifest->'training_summary' END, "
            "pruned_at IS NOT NULL, pinned, manifest FROM registry_versions ORDER BY number"
        ).fetchall()
        facts = {}
        for v, parent, summary, pruned, _, stored in rows:
            manifest = Manifest.from_dict(stored)
            facts[v] = VersionFacts(
                parent, summary or {}, pruned, provided_base(manifest), needed_base(manifest)
            )
        pins = frozenset(v for v, _, _, _, pinned, _ in rows if pinned)
        return RegistrySnapshot(facts, self._pointer_tx(conn), pins)

    def _prune(self, planner: Planner, *, dry_run: bool, reason: str) -> PrunePlan:
        def work(conn: psycopg.Connection) -> PrunePlan:
            advisory_xact_lock(conn, _WRITERS_LOCK)
            plan = planner(self._snapshot_tx(conn))
            if dry_run or not plan.prune:
                return plan
            pruned = list(plan.prune)
            freed: dict[str, int] = dict(
                conn.execute(
                    "SELECT version, SUM(octet_length(data)) FROM registry_files "
                    "WHERE version = ANY(%s) GROUP BY version",
                    (pruned,),
                ).fetchall()
            )
            conn.execute(
                "UPDATE registry_versions SET pruned_at = %s WHERE version = ANY(%s)",
                (now_iso(), pruned),
            )
            conn.execute("DELETE FROM registry_files WHERE version = ANY(%s)", (pruned,))
            for version in pruned:
                _insert_decision(
                    conn, self._pruned_decision(version, reason, int(freed.get(version, 0)))
                )
            return plan

        plan = self._pool.run("prune", work, transaction=True)
        if not dry_run:
            for version in plan.prune:  # this machine's cached copies (others drop theirs on use)
                shutil.rmtree(self.cache_dir / version, ignore_errors=True)
        return plan

    # -- history -------------------------------------------------------------------------------

    def record(self, decision: Decision) -> None:
        if decision.action not in ACTIONS:
            raise ValueError(f"unknown action {decision.action!r}")

        def work(conn: psycopg.Connection) -> None:
            advisory_xact_lock(conn, _WRITERS_LOCK)
            _insert_decision(conn, decision)

        self._pool.run("record", work, transaction=True)

    def history(self, limit: int | None = None) -> list[Decision]:
        rows = self._fetch(
            "history",
            "SELECT version, action, reason, details, at FROM registry_history "
            "ORDER BY seq DESC LIMIT %s",
            (limit if limit else None,),
        )
        return [Decision(v, a, r, d, at) for v, a, r, d, at in rows]

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._pool.close()
