"""Benchmark the OpenAI-compatible HTTP API against gRPC Generate, on one server, in one run.

    python bench/bench_http.py                    # 3 rounds of 5 s each way, about 1 minute
    python bench/bench_http.py --rounds 5 --duration-s 8 --json out.json

One `feedloop serve --http-port 0` subprocess (default batching) serves both doors. The load is
closed-loop at concurrency 64, num_candidates 1, max_tokens 16, the same prompt, from h2load in
a process of its own (bench/serve_load.py): gRPC Generate over one HTTP/2 connection with 64
streams (`generate-h2load`), POST /v1/completions over 64 HTTP/1.1 connections
(`completions-h2load`), as OpenAI clients connect. The two alternate round by round, so a burst
of background load hits both alike; the report gives each round, the medians, the ratio of the
medians HTTP / gRPC of completions per second and the median of the rounds' ratios (the issue's
target: at least 0.8; the verdict takes the lower of the two).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_serve import load, prepare_checkpoint, serve  # bench/ is on the path: a script

CONCURRENCY = 64
MAX_TOKENS = 16
TARGET_RATIO = 0.8


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def one_round(server: dict[str, str], duration_s: float) -> dict[str, dict[str, Any]]:
    flags = ["--concurrency", str(CONCURRENCY), "--duration-s", str(duration_s)]
    flags += ["--max-tokens", str(MAX_TOKENS)]
    grpc_point = load("generate-h2load", server["grpc"], *flags, "--metrics", server["metrics"])
    http_point = load("completions-h2load", server["http"], *flags)
    return {"grpc": grpc_point, "http": http_point}


def report(
    rounds: list[dict[str, dict[str, Any]]], note: str, load_before: float
) -> tuple[str, dict[str, Any]]:
    lines = [
        f"HTTP /v1/completions vs gRPC Generate, concurrency {CONCURRENCY}, max_tokens "
        f"{MAX_TOKENS}, h2load (checkpoint: {note})",
        f"1-minute load average before the run: {load_before:.2f} on {os.cpu_count()} CPUs",
        f"{'round':>5}  {'gRPC /s':>8} {'p99 ms':>7} {'err':>4}   {'HTTP /s':>8} {'p99 ms':>7} "
        f"{'err':>4}   {'ratio':>5}",
    ]
    for i, r in enumerate(rounds, start=1):
        g, h = r["grpc"], r["http"]
        lines.append(
            f"{i:>5}  {g['per_s']:>8.0f} {g['p99_ms']:>7.1f} {g['errors']:>4}   "
            f"{h['per_s']:>8.0f} {h['p99_ms']:>7.1f} {h['errors']:>4}   "
            f"{h['per_s'] / g['per_s']:>5.2f}"
        )
    median = {
        door: {key: statistics.median(r[door][key] for r in rounds) for key in ("per_s", "p99_ms")}
        for door in ("grpc", "http")
    }
    ratio = median["http"]["per_s"] / median["grpc"]["per_s"]
    # Each round's two points ran back to back, so their ratio shares that moment's background
    # load: the median of the round ratios is the steadier figure on a busy machine.
    round_ratio = statistics.median(r["http"]["per_s"] / r["grpc"]["per_s"] for r in rounds)
    verdict = "meets" if min(ratio, round_ratio) >= TARGET_RATIO else "misses"
    lines.append(
        f"median  {median['grpc']['per_s']:>8.0f} {median['grpc']['p99_ms']:>7.1f}        "
        f"{median['http']['per_s']:>8.0f} {median['http']['p99_ms']:>7.1f}        {ratio:>5.2f}"
        f"   (median of the round ratios {round_ratio:.2f}: {verdict} the target of "
        f"{TARGET_RATIO})"
    )
    figures = {
        "rounds": rounds,
        "median": median,
        "ratio": ratio,
        "round_ratio": round_ratio,
        "load_before": load_before,
    }
    return "\n".join(lines), figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, help="checkpoint dir (default: see bench_serve)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each door once a round")
    parser.add_argument("--duration-s", type=float, default=5.0, help="per measured point")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if shutil.which("h2load") is None:
        log("h2load not found: apt-get install nghttp2-client")
        return 2
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="feedloop-bench-http-") as tmp:
        checkpoint, note = prepare_checkpoint(args.checkpoint, Path(tmp))
        with serve(Path(tmp), checkpoint, "--http-port", "0") as server:
            rounds = []
            for i in range(args.rounds):
                log(f"round {i + 1}/{args.rounds} ...")
                rounds.append(one_round(server, args.duration_s))
    text, figures = report(rounds, note, load_before)
    print(text)
    print(f"\n(wall time {time.monotonic() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
