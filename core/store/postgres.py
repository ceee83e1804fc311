"""The shared replay store: PostgreSQL via psycopg 3, for many server replicas and the trainer.

Same tables and meaning as the SQLite store (see feedloop.core.store.schema); the URL's
`?schema=NAME` picks the schema (see feedloop.core.postgres for URL, pool and reconnect).

Durability: a batch is one transaction; COMMIT returns after the WAL flush (the server's
synchronous_commit=on), and only then does insert_feedback return.

Ordering: trainers read "seq > cursor". An identity column hands out numbers at INSERT time, so
two writers committing in the other order would let a reader pass a row that commits later with
a smaller seq, and that row would never be read. Each write transaction therefore takes a
transaction-scoped advisory lock per table first: numbers are assigned in commit order. The
lock is held only for the length of one batch insert (group commit keeps those few).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from feedloop.core.errors import FeedloopError, StoreFullError, StoreUnavailableError
from feedloop.core.human_eval import VerdictRecord
from feedloop.core.migrations import migrate
from feedloop.core.postgres import Pool, advisory_xact_lock, is_disk_full
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
    POSTGRES_MIGRATIONS,
    SHADOW_SCORE_COLUMNS,
    erasure_insert,
    export_rows,
    sample_seqs,
    verdict_insert,
    verdicts_select,
)

_EXPORT_PAGE_ROWS = 500
_INSERT_CHUNK_ROWS = 1000
_GEN_SELECT = "SELECT seq, " + ", ".join(GENERATION_COLUMNS) + " FROM generations"
_FB_SELECT = "SELECT seq, " + ", ".join(FEEDBACK_COLUMNS) + " FROM feedback"


def _unavailable(message: str, exc: BaseException) -> FeedloopError:
    return StoreFullError(message) if is_disk_full(exc) else StoreUnavailableError(message)


def _values_clause(rows: int, columns: int) -> str:
    one = "(" + ", ".join(["%s"] * columns) + ")"
    return ", ".join([one] * rows)


def _insert_rows(
    conn: psycopg.Connection,
    table: str,
    columns: Sequence[str],
    rows: Sequence[tuple[Any, ...]],
    unique_key: str,
) -> None:
    """Insert rows in multi-row statements, skipping any whose unique_key is already stored."""
    for start in range(0, len(rows), _INSERT_CHUNK_ROWS):
        chunk = rows[start : start + _INSERT_CHUNK_ROWS]
        conn.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
            f"{_values_clause(len(chunk), len(columns))} ON CONFLICT ({unique_key}) DO NOTHING",
            [value for row in chunk for value in row],
        )


def _generation_params(record: GenerationRecord) -> tuple[Any, ...]:
    return (
        record.generation_id,
        record.request_id,
        record.prompt,
        record.prompt_ids,
        record.output_ids,
        record.behaviour_logprobs,
        record.policy_logprobs,
        record.finished,
        record.text,
        Jsonb(record.sampling),
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
    return GenerationRecord(**dict(zip(GENERATION_COLUMNS, fields, strict=True)), seq=seq)


# A batch of events in ONE statement whose text never changes (so the server plans it once):
# the rows travel as one JSON array, which the client encodes in C, where binding 9 parameters
# per row (or one array per column) makes psycopg adapt every value in Python, about three
# times the client CPU. Floats arrive exactly: JSON numbers are Python's round-trip repr, and
# PostgreSQL parses them with float8in. WITH ORDINALITY keeps seq in the records' order.
_FB_INSERT_JSON = (
    f"INSERT INTO feedback ({', '.join(FEEDBACK_COLUMNS)}) "
    f"SELECT {', '.join(FEEDBACK_COLUMNS)} FROM ROWS FROM (jsonb_to_recordset(%s::jsonb) AS ("
    "event_id text, kind text, generation_ids text[], client_id text, received_at float8, "
    "score float8, scale text, text text, given_at float8"
    f")) WITH ORDINALITY AS batch({', '.join(FEEDBACK_COLUMNS)}, position) ORDER BY position "
    # DO NOTHING also skips a repeat inside the same statement: the first one wins.
    "ON CONFLICT (client_id, event_id) DO NOTHING RETURNING client_id, event_id"
)
_strict_json = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode


def _feedback_json(records: Sequence[FeedbackRecord]) -> str:
    rows = [
        {
            "event_id": r.event_id,
            "kind": r.kind,
            "generation_ids": r.generation_ids,
            "client_id": r.client_id,
            "received_at": r.received_at,
            "score": r.score,
            "scale": r.scale,
            "text": r.text,
            "given_at": r.given_at,
        }
        for r in records
    ]
    try:
        return _strict_json(rows)
    except ValueError:  # NaN or an infinity: JSON has none, float8 reads them from strings
        return _strict_json([{k: _json_float(v) for k, v in row.items()} for row in rows])


def _json_float(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _feedback_from_row(row: Sequence[Any]) -> FeedbackRecord:
    seq, *fields = row
    return FeedbackRecord(**dict(zip(FEEDBACK_COLUMNS, fields, strict=True)), seq=seq)


class PostgresStore(ReplayStore):
    """A replay store in a PostgreSQL schema (tables created or migrated on open)."""

    def __init__(self, url: str, *, max_connections: int = 4) -> None:
        self.url = url
        self._pool = Pool(url, unavailable=_unavailable, max_connections=max_connections)
        self._pool.run("migrate", self._migrate, transaction=True)

    @staticmethod
    def _migrate(conn: psycopg.Connection) -> None:
        # Replicas starting together: one migrates, the others wait here and then find it done.
        advisory_xact_lock(conn, "schema_version")
        migrate(
            conn,
            POSTGRES_MIGRATIONS,
            placeholder="%s",
            store_name="replay store",
            error=StoreUnavailableError,
        )

    def _fetch(self, action: str, query: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._pool.run(
            action, lambda conn: conn.execute(query, params).fetchall(), transaction=False
        )

    # -- writes --------------------------------------------------------------------------------

    def append_generations(self, records: Sequence[GenerationRecord]) -> None:
        if not records:
            return
        require_finite_logprobs(records)
        rows = [_generation_params(r) for r in records]

        def work(conn: psycopg.Connection) -> None:
            advisory_xact_lock(conn, "generations")
            _insert_rows(conn, "generations", GENERATION_COLUMNS, rows, "generation_id")

        self._pool.run("append_generations", work, transaction=True)

    def append_shadow_scores(self, scores: Sequence[ShadowScore]) -> None:
        if not scores:
            return
        rows = [(s.version, s.generation_id, s.logprobs, s.created_at) for s in scores]
        self._pool.run(
            "append_shadow_scores",
            lambda conn: _insert_rows(
                conn, "shadow_scores", SHADOW_SCORE_COLUMNS, rows, "version, generation_id"
            ),
            transaction=True,
        )

    def insert_feedback(self, records: Sequence[FeedbackRecord]) -> list[bool]:
        if not records:
            return []
        documents = [
            _feedback_json(records[start : start + _INSERT_CHUNK_ROWS])
            for start in range(0, len(records), _INSERT_CHUNK_ROWS)
        ]

        def work(conn: psycopg.Connection) -> set[tuple[str, str]]:
            advisory_xact_lock(conn, "feedback")
            inserted: set[tuple[str, str]] = set()
            for document in documents:
                cursor = conn.execute(_FB_INSERT_JSON, (document,))
                inserted.update((row[0], row[1]) for row in cursor.fetchall())
            return inserted

        inserted = self._pool.run("insert_feedback", work, transaction=True)
        accepted: list[bool] = []
        for record in records:
            key = (record.client_id, record.event_id)
            accepted.append(key in inserted)
            inserted.discard(key)  # a later repeat in this batch is a duplicate
        return accepted

    def insert_verdict(self, record: VerdictRecord) -> bool:
        def work(conn: psycopg.Connection) -> bool:
            return conn.execute(verdict_insert("%s"), dataclasses.astuple(record)).rowcount > 0

        return bool(self._pool.run("insert_verdict", work, transaction=True))

    def verdicts_between(self, version_a: str, version_b: str) -> list[VerdictRecord]:
        rows = self._fetch(
            "verdicts_between",
            verdicts_select("%s"),
            (version_a, version_b, version_b, version_a),
        )
        return [VerdictRecord(*row) for row in rows]

    def erase_rows(
        self, target: ErasureTarget, *, requested_by: str, now: float, archive_rows: int
    ) -> ErasureRecord:
        column, value = (
            ("client_id", target.client_id) if target.client_id else ("end_user", target.end_user)
        )

        def work(conn: psycopg.Connection) -> ErasureRecord:
            # The writers' locks, in the order no writer reverses (each takes one): no feedback
            # naming a generation being erased commits beside this transaction.
            advisory_xact_lock(conn, "generations")
            advisory_xact_lock(conn, "feedback")
            erased_generations = f"SELECT generation_id FROM generations WHERE {column} = %(who)s"
            # Events naming an erased generation are found by a scan joined on the unnested id
            # arrays, not through their GIN index: with fastupdate the index's recent entries
            # sit in its pending list, which `&&` with the client's 1,000 ids searched once per
            # id (the erasure took 7.1 s among 100,000 events, 0.9 s with this scan; see
            # docs/performance.md). An end user sent no events of their own (events carry no
            # end-user key): only those naming their generations go.
            feedback = conn.execute(
                "DELETE FROM feedback WHERE client_id = %(client)s OR seq IN ("
                "SELECT f.seq FROM feedback AS f CROSS JOIN LATERAL unnest(f.generation_ids) AS "
                f"named(id) WHERE named.id IN ({erased_generations}))",
                {"client": target.client_id or None, "who": value},
            ).rowcount
            shadow_scores = conn.execute(
                f"DELETE FROM shadow_scores WHERE generation_id IN ({erased_generations})",
                {"who": value},
            ).rowcount
            verdicts = conn.execute(
                # a client's own verdicts too; an end user gives none (raters are clients)
                "DELETE FROM verdicts WHERE (%(client)s <> '' AND rater = %(client)s) "
                f"OR generation_id_a IN ({erased_generations}) "
                f"OR generation_id_b IN ({erased_generations})",
                {"client": target.client_id, "who": value},
            ).rowcount
            generations = conn.execute(
                f"DELETE FROM generations WHERE {column} = %s", (value,)
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
                conn.execute(erasure_insert("%s"), dataclasses.astuple(record))
            return record

        return self._pool.run("erase", work, transaction=True)

    # -- retention -----------------------------------------------------------------------------

    def generation_ages(
        self, after_seq: int, upto_seq: int, limit: int
    ) -> list[tuple[int, str, float]]:
        rows = self._fetch(
            "generation_ages",
            "SELECT seq, generation_id, created_at FROM generations "
            "WHERE seq > %s AND seq <= %s ORDER BY seq LIMIT %s",
            (after_seq, upto_seq, limit),
        )
        return [(int(seq), gid, float(created_at)) for seq, gid, created_at in rows]

    def delete_pruned(
        self, generation_ids: Sequence[str], events: Sequence[FeedbackRecord], archive: str | None
    ) -> PrunedRows:
        if not generation_ids and not events:
            return PrunedRows()
        ids, seqs = list(generation_ids), [e.seq for e in events]

        def work(conn: psycopg.Connection) -> PrunedRows:
            feedback = conn.execute(
                "DELETE FROM feedback WHERE seq = ANY(%s::bigint[])", (seqs,)
            ).rowcount
            shadow_scores = conn.execute(
                "DELETE FROM shadow_scores WHERE generation_id = ANY(%s::text[])", (ids,)
            ).rowcount
            generations = conn.execute(
                "DELETE FROM generations WHERE generation_id = ANY(%s::text[])", (ids,)
            ).rowcount
            if archive is not None:
                conn.execute(
                    "UPDATE archives SET generations = generations + %s, "
                    "feedback = feedback + %s WHERE path = %s",
                    (generations, feedback, archive),
                )
            return PrunedRows(generations, feedback, shadow_scores)

        return self._pool.run("delete_pruned", work, transaction=True)

    def register_archive(self, path: str, now: float) -> None:
        self._pool.run(
            "register_archive",
            lambda conn: conn.execute(
                "INSERT INTO archives (path, created_at, generations, feedback) "
                "VALUES (%s, %s, 0, 0) ON CONFLICT (path) DO NOTHING",
                (path, now),
            ),
            transaction=True,
        )

    def archives(self) -> list[str]:
        rows = self._fetch("archives", "SELECT path FROM archives ORDER BY created_at, path")
        return [row[0] for row in rows]

    def cursors(self) -> dict[str, dict[str, Any]]:
        return dict(self._fetch("cursors", "SELECT name, value FROM cursors"))

    def reclaim_space(self) -> int:
        """A plain VACUUM of the pruned tables right after a prune, rather than waiting for
        autovacuum: it marks the deleted rows' space reusable, so the next inserts fill it and
        the tables stop growing. It takes no lock that blocks reads or writes (unlike VACUUM
        FULL, which would give the space back to the file system but locks the table while it
        rewrites it). The file system gets nothing back: 0."""

        def work(conn: psycopg.Connection) -> None:
            conn.execute("VACUUM generations, feedback, shadow_scores")

        self._pool.run("reclaim_space", work, transaction=False)
        return 0

    @contextlib.contextmanager
    def maintenance_lock(self) -> Iterator[None]:
        # A session advisory lock on a connection of its own (the pool's are shared): held
        # across processes and replicas, released when the connection closes if we die.
        try:
            conn = self._pool.connect()
        except psycopg.Error as exc:
            raise _unavailable(f"PostgreSQL: maintenance lock failed: {exc}", exc) from exc
        try:
            conn.execute("SELECT pg_advisory_lock(hashtext(current_schema() || '.maintenance'))")
            yield
        finally:
            conn.close()

    def erasures(self) -> list[ErasureRecord]:
        rows = self._fetch(
            "erasures",
            ERASURES_SELECT,
        )
        return [ErasureRecord(*row) for row in rows]

    def set_cursor(self, name: str, value: dict[str, Any]) -> None:
        self._pool.run(
            "set_cursor",
            lambda conn: conn.execute(
                "INSERT INTO cursors (name, value) VALUES (%s, %s) "
                "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                (name, Jsonb(value)),
            ),
            transaction=True,
        )

    # -- reads ---------------------------------------------------------------------------------

    def get_generations(self, generation_ids: Sequence[str]) -> dict[str, GenerationRecord]:
        rows = self._fetch(
            "get_generations",
            f"{_GEN_SELECT} WHERE generation_id = ANY(%s::text[])",
            (list(dict.fromkeys(generation_ids)),),
        )
        records = [_generation_from_row(row) for row in rows]
        return {r.generation_id: r for r in records}

    def shadow_scores(self, version: str, generation_ids: Sequence[str]) -> dict[str, ShadowScore]:
        rows = self._fetch(
            "shadow_scores",
            f"SELECT {', '.join(SHADOW_SCORE_COLUMNS)} FROM shadow_scores "
            "WHERE version = %s AND generation_id = ANY(%s::text[])",
            (version, list(dict.fromkeys(generation_ids))),
        )
        return {
            gid: ShadowScore(gid, version_, logprobs, created_at)
            for version_, gid, logprobs, created_at in rows
        }

    def generations_after(self, seq: int, limit: int) -> list[GenerationRecord]:
        rows = self._fetch(
            "generations_after",
            f"{_GEN_SELECT} WHERE seq > %s ORDER BY seq LIMIT %s",
            (seq, limit),
        )
        return [_generation_from_row(row) for row in rows]

    def sample_generations(self, before_seq: int, n: int, seed: int) -> list[GenerationRecord]:
        seqs = self._fetch(
            "sample_generations",
            "SELECT seq FROM generations WHERE seq <= %s ORDER BY seq",
            (before_seq,),
        )
        chosen = sample_seqs([row[0] for row in seqs], n, seed)
        if not chosen:
            return []
        rows = self._fetch(
            "sample_generations",
            f"{_GEN_SELECT} WHERE seq = ANY(%s::bigint[]) ORDER BY seq",
            (chosen,),
        )
        return [_generation_from_row(row) for row in rows]

    def get_feedback(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], FeedbackRecord]:
        if not keys:
            return {}
        unique = list(dict.fromkeys(keys))
        rows = self._fetch(
            "get_feedback",
            f"{_FB_SELECT} WHERE (client_id, event_id) IN "
            "(SELECT * FROM unnest(%s::text[], %s::text[]))",
            ([k[0] for k in unique], [k[1] for k in unique]),
        )
        records = [_feedback_from_row(row) for row in rows]
        return {(r.client_id, r.event_id): r for r in records}

    def feedback_after(self, seq: int, limit: int) -> list[FeedbackRecord]:
        rows = self._fetch(
            "feedback_after",
            f"{_FB_SELECT} WHERE seq > %s ORDER BY seq LIMIT %s",
            (seq, limit),
        )
        return [_feedback_from_row(row) for row in rows]

    def feedback_for(self, generation_ids: Sequence[str]) -> list[FeedbackRecord]:
        if not generation_ids:
            return []
        rows = self._fetch(
            "feedback_for",
            f"{_FB_SELECT} WHERE generation_ids && %s::text[] ORDER BY seq",
            (list(dict.fromkeys(generation_ids)),),
        )
        return [_feedback_from_row(row) for row in rows]

    def judged_generations(
        self, since: float, until: float | None = None
    ) -> list[JudgedGeneration]:
        sql = (
            "SELECT feedback.seq, feedback.kind, feedback.score, feedback.scale, "
            "ids.position::integer - 1, ids.generation_id, generations.model_version, "
            "feedback.received_at, generations.served_as "
            "FROM feedback CROSS JOIN LATERAL unnest(feedback.generation_ids) "
            "WITH ORDINALITY AS ids(generation_id, position) "
            "JOIN generations ON generations.generation_id = ids.generation_id "
            "WHERE feedback.kind = ANY(%s::text[]) AND feedback.received_at >= %s"
        )
        params: list[Any] = [list(JUDGING_KINDS), since]
        if until is not None:
            sql += " AND feedback.received_at < %s"
            params.append(until)
        rows = self._fetch(
            "judged_generations", sql + " ORDER BY feedback.seq, ids.position", params
        )
        return [JudgedGeneration(*row) for row in rows]

    def size_bytes(self) -> int:
        rows = self._fetch(
            "size_bytes",
            "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind = 'r'",
        )
        return int(rows[0][0])

    def max_seq(self) -> tuple[int, int]:
        row = self._fetch(
            "max_seq",
            "SELECT (SELECT COALESCE(MAX(seq), 0) FROM generations), "
            "(SELECT COALESCE(MAX(seq), 0) FROM feedback)",
        )[0]
        return int(row[0]), int(row[1])

    def counts(self) -> StoreCounts:
        generations = self._fetch("counts", "SELECT COUNT(*) FROM generations")[0][0]
        by_kind = dict(self._fetch("counts", "SELECT kind, COUNT(*) FROM feedback GROUP BY kind"))
        return StoreCounts(int(generations), sum(by_kind.values()), by_kind)

    def get_cursor(self, name: str) -> dict[str, Any] | None:
        rows = self._fetch("get_cursor", "SELECT value FROM cursors WHERE name = %s", (name,))
        if not rows:
            return None
        value = rows[0][0]
        return json.loads(value) if isinstance(value, str) else value

    def iter_export(self) -> Iterator[dict[str, Any]]:
        return export_rows(self, _EXPORT_PAGE_ROWS)

    def schema_version(self) -> int:
        return int(self._fetch("schema_version", "SELECT version FROM schema_version")[0][0])

    def close(self) -> None:
        self._pool.close()
