"""Serving latency while the trainer trains vs while it is idle, on one shared machine.

    .venv/bin/python bench/bench_share.py [--generations 5000] [--concurrency 16]
        [--duration-s 8] [--runs 3]

A `feedloop serve` subprocess serves the default pretrained policy; bench/serve_load.py (its
own process) drives Generate at a fixed concurrency and reports p50/p99. The store is first
filled with logged generations and simulated feedback, so that a `feedloop train --once`
subprocess (default config: one torch thread) has a full round to train. Each run measures the
idle p99, then starts the trainer and measures again while its round is in progress (the
trainer's own report says how long the round took, so a round shorter than the measurement
shows). Target: p99 while training within 1.5x of idle.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from feedloop.core.config import default_data_dir
from feedloop.core.corpus import load_phrases, split_corpus
from feedloop.core.pretrain import ensure_default_checkpoint
from feedloop.core.registry import open_registry
from feedloop.core.store import open_store
from feedloop.demo.processes import start_server
from feedloop.demo.simulate import Simulation, corpus_prompts
from feedloop.demo.simusers import IncludeWord, SimulatedUser

LOAD = str(Path(__file__).with_name("serve_load.py"))


@contextlib.contextmanager
def serve(root: Path) -> Iterator[str]:
    child = start_server(
        root,
        "--registry",
        str(root / "registry"),
        "--store",
        str(root / "replay.sqlite3"),
        "--log-level",
        "warning",
        log_path=root / "serve.log",
    )
    try:
        yield child.banner["grpc"]
    finally:
        child.stop(grace_s=30)


def load(target: str, concurrency: int, duration_s: float) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            LOAD,
            "generate",
            "--target",
            target,
            "--concurrency",
            str(concurrency),
            "--duration-s",
            str(duration_s),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def start_trainer(root: Path, run: int) -> subprocess.Popen[str]:
    command = [
        sys.executable,
        "-m",
        "feedloop.client.cli",
        "train",
        "--once",
        "--data-dir",
        str(root),
        "--store",
        str(root / "replay.sqlite3"),
        "--registry",
        str(root / "registry"),
        "--metrics-port",
        "0",
        "--join-window-s",
        "0",
        "--cursor-name",
        f"bench-{run}",
        # Every run trains a round from the pretrained version again: a canary trial left
        # running by the previous run would make the trainer wait for its verdict instead.
        "--publish-as",
        "live",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    process.stdout.readline()  # the start line: torch is imported, the round begins
    return process


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=8.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    checkpoint = ensure_default_checkpoint(default_data_dir())
    root = Path(tempfile.mkdtemp(prefix="feedloop-bench-share-"))
    registry = open_registry(root / "registry")
    registry.publish(checkpoint, reason="pretrained", make_live=True)
    store = open_store(str(root / "replay.sqlite3"))
    prompts = corpus_prompts(split_corpus(load_phrases(), seed=0).train, seed=1)
    sim = Simulation(
        store,
        registry,
        SimulatedUser(IncludeWord("good"), seed=1),
        prompts,
        seed=2,
        requests_per_batch=64,
    )
    while store.max_seq()[0] < args.generations:
        sim.serve_batch()
    print(f"store: {store.max_seq()[0]} generations, {store.max_seq()[1]} events", flush=True)
    store.close()

    idle_p99, busy_p99 = [], []
    with serve(root) as target:
        load(target, args.concurrency, 2.0)  # warm-up
        for run in range(args.runs):
            # Each run trains from the pretrained version on the whole store again.
            registry.set_live("v0001", reason="bench reset")
            idle = load(target, args.concurrency, args.duration_s)
            trainer = start_trainer(root, run)
            started = time.monotonic()
            busy = load(target, args.concurrency, args.duration_s)
            output, _ = trainer.communicate(timeout=600)
            round_s = time.monotonic() - started
            idle_p99.append(idle["p99_ms"])
            busy_p99.append(busy["p99_ms"])
            last = [line for line in output.splitlines() if "round" in line][-1:]
            print(
                f"run {run + 1}: idle p99 {idle['p99_ms']:.1f} ms ({idle['per_s']:.0f}/s), "
                f"training p99 {busy['p99_ms']:.1f} ms ({busy['per_s']:.0f}/s); trainer "
                f"finished {round_s:.1f} s after the measurement began: {' '.join(last)}",
                flush=True,
            )
    idle_median, busy_median = statistics.median(idle_p99), statistics.median(busy_p99)
    ratio = busy_median / idle_median
    print(
        f"\nGenerate p99 at concurrency {args.concurrency} (median of {args.runs}): idle "
        f"{idle_median:.1f} ms, trainer training {busy_median:.1f} ms, ratio {ratio:.2f} "
        f"(target <= 1.5: {'met' if ratio <= 1.5 else 'MISSED'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
