"""The soak: server, trainer and load generator as real processes, with swaps, for N seconds.

    python bench/soak.py --duration-s 120            # the CI soak (about 2.5 minutes)
    python bench/soak.py --duration-s 1800 --policy default --report-json soak.json
    python bench/soak.py --duration-s 180 --checkpoint HF_CHECKPOINT --logprob-mismatch

What runs: `feedloop serve` and `feedloop train` on a temporary data dir, and
bench/soak_load.py (its own process, asyncio) keeping a steady mix of Generate and feedback
(unary and streamed) at the configured rates. Meanwhile the trainer publishes what its gate
lets through, this script forces extra swaps (SetLive to another version every --swap-every-s)
and one Rollback half-way, and samples the memory (PSS, /proc/PID/smaps_rollup) and open file
descriptors (/proc/PID/fd) of the server and its model process every few seconds.

The report: requests sent / succeeded / failed by code, p50/p99 latency per minute, feedback
acknowledged vs stored (read back from the store after the server has drained), swaps done,
memory and fds at start and end; with --logprob-mismatch, the behaviour log-prob mismatch over
every generation of the soak (each recomputed by a trainer's teacher-forced pass under the
weights of the version that served it, across all the swaps: bench/hf_mismatch.py), max and
mean per token. Exit status 1 when any request failed, an acknowledged event is
missing from the store (or stored twice), or memory or descriptors grow steadily:

    steady growth: the median of the samples in the LAST third of the run exceeds the median of
    the MIDDLE third by more than max(8 MiB, 5%) for memory, or by more than 8 for open fds. (The
    first third is warm-up: allocator pools, loaded model versions and connections settle.)

or (--logprob-mismatch) a logged behaviour log-prob is further than 1e-5 from its recompute.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from tqdm import tqdm

from feedloop.core.registry import DirectoryRegistry
from feedloop.core.store import open_store
from feedloop.demo.processes import (
    Child,
    feedloop_command,
    process_tree,
    start_child,
    start_server,
)
from feedloop.v1 import feedloop_pb2 as pb
from feedloop.v1 import feedloop_pb2_grpc as pb_grpc

HERE = Path(__file__).resolve().parent
# Served vs recomputed behaviour log-prob, per token: float rounding between a cached sampling
# step and one teacher-forced pass (tests/test_hf_policy.py and tests/test_hf_server.py).
EXACT_LOGPROB = 1e-5
SAMPLE_EVERY_S = 5.0
RSS_GROWTH_MIN_BYTES = 8 * 1024 * 1024
RSS_GROWTH_SHARE = 0.05
FD_GROWTH_MAX = 8
TINY_POLICY = dict(
    epochs=1,
    embedding_dim=16,
    hidden_dim=32,
    value_hidden_dim=16,
    batch_size=256,
    eval_samples=20,
    resume=False,
    torch_threads=1,
)


@dataclass
class Sample:
    at_s: float
    memory_bytes: int
    fds: int


@dataclass
class Swaps:
    forced: int = 0
    rollbacks: int = 0
    errors: list[str] = field(default_factory=list)


def memory_bytes(pid: int) -> int:
    """Memory of the server and its model process: the sum of their proportional set sizes
    (PSS: pages shared between the processes counted once in all)."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):  # a process that ended meanwhile has no memory
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
    if not total:
        raise RuntimeError(f"no memory figures for pid {pid}")
    return total


def open_fds(pid: int) -> int:
    """Open file descriptors of the server and its model process."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{member}/fd"))
    return total


def steady_growth(samples: list[Sample]) -> dict[str, Any]:
    """Middle-third vs last-third medians of RSS and fds, and whether either grew steadily."""
    third = len(samples) // 3
    if third < 2:
        return {"judged": False, "reason": "too few samples (run longer than ~30 s)"}
    middle, last = samples[third : 2 * third], samples[2 * third :]
    rss_mid = statistics.median(s.memory_bytes for s in middle)
    rss_last = statistics.median(s.memory_bytes for s in last)
    fd_mid = statistics.median(s.fds for s in middle)
    fd_last = statistics.median(s.fds for s in last)
    rss_limit = max(RSS_GROWTH_MIN_BYTES, RSS_GROWTH_SHARE * rss_mid)
    return {
        "judged": True,
        "rss_middle_mib": rss_mid / 2**20,
        "rss_last_mib": rss_last / 2**20,
        "rss_growth_limit_mib": rss_limit / 2**20,
        "rss_steady_growth": rss_last - rss_mid > rss_limit,
        "fds_middle": fd_mid,
        "fds_last": fd_last,
        "fds_steady_growth": fd_last - fd_mid > FD_GROWTH_MAX,
    }


def prepare_data_dir(data_dir: Path, policy: str, checkpoint: Path | None = None) -> Path:
    """Put the policy to serve where `feedloop serve` seeds from; returns its checkpoint."""
    from feedloop.core.pretrain import (
        PretrainConfig,
        default_checkpoint_dir,
        ensure_default_checkpoint,
        pretrain,
    )

    target = default_checkpoint_dir(data_dir)
    if checkpoint is not None:
        shutil.copytree(checkpoint, target)
    elif policy == "tiny":
        print("soak: pretraining a tiny policy (seconds)", flush=True)
        result = pretrain(PretrainConfig(data_dir=data_dir, **TINY_POLICY), progress=False)  # type: ignore[arg-type]
        if result.checkpoint != target:
            shutil.copytree(result.checkpoint, target)
    else:
        from feedloop.core.config import default_data_dir

        source = ensure_default_checkpoint(default_data_dir(), progress=True)
        shutil.copytree(source, target)
    return target


def store_location(data_dir: Path, args: argparse.Namespace) -> str:
    return args.store or str(data_dir / "replay.sqlite3")


def start_processes(data_dir: Path, args: argparse.Namespace) -> tuple[Child, Child | None]:
    store = ("--store", store_location(data_dir, args))
    server = start_server(
        data_dir,
        "--registry-poll-interval-s",
        "0.1",
        *store,
        log_path=data_dir / "logs" / "serve.log",
        name="feedloop serve",
    )
    if args.no_trainer:
        return server, None
    trainer = start_child(
        "feedloop train",
        feedloop_command(
            "train",
            "--data-dir",
            str(data_dir),
            "--metrics-port",
            "0",
            "--interval-s",
            "15",
            "--poll-interval-s",
            "1",
            "--wake-after-feedback-events",
            "300",
            "--min-feedback-events",
            "32",
            "--pause-between-rounds-s",
            "5",
            "--torch-threads",
            "1",
            "--join-window-s",
            "0",
            *(("--lora-rank", str(args.lora_rank)) if args.lora_rank else ()),
            *store,
        ),
        log_path=data_dir / "logs" / "train.log",
        banner_prefix="feedloop train: metrics=",
    )
    return server, trainer


def start_load(address: str, out: Path, args: argparse.Namespace) -> Child:
    return start_child(
        "soak load",
        [
            sys.executable,
            str(HERE / "soak_load.py"),
            "--target",
            address,
            "--duration-s",
            str(args.duration_s),
            "--generate-rps",
            str(args.generate_rps),
            "--feedback-rps",
            str(args.feedback_rps),
            "--stream-share",
            str(args.stream_share),
            "--out",
            str(out),
        ],
        log_path=out / "load.log",
        banner_prefix="soak_load: started",
    )


def force_swap(admin: pb_grpc.ModelAdminStub, swaps: Swaps, rollback: bool) -> None:
    """SetLive to the oldest version that is not live (or Rollback); errors are recorded."""
    try:
        if rollback:
            admin.Rollback(pb.RollbackRequest(reason="soak: forced rollback"), timeout=10)
            swaps.rollbacks += 1
            return
        models = admin.ListModels(pb.ListModelsRequest(max_decisions=1), timeout=10)
        others = [v.version for v in models.versions if not v.live]
        if not others:
            return
        target = others[(swaps.forced * 7) % len(others)]
        admin.SetLive(pb.SetLiveRequest(version=target, reason="soak: forced swap"), timeout=10)
        swaps.forced += 1
    except grpc.RpcError as exc:
        swaps.errors.append(f"{'Rollback' if rollback else 'SetLive'}: {exc.code().name}")


def check_store(location: str, acked_path: Path) -> dict[str, Any]:
    acked = [line for line in acked_path.read_text().splitlines() if line]
    store = open_store(location)
    try:
        stored = [f.event_id for f in store.feedback_after(0, 10_000_000)]
        generations = store.counts().generations
    finally:
        store.close()
    stored_set = set(stored)
    return {
        "acknowledged": len(acked),
        "acknowledged_distinct": len(set(acked)),
        "stored": len(stored),
        "stored_twice": len(stored) - len(stored_set),
        "missing": len(set(acked) - stored_set),
        "stored_not_acked": len(stored_set - set(acked)),
        "generations_stored": generations,
    }


def print_report(report: dict[str, Any]) -> None:
    load = report["load"]
    print("\n=== feedloop soak report ===")
    print(f"duration: {report['duration_s']:.0f} s (load ran {load['elapsed_s']:.0f} s)")
    print("requests by method and code:")
    for method, codes in sorted(load["codes"].items()):
        sent = load["sent"].get(method, sum(codes.values()))
        ok = codes.get("OK", 0)
        failed = {c: n for c, n in codes.items() if c != "OK"}
        print(f"  {method:<13} sent {sent:>7}  succeeded {ok:>7}  failed {failed or 0}")
    print("latency per minute (p50 / p99, ms):")
    for row in load["per_minute"]:
        cells = [
            f"{m} {v['p50_ms']:.1f}/{v['p99_ms']:.1f} (n={v['n']})"
            for m, v in row.items()
            if m != "minute"
        ]
        print(f"  minute {row['minute']:>3}: " + "; ".join(cells))
    store = report["store"]
    print(
        f"feedback: acknowledged {store['acknowledged_distinct']}, stored {store['stored']}, "
        f"missing {store['missing']}, stored twice {store['stored_twice']}, "
        f"stored but not acknowledged {store['stored_not_acked']}; "
        f"generations stored {store['generations_stored']}"
    )
    swaps = report["swaps"]
    print(
        f"swaps: server swaps succeeded {swaps['server_succeeded']}, refused "
        f"{swaps['server_refused']}; forced SetLive {swaps['forced']}, rollbacks "
        f"{swaps['rollbacks']}, trainer publishes {swaps['trainer_published']}; versions by "
        f"architecture {swaps['architectures']}"
        + (f", swap call errors {swaps['errors']}" if swaps["errors"] else "")
    )
    res = report["resources"]
    growth = res["growth"]
    print(
        f"server + model process memory (PSS): start {res['rss_start_mib']:.1f} MiB, "
        f"end {res['rss_end_mib']:.1f} MiB; "
        f"open fds: start {res['fds_start']}, end {res['fds_end']} ({res['samples']} samples)"
    )
    if growth["judged"]:
        print(
            f"growth (middle third -> last third medians): "
            f"memory {growth['rss_middle_mib']:.1f} -> "
            f"{growth['rss_last_mib']:.1f} MiB (limit +{growth['rss_growth_limit_mib']:.1f}), "
            f"fds {growth['fds_middle']:.0f} -> {growth['fds_last']:.0f} (limit +{FD_GROWTH_MAX})"
        )
    else:
        print(f"growth: not judged ({growth['reason']})")
    mismatch = report.get("logprob_mismatch")
    if mismatch is not None:
        print(
            f"behaviour log-prob vs recompute over {mismatch['generations']} generations "
            f"({mismatch['tokens']} tokens) from {len(mismatch['versions'])} versions: "
            f"max {mismatch['max']:.2e}, mean {mismatch['mean']:.2e} per token"
        )
    print(f"server exit code after SIGTERM: {report['server_exit_code']}")
    verdict = "PASS" if not report["problems"] else "FAIL: " + "; ".join(report["problems"])
    print(f"verdict: {verdict}")


def problems_of(report: dict[str, Any]) -> list[str]:
    problems = []
    load, store, growth = report["load"], report["store"], report["resources"]["growth"]
    if load["failed"]:
        problems.append(f"{load['failed']} requests failed")
    if load["duplicates"]:
        problems.append(f"{load['duplicates']} fresh events acknowledged as duplicates")
    if store["missing"]:
        problems.append(f"{store['missing']} acknowledged events missing from the store")
    if store["stored_twice"]:
        problems.append(f"{store['stored_twice']} events stored twice")
    if store["acknowledged_distinct"] != store["stored"]:
        problems.append(
            f"acknowledged {store['acknowledged_distinct']} != stored {store['stored']}"
        )
    if growth.get("rss_steady_growth"):
        problems.append("server memory grows steadily")
    if growth.get("fds_steady_growth"):
        problems.append("server open file descriptors grow steadily")
    if report["server_exit_code"] != 0:
        problems.append(f"server exited {report['server_exit_code']} on SIGTERM")
    mismatch = report.get("logprob_mismatch")
    if mismatch is not None and mismatch["max"] > EXACT_LOGPROB:
        problems.append(
            f"a behaviour log-prob is {mismatch['max']:.2e} from its recompute "
            f"(> {EXACT_LOGPROB:g})"
        )
    if report["trainer_died"]:
        problems.append("the trainer died during the soak")
    if sum(load["sent"].values()) == 0:
        problems.append("no requests were sent")
    return problems


def run(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    checkpoint = prepare_data_dir(data_dir, args.policy, args.checkpoint)
    server, trainer = start_processes(data_dir, args)
    address = server.banner["grpc"]
    out = data_dir / "load"
    samples: list[Sample] = []
    swaps = Swaps()
    started = time.monotonic()
    try:
        # A second version to swap to from the start (the trainer adds more as its gate allows).
        DirectoryRegistry(data_dir / "registry").publish(checkpoint, reason="soak: swap target")
        channel = grpc.insecure_channel(address)
        admin = pb_grpc.ModelAdminStub(channel)
        status_start = admin.GetStatus(pb.GetStatusRequest(), timeout=10)
        load = start_load(address, out, args)
        next_sample = next_swap = time.monotonic()
        next_swap += args.swap_every_s
        rollback_at = started + args.duration_s / 2
        rolled_back = False
        with tqdm(total=int(args.duration_s), unit="s", desc="soak", file=sys.stderr) as bar:
            while load.alive():
                now = time.monotonic()
                if now >= next_sample:
                    samples.append(
                        Sample(now - started, memory_bytes(server.pid), open_fds(server.pid))
                    )
                    next_sample += SAMPLE_EVERY_S
                if now >= next_swap and now < started + args.duration_s - 5:
                    force_swap(admin, swaps, rollback=False)
                    next_swap += args.swap_every_s
                # After a forced swap at least, so that there is always a version to go back to.
                if not rolled_back and now >= rollback_at and swaps.forced:
                    force_swap(admin, swaps, rollback=True)
                    rolled_back = True
                bar.n = min(int(now - started), int(args.duration_s))
                bar.set_postfix_str(
                    f"mem={samples[-1].memory_bytes / 2**20:.0f}MiB" if samples else ""
                )
                bar.refresh()
                time.sleep(0.2)
        samples.append(
            Sample(time.monotonic() - started, memory_bytes(server.pid), open_fds(server.pid))
        )
        load_code = load.stop()
        status_end = admin.GetStatus(pb.GetStatusRequest(), timeout=10)
        channel.close()
        trainer_died = trainer is not None and not trainer.alive()
    finally:
        if trainer is not None:
            trainer.stop(grace_s=30.0)
        server_exit_code = server.stop(grace_s=30.0)
    summary_path = out / "load_summary.json"
    if load_code != 0 or not summary_path.exists():
        raise SystemExit(
            f"soak: the load generator failed (exit {load_code}); see {out / 'load.log'}"
        )
    registry = DirectoryRegistry(data_dir / "registry")
    history = registry.history()
    report: dict[str, Any] = {
        "duration_s": time.monotonic() - started,
        "rates": {
            "generate_rps": args.generate_rps,
            "feedback_rps": args.feedback_rps,
            "stream_share": args.stream_share,
        },
        "load": json.loads(summary_path.read_text()),
        "store": check_store(store_location(data_dir, args), out / "acked.txt"),
        "swaps": {
            "server_succeeded": status_end.swaps_succeeded - status_start.swaps_succeeded,
            "server_refused": status_end.swaps_refused - status_start.swaps_refused,
            "forced": swaps.forced,
            "rollbacks": swaps.rollbacks,
            "errors": swaps.errors,
            "trainer_published": sum(
                1
                for d in history
                if d.action == "published" and not d.reason.startswith(("soak", "seed"))
            ),
            # versions by architecture (adapters with --lora-rank: hf-causal-lm-lora)
            "architectures": dict(
                collections.Counter(registry.manifest(v).architecture for v in registry.versions())
            ),
        },
        "resources": {
            "rss_start_mib": samples[0].memory_bytes / 2**20,
            "rss_end_mib": samples[-1].memory_bytes / 2**20,
            "fds_start": samples[0].fds,
            "fds_end": samples[-1].fds,
            "samples": len(samples),
            "growth": steady_growth(samples),
        },
        "server_exit_code": server_exit_code,
        "trainer_died": trainer_died,
    }
    if swaps.errors:
        report["load"]["failed"] += len(swaps.errors)
    if args.logprob_mismatch:
        from hf_mismatch import store_mismatch  # bench/ is on the path: this file runs as a script

        print("soak: recomputing the behaviour log-probs of every generation", flush=True)
        report["logprob_mismatch"] = store_mismatch(
            store_location(data_dir, args), data_dir / "registry"
        )
    report["problems"] = problems_of(report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Soak feedloop: server, trainer and load as real processes, with swaps.",
        epilog=__doc__.split("The report:")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration-s", type=float, default=120.0, help="how long the load runs")
    parser.add_argument("--generate-rps", type=float, default=20.0, help="Generate calls per s")
    parser.add_argument("--feedback-rps", type=float, default=20.0, help="feedback events per s")
    parser.add_argument(
        "--stream-share", type=float, default=0.5, help="share of feedback sent over streams"
    )
    parser.add_argument("--swap-every-s", type=float, default=15.0, help="forced SetLive period")
    parser.add_argument(
        "--policy",
        choices=("tiny", "default"),
        default="tiny",
        help="tiny: pretrained in seconds (CI); default: the real default policy",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="serve this checkpoint directory instead of --policy (e.g. an hf-causal-lm one "
        "from `feedloop pretrain --architecture hf-causal-lm`)",
    )
    parser.add_argument(
        "--logprob-mismatch",
        action="store_true",
        help="after the soak, recompute every generation's behaviour log-probs under the "
        "version that served it and report max / mean per token (fails above 1e-5)",
    )
    parser.add_argument("--no-trainer", action="store_true", help="soak the server alone")
    parser.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="the trainer publishes LoRA adapters of this rank over the served hf-causal-lm "
        "--checkpoint (0: full versions), so the forced swaps go between the base and adapters",
    )
    parser.add_argument(
        "--store",
        help="replay store for server and trainer: a postgresql:// URL (use a schema of its "
        "own, ?schema=NAME) or a SQLite path; default: DATA_DIR/replay.sqlite3",
    )
    parser.add_argument("--data-dir", type=Path, help="keep everything here (default: temporary)")
    parser.add_argument("--report-json", type=Path, help="also write the report as JSON")
    args = parser.parse_args(argv)

    if args.data_dir:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        report = run(args, args.data_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="feedloop-soak-") as tmp:
            report = run(args, Path(tmp))
    print_report(report)
    if args.report_json:
        args.report_json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
