"""Online evaluation, measured: what canary and shadow trials cost the server, how fast a bad
candidate is rolled back, and how the loop serves users whose taste changes.

    .venv/bin/python bench/bench_online.py cost [--duration-s 8] [--rounds 3]
    .venv/bin/python bench/bench_online.py bad-candidate [--rate-rps 40]
    .venv/bin/python bench/bench_online.py taste-change [--duration-s 600]

cost: one `feedloop serve` (batch 32, 2 ms queue delay, as bench_serve's batched row) with
v0001 live and v0002 (the same weights, published again) on trial; closed-loop Generate at
concurrency 64 from h2load for each state in turn: no trial, v0002 as a 10% canary, v0002 as a
10% shadow (scoring a tenth of live's generations). The states alternate `rounds` times; the
report gives each state's median generations/s and p99 and their ratios to no trial, one run.

bad-candidate: the demo's server, trainer and simulated users (preference `keyword`, the share
of the prompt's keywords a phrase contains) with the default policy live. After a warm-up a bad
candidate is published as a canary on 10% of users (sticky by user id): the default policy with
its output logits scaled down (a flatter, valid policy that drops keywords more often; the
registry takes it as any other version, the gate is not asked). The trainer trains nothing here
(its round triggers are set out of reach) and judges the trial every decision_interval_s with
the default decision policy. Reported: seconds from publication to the automatic rollback, the
share of requests the candidate served, failed requests, the true reward of both sides, and the
true reward the users lost (the difference of means times the candidate's candidates).

taste-change: the demo (canary publishing, or `--publish-as live`: candidates live at once
and watched; trainer settings named in the report) and a population whose taste changes
halfway, from include:little to include:old (two words of about the same frequency in the
corpus: 214 and 202 of 6,000 phrases). Reported: the live version's true reward over time, the
time from the change to the first promotion of a version that serves the new taste better than
the one live at the change (by more than 0.05 in mean true reward), the worst true reward
served, and the no-silent-regression figure: the longest stretch during which the live
version's reward stayed more than 0.05 below the best version seen in the same phase.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sqlite3
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import generate_point, serve

from feedloop.client import FeedloopClient
from feedloop.core.checkpoint import load_checkpoint, save_checkpoint
from feedloop.core.config import default_data_dir
from feedloop.core.pretrain import ensure_default_checkpoint
from feedloop.core.registry import CANARY, SHADOW, DirectoryRegistry
from feedloop.demo.cli import Demo
from feedloop.demo.options import build_parser
from feedloop.demo.phases import (
    live_at,
    live_reward_timeline,
    phases_of,
    regression,
    versions_in,
)
from feedloop.demo.population import PopulationConfig

TRIAL_SHARE = 0.1
BETTER_BY = 0.05  # a version serves the new taste better: by more than this in true reward
NO_TRAINING = ("--interval-s", "86400", "--wake-after-feedback-events", "100000000")


def log(message: str) -> None:
    print(f"bench_online: {message}", file=sys.stderr, flush=True)


def metric(metrics_address: str, name: str) -> float:
    """The sum of a series' samples on a /metrics page (0 when absent)."""
    page = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in page.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(predicate: Any, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


# -- cost ----------------------------------------------------------------------------------------


def bench_cost(args: argparse.Namespace, workdir: Path, checkpoint: Path) -> dict[str, Any]:
    registry_dir = workdir / "registry"
    registry = DirectoryRegistry(registry_dir)
    registry.publish(checkpoint, reason="bench: live", make_live=True)
    trial_version = registry.publish(checkpoint, reason="bench: the trial's version")
    flags = ("--max-batch-size", "32", "--max-queue-delay-ms", "2")
    rows: list[dict[str, Any]] = []
    store = workdir / "replay.sqlite3"
    with serve(workdir, checkpoint, *flags, registry=str(registry_dir), store=str(store)) as server:
        client = FeedloopClient(server["grpc"], timeout_s=10)

        def served_as_canary() -> bool:
            replies = [client.generate("a", 1, routing_key=f"k{i}") for i in range(40)]
            return any(r.served_as == CANARY for r in replies)

        def scoring() -> bool:
            before = metric(server["metrics"], "feedloop_shadow_scored_generations_total")
            for i in range(40):
                client.generate("a", 1, routing_key=f"k{i}")
            time.sleep(0.3)
            return metric(server["metrics"], "feedloop_shadow_scored_generations_total") > before

        def no_trial() -> bool:
            return client.status().trial is None

        for round_ in range(args.rounds):
            for state in ("none", CANARY, SHADOW):
                if registry.pointer().trial is not None:
                    registry.end_trial(promote=False, reason="bench: next state")
                if state == "none":
                    wait_until(no_trial, "the server to end the trial")
                else:
                    registry.start_trial(trial_version, mode=state, share=TRIAL_SHARE)
                    wait_until(served_as_canary if state == CANARY else scoring, state)
                scored = metric(server["metrics"], "feedloop_shadow_scored_generations_total")
                log(f"round {round_ + 1}: {state} ...")
                point = generate_point("h2load", server, 64, args.duration_s)
                scored = (
                    metric(server["metrics"], "feedloop_shadow_scored_generations_total") - scored
                )
                rows.append({"round": round_ + 1, "state": state, "shadow_scored": scored, **point})
                log(f"  {point['per_s']:.0f}/s, p99 {point['p99_ms']:.1f} ms, scored {scored:.0f}")
        client.close()
    served_as = count_served_as(store)
    out: dict[str, Any] = {"share": TRIAL_SHARE, "rows": rows, "served_as": served_as}
    for state in ("none", CANARY, SHADOW):
        mine = [r for r in rows if r["state"] == state]
        out[state] = {
            "per_s": statistics.median(r["per_s"] for r in mine),
            "p99_ms": statistics.median(r["p99_ms"] for r in mine),
            "errors": sum(error_count(r.get("errors", 0)) for r in mine),
        }
    for state in (CANARY, SHADOW):
        out[state]["per_s_over_none"] = out[state]["per_s"] / out["none"]["per_s"]
        out[state]["p99_over_none"] = out[state]["p99_ms"] / out["none"]["p99_ms"]
    return out


def error_count(errors: int | dict[str, int]) -> int:
    return sum(errors.values()) if isinstance(errors, dict) else int(errors)


def count_served_as(store: Path) -> dict[str, int]:
    """Logged generations by why they were served (live, canary, pinned)."""
    with contextlib.closing(sqlite3.connect(store)) as db:
        return dict(db.execute("SELECT served_as, COUNT(*) FROM generations GROUP BY served_as"))


# -- the demo-based scenarios --------------------------------------------------------------------


def demo_args(
    args: argparse.Namespace,
    preference: str,
    *extra: str,
    duration_s: float | None = None,
    seed: int | None = None,
) -> argparse.Namespace:
    """The demo's options for a bench run: args' users and rate; args' duration and seed unless
    given (bench_drift's runs each have their own)."""
    return build_parser().parse_args(
        [
            "--preference",
            preference,
            "--users",
            str(args.users),
            "--rate-rps",
            str(args.rate_rps),
            "--duration-s",
            str(args.duration_s if duration_s is None else duration_s),
            "--no-live",
            "--seed",
            str(args.seed if seed is None else seed),
            *extra,
        ]
    )


def start_demo(demo_ns: argparse.Namespace, data_dir: Path, checkpoint: Path) -> Demo:
    config = PopulationConfig.from_options(demo_ns)
    demo = Demo(demo_ns, config)
    demo.start(data_dir, checkpoint)
    return demo


def flatten(checkpoint: Path, factor: float, out: Path) -> Path:
    """The policy with its output logits scaled by factor (< 1: flatter, more random)."""
    import torch

    policy, manifest = load_checkpoint(checkpoint)
    with torch.no_grad():
        policy.output.weight.mul_(factor)  # type: ignore[operator]
        policy.output.bias.mul_(factor)  # type: ignore[operator]
    save_checkpoint(policy, out, parent_version=manifest.version, training_summary={})
    return out


def trial_window(registry: DirectoryRegistry, version: str) -> tuple[float, float, str, str]:
    """(start, end, action, reason) of the version's trial, from the registry's history."""
    from feedloop.core.registry.pointer import unix_seconds

    start = end = math.nan
    action = reason = ""
    for decision in reversed(registry.history()):
        # A trial's rollback names the version that serves and `from` the one removed.
        if version not in (decision.version, decision.details.get("from")):
            continue
        if math.isnan(start) and decision.action in (CANARY, SHADOW):
            start = unix_seconds(decision.at)
        elif not math.isnan(start):
            end, action, reason = unix_seconds(decision.at), decision.action, decision.reason
            break
    return start, end, action, reason


def bench_bad_candidate(
    args: argparse.Namespace, workdir: Path, checkpoint: Path
) -> dict[str, Any]:
    bad = flatten(checkpoint, args.flatten, workdir / "bad-candidate")
    extra = [f"--trainer-arg={a}" for a in (*NO_TRAINING, "--decision-interval-s", "5")]
    demo = start_demo(demo_args(args, "keyword", *extra), workdir / "demo", checkpoint)
    registry = DirectoryRegistry(workdir / "demo" / "registry")
    try:
        time.sleep(args.warmup_s)
        version = registry.publish(bad, reason="bench: a bad candidate")
        published_at, published_s = time.time(), demo.stats.elapsed_s()
        registry.start_trial(version, mode=CANARY, share=TRIAL_SHARE, reason="bench")
        log(f"{version} on canary trial; waiting for the verdict")
        deadline = time.monotonic() + args.duration_s
        while registry.pointer().trial is not None and time.monotonic() < deadline:
            demo._poll()
            time.sleep(0.5)
        ended_s = demo.stats.elapsed_s()
        time.sleep(3)  # answers in flight are counted
        demo.finish()
    finally:
        demo.stop_children()
    start, end, action, reason = trial_window(registry, version)
    during = [s for s in demo.stats.samples if published_s <= s.at_s <= ended_s]
    canary = [s.reward for s in during if s.version == version]
    live = [s.reward for s in during if s.version != version]
    live_mean = statistics.fmean(live) if live else math.nan
    canary_mean = statistics.fmean(canary) if canary else math.nan
    return {
        "candidate": version,
        "flatten": args.flatten,
        "decision": action or "none before the deadline",
        "reason": reason,
        "publication_to_decision_s": end - start if action else math.nan,
        "publication_at": published_at,
        "requests_during_trial": len(during),
        "canary_requests": len(canary),
        "canary_request_share": len(canary) / len(during) if during else math.nan,
        "live_mean_true_reward": live_mean,
        "canary_mean_true_reward": canary_mean,
        # Each request's sample is the mean over its candidates: times candidates per request.
        "true_reward_lost": (live_mean - canary_mean) * len(canary) * demo.args.candidates,
        "failed_requests": sum(demo.stats.errors.values()),
        "errors": dict(demo.stats.errors),
    }


def bench_taste_change(args: argparse.Namespace, workdir: Path, checkpoint: Path) -> dict[str, Any]:
    change_at = args.duration_s / 2
    trainer = (
        "--publish-as",
        args.publish_as,
        "--canary-share",
        str(args.canary_share),
        "--decision-margin",
        str(args.margin),
        "--decision-interval-s",
        "5",
    )
    extra = [f"--trainer-arg={a}" for a in trainer]
    extra += ["--taste-change", f"{args.second_taste}@{change_at}"]
    ns = demo_args(args, args.first_taste, *extra)
    demo = start_demo(ns, workdir / "demo", checkpoint)
    try:
        demo.run()
        models = demo.finish()
    finally:
        demo.stop_children()
    stats = demo.stats
    end_s = stats.elapsed_s()
    phases = phases_of(args.first_taste, stats.taste_changes, end_s)
    by_phase = [versions_in(p, stats.samples) for p in phases]
    live_at_change = live_at(stats.initial_version, stats.swaps, change_at)
    second = by_phase[-1] if len(phases) > 1 else {}
    base = second.get(live_at_change)
    first_better = next(
        (
            s
            for s in stats.swaps
            if s.at_s > change_at
            and base is not None
            and s.live in second
            and second[s.live].mean_reward > base.mean_reward + BETTER_BY
        ),
        None,
    )
    timeline = live_reward_timeline(stats.samples, 30.0, end_s)
    figures = regression(phases, stats.samples, stats.initial_version, stats.swaps)
    decisions = [
        {"version": d.version, "action": d.action, "reason": d.reason, "at": d.at}
        for d in (models.decisions if models else [])
    ]
    return {
        "trainer_args": list(trainer),
        "phases": [p.__dict__ for p in phases],
        "versions_by_phase": [{v: s.__dict__ for v, s in p.items()} for p in by_phase],
        "live_at_change": live_at_change,
        "change_to_better_promotion_s": first_better.at_s - change_at if first_better else None,
        "better_version": first_better.live if first_better else None,
        "live_reward_every_30s": timeline,
        "worst_live_reward_30s": min((r for _, r, n in timeline if n), default=math.nan),
        "regression": figures.__dict__,
        "swaps": [s.__dict__ for s in stats.swaps],
        "rounds": stats.round_counts(),
        "requests": stats.requests,
        "feedback_events": stats.feedback_events,
        "errors": dict(stats.errors),
        "decisions": decisions[:40],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="scenario", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", type=Path, help="also write the figures here")
    cost = sub.add_parser("cost", parents=[common])
    cost.add_argument("--duration-s", type=float, default=8.0)
    cost.add_argument("--rounds", type=int, default=3)
    for name, duration in (("bad-candidate", 300.0), ("taste-change", 600.0)):
        s = sub.add_parser(name, parents=[common])
        s.add_argument("--duration-s", type=float, default=duration)
        s.add_argument("--users", type=int, default=64)
        s.add_argument("--rate-rps", type=float, default=40.0)
        s.add_argument("--seed", type=int, default=0)
        if name == "bad-candidate":
            s.add_argument("--warmup-s", type=float, default=15.0)
            s.add_argument("--flatten", type=float, default=0.5)
        else:
            s.add_argument("--first-taste", default="include:little")
            s.add_argument("--second-taste", default="include:old")
            s.add_argument("--publish-as", choices=("canary", "live"), default="canary")
            s.add_argument("--canary-share", type=float, default=0.2)
            s.add_argument("--margin", type=float, default=0.2)
    args = p.parse_args(argv)
    checkpoint = ensure_default_checkpoint(default_data_dir())
    with tempfile.TemporaryDirectory(prefix="bench-online-") as tmp:
        workdir = Path(tmp)
        if args.scenario == "cost":
            result = bench_cost(args, workdir, checkpoint)
        elif args.scenario == "bad-candidate":
            result = bench_bad_candidate(args, workdir, checkpoint)
        else:
            result = bench_taste_change(args, workdir, checkpoint)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
