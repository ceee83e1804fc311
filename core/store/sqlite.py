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
import dataclasses
import fcntl
import functools
import json
import math
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from feedloop.core.errors import StoreFullError, StoreUnavailableError
from feedloop.core.human_eval import VerdictRecord
from feedloop.core.migrations import migrate
from feedloop.core.store.base import (
    ErasureRecord,
    ErasureTarget,
    FeedbackRecord,
    GenerationRecord,
    PrunedRows,
    ReplayStore,
    ShadowScore,
    StoreCounts,
    require_finite_logprobs,
)
from feedloop.core.store.outcomes import (
    JUDGING_KINDS,
    JudgedGeneration,
)
from feedloop.core.store.schema import (
    ERASURES_SELECT,
    FEEDBACK_COLUMNS,
    GENERATION_COLUMNS,
    SHADOW_SCORE_COLUMNS,
    SQLITE_MIGRATIONS,
    VERDICT_COLUMNS,
    erasure_insert,
    export_rows,
    sample_seqs,
    verdict_insert,
    verdicts_select,
)

_SQLITE_FULL = 13
_EXPORT_PAGE_ROWS = 500
# SQLite's default limit on bound parameters is 32766; stay well under it for IN (...) lists.
_MAX_IN_PARAMS = 900
# Pages an incremental vacuum step frees (4 KiB each: 8 MiB), one short write transaction.
_VACUUM_STEP_PAGES = 2048
# A file smaller than this that is not yet auto_vacuum=INCREMENTAL is converted when it is
# opened (its VACUUM takes well under a second); a larger one waits for `feedloop store vacuum`.
_CONVERT_AT_OPEN_BYTES = 64 << 20


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
        record.served_as,
        record.end_user,
        record.reply_id,
    )


def _generation_from_row(row: Sequence[Any]) -> GenerationRecord:
    seq, *fields = row
    values = dict(zip(GENERATION_COLUMNS, fields, strict=True))
    for key in ("prompt_ids", "output_ids", "behaviour_logprobs", "policy_logprobs", "sampling"):
        values[key] = json.loads(values[key])
    values["finished"] = bool(values["finished"])
    return GenerationRecord(**values, seq=seq)


def _ids_json(ids: list[str]) -> str:
    """compact JSON of a list of ids; a lone plain id (the server's own are hex) without the
    encoder, which costs five times as much as the rest of a feedback row's values."""
    if len(ids) == 1:
        only = ids[0]
        if only.isascii() and only.isalnum():
            return f'["{only}"]'
    return _compact(ids)


def _feedback_row(record: FeedbackRecord) -> tuple[Any, ...]:
    return (
        record.event_id,
        record.kind,
        _ids_json(record.generation_ids),
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
# Rows per multi-row INSERT: at most 500 x 17 bound parameters, under SQLite's limit (32766).
_INSERT_CHUNK_ROWS = 500


@functools.lru_cache(maxsize=256)
def _verdict_from_row(row: Sequence[Any]) -> VerdictRecord:
    fields = dict(zip(VERDICT_COLUMNS, row, strict=True))
    fields["a_shown_left"] = bool(fields["a_shown_left"])
    return VerdictRecord(**fields)


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


# feedback_generations (generation id -> feedback seq) is caught up in bulk, in the commit that
# leaves this many events unindexed, not row by row: its keys are random, so row by row each
# event dirtied a B-tree leaf of its own, and every dirty page is written whole to the WAL at
# each commit (docs/performance.md: about half the CPU per event). The unindexed tail, shorter
# than this, is what feedback_for scans, so this also bounds that scan.
_INDEX_CATCH_UP_ROWS = 8192


def _catch_up_index(conn: sqlite3.Connection, indexed_upto: int) -> None:
    """Index every event after indexed_upto, inside the caller's write transaction."""
    conn.execute(
        "INSERT OR IGNORE INTO feedback_generations (generation_id, feedback_seq) "
        "SELECT ids.value, feedback.seq FROM feedback, json_each(feedback.generation_ids) AS ids "
        "WHERE feedback.seq > ? ORDER BY 1, 2",
        (indexed_upto,),
    )
    conn.execute("UPDATE feedback_index SET indexed_upto = (SELECT MAX(seq) FROM feedback)")


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
            self._incremental_vacuum_at_open()

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
        # auto_vacuum must be chosen before the first table exists (it is a no-op on a file with
        # tables: see _incremental_vacuum_at_open); the journal mode comes after it.
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
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

    def _incremental_vacuum_at_open(self) -> None:
        """Retention gives space back by incremental vacuum, which needs auto_vacuum=INCREMENTAL
        in the file's header. A new file gets it before its first table (the pragma is free
        then); an older file needs one VACUUM, done here when the file is small and left to
        `feedloop store vacuum` when it is not (until then freed pages are reused, not given
        back)."""
        if self.vacuum_mode() == "incremental":
            return
        if self.size_bytes() <= _CONVERT_AT_OPEN_BYTES:
            # Best effort: another process writing all along (the server, as the trainer
            # starts) can keep the VACUUM from its lock past busy_timeout; the store then opens
            # as it is and a later open, or `feedloop store vacuum`, converts it.
            with contextlib.suppress(StoreUnavailableError):
                self.convert_to_incremental_vacuum()

    def _migrate(self) -> None:
        with self._transaction("migrate") as conn:
            migrate(
                conn,
                SQLITE_MIGRATIONS,
                placeholder="?",
                store_name=f"replay store {self.path}",
                error=StoreUnavailableError,
            )

    def _read(self, action: str, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._mapped_errors(action):
            return self._conn().execute(sql, params).fetchall()

    # -- writes --------------------------------------------------------------------------------

    def append_generations(self, records: Sequence[GenerationRecord]) -> None:
        if not records:
            return
        require_finite_logprobs(records)
        values = [value for record in records for value in _generation_row(record)]
        with self._transaction("append_generations") as conn:
            _insert_rows(
                conn,
                "generations",
                GENERATION_COLUMNS,
                values,
                " ON CONFLICT (generation_id) DO NOTHING",
            )

    def append_shadow_scores(self, scores: Sequence[ShadowScore]) -> None:
        if not scores:
            return
        values = [
            value
            for score in scores
            for value in (
                score.version,
                score.generation_id,
                _compact(score.logprobs),
                score.created_at,
            )
        ]
        with self._transaction("append_shadow_scores") as conn:
            _insert_rows(
                conn,
                "shadow_scores",
                SHADOW_SCORE_COLUMNS,
                values,
                " ON CONFLICT (version, generation_id) DO NOTHING",
            )

    def insert_feedback(self, records: Sequence[FeedbackRecord]) -> list[bool]:
        if not records:
            return []
        values = [value for record in records for value in _feedback_row(record)]
        with self._transaction("insert_feedback") as conn:
            # Safe to reason about seqs: BEGIN IMMEDIATE holds the write lock, so no other
            # writer, in this process or another, adds a row between these statements.
            last_seq, indexed_upto = conn.execute(
                "SELECT (SELECT COALESCE(MAX(seq), 0) FROM feedback), "
                "(SELECT indexed_upto FROM feedback_index)"
            ).fetchone()
            before = conn.total_changes
            # DO NOTHING also skips a repeat inside the same statement: the first one wins.
            _insert_rows(
                conn,
                "feedback",
                FEEDBACK_COLUMNS,
                values,
                " ON CONFLICT (client_id, event_id) DO NOTHING",
            )
            inserted = conn.total_changes - before
            if inserted == len(records):  # the common case: no duplicate, nothing to look up
                accepted = [True] * len(records)
            else:
                new_keys = {
                    (row[0], row[1])
                    for row in conn.execute(
                        "SELECT client_id, event_id FROM feedback WHERE seq > ?", (last_seq,)
                    )
                }
                accepted = []
                for record in records:
                    key = (record.client_id, record.event_id)
                    accepted.append(key in new_keys)
                    new_keys.discard(key)  # a later repeat in the batch: duplicate
            if inserted and last_seq + inserted - indexed_upto >= _INDEX_CATCH_UP_ROWS:
                _catch_up_index(conn, indexed_upto)
        return accepted

    def insert_verdict(self, record: VerdictRecord) -> bool:
        with self._transaction("insert_verdict") as conn:
            before = conn.total_changes
            conn.execute(verdict_insert("?"), dataclasses.astuple(record))
            return conn.total_changes > before

    def verdicts_between(self, version_a: str, version_b: str) -> list[VerdictRecord]:
        rows = self._read(
            "verdicts_between",
            verdicts_select("?"),
            (version_a, version_b, version_b, version_a),
        )
        return [_verdict_from_row(row) for row in rows]

    @contextlib.contextmanager
    def _bulk_delete(self, action: str) -> Iterator[None]:
        """Around an erasure or a retention batch, on this thread's connection (both pragmas
        are no-ops inside a transaction). foreign_keys off: the caller deletes the index rows of
        the events it deletes itself, and the check would scan the whole unindexed
        feedback_generations.feedback_seq for every deleted event (minutes for a thousand
        events among 100,000). secure_delete (erasures): the freed pages are overwritten with
        zeros, so erased content does not linger in the file's free pages."""
        secure = action == "erase"
        with self._mapped_errors(action):
            if secure:
                self._conn().execute("PRAGMA secure_delete=ON")
            self._conn().execute("PRAGMA foreign_keys=OFF")
        try:
            yield
        finally:
            with self._mapped_errors(action):
                self._conn().execute("PRAGMA foreign_keys=ON")
                if secure:
                    self._conn().execute("PRAGMA secure_delete=OFF")

    def erase_rows(
        self, target: ErasureTarget, *, requested_by: str, now: float, archive_rows: int
    ) -> ErasureRecord:
        with self._bulk_delete("erase"):
            return self._erase_rows(target, requested_by, now, archive_rows)

    def _erase_rows(
        self, target: ErasureTarget, requested_by: str, now: float, archive_rows: int
    ) -> ErasureRecord:
        column, value = (
            ("client_id", target.client_id) if target.client_id else ("end_user", target.end_user)
        )
        with self._transaction("erase") as conn:
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS erased_generations (id TEXT PRIMARY KEY)")
            conn.execute("DELETE FROM temp.erased_generations")
            conn.execute(
                "INSERT INTO temp.erased_generations SELECT generation_id FROM generations "
                f"WHERE {column} = ?",
                (value,),
            )
            # The client's own events (an end user has none: events carry no end-user key), and
            # any event naming one of the erased generations: through the index up to
            # indexed_upto, by a scan of the unindexed tail past it.
            (indexed_upto,) = conn.execute("SELECT indexed_upto FROM feedback_index").fetchone()
            conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS erased_feedback (seq INTEGER PRIMARY KEY)"
            )
            conn.execute("DELETE FROM temp.erased_feedback")
            conn.execute(
                "INSERT OR IGNORE INTO temp.erased_feedback "
                "SELECT seq FROM feedback WHERE client_id = ? "
                "UNION SELECT feedback_seq FROM feedback_generations "
                "WHERE generation_id IN (SELECT id FROM temp.erased_generations) "
                "UNION SELECT feedback.seq FROM feedback, json_each(feedback.generation_ids) AS ids"
                " WHERE feedback.seq > ? AND ids.value IN (SELECT id FROM temp.erased_generations)",
                (target.client_id or None, indexed_upto),
            )
            erased = "(SELECT seq FROM temp.erased_feedback)"
            conn.execute(f"DELETE FROM feedback_generations WHERE feedback_seq IN {erased}")
            feedback = conn.execute(f"DELETE FROM feedback WHERE seq IN {erased}").rowcount
            shadow_scores = conn.execute(
                "DELETE FROM shadow_scores "
                "WHERE generation_id IN (SELECT id FROM temp.erased_generations)"
            ).rowcount
            verdicts = conn.execute(
                # a client's own verdicts too; an end user gives none (raters are clients)
                "DELETE FROM verdicts WHERE (? <> '' AND rater = ?) "
                "OR generation_id_a IN (SELECT id FROM temp.erased_generations) "
                "OR generation_id_b IN (SELECT id FROM temp.erased_generations)",
                (target.client_id, target.client_id),
            ).rowcount
            generations = conn.execute(
                f"DELETE FROM generations WHERE {column} = ?", (value,)
            ).rowcount
            record = ErasureRecord(
                target.client_id,
                requested_by,
                now,
                generations,
                feedback,
                shadow_scores,
                target.end_user,
                archive_rows,
                verdicts,
            )
            if record.found:
                conn.execute(erasure_insert("?"), dataclasses.astuple(record))
            conn.execute("DELETE FROM temp.erased_generations")
            conn.execute("DELETE FROM temp.erased_feedback")
        return record

    # -- retention -----------------------------------------------------------------------------

    def generation_ages(
        self, after_seq: int, upto_seq: int, limit: int
    ) -> list[tuple[int, str, float]]:
        return [
            (int(seq), gid, float(created_at))
            for seq, gid, created_at in self._read(
                "generation_ages",
                "SELECT seq, generation_id, created_at FROM generations "
                "WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                (after_seq, upto_seq, limit),
            )
        ]

    def delete_pruned(
        self, generation_ids: Sequence[str], events: Sequence[FeedbackRecord], archive: str | None
    ) -> PrunedRows:
        if not generation_ids and not events:
            return PrunedRows()
        with self._bulk_delete("delete_pruned"), self._transaction("delete_pruned") as conn:
            feedback = shadow_scores = generations = 0
            conn.executemany(
                "DELETE FROM feedback_generations WHERE generation_id = ? AND feedback_seq = ?",
                [(gid, e.seq) for e in events for gid in dict.fromkeys(e.generation_ids)],
            )
            for start in range(0, len(events), _MAX_IN_PARAMS):
                chunk = [e.seq for e in events[start : start + _MAX_IN_PARAMS]]
                feedback += conn.execute(
                    f"DELETE FROM feedback WHERE seq IN ({', '.join('?' * len(chunk))})", chunk
                ).rowcount
            for start in range(0, len(generation_ids), _MAX_IN_PARAMS):
                ids = list(generation_ids[start : start + _MAX_IN_PARAMS])
                marks = ", ".join("?" * len(ids))
                shadow_scores += conn.execute(
                    f"DELETE FROM shadow_scores WHERE generation_id IN ({marks})", ids
                ).rowcount
                generations += conn.execute(
                    f"DELETE FROM generations WHERE generation_id IN ({marks})", ids
                ).rowcount
            if archive is not None:
                conn.execute(
                    "UPDATE archives SET generations = generations + ?, feedback = feedback + ? "
                    "WHERE path = ?",
                    (generations, feedback, archive),
                )
        return PrunedRows(generations, feedback, shadow_scores)

    def register_archive(self, path: str, now: float) -> None:
        with self._transaction("register_archive") as conn:
            conn.execute(
                "INSERT INTO archives (path, created_at, generations, feedback) "
                "VALUES (?, ?, 0, 0) ON CONFLICT (path) DO NOTHING",
                (path, now),
            )

    def archives(self) -> list[str]:
        return [
            row[0]
            for row in self._read("archives", "SELECT path FROM archives ORDER BY created_at, path")
        ]

    def cursors(self) -> dict[str, dict[str, Any]]:
        return {
            name: json.loads(value)
            for name, value in self._read("cursors", "SELECT name, value FROM cursors")
        }

    @contextlib.contextmanager
    def maintenance_lock(self) -> Iterator[None]:
        # A file lock beside the database: held across processes (the pruner, an erasure).
        with self._mapped_errors("maintenance lock"), open(f"{self.path}.maintenance", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def used_bytes(self) -> int:
        ((pages, free, page_size),) = self._read(
            "used_bytes",
            "SELECT (SELECT page_count FROM pragma_page_count), "
            "(SELECT freelist_count FROM pragma_freelist_count), "
            "(SELECT page_size FROM pragma_page_size)",
        )
        return int(pages - free) * int(page_size)

    def reclaim_space(self, pages_per_step: int = _VACUUM_STEP_PAGES) -> int:
        """Incremental vacuum in steps of pages_per_step pages (each one short write
        transaction, so the server's group commits pass between them), then a WAL checkpoint
        that truncates the log; bytes given back. Needs auto_vacuum=INCREMENTAL (see
        `vacuum_mode`); without it the freed pages are reused by later writes instead."""
        before = self.size_bytes()
        if self.vacuum_mode() != "incremental":
            return 0
        while True:
            with self._mapped_errors("reclaim_space"), self._write_lock:
                conn = self._conn()
                (free,) = conn.execute("PRAGMA freelist_count").fetchone()
                if not free:
                    break
                conn.execute(f"PRAGMA incremental_vacuum({int(pages_per_step)})").fetchall()
        with self._mapped_errors("reclaim_space"), self._write_lock:
            # TRUNCATE gives the log's space back too; a busy reader makes it a no-op, not an
            # error (the next checkpoint catches up).
            self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return max(0, before - self.size_bytes())

    def vacuum_mode(self) -> str:
        """The file's auto_vacuum mode: "none", "full" or "incremental"."""
        ((mode,),) = self._read("vacuum_mode", "PRAGMA auto_vacuum")
        return ("none", "full", "incremental")[int(mode)]

    def convert_to_incremental_vacuum(self) -> None:
        """Switch an existing file to auto_vacuum=INCREMENTAL: the mode only takes effect through
        a VACUUM, which rewrites the whole file (it needs as much free disk again, and holds
        the write lock throughout: writers wait, so run it while the server is stopped or
        quiet). Files feedloop creates are incremental from the start."""
        with self._mapped_errors("vacuum"), self._write_lock:
            conn = self._conn()
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("VACUUM")

    def backup(self, destination: Path) -> None:
        """A consistent copy of the store at destination, while writers go on: SQLite's online
        backup API in one step, which reads one snapshot of the WAL-mode file (writers are
        never blocked by a reader). Written beside destination and renamed into place."""
        destination = Path(destination)
        tmp = destination.with_name(f".{destination.name}.partial")
        tmp.unlink(missing_ok=True)
        with self._mapped_errors("backup"):
            target = sqlite3.connect(tmp)
            try:
                self._conn().backup(target)
                target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            finally:
                target.close()
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, destination)
            fd = os.open(destination.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def erasures(self) -> list[ErasureRecord]:
        rows = self._read(
            "erasures",
            ERASURES_SELECT,
        )
        return [ErasureRecord(*row) for row in rows]

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

    def shadow_scores(self, version: str, generation_ids: Sequence[str]) -> dict[str, ShadowScore]:
        found: dict[str, ShadowScore] = {}
        unique = list(dict.fromkeys(generation_ids))
        for start in range(0, len(unique), _MAX_IN_PARAMS):
            chunk = unique[start : start + _MAX_IN_PARAMS]
            sql = (
                f"SELECT {', '.join(SHADOW_SCORE_COLUMNS)} FROM shadow_scores "
                f"WHERE version = ? AND generation_id IN ({', '.join('?' * len(chunk))})"
            )
            for version_, gid, logprobs, created_at in self._read(
                "shadow_scores", sql, [version, *chunk]
            ):
                found[gid] = ShadowScore(gid, version_, json.loads(logprobs), created_at)
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

    def get_feedback(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], FeedbackRecord]:
        found: dict[tuple[str, str], FeedbackRecord] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), _MAX_IN_PARAMS // 2):
            chunk = unique[start : start + _MAX_IN_PARAMS // 2]
            marks = ", ".join(["(?, ?)"] * len(chunk))
            sql = f"{_FB_SELECT} WHERE (client_id, event_id) IN (VALUES {marks})"
            for row in self._read("get_feedback", sql, [v for key in chunk for v in key]):
                record = _feedback_from_row(row)
                found[record.client_id, record.event_id] = record
        return found

    def feedback_after(self, seq: int, limit: int) -> list[FeedbackRecord]:
        rows = self._read(
            "feedback_after", f"{_FB_SELECT} WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
        )
        return [_feedback_from_row(row) for row in rows]

    def feedback_for(self, generation_ids: Sequence[str]) -> list[FeedbackRecord]:
        unique = list(dict.fromkeys(generation_ids))
        by_seq: dict[int, FeedbackRecord] = {}
        # Read first: every event at or before it is in feedback_generations (index rows are
        # never removed), every later one is in the tail scanned below. A catch-up committed
        # in between only puts an event in both answers, and by_seq keeps it once.
        ((indexed_upto,),) = self._read("feedback_for", "SELECT indexed_upto FROM feedback_index")
        for start in range(0, len(unique), _MAX_IN_PARAMS):
            chunk = unique[start : start + _MAX_IN_PARAMS]
            marks = ", ".join("?" * len(chunk))
            indexed = (
                f"{_FB_SELECT} WHERE seq IN (SELECT feedback_seq FROM feedback_generations "
                f"WHERE generation_id IN ({marks}))"
            )
            tail = (
                f"{_FB_SELECT} WHERE seq > ? AND EXISTS (SELECT 1 FROM "
                f"json_each(feedback.generation_ids) AS ids WHERE ids.value IN ({marks}))"
            )
            rows = self._read("feedback_for", indexed, chunk)
            rows += self._read("feedback_for", tail, [indexed_upto, *chunk])
            for row in rows:
                record = _feedback_from_row(row)
                by_seq[record.seq] = record
        return [by_seq[seq] for seq in sorted(by_seq)]

    def judged_generations(
        self, since: float, until: float | None = None
    ) -> list[JudgedGeneration]:
        sql = (
            "SELECT feedback.seq, feedback.kind, feedback.score, feedback.scale, "
            "CAST(ids.key AS INTEGER), ids.value, generations.model_version, "
            "feedback.received_at, generations.served_as "
            "FROM feedback, json_each(feedback.generation_ids) AS ids "
            "JOIN generations ON generations.generation_id = ids.value "
            f"WHERE feedback.kind IN ({', '.join('?' * len(JUDGING_KINDS))}) "
            "AND feedback.received_at >= ?"
        )
        params: list[Any] = [*JUDGING_KINDS, since]
        if until is not None:
            sql += " AND feedback.received_at < ?"
            params.append(until)
        rows = self._read("judged_generations", sql + " ORDER BY feedback.seq, ids.key", params)
        return [JudgedGeneration(*row) for row in rows]

    def size_bytes(self) -> int:
        files = (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm"))
        return sum(f.stat().st_size for f in files if f.exists())

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
