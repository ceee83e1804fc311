"""Bytes on disk per logged generation and per feedback event, SQLite and PostgreSQL.

    .venv/bin/python bench/bench_disk.py [--generations 20000] [--postgres URL | --no-postgres]

The records are real: the default pretrained policy serves keyword prompts from the corpus to a
simulated user (demo/simulate.py, the server's own record builder: prompt and output tokens,
behaviour and policy log-probabilities, sampling, version), and the user answers with the four
feedback kinds. The same records go into a fresh store of each backend in batches of 100 (the
server's group commit): generations first, then feedback, the store's size (`size_bytes`: the
SQLite files after a WAL checkpoint, or the PostgreSQL schema's tables with indexes and TOAST)
read before, between and after. What this machine's disk takes is what a month of traffic costs:
multiply by the generations and events a day.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from feedloop.core.config import default_data_dir
from feedloop.core.corpus import load_phrases
from feedloop.core.pretrain import ensure_default_checkpoint
from feedloop.core.registry import DirectoryRegistry
from feedloop.core.store import FeedbackRecord, GenerationRecord, ReplayStore, open_store
from feedloop.demo.simulate import Simulation, corpus_prompts
from feedloop.demo.simusers import ContainsKeyword, SimulatedUser

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
BATCH = 100


class Recorder:
    """Stands in for a store: keeps what the simulation would have written."""

    def __init__(self) -> None:
        self.generations: list[GenerationRecord] = []
        self.feedback: list[FeedbackRecord] = []

    def append_generations(self, records: Sequence[GenerationRecord]) -> None:
        self.generations.extend(records)

    def insert_feedback(self, records: Sequence[FeedbackRecord]) -> list[bool]:
        self.feedback.extend(records)
        return [True] * len(records)


def real_records(workdir: Path, n_generations: int) -> Recorder:
    registry = DirectoryRegistry(workdir / "registry")
    checkpoint = ensure_default_checkpoint(default_data_dir())
    registry.publish(checkpoint, reason="bench", make_live=True)
    recorder = Recorder()
    simulation = Simulation(
        recorder,  # type: ignore[arg-type]
        registry,
        SimulatedUser(ContainsKeyword(), seed=0),
        corpus_prompts(load_phrases(), seed=0),
    )
    while len(recorder.generations) < n_generations:
        simulation.serve_batch()
    return recorder


def settled_size(store: ReplayStore, sqlite_path: Path | None) -> int:
    if sqlite_path is not None:  # fold the WAL into the database file first
        with contextlib.closing(sqlite3.connect(sqlite_path)) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return store.size_bytes()


def measure(store: ReplayStore, records: Recorder, sqlite_path: Path | None) -> dict[str, Any]:
    empty = settled_size(store, sqlite_path)
    for i in range(0, len(records.generations), BATCH):
        store.append_generations(records.generations[i : i + BATCH])
    with_generations = settled_size(store, sqlite_path)
    for i in range(0, len(records.feedback), BATCH):
        store.insert_feedback(records.feedback[i : i + BATCH])
    full = settled_size(store, sqlite_path)
    return {
        "generations": len(records.generations),
        "feedback_events": len(records.feedback),
        "empty_bytes": empty,
        "bytes_per_generation": (with_generations - empty) / len(records.generations),
        "bytes_per_feedback_event": (full - with_generations) / len(records.feedback),
        "total_bytes": full,
    }


@contextlib.contextmanager
def pg_store(url: str) -> Iterator[ReplayStore | None]:
    try:
        import psycopg

        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        print(f"bench_disk: PostgreSQL skipped: {str(exc).splitlines()[0]}", file=sys.stderr)
        yield None
        return
    schema = f"bench_disk_{uuid.uuid4().hex[:10]}"
    store = open_store(f"{url}?schema={schema}")
    try:
        yield store
    finally:
        store.close()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--generations", type=int, default=20000)
    p.add_argument("--postgres", default=PG_URL)
    p.add_argument("--no-postgres", action="store_true")
    args = p.parse_args(argv)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-disk-") as tmp:
        workdir = Path(tmp)
        records = real_records(workdir, args.generations)
        kinds: dict[str, int] = {}
        for event in records.feedback:
            kinds[event.kind] = kinds.get(event.kind, 0) + 1
        results["feedback_kinds"] = kinds
        path = workdir / "replay.sqlite3"
        store = open_store(str(path))
        try:
            results["sqlite"] = measure(store, records, path)
        finally:
            store.close()
        if not args.no_postgres:
            with pg_store(args.postgres) as pg:
                if pg is not None:
                    results["postgres"] = measure(pg, records, None)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
