"""PostgreSQL registry: how soon a watcher learns of a new live version (LISTEN/NOTIFY).

One registry object calls set_live; another, on its own connections (as a server replica would
be), is blocked in wait_for_change. The figure is the time from set_live's call to the watcher's
return, per round, with the fallback poll set far longer than the bench so every wake-up is a
NOTIFY. The ceiling, measured in the same run, is the same work in bare psycopg: a transaction that
updates one row and NOTIFYs, received on another connection that LISTENs and re-reads the row.
The issue's target: a new live version serving within 200 ms.

    .venv/bin/python bench/bench_registry_pg.py [--rounds 20] [--postgres URL]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from tqdm import tqdm

from feedloop.core.checkpoint import TOKENIZER, WEIGHTS, Manifest, write_manifest
from feedloop.core.errors import StoreUnavailableError
from feedloop.core.postgres import Pool
from feedloop.core.registry import LivePointer
from feedloop.core.registry.postgres import PostgresRegistry


def fake_checkpoint(folder: Path, seed: int) -> Path:
    """Checkpoint files the registry accepts (it checks checksums, never parses weights)."""
    folder.mkdir(parents=True)
    contents = {WEIGHTS: bytes([seed % 256]) * 65536, TOKENIZER: b'{"bench": true}'}
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    write_manifest(
        folder,
        Manifest(
            version="unpublished",
            parent_version=None,
            architecture="gru",
            hyperparameters={},
            files={n: hashlib.sha256(d).hexdigest() for n, d in contents.items()},
            created_at=datetime.now(UTC).isoformat(),
            parameter_count=16384,
        ),
    )
    return folder


def wake_latencies_ms(url: str, rounds: int, tmp: Path) -> list[float]:
    watcher = PostgresRegistry(url, cache_dir=tmp / "w", poll_interval_s=60.0)
    publisher = PostgresRegistry(url, cache_dir=tmp / "p")
    try:
        publisher.publish(fake_checkpoint(tmp / "a", 1), make_live=True)
        publisher.publish(fake_checkpoint(tmp / "b", 2))
        seen = watcher.pointer()
        latencies: list[float] = []
        for i in tqdm(range(rounds), desc="set_live -> wake", file=sys.stderr):
            target = ("v0002", "v0001")[i % 2]
            woke_at: list[float] = []
            waiting = threading.Event()

            def wait(
                last_seen: LivePointer = seen,
                out: list[float] = woke_at,
                waiting: threading.Event = waiting,
            ) -> None:
                waiting.set()
                watcher.wait_for_change(last_seen, timeout_s=30.0)
                out.append(time.perf_counter())

            thread = threading.Thread(target=wait)
            thread.start()
            waiting.wait()
            time.sleep(0.05)  # let it block in its LISTEN wait, as a server's watcher would be
            changed_at = time.perf_counter()
            seen = publisher.set_live(target)
            thread.join()
            latencies.append((woke_at[0] - changed_at) * 1000)
        return latencies
    finally:
        watcher.close()
        publisher.close()


def notify_ceiling_ms(url: str, rounds: int) -> list[float]:
    """The same work bare: a transaction updates one row and NOTIFYs; the receiver re-reads it."""
    pool = Pool(url, unavailable=lambda message, exc: StoreUnavailableError(message))
    listener, sender = pool.connect(), pool.connect()
    try:
        sender.execute("CREATE TABLE bench_live (id INTEGER PRIMARY KEY, live TEXT)")
        sender.execute("INSERT INTO bench_live VALUES (1, 'v0')")
        listener.execute("LISTEN bench_ceiling")
        latencies = []
        for i in range(rounds):
            start = time.perf_counter()
            with sender.transaction():
                sender.execute("UPDATE bench_live SET live = %s WHERE id = 1", (f"v{i}",))
                sender.execute("NOTIFY bench_ceiling")
            for _ in listener.notifies(timeout=5.0, stop_after=1):
                pass
            listener.execute("SELECT live FROM bench_live WHERE id = 1").fetchone()
            latencies.append((time.perf_counter() - start) * 1000)
        return latencies
    finally:
        listener.close()
        sender.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    url = f"{args.postgres}?schema={schema}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            wake = wake_latencies_ms(url, args.rounds, Path(tmp))
        bare = notify_ceiling_ms(url, args.rounds)
    finally:
        with psycopg.connect(args.postgres, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    ratio = statistics.median(wake) / statistics.median(bare)
    print(f"\nPostgreSQL registry, {args.rounds} rounds (ms)")
    print(f"  {'what':<34} {'p50':>8} {'max':>8} {'/ ceiling':>10}")
    print(
        f"  {'set_live -> wait_for_change returns':<34} {statistics.median(wake):>8.2f} "
        f"{max(wake):>8.2f} {ratio:>10.2f}"
    )
    print(
        f"  {'ceiling: bare update+NOTIFY->read':<34} {statistics.median(bare):>8.2f} "
        f"{max(bare):>8.2f}"
    )
    print(f"  target: under 200 ms -> {'met' if max(wake) < 200 else 'NOT met'} (max)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
