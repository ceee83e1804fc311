"""Benchmark `feedloop serve`: batched generation, feedback ingestion and swap under load.

    python bench/bench_serve.py                  # everything, about 3 minutes
    python bench/bench_serve.py --only generate  # one part: generate, feedback, swap
    python bench/bench_serve.py --json out.json  # also write the figures as JSON

The server runs as a `feedloop serve` subprocess and the load generator (bench/serve_load.py) as
another, so neither steals the other's event loop. Generate's load comes from h2load (C, package
nghttp2-client) when it is installed: the Python gRPC client costs 110-140 us of CPU per call,
a quarter of a core at concurrency 64 taken from the two the server has; its c64 figures are
measured too and printed beside. Without h2load the Python client drives every point. Every
figure stands beside a ceiling measured in the same run, so the ratios hold on a noisy machine:
- Generate (closed loop, num_candidates 1, max_tokens 16) at concurrency 1/16/64/256 with the
  batcher on and off (max batch 1), against the policy alone at batch 32 in this process.
- Feedback (durable, thumbs ratings), unary and streamed, SQLite and PostgreSQL, against a bare
  gRPC bidirectional echo stream with the same message size and the same number of streams
  (measured before, between and after the backends; the median is the ceiling).
- Swap under load at concurrency 64: failed requests, p99 latency in the second after the
  publication vs the two seconds before it, and the time from publication to the first reply
  from the new version (directory registry, and PostgreSQL LISTEN/NOTIFY).

The checkpoint is the default pretrained one if it exists, else a default-size policy with
random weights (its phrases run to max_tokens, so figures are slightly pessimistic).
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

import torch
from serve_load import STREAM_WINDOW  # bench/ is on the path: this file runs as a script

from feedloop.core.checkpoint import MANIFEST, load_checkpoint, save_checkpoint
from feedloop.core.config import default_data_dir
from feedloop.core.corpus import load_phrases
from feedloop.core.gru import GRUConfig, GRUPolicy
from feedloop.core.policy import SampleRequest
from feedloop.core.pretrain import default_checkpoint_dir
from feedloop.core.registry import DirectoryRegistry
from feedloop.core.sampling import SamplingParams
from feedloop.core.tokenizer import Tokenizer
from feedloop.demo.processes import start_server
from feedloop.server.feedback import STREAM_WINDOW as SERVER_STREAM_WINDOW

LOAD = str(Path(__file__).with_name("serve_load.py"))
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
CONCURRENCIES = (1, 16, 64, 256)
MAX_TOKENS = 16


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- set-up ----------------------------------------------------------------------------------


def prepare_checkpoint(explicit: Path | None, workdir: Path) -> tuple[Path, str]:
    if explicit:
        return explicit, str(explicit)
    default = default_checkpoint_dir(default_data_dir())
    if (default / MANIFEST).is_file():
        return default, f"default pretrained ({default})"
    tokenizer = Tokenizer.build(load_phrases())
    policy = GRUPolicy(GRUConfig(vocab_size=tokenizer.vocab_size), tokenizer)
    target = workdir / "random-default-size"
    save_checkpoint(policy, target)
    return target, "default sizes, random weights (no pretrained checkpoint found)"


def policy_alone(checkpoint: Path, batch: int, repeats: int = 15) -> float:
    """Median generations/s of policy.sample at this batch size, one torch thread."""
    torch.set_num_threads(1)
    policy, _ = load_checkpoint(checkpoint)
    prompts = ("ocean sunrise", "quiet forest", "city lights", "mountain air")
    rates = []
    for r in range(repeats + 2):
        requests = [
            SampleRequest(
                policy.encode_prompt(prompts[i % len(prompts)]),
                SamplingParams(max_tokens=MAX_TOKENS, seed=1 + r * batch + i),
            )
            for i in range(batch)
        ]
        started = time.perf_counter()
        policy.sample(requests)
        if r >= 2:  # two warm-up passes
            rates.append(batch / (time.perf_counter() - started))
    return statistics.median(rates)


@contextlib.contextmanager
def pg_schema() -> Iterator[str | None]:
    """A fresh PostgreSQL schema URL, dropped afterwards; None when no server answers."""
    try:
        import psycopg

        with psycopg.connect(PG_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        log(f"PostgreSQL rows skipped: {str(exc).splitlines()[0]}")
        yield None
        return
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    try:
        yield f"{PG_URL}?schema={schema}"
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@contextlib.contextmanager
def serve(
    workdir: Path,
    checkpoint: Path,
    *flags: str,
    registry: str | None = None,
    store: str | None = None,
) -> Iterator[dict[str, str]]:
    """A `feedloop serve` subprocess on free ports; yields its banner: {"grpc": HOST:PORT,
    "metrics": HOST:PORT, ...}."""
    data_dir = Path(tempfile.mkdtemp(dir=workdir))
    if registry is None:
        registry = str(data_dir / "registry")
        DirectoryRegistry(Path(registry)).publish(checkpoint, reason="bench", make_live=True)
    child = start_server(
        data_dir,
        "--registry",
        registry,
        "--store",
        store or str(data_dir / "replay.sqlite3"),
        "--log-level",
        "warning",
        "--max-queue-size",
        "4096",
        *flags,
        log_path=data_dir / "serve.log",
    )
    try:
        yield child.banner
    finally:
        child.stop(grace_s=30)


def load(mode: str, target: str, *flags: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, LOAD, mode, "--target", target, *flags],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# -- the three parts ---------------------------------------------------------------------------


def generate_point(
    generator: str, server: dict[str, str], concurrency: int, duration_s: float
) -> dict[str, Any]:
    """One closed-loop Generate point against server (serve()'s banner)."""
    mode = "generate-h2load" if generator == "h2load" else "generate"
    flags = ["--concurrency", str(concurrency), "--duration-s", str(duration_s)]
    flags += ["--max-tokens", str(MAX_TOKENS), "--metrics", server["metrics"]]
    return load(mode, server["grpc"], *flags)


def bench_generate(
    workdir: Path, checkpoint: Path, duration_s: float, generator: str
) -> dict[str, Any]:
    """Every concurrency with `generator` (h2load or python); with h2load, also c64 with the
    Python client, whose own CPU (a quarter of a core at c64) the server then shares."""
    # The ceiling is measured three times (before, right before the batched c64 point, and
    # after) and its median used, so a burst of background load skews it less.
    log("policy alone ...")
    ceilings = [policy_alone(checkpoint, 32)]
    alone_1 = policy_alone(checkpoint, 1)
    modes = {
        "batched": ("--max-batch-size", "32", "--max-queue-delay-ms", "2"),
        "unbatched": ("--max-batch-size", "1"),
    }
    points = [(generator, c) for c in CONCURRENCIES]
    if generator == "h2load":
        points.append(("python", 64))
    rows = []
    for label, flags in modes.items():
        with serve(workdir, checkpoint, *flags) as server:
            for point_generator, concurrency in points:
                if label == "batched" and concurrency == 64 and point_generator == generator:
                    ceilings.append(policy_alone(checkpoint, 32))
                log(f"generate {label} c={concurrency} ({point_generator}) ...")
                result = generate_point(point_generator, server, concurrency, duration_s)
                rows.append(
                    {
                        "mode": label,
                        "concurrency": concurrency,
                        "load_generator": point_generator,
                        **result,
                    }
                )
    ceilings.append(policy_alone(checkpoint, 32))
    ceiling = statistics.median(ceilings)
    by = {(r["mode"], r["concurrency"], r["load_generator"]): r for r in rows}
    out: dict[str, Any] = {
        "load_generator": generator,
        "policy_alone_batch32_per_s": ceiling,
        "policy_alone_batch32_runs_per_s": ceilings,
        "policy_alone_batch1_per_s": alone_1,
        "rows": rows,
    }
    for g in dict.fromkeys(r["load_generator"] for r in rows):
        batched, unbatched = by["batched", 64, g], by["unbatched", 64, g]
        out[g] = {
            "batched_over_unbatched_c64": batched["per_s"] / unbatched["per_s"],
            "served_c64_over_policy_batch32": batched["per_s"] / ceiling,
            "p99_ms_c64": batched["p99_ms"],
        }
    return out


def echo_ceiling(streams: str, window: str, duration_s: float) -> float:
    """Messages/s of a bare gRPC echo stream (its own server process), same client work."""
    echo = subprocess.Popen(
        [sys.executable, LOAD, "echo-server"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert echo.stdout is not None and echo.stdin is not None
    port = echo.stdout.readline().strip()
    log("echo stream ceiling ...")
    try:
        flags = ("--streams", streams, "--stream-window", window, "--duration-s", str(duration_s))
        return float(load("echo-stream", f"127.0.0.1:{port}", *flags)["per_s"])
    finally:
        echo.stdin.close()
        echo.wait(timeout=10)


def bench_feedback(
    workdir: Path, checkpoint: Path, duration_s: float, stream_window: int
) -> dict[str, Any]:
    # As with Generate's ceiling, the echo is measured three times (before, between the two
    # backends, after) and its median used, so a burst of background load skews it less.
    streams, window = "4", str(stream_window)
    ceilings = [echo_ceiling(streams, window, duration_s)]
    rows = []
    with pg_schema() as pg_url:
        backends = [("sqlite", None)] + ([("postgresql", pg_url)] if pg_url else [])
        for index, (backend, store) in enumerate(backends):
            if index:
                ceilings.append(echo_ceiling(streams, window, duration_s))
            with serve(workdir, checkpoint, store=store) as server:
                target = server["grpc"]
                log(f"feedback {backend} unary ...")
                unary = load(
                    "feedback-unary", target, "--concurrency", "64", "--duration-s", str(duration_s)
                )
                log(f"feedback {backend} stream ...")
                stream = load(
                    "feedback-stream",
                    target,
                    *("--streams", streams, "--stream-window", window),
                    *("--duration-s", str(duration_s)),
                )
            rows.append({"backend": backend, "unary": unary, "stream": stream})
    ceilings.append(echo_ceiling(streams, window, duration_s))
    ceiling = statistics.median(ceilings)
    for row in rows:
        row["stream_over_echo"] = row["stream"]["per_s"] / ceiling
    return {
        "echo_stream_per_s": ceiling,
        "echo_stream_runs_per_s": ceilings,
        "stream_window": stream_window,
        "rows": rows,
    }


def swap_once(workdir: Path, checkpoint: Path, registry_url: str | None) -> dict[str, Any]:
    """Publish a new live version 3 s into an 8 s load at concurrency 64; measure around it."""
    if registry_url is None:
        registry_dir = Path(tempfile.mkdtemp(dir=workdir)) / "registry"
        registry: Any = DirectoryRegistry(registry_dir, poll_interval_s=0.2)
        location = str(registry_dir)
    else:
        from feedloop.core.registry.postgres import PostgresRegistry

        registry = PostgresRegistry(registry_url, cache_dir=workdir / f"cache-{uuid.uuid4().hex}")
        location = registry_url
    registry.publish(checkpoint, reason="bench", make_live=True)
    with serve(workdir, checkpoint, registry=location) as server:
        target = server["grpc"]
        loader = subprocess.Popen(
            [
                sys.executable,
                LOAD,
                "swap-load",
                "--target",
                target,
                "--concurrency",
                "64",
                "--duration-s",
                "8",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(3.0)
        new_version = registry.publish(checkpoint, reason="bench swap", make_live=True)
        published_at = time.time()
        out, _ = loader.communicate(timeout=120)
    registry.close()
    result = json.loads(out.strip().splitlines()[-1])
    replies = result.pop("replies")
    before = [done - sent for sent, done, _ in replies if published_at - 2.0 <= sent < published_at]
    during = [done - sent for sent, done, _ in replies if published_at <= sent < published_at + 1.0]
    first_new = min((done for _, done, v in replies if v == new_version), default=float("nan"))

    def p99(values: list[float]) -> float:
        return sorted(values)[int(0.99 * (len(values) - 1))] * 1000 if values else float("nan")

    return {
        "failed": result["errors"],
        "replies": len(replies),
        "p99_ms_before": p99(before),
        "p99_ms_during": p99(during),
        "p99_ratio": p99(during) / p99(before),
        "publication_to_serving_ms": (first_new - published_at) * 1000,
    }


def bench_swap(workdir: Path, checkpoint: Path) -> dict[str, Any]:
    log("swap under load (directory registry) ...")
    rows = [{"registry": "directory", **swap_once(workdir, checkpoint, None)}]
    with pg_schema() as pg_url:
        if pg_url:
            log("swap under load (PostgreSQL registry) ...")
            rows.append({"registry": "postgresql", **swap_once(workdir, checkpoint, pg_url)})
    return {"rows": rows}


# -- report ----------------------------------------------------------------------------------


def report(results: dict[str, Any], checkpoint_note: str) -> str:
    lines = [f"checkpoint: {checkpoint_note}", f"machine: {os.cpu_count()} CPUs"]
    if "generate" in results:
        g = results["generate"]
        lines += [
            "",
            f"Generate (max_tokens {MAX_TOKENS}, 1 candidate); policy alone: "
            f"batch 32 {g['policy_alone_batch32_per_s']:.0f}/s, "
            f"batch 1 {g['policy_alone_batch1_per_s']:.0f}/s",
            f"{'mode':<10} {'conc':>5} {'load':>7} {'gen/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'errors':>7}",
        ]
        for r in g["rows"]:
            lines.append(
                f"{r['mode']:<10} {r['concurrency']:>5} {r['load_generator']:>7} "
                f"{r['per_s']:>8.0f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['errors']:>7}"
            )
        for generator in dict.fromkeys(r["load_generator"] for r in g["rows"]):
            figures = g[generator]
            lines += [
                f"load generator {generator}:",
                f"  batched/unbatched at c64: {figures['batched_over_unbatched_c64']:.2f}x "
                f"(target >= 5x)",
                f"  served c64 / policy alone batch 32: "
                f"{figures['served_c64_over_policy_batch32']:.0%} (target >= 60%)",
                f"  p99 at c64: {figures['p99_ms_c64']:.1f} ms (target < 50 ms)",
            ]
    if "feedback" in results:
        f = results["feedback"]
        lines += [
            "",
            f"Feedback (durable); bare echo stream ceiling {f['echo_stream_per_s']:.0f} msg/s "
            f"(median of {', '.join(f'{c:.0f}' for c in f['echo_stream_runs_per_s'])}); "
            f"4 streams, {f['stream_window']} events in flight each",
            f"{'backend':<11} {'unary/s':>8} {'u p99 ms':>9} {'stream/s':>9} "
            f"{'stream/echo':>12} {'errors':>7}",
        ]
        for r in f["rows"]:
            lines.append(
                f"{r['backend']:<11} {r['unary']['per_s']:>8.0f} {r['unary']['p99_ms']:>9.1f} "
                f"{r['stream']['per_s']:>9.0f} {r['stream_over_echo']:>12.0%} "
                f"{r['unary']['errors'] + r['stream']['errors']:>7}"
            )
        lines.append("targets: unary >= 4000/s; stream >= 80% of echo")
    if "swap" in results:
        lines += [
            "",
            "Swap under load (c64)",
            f"{'registry':<11} {'failed':>7} {'replies':>8} {'p99 before':>11} "
            f"{'p99 during':>11} {'ratio':>6} {'pub->serve ms':>14}",
        ]
        for r in results["swap"]["rows"]:
            lines.append(
                f"{r['registry']:<11} {r['failed']:>7} {r['replies']:>8} "
                f"{r['p99_ms_before']:>11.1f} {r['p99_ms_during']:>11.1f} "
                f"{r['p99_ratio']:>6.2f} {r['publication_to_serving_ms']:>14.0f}"
            )
        lines.append("targets: failed 0; ratio <= 1.2; directory <= 1000 ms, PostgreSQL <= 200 ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=("generate", "feedback", "swap"), action="append")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint dir (default: see above)")
    parser.add_argument("--duration-s", type=float, default=3.0, help="per measured point")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--stream-window",
        type=int,
        default=STREAM_WINDOW,
        help=f"events each feedback and echo stream keeps in flight (default {STREAM_WINDOW}, as "
        f"the README's figures; the server reads up to {SERVER_STREAM_WINDOW} ahead per stream)",
    )
    parser.add_argument(
        "--generate-load",
        choices=("h2load", "python"),
        help="Generate's load generator (default: h2load if installed, else python)",
    )
    args = parser.parse_args(argv)
    generator = args.generate_load or ("h2load" if shutil.which("h2load") else "python")
    if generator == "python" and args.generate_load is None:
        log("h2load not found (apt-get install nghttp2-client): Generate load from Python only")
    parts = args.only or ["generate", "feedback", "swap"]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="feedloop-bench-") as tmp:
        workdir = Path(tmp)
        checkpoint, note = prepare_checkpoint(args.checkpoint, workdir)
        results: dict[str, Any] = {}
        if "generate" in parts:
            results["generate"] = bench_generate(workdir, checkpoint, args.duration_s, generator)
        if "feedback" in parts:
            results["feedback"] = bench_feedback(
                workdir, checkpoint, args.duration_s, args.stream_window
            )
        if "swap" in parts:
            results["swap"] = bench_swap(workdir, checkpoint)
    print(report(results, note))
    print(f"\n(wall time {time.monotonic() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
