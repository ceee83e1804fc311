"""Erasing one client from a replay store of many: how long `erase_client` takes, and that none of
its rows are left.

For each backend it fills a fresh store with --events generations and one rating each (so
2 x --events rows), spread evenly over --clients clients, plus, for one event in ten, a
comparison by another client naming the erased client's generation (rows that must go too).
Then it erases one client and counts, through the store's reads, the rows left that are the
client's or name its generations (0 is the only right answer).

    .venv/bin/python bench/bench_erasure.py [--events 100000] [--clients 100] [--no-postgres]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench_store import drop_schema, generations
from tqdm import tqdm

from feedloop.core.store import FeedbackRecord, ReplayStore, open_store

BATCH = 1000
ERASED = "client-0"


def client_of(i: int, clients: int) -> str:
    return f"client-{i % clients}"


def fill(store: ReplayStore, events: int, clients: int) -> None:
    for start in tqdm(range(0, events, BATCH), desc="fill", unit="batch", file=sys.stderr):
        ids = range(start, min(events, start + BATCH))
        store.append_generations(
            [
                replace(
                    g, generation_id=f"g{i}", client_id=client_of(i, clients), created_at=float(i)
                )
                for i, g in zip(ids, generations(len(ids), "g"), strict=True)
            ]
        )
        feedback = [
            FeedbackRecord(
                f"e{i}", "rating", [f"g{i}"], client_of(i, clients), float(i), 0.5, "unit"
            )
            for i in ids
        ]
        # Another client's comparison naming a generation of the client to be erased.
        feedback += [
            FeedbackRecord(f"c{i}", "comparison", [f"g{i + 1}", f"g{i}"], "client-1", float(i))
            for i in ids
            if i % 10 == 0 and client_of(i, clients) == ERASED and i + 1 < events
        ]
        store.insert_feedback(feedback)


def measure(store: ReplayStore, left: Callable[[], int], events: int, clients: int) -> str:
    fill(store, events, clients)
    counts = store.counts()
    started = time.perf_counter()
    record = store.erase_client(ERASED, requested_by="bench", now=time.time())
    seconds = time.perf_counter() - started
    after = store.counts()
    return (
        f"{counts.generations + counts.feedback:,} rows ({counts.generations:,} generations, "
        f"{counts.feedback:,} feedback); erased {record.generations:,} generations and "
        f"{record.feedback:,} feedback events in {seconds:.3f} s; rows of {ERASED} left: "
        f"{left()}; rows left in all: {after.generations + after.feedback:,}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="a database to bench in (a scratch schema is made and dropped)",
    )
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    erased_ids = [f"g{i}" for i in range(args.events) if client_of(i, args.clients) == ERASED]

    with tempfile.TemporaryDirectory() as tmp:
        report("SQLite", open_store(str(Path(tmp) / "replay.sqlite3")), args, erased_ids)
    if args.no_postgres:
        return 0
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    try:
        report("PostgreSQL", open_store(f"{args.postgres}?schema={schema}"), args, erased_ids)
    finally:
        drop_schema(args.postgres, schema)
    return 0


def report(name: str, store: ReplayStore, args: argparse.Namespace, erased_ids: list[str]) -> None:
    try:
        figures = measure(store, lambda: rows_left(store, erased_ids), args.events, args.clients)
        print(f"{name}: {figures}")
    finally:
        store.close()


def rows_left(store: ReplayStore, erased_ids: list[str]) -> int:
    """Rows of the erased client, or naming its generations, that the store still returns."""
    found: list[Any] = []
    for start in range(0, len(erased_ids), BATCH):
        chunk = erased_ids[start : start + BATCH]
        found += store.get_generations(chunk).values()
        found += store.feedback_for(chunk)
    found += [e for e in iter_all_feedback(store) if e.client_id == ERASED]
    return len(found)


def iter_all_feedback(store: ReplayStore) -> list[FeedbackRecord]:
    events: list[FeedbackRecord] = []
    seq = 0
    while page := store.feedback_after(seq, 10_000):
        events += page
        seq = page[-1].seq
    return events


if __name__ == "__main__":
    sys.exit(main())
