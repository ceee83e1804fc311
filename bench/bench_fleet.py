"""Benchmark a fleet: generations/s of 1, 2 and 3 `feedloop serve` replicas on one PostgreSQL
store and registry, and what each event costs PostgreSQL.

    .venv/bin/python bench/bench_fleet.py             # ~2 minutes
    python bench/bench_fleet.py --repeats 5 --duration-s 10 --json out.json

Three replicas start once on a database of their own (created and dropped here, so its
commit counters are this benchmark's alone). Each arm drives the first k replicas with h2load
(C, nghttp2-client): one h2load per replica, the total concurrency split evenly, the closed
loop and request of bench_serve.py's Generate (num_candidates 1, max_tokens 16). The arms are
interleaved (1, 2, 3, 1, 2, 3, ...) and each figure is the median of its arm's repeats, so a
change in the machine's load touches every arm alike. Replicas outside an arm stay up, idle.

Per arm: generations/s (h2load's measured window, HTTP 200s, gRPC codes from the replicas'
own counters), the CPU seconds the replicas' processes (server and model process) spent, hence
generations per CPU-second (the per-core efficiency), and PostgreSQL's cost per generation:
transactions committed in the bench's database (exact), WAL bytes (pg_current_wal_lsn, which
counts the whole cluster: the machine is shared, so the WAL written by others during an equal
idle interval just before the arm is subtracted, and the figure is approximate) and table
growth (pg_total_relation_size of the store's tables).

The checkpoint is the default pretrained one if it exists, else a default-size policy with
random weights (bench_serve.py's). The machine has 2 cores shared by every replica, its model
process, PostgreSQL and the load generator: the replicas cannot add cores, only overlap each
other's waits. Say so with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from bench_serve import prepare_checkpoint  # bench/ is on the path: this file runs as a script
from serve_load import PROMPTS, generate_codes, grpc_frame, h2load_latencies, settled_codes

from feedloop.core.registry import open_registry
from feedloop.demo.processes import Child, process_tree, start_server
from feedloop.v1 import feedloop_pb2 as pb

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of pid and every process below it (the model process)."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            with open(f"/proc/{p}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLOCK_TICKS


@contextlib.contextmanager
def bench_database() -> Iterator[str]:
    name = f"fleet_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class PostgresCounters:
    def __init__(self, database: str) -> None:
        self.database = database
        self.conn = psycopg.connect(ADMIN_URL, autocommit=True)

    def read(self) -> dict[str, float]:
        # pg_stat_database is refreshed by the backends' stats reports: force a fresh snapshot.
        self.conn.execute("SELECT pg_stat_clear_snapshot()")
        commits = self.conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (self.database,)
        ).fetchone()
        lsn = self.conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
        with psycopg.connect(ADMIN_URL.replace("/test", f"/{self.database}")) as db:
            size = db.execute(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
            ).fetchone()
        assert commits and lsn and size
        return {
            "commits": float(commits[0]),
            "wal_bytes": float(lsn[0]),
            "table_bytes": float(size[0]),
        }

    def close(self) -> None:
        self.conn.close()


def h2load_on(
    replica: Child, concurrency: int, duration_s: float, warmup_s: float, body: Path, tmp: Path
) -> tuple[subprocess.Popen[str], Path]:
    log_path = tmp / f"h2load-{replica.banner['grpc']}-{uuid.uuid4().hex[:6]}.log"
    process = subprocess.Popen(
        [
            shutil.which("h2load") or "h2load",
            "--clients=1",
            f"--max-concurrent-streams={concurrency}",
            f"--duration={round(duration_s * 1000)}ms",
            f"--warm-up-time={round(warmup_s * 1000)}ms",
            f"--data={body}",
            "--header=content-type: application/grpc",
            "--header=te: trailers",
            "--header=grpc-timeout: 30S",
            f"--log-file={log_path}",
            f"http://{replica.banner['grpc']}/feedloop.v1.Generation/Generate",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return process, log_path


def run_arm(
    replicas: list[Child],
    counters: PostgresCounters,
    args: argparse.Namespace,
    body: Path,
    tmp: Path,
) -> dict[str, float]:
    # The cluster's background WAL (other users of the machine) over an idle interval as long
    # as the arm's measured window.
    idle_before = counters.read()
    time.sleep(args.idle_s)
    idle_after = counters.read()
    background_wal_per_s = (idle_after["wal_bytes"] - idle_before["wal_bytes"]) / args.idle_s

    codes_before = [generate_codes(r.banner["metrics"]) for r in replicas]
    per_replica = max(1, args.concurrency // len(replicas))
    loads = [h2load_on(r, per_replica, args.duration_s, args.warmup_s, body, tmp) for r in replicas]
    time.sleep(args.warmup_s)
    cpu_before = sum(cpu_seconds(r.pid) for r in replicas)
    pg_before = counters.read()
    started = time.monotonic()
    for process, _ in loads:
        process.wait(timeout=args.duration_s + args.warmup_s + 60)
    measured_s = time.monotonic() - started
    cpu_after = sum(cpu_seconds(r.pid) for r in replicas)
    time.sleep(0.5)  # the generation logs' last group commits
    pg_after = counters.read()

    served, errors = 0, 0
    for (_, log_path), replica, before in zip(loads, replicas, codes_before, strict=True):
        latencies, failed = h2load_latencies(log_path)
        served += len(latencies)
        errors += sum(failed.values())
        after = settled_codes(replica.banner["metrics"], before)
        errors += sum(
            int(n - before.get(code, 0.0))
            for code, n in after.items()
            if code not in ("OK", "CANCELLED")
        )
    logged = served  # num_candidates 1: one logged generation per reply
    wal = pg_after["wal_bytes"] - pg_before["wal_bytes"] - background_wal_per_s * measured_s
    return {
        "replicas": len(replicas),
        "generations_per_s": served / args.duration_s,
        "errors": errors,
        "replica_cpu_s_per_s": (cpu_after - cpu_before) / measured_s,
        "generations_per_cpu_s": served / max(cpu_after - cpu_before, 1e-9),
        "pg_commits_per_generation": (pg_after["commits"] - pg_before["commits"]) / max(logged, 1),
        "pg_wal_bytes_per_generation": wal / max(logged, 1),
        "pg_background_wal_bytes_per_s": background_wal_per_s,
        "pg_table_bytes_per_generation": (pg_after["table_bytes"] - pg_before["table_bytes"])
        / max(logged, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each arm, interleaved")
    parser.add_argument("--duration-s", type=float, default=8.0, help="measured window per run")
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--idle-s", type=float, default=2.0, help="background WAL interval")
    parser.add_argument("--concurrency", type=int, default=48, help="total, split over replicas")
    parser.add_argument("--max-replicas", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if shutil.which("h2load") is None:
        raise SystemExit("h2load not found: apt-get install nghttp2-client")
    request = pb.GenerateRequest(prompt=PROMPTS[0], sampling=pb.SamplingParams(max_tokens=16))

    with bench_database() as database, tempfile.TemporaryDirectory(prefix="fleet-") as tmp_name:
        tmp = Path(tmp_name)
        url = ADMIN_URL.replace("/test", f"/{database}")
        body = tmp / "request.bin"
        body.write_bytes(grpc_frame(request.SerializeToString()))
        checkpoint, described = prepare_checkpoint(None, tmp)
        log(f"checkpoint: {described}")
        registry = open_registry(url)
        registry.publish(checkpoint, reason="bench_fleet seed", make_live=True)
        registry.close()
        replicas: list[Child] = []
        counters = PostgresCounters(database)
        try:
            for i in range(args.max_replicas):
                data_dir = tmp / f"replica{i}"
                data_dir.mkdir()
                replicas.append(
                    start_server(
                        data_dir,
                        *("--store", url, "--registry", url, "--torch-threads", "1"),
                        log_path=data_dir / "serve.log",
                        name=f"replica {i}",
                    )
                )
            log(f"{len(replicas)} replicas up on database {database}; arms interleaved")
            results: dict[int, list[dict[str, float]]] = {}
            for repeat in range(args.repeats):
                for k in range(1, args.max_replicas + 1):
                    arm = run_arm(replicas[:k], counters, args, body, tmp)
                    results.setdefault(k, []).append(arm)
                    log(
                        f"repeat {repeat + 1} replicas={k}: "
                        f"{arm['generations_per_s']:.0f} generations/s, "
                        f"{arm['generations_per_cpu_s']:.0f}/CPU-s, "
                        f"{arm['pg_commits_per_generation']:.3f} commits/generation"
                    )
        finally:
            counters.close()
            for replica in replicas:
                replica.stop()

    summary: dict[str, Any] = {
        "checkpoint": described,
        "cores": os.cpu_count(),
        "concurrency": args.concurrency,
        "repeats": args.repeats,
        "arms": {},
    }
    base = statistics.median(r["generations_per_s"] for r in results[1])
    print(f"\nbench_fleet: {os.cpu_count()} cores shared by replicas, PostgreSQL and h2load")
    print(f"checkpoint: {described}; concurrency {args.concurrency} in all; {args.repeats} runs")
    print(
        f"{'replicas':>8} {'gen/s':>8} {'x1':>6} {'gen/CPU-s':>10} {'CPU used':>9} "
        f"{'commits/gen':>12} {'WAL B/gen':>10} {'table B/gen':>12} {'errors':>7}"
    )
    for k, runs in results.items():
        med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        med["ratio_to_one_replica"] = med["generations_per_s"] / base
        summary["arms"][k] = med
        print(
            f"{k:>8} {med['generations_per_s']:>8.0f} {med['ratio_to_one_replica']:>6.2f} "
            f"{med['generations_per_cpu_s']:>10.0f} {med['replica_cpu_s_per_s']:>9.2f} "
            f"{med['pg_commits_per_generation']:>12.3f} "
            f"{med['pg_wal_bytes_per_generation']:>10.0f} "
            f"{med['pg_table_bytes_per_generation']:>12.0f} {int(med['errors']):>7}"
        )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
