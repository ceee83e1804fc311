"""Replay store write throughput: durable feedback inserts, one commit per event vs group commit.

For each backend (SQLite in WAL with synchronous=FULL; PostgreSQL with synchronous_commit on) it
measures rows/s of `insert_feedback` with one event per call (one commit, one fsync each) and
with batches of 100 (the server's group commit), plus `append_generations` in batches of 100.
Each figure is the median of --runs runs on a fresh store, set beside a ceiling measured in the
same run: the bare driver inserting the same rows in batches of 100 with nothing of ours around
it, so the ratio holds on a noisy machine (on a shared disk every figure here is bound by fsync
latency, which others' work moves by 10x; the ratio moves far less).

    .venv/bin/python bench/bench_store.py [--runs 5] [--postgres URL | --no-postgres]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from feedloop.core.store import FeedbackRecord, GenerationRecord, ReplayStore, open_store

BATCH = 100


def feedback_events(n: int, prefix: str) -> list[FeedbackRecord]:
    return [
        FeedbackRecord(
            f"{prefix}-{i}", "rating", [f"g{i % 500}"], "bench", 1.0, score=0.5, scale="unit"
        )
        for i in range(n)
    ]


def generations(n: int, prefix: str) -> list[GenerationRecord]:
    return [
        GenerationRecord(
            f"{prefix}-{i}",
            "r",
            "a prompt",
            [2, 17, 33, 9],
            list(range(12)),
            [-0.5] * 12,
            [-0.6] * 12,
            True,
            "some text",
            {"temperature": 1.0},
            "v0001",
            "bench",
            1.0,
        )
        for i in range(n)
    ]


def timed_rows_per_s(rows: int, action: Callable[[], None]) -> float:
    start = time.perf_counter()
    action()
    return rows / (time.perf_counter() - start)


def one_run(
    open_fresh: Callable[[], ReplayStore], n_single: int, n_batched: int
) -> dict[str, float]:
    figures: dict[str, float] = {}
    store = open_fresh()
    try:
        singles = feedback_events(n_single, "s")

        def one_commit_each() -> None:
            for event in singles:
                store.insert_feedback([event])

        figures["feedback, 1 per commit"] = timed_rows_per_s(n_single, one_commit_each)
        batched = feedback_events(n_batched, "b")

        def group_commit() -> None:
            for start in range(0, n_batched, BATCH):
                store.insert_feedback(batched[start : start + BATCH])

        figures[f"feedback, {BATCH} per commit"] = timed_rows_per_s(n_batched, group_commit)
        gens = generations(n_batched, "g")

        def append() -> None:
            for start in range(0, n_batched, BATCH):
                store.append_generations(gens[start : start + BATCH])

        figures[f"generations, {BATCH} per commit"] = timed_rows_per_s(n_batched, append)
    finally:
        store.close()
    return figures


def sqlite_ceiling(path: Path, n: int) -> float:
    """Bare sqlite3, same pragmas, same rows, executemany in batches of 100."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE t (event_id TEXT UNIQUE, kind TEXT, ids TEXT, client TEXT, "
        "at REAL, score REAL, scale TEXT)"
    )
    rows = [
        (
            e.event_id,
            e.kind,
            json.dumps(e.generation_ids),
            e.client_id,
            e.received_at,
            e.score,
            e.scale,
        )
        for e in feedback_events(n, "c")
    ]

    def insert() -> None:
        for start in range(0, n, BATCH):
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO t VALUES (?, ?, ?, ?, ?, ?, ?)", rows[start : start + BATCH]
            )
            conn.execute("COMMIT")

    try:
        return timed_rows_per_s(n, insert)
    finally:
        conn.close()


def postgres_ceiling(url: str, n: int) -> float:
    """Bare psycopg, same rows, one multi-row INSERT per transaction of 100 (no conflict checks)."""
    from feedloop.core.errors import StoreUnavailableError
    from feedloop.core.postgres import Pool

    conn = Pool(url, unavailable=lambda message, exc: StoreUnavailableError(message)).connect()
    conn.execute(
        "CREATE TABLE ceiling (event_id TEXT UNIQUE, kind TEXT, ids TEXT[], "
        "client TEXT, at DOUBLE PRECISION, score DOUBLE PRECISION, scale TEXT)"
    )
    rows = [
        (e.event_id, e.kind, e.generation_ids, e.client_id, e.received_at, e.score, e.scale)
        for e in feedback_events(n, "c")
    ]
    values = ", ".join(["(%s, %s, %s, %s, %s, %s, %s)"] * BATCH)

    def insert() -> None:
        for start in range(0, n, BATCH):
            with conn.transaction():
                chunk = rows[start : start + BATCH]
                conn.execute(f"INSERT INTO ceiling VALUES {values}", [v for r in chunk for v in r])

    try:
        return timed_rows_per_s(n, insert)
    finally:
        conn.execute("DROP TABLE ceiling")
        conn.close()


def drop_schema(admin_url: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def bench_backend(
    name: str,
    runs: int,
    n_single: int,
    n_batched: int,
    open_fresh: Callable[[], ReplayStore],
    ceiling: Callable[[], float],
) -> None:
    samples: dict[str, list[float]] = {}
    ceilings: list[float] = []
    for _ in tqdm(range(runs), desc=name, unit="run", file=sys.stderr):
        for key, value in one_run(open_fresh, n_single, n_batched).items():
            samples.setdefault(key, []).append(value)
        ceilings.append(ceiling())
    ceiling_median = statistics.median(ceilings)
    print(f"\n{name}: medians of {runs} runs ({n_single} single events, {n_batched} batched rows)")
    print(f"  {'what':<28} {'rows/s':>10} {'min':>10} {'max':>10} {'/ ceiling':>10}")
    for key, values in samples.items():
        median = statistics.median(values)
        # The ceiling inserts feedback rows: a ratio for generation rows would compare unlike rows.
        ratio = f"{median / ceiling_median:.2f}" if key.startswith("feedback") else "-"
        print(
            f"  {key:<28} {median:>10,.0f} {min(values):>10,.0f} {max(values):>10,.0f} {ratio:>10}"
        )
    print(
        f"  {'ceiling: bare driver, 100/commit':<28} {ceiling_median:>10,.0f} "
        f"{min(ceilings):>10,.0f} {max(ceilings):>10,.0f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--single", type=int, default=2000, help="events committed one by one")
    parser.add_argument("--batched", type=int, default=20000, help="rows in batches of 100")
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="a database to bench in (a scratch schema is made and dropped)",
    )
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)

        def fresh_sqlite() -> ReplayStore:
            return open_store(str(root / f"{uuid.uuid4().hex}.sqlite3"))

        bench_backend(
            "SQLite (WAL, synchronous=FULL)",
            args.runs,
            args.single,
            args.batched,
            fresh_sqlite,
            lambda: sqlite_ceiling(root / f"c{uuid.uuid4().hex}.sqlite3", args.batched),
        )

    if args.no_postgres:
        return 0
    schemas: list[str] = []

    def fresh_postgres() -> ReplayStore:
        schemas.append(f"bench_{uuid.uuid4().hex[:12]}")
        return open_store(f"{args.postgres}?schema={schemas[-1]}")

    try:
        bench_backend(
            "PostgreSQL (synchronous_commit=on)",
            max(1, args.runs),
            args.single // 2,
            args.batched,
            fresh_postgres,
            lambda: postgres_ceiling(f"{args.postgres}?schema={schemas[-1]}", args.batched),
        )
    except Exception as exc:  # the bench still reports SQLite on a machine without PostgreSQL
        print(f"\nPostgreSQL skipped: {str(exc).splitlines()[0]}")
    finally:
        for schema in schemas:
            drop_schema(args.postgres, schema)
    return 0


if __name__ == "__main__":
    sys.exit(main())
