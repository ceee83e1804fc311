"""The replay store's versioned schema: ordered migrations per backend, and the export format.

Each backend keeps a one-row `schema_version` table, brought up to date at open by
`feedloop.core.migrations.migrate` (all of it in one transaction). A migration, once released,
is never edited: changes are new entries appended to the list.

Both backends carry the same tables with the same meaning:
    generations           seq (store-assigned, strictly increasing), generation_id unique, and
                          every field of GenerationRecord
    feedback              seq, (client_id, event_id) unique, every field of FeedbackRecord
    feedback_generations  (SQLite) generation id -> feedback seq, so `feedback_for` is an
                          indexed lookup; caught up in bulk to feedback_index.indexed_upto
                          (SQLite); PostgreSQL uses a GIN index on the id array instead
    cursors               name -> JSON value (the trainer's progress)
    shadow_scores         (version, generation_id) -> a shadow version's per-token
                          log-probabilities of a live generation's output, created_at
    erasures              one row per erasure that found something: the client id or end-user
                          key, who asked, when, rows deleted per table and archive rows
                          rewritten away (never the erased content)
    archives              one row per archive file retention wrote (path, rows in it), so an
                          erasure can rewrite every archive the store wrote
    verdicts              seq, verdict_id unique, every field of a human evaluation's
                          VerdictRecord (feedloop.core.human_eval), read by version pair; an
                          erasure deletes a client's verdicts and counts them (migration 10)
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Sequence
from typing import Any

from feedloop.core.human_eval import VerdictRecord
from feedloop.core.store.base import FeedbackRecord, GenerationRecord, ReplayStore

SQLITE_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: the initial schema. Lists are compact JSON text: exact for floats (repr round-trips)
    # and readable with the sqlite3 shell when debugging a production store.
    (
        """CREATE TABLE generations (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            generation_id TEXT NOT NULL UNIQUE,
            request_id TEXT NOT NULL,
            prompt TEXT NOT NULL,
            prompt_ids TEXT NOT NULL,
            output_ids TEXT NOT NULL,
            behaviour_logprobs TEXT NOT NULL,
            policy_logprobs TEXT NOT NULL,
            finished INTEGER NOT NULL,
            text TEXT NOT NULL,
            sampling TEXT NOT NULL,
            model_version TEXT NOT NULL,
            client_id TEXT NOT NULL,
            created_at REAL NOT NULL,
            candidate_index INTEGER NOT NULL,
            num_candidates INTEGER NOT NULL
        )""",
        """CREATE TABLE feedback (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            event_id TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL,
            generation_ids TEXT NOT NULL,
            client_id TEXT NOT NULL,
            received_at REAL NOT NULL,
            score REAL,
            scale TEXT,
            text TEXT,
            given_at REAL
        )""",
        """CREATE TABLE feedback_generations (
            generation_id TEXT NOT NULL,
            feedback_seq INTEGER NOT NULL REFERENCES feedback(seq),
            PRIMARY KEY (generation_id, feedback_seq)
        ) WITHOUT ROWID""",
        "CREATE TABLE cursors (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
    # 2: the trainer reads windows by model version (staleness bounds).
    ("CREATE INDEX generations_model_version ON generations (model_version, seq)",),
    # 3: feedback_generations is caught up in bulk, not row by row in every group commit: its
    # key (a generation id) is random, so each event dirtied a leaf page of its own, written
    # whole to the WAL at every commit. Events past `indexed_upto` are found by a scan of that
    # bounded tail. Every existing event was indexed when it was written.
    (
        "CREATE TABLE feedback_index (indexed_upto INTEGER NOT NULL)",
        "INSERT INTO feedback_index (indexed_upto) SELECT COALESCE(MAX(seq), 0) FROM feedback",
    ),
    # 4: the online report (online_outcomes) reads the feedback received in a time range.
    ("CREATE INDEX feedback_received_at ON feedback (received_at)",),
    # 5: why each generation's version served it (live, canary, pinned); "" for older rows.
    ("ALTER TABLE generations ADD COLUMN served_as TEXT NOT NULL DEFAULT ''",),
    # 6: a shadow version's log-probabilities of live generations' outputs (see ShadowScore),
    # read by version and generation id.
    (
        """CREATE TABLE shadow_scores (
            version TEXT NOT NULL,
            generation_id TEXT NOT NULL,
            logprobs TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (version, generation_id)
        ) WITHOUT ROWID""",
    ),
    # 7: the record of erasures (a client's data deleted on request).
    (
        """CREATE TABLE erasures (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            client_id TEXT NOT NULL,
            requested_by TEXT NOT NULL,
            erased_at REAL NOT NULL,
            generations INTEGER NOT NULL,
            feedback INTEGER NOT NULL,
            shadow_scores INTEGER NOT NULL
        )""",
    ),
    # 8: the app's end-user key per generation (erasure by end user; the partial index keeps
    # rows without one out of it), erasures by end user and of archive rows, and the archive
    # files retention wrote (an erasure rewrites each of them).
    (
        "ALTER TABLE generations ADD COLUMN end_user TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX generations_end_user ON generations (end_user) WHERE end_user <> ''",
        "ALTER TABLE erasures ADD COLUMN end_user TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE erasures ADD COLUMN archive_rows INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE archives (
            path TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            generations INTEGER NOT NULL,
            feedback INTEGER NOT NULL
        )""",
    ),
    # 9: tenancy and server-issued replies. An event id is the idempotency key of its client
    # (the tenant: see GenerationRecord.client_id), not of the whole store: another tenant's
    # "order-42" is another event. SQLite cannot drop a column's UNIQUE, so feedback is rebuilt
    # (seq values kept, and the AUTOINCREMENT high-water mark, which the trainer's cursor relies
    # on never going back); its index table, which references it, is rebuilt around it. Every
    # generation gets the id of the reply that served it ("" for older rows).
    (
        "ALTER TABLE generations ADD COLUMN reply_id TEXT NOT NULL DEFAULT ''",
        """CREATE TABLE feedback_v9 (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            event_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            generation_ids TEXT NOT NULL,
            client_id TEXT NOT NULL,
            received_at REAL NOT NULL,
            score REAL,
            scale TEXT,
            text TEXT,
            given_at REAL,
            UNIQUE (client_id, event_id)
        )""",
        "INSERT INTO feedback_v9 SELECT * FROM feedback ORDER BY seq",
        "CREATE TEMP TABLE feedback_generations_v9 AS SELECT * FROM feedback_generations",
        "CREATE TEMP TABLE feedback_seq_v9 AS "
        "SELECT seq FROM sqlite_sequence WHERE name = 'feedback'",
        "DROP TABLE feedback_generations",
        "DROP TABLE feedback",
        "ALTER TABLE feedback_v9 RENAME TO feedback",
        """INSERT INTO sqlite_sequence (name, seq) SELECT 'feedback', 0
            WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'feedback')""",
        """UPDATE sqlite_sequence
            SET seq = MAX(seq, COALESCE((SELECT MAX(seq) FROM temp.feedback_seq_v9), 0))
            WHERE name = 'feedback'""",
        """CREATE TABLE feedback_generations (
            generation_id TEXT NOT NULL,
            feedback_seq INTEGER NOT NULL REFERENCES feedback(seq),
            PRIMARY KEY (generation_id, feedback_seq)
        ) WITHOUT ROWID""",
        "INSERT INTO feedback_generations SELECT * FROM temp.feedback_generations_v9",
        "DROP TABLE temp.feedback_generations_v9",
        "DROP TABLE temp.feedback_seq_v9",
        "CREATE INDEX feedback_received_at ON feedback (received_at)",
    ),
    # 10: human evaluation: raters' blind verdicts on two versions' candidates for one prompt.
    (
        """CREATE TABLE verdicts (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            verdict_id TEXT NOT NULL UNIQUE,
            session_id TEXT NOT NULL,
            rater TEXT NOT NULL,
            version_a TEXT NOT NULL,
            generation_id_a TEXT NOT NULL,
            version_b TEXT NOT NULL,
            generation_id_b TEXT NOT NULL,
            choice TEXT NOT NULL,
            a_shown_left INTEGER NOT NULL,
            prompt TEXT NOT NULL,
            received_at REAL NOT NULL,
            given_at REAL
        )""",
        "CREATE INDEX verdicts_versions ON verdicts (version_a, version_b)",
        # An erasure deletes the client's verdicts too, and counts them.
        "ALTER TABLE erasures ADD COLUMN verdicts INTEGER NOT NULL DEFAULT 0",
    ),
)

POSTGRES_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE generations (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            generation_id TEXT NOT NULL UNIQUE,
            request_id TEXT NOT NULL,
            prompt TEXT NOT NULL,
            prompt_ids INTEGER[] NOT NULL,
            output_ids INTEGER[] NOT NULL,
            behaviour_logprobs DOUBLE PRECISION[] NOT NULL,
            policy_logprobs DOUBLE PRECISION[] NOT NULL,
            finished BOOLEAN NOT NULL,
            text TEXT NOT NULL,
            sampling JSONB NOT NULL,
            model_version TEXT NOT NULL,
            client_id TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            candidate_index INTEGER NOT NULL,
            num_candidates INTEGER NOT NULL
        )""",
        """CREATE TABLE feedback (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            event_id TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL,
            generation_ids TEXT[] NOT NULL,
            client_id TEXT NOT NULL,
            received_at DOUBLE PRECISION NOT NULL,
            score DOUBLE PRECISION,
            scale TEXT,
            text TEXT,
            given_at DOUBLE PRECISION
        )""",
        # `generation_ids && ARRAY[...]` is answered from this index: feedback_for stays indexed.
        "CREATE INDEX feedback_generation_ids ON feedback USING GIN (generation_ids)",
        "CREATE TABLE cursors (name TEXT PRIMARY KEY, value JSONB NOT NULL)",
    ),
    ("CREATE INDEX generations_model_version ON generations (model_version, seq)",),
    # 3: SQLite's migration 3 defers its generation index to bulk catch-ups. The GIN index does
    # the same on its own (new entries go to a pending list, merged in bulk), as long as
    # fastupdate is on: the default, made explicit so no one turns it off unawares.
    ("ALTER INDEX feedback_generation_ids SET (fastupdate = on)",),
    ("CREATE INDEX feedback_received_at ON feedback (received_at)",),
    ("ALTER TABLE generations ADD COLUMN served_as TEXT NOT NULL DEFAULT ''",),
    (
        """CREATE TABLE shadow_scores (
            version TEXT NOT NULL,
            generation_id TEXT NOT NULL,
            logprobs DOUBLE PRECISION[] NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (version, generation_id)
        )""",
    ),
    (
        """CREATE TABLE erasures (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            client_id TEXT NOT NULL,
            requested_by TEXT NOT NULL,
            erased_at DOUBLE PRECISION NOT NULL,
            generations BIGINT NOT NULL,
            feedback BIGINT NOT NULL,
            shadow_scores BIGINT NOT NULL
        )""",
    ),
    (
        "ALTER TABLE generations ADD COLUMN end_user TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX generations_end_user ON generations (end_user) WHERE end_user <> ''",
        "ALTER TABLE erasures ADD COLUMN end_user TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE erasures ADD COLUMN archive_rows BIGINT NOT NULL DEFAULT 0",
        """CREATE TABLE archives (
            path TEXT PRIMARY KEY,
            created_at DOUBLE PRECISION NOT NULL,
            generations BIGINT NOT NULL,
            feedback BIGINT NOT NULL
        )""",
    ),
    # 9: see SQLite's 9. The new key's index leads with client_id: a tenant's events are found
    # by it (erasure) as well.
    (
        "ALTER TABLE generations ADD COLUMN reply_id TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE feedback DROP CONSTRAINT feedback_event_id_key",
        "ALTER TABLE feedback ADD CONSTRAINT feedback_client_event_key "
        "UNIQUE (client_id, event_id)",
    ),
    # 10: see SQLite's 10.
    (
        """CREATE TABLE verdicts (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            verdict_id TEXT NOT NULL UNIQUE,
            session_id TEXT NOT NULL,
            rater TEXT NOT NULL,
            version_a TEXT NOT NULL,
            generation_id_a TEXT NOT NULL,
            version_b TEXT NOT NULL,
            generation_id_b TEXT NOT NULL,
            choice TEXT NOT NULL,
            a_shown_left BOOLEAN NOT NULL,
            prompt TEXT NOT NULL,
            received_at DOUBLE PRECISION NOT NULL,
            given_at DOUBLE PRECISION
        )""",
        "CREATE INDEX verdicts_versions ON verdicts (version_a, version_b)",
        # An erasure deletes the client's verdicts too, and counts them.
        "ALTER TABLE erasures ADD COLUMN verdicts BIGINT NOT NULL DEFAULT 0",
    ),
)

LATEST_VERSION = len(SQLITE_MIGRATIONS)


assert len(POSTGRES_MIGRATIONS) == LATEST_VERSION, "both backends share one schema version"

GENERATION_COLUMNS: tuple[str, ...] = (
    "generation_id",
    "request_id",
    "prompt",
    "prompt_ids",
    "output_ids",
    "behaviour_logprobs",
    "policy_logprobs",
    "finished",
    "text",
    "sampling",
    "model_version",
    "client_id",
    "created_at",
    "candidate_index",
    "num_candidates",
    "served_as",
    "end_user",
    "reply_id",
)
SHADOW_SCORE_COLUMNS: tuple[str, ...] = ("version", "generation_id", "logprobs", "created_at")
ERASURE_COLUMNS: tuple[str, ...] = (
    "client_id",
    "requested_by",
    "erased_at",
    "generations",
    "feedback",
    "shadow_scores",
    "end_user",
    "archive_rows",
    "verdicts",
)
ERASURES_SELECT = "SELECT " + ", ".join(ERASURE_COLUMNS) + " FROM erasures ORDER BY seq"


def erasure_insert(placeholder: str) -> str:
    """The INSERT of one erasure record (its fields in ERASURE_COLUMNS order)."""
    values = ", ".join([placeholder] * len(ERASURE_COLUMNS))
    return f"INSERT INTO erasures ({', '.join(ERASURE_COLUMNS)}) VALUES ({values})"


VERDICT_COLUMNS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(VerdictRecord))


def verdict_insert(placeholder: str) -> str:
    """The INSERT of one verdict (its fields in VERDICT_COLUMNS order), skipping a repeated id."""
    values = ", ".join([placeholder] * len(VERDICT_COLUMNS))
    return (
        f"INSERT INTO verdicts ({', '.join(VERDICT_COLUMNS)}) VALUES ({values}) "
        "ON CONFLICT (verdict_id) DO NOTHING"
    )


def verdicts_select(placeholder: str) -> str:
    """The SELECT of every verdict on two versions, in either order (4 parameters: a, b, b, a)."""
    p = placeholder
    return (
        f"SELECT {', '.join(VERDICT_COLUMNS)} FROM verdicts "
        f"WHERE (version_a = {p} AND version_b = {p}) OR (version_a = {p} AND version_b = {p}) "
        "ORDER BY seq"
    )


FEEDBACK_COLUMNS: tuple[str, ...] = (
    "event_id",
    "kind",
    "generation_ids",
    "client_id",
    "received_at",
    "score",
    "scale",
    "text",
    "given_at",
)


def sample_seqs(candidate_seqs: Sequence[int], n: int, seed: int) -> list[int]:
    """A seeded uniform sample (without replacement) of up to n seqs, in ascending order.

    Both backends draw from the same ascending list with the same generator, so one seed gives
    the same sample on SQLite and PostgreSQL holding the same rows.
    """
    if n <= 0 or not candidate_seqs:
        return []
    chosen = random.Random(seed).sample(list(candidate_seqs), min(n, len(candidate_seqs)))
    return sorted(chosen)


def export_row(generation: GenerationRecord, feedback: Sequence[FeedbackRecord]) -> dict[str, Any]:
    """One JSON Lines row of `feedloop store export`: a generation with its events, oldest first."""
    row = dataclasses.asdict(generation)
    row["feedback"] = [dataclasses.asdict(event) for event in feedback]
    return row


def export_rows(store: ReplayStore, page_rows: int) -> Iterator[dict[str, Any]]:
    """Every generation with its events, oldest first, read a page at a time (bounded memory)."""
    last_seq = 0
    while page := store.generations_after(last_seq, page_rows):
        events: dict[str, list[FeedbackRecord]] = {}
        for event in store.feedback_for([g.generation_id for g in page]):
            for gid in dict.fromkeys(event.generation_ids):
                events.setdefault(gid, []).append(event)
        for generation in page:
            yield export_row(generation, events.get(generation.generation_id, []))
        last_seq = page[-1].seq
