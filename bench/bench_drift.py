"""Issue 21's drift benchmark: the whole loop (the demo's server, trainer and simulated users)
while the users' taste changes, against the same population whose taste does not.

    .venv/bin/python bench/bench_drift.py [--runs abrupt:0,abrupt:1,abrupt:2,none:0]
        [--phase-s 240] [--after-s 360] [--span-s 120] [--json bench/drift.json]
        [--plot bench/drift.png] [--trainer-arg=ARG ...] [--server-arg=ARG ...]

Each run is SCENARIO:PAIR. PAIR seeds the tastes: three disjoint letter sets A, B, C (the last
word of a liked phrase starts with one of them; demo/tastes.py), each about a quarter of the
pretrained policy's own phrases, measured on its samples for the demo's prompts. Scenarios:
  none     A for phase-s + after-s (the no-change run)
  abrupt   A for phase-s, then B for after-s
  twice    A for phase-s, B for after-s, then C for after-s
  gradual  A for phase-s, then users move to B one by one over span-s, then B to the end
  A run's --trainer-arg/--server-arg go to every run (e.g. `--trainer-arg=--drift-detect
  --trainer-arg=false` for the trainer without its drift reaction, `--server-arg=--explore-share
  --server-arg=0` without exploration); `--label` names that variant in the JSON.

Per run: the served liked rate (every answered request, exploration included, judged by the
taste each user had then) in --bucket-s buckets; after each change (gradual: from its start),
the time and feedback events until the served rate is 0.15 above the new taste's base (the
pretrained policy's share of it: the first version's rate on the new taste, what the reference
serves) and until it reaches the level phase 1 reached (the served rate over the last 60 s
before the change), or "not reached in N s" (a gradual change: also from the move's end,
`from_move_end`, when every user holds the new taste); the worst bucket after the change and how
long the served rate stayed below the base (longest run and total); the server's distinct-phrase
share and sampled entropy of what the policy served, every 15 s; the live version's held-out
perplexity ratio to the reference at the end (and the highest of any published version); the
trainer's drift detections and restarts. JSON is rewritten after every run, so a cut benchmark
keeps what it measured.

Figures are in seconds of a real run on this machine: its load moves them. Targets (issue 21):
+0.15 within 300 s for at least three taste pairs, the phase-1 level within 900 s, never below
the base for more than 120 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from bench_online import demo_args  # bench/ is on the path: this file runs as a script

from feedloop.client.errors import FeedloopClientError
from feedloop.core.config import default_data_dir
from feedloop.core.pretrain import default_checkpoint_dir
from feedloop.core.registry import DirectoryRegistry
from feedloop.demo.cli import Demo
from feedloop.demo.phases import (
    Bucket,
    first_reaching,
    served_buckets,
    served_mean,
    time_below,
)
from feedloop.demo.population import PopulationConfig, demo_prompts
from feedloop.demo.tastes import policy_initial_shares, set_share, taste_names, taste_sets

SCENARIOS = ("none", "abrupt", "twice", "gradual")
PLUS = 0.15  # the first target: this far above the new taste's base
LEVEL_WINDOW_S = 60.0  # phase 1's level: the served rate over its last minute
SCRAPE_S = 15.0
TARGET_PLUS_S, TARGET_LEVEL_S, TARGET_BELOW_S = 300.0, 900.0, 120.0
SHARE_PROMPTS = 500  # prompts (x4 samples) the letter shares are measured on


def log(message: str) -> None:
    print(f"bench_drift: {message}", file=sys.stderr, flush=True)


def scrape(address: str, names: tuple[str, ...]) -> dict[str, float]:
    """Unlabelled gauges from a /metrics page (nan when absent)."""
    page = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    found = dict.fromkeys(names, math.nan)
    for line in page.splitlines():
        name, _, value = line.partition(" ")
        if name in found:
            found[name] = float(value)
    return found


DIVERSITY = ("feedloop_served_distinct_phrase_share", "feedloop_served_sampled_entropy_nats")


def schedule(
    scenario: str, tastes: list[str], args: argparse.Namespace
) -> tuple[list[str], list[tuple[float, float, str]], float]:
    """The run's --taste-change specs, its changes as (start_s, end_s, new taste): the same
    instant for an abrupt change, the move's first and last user for a gradual one; and the
    run's duration."""
    _, b, c = tastes
    p1, after = args.phase_s, args.after_s
    if scenario == "none":
        return [], [], p1 + after
    if scenario == "abrupt":
        return [f"{b}@{p1:g}"], [(p1, p1, b)], p1 + after
    if scenario == "twice":
        second = p1 + after
        specs = [f"{b}@{p1:g}", f"{c}@{second:g}"]
        return specs, [(p1, p1, b), (second, second, c)], second + after
    return [f"{b}@{p1:g}-{p1 + args.span_s:g}"], [(p1, p1 + args.span_s, b)], p1 + after


def run_demo(
    args: argparse.Namespace,
    preference: str,
    changes: list[str],
    duration_s: float,
    seed: int,
    data_dir: Path,
    checkpoint: Path,
) -> tuple[Demo, list[dict[str, float]], dict[str, Any]]:
    """One demo run, scraping the server's diversity gauges; returns the demo (its stats), the
    scrapes and the registry's figures of the published versions."""
    ns = demo_args(
        args,
        preference,
        *(f"--taste-change={c}" for c in changes),
        *(f"--trainer-arg={a}" for a in args.trainer_arg),
        *(f"--server-arg={a}" for a in args.server_arg),
        duration_s=duration_s,
        seed=seed,
    )
    config = PopulationConfig.from_options(ns)
    demo = Demo(ns, config)
    scrapes: list[dict[str, float]] = []
    try:
        demo.start(data_dir, checkpoint)
        deadline = time.monotonic() + duration_s
        next_scrape = next_line = time.monotonic()
        while time.monotonic() < deadline:
            demo._poll()
            if time.monotonic() >= next_scrape:
                next_scrape += SCRAPE_S
                with contextlib.suppress(OSError):
                    figures = scrape(demo.server.banner["metrics"], DIVERSITY)
                    scrapes.append({"at_s": demo.stats.elapsed_s(), **figures})
            if time.monotonic() >= next_line:
                next_line += 30
                demo._progress_line()
            time.sleep(0.5)
        with contextlib.suppress(FeedloopClientError):
            demo.finish()
    finally:
        demo.stop_children()
    return demo, scrapes, registry_figures(data_dir / "registry")


def registry_figures(path: Path) -> dict[str, Any]:
    """Live's held-out perplexity ratio to the reference, the highest of any published
    version, and the versions' parents (a restart shows as a parent that is not the previous
    live)."""
    registry = DirectoryRegistry(path)
    try:
        live = registry.live()
        ratios: dict[str, float] = {}
        parents: dict[str, str | None] = {}
        for version in registry.versions():
            with contextlib.suppress(Exception):
                manifest = registry.manifest(version)
                parents[version] = manifest.parent_version
                ratio = (manifest.training_summary or {}).get("perplexity_ratio_reference")
                if isinstance(ratio, int | float):
                    ratios[version] = float(ratio)
        return {
            "live": live,
            "live_perplexity_ratio_reference": ratios.get(live or "", 1.0),
            "max_perplexity_ratio_reference": max(ratios.values(), default=1.0),
            "parents": parents,
        }
    finally:
        registry.close()


def after_change(
    buckets: list[Bucket], at_s: float, base: float, level: float, end_s: float
) -> dict[str, Any]:
    """The figures after one change (buckets cut at the change; see the module docstring)."""
    after = [b for b in buckets if at_s <= b.start_s < end_s]
    plus = first_reaching(after, base + PLUS)
    reached = first_reaching(after, level)
    below = time_below(after, base)
    return {
        "base": base,
        "phase1_level": level,
        "plus_015": plus.__dict__ | {"text": plus.describe()},
        "phase1_level_reached": reached.__dict__ | {"text": reached.describe()},
        "worst": below.worst,
        "worst_after_s": below.worst_at_s,
        "below_base_longest_s": below.longest_s,
        "below_base_total_s": below.total_s,
        "served_rate_last_60s": served_mean_of(buckets, end_s - LEVEL_WINDOW_S, end_s),
        "targets": {
            "plus_015_within_300s": plus.after_s is not None and plus.after_s <= TARGET_PLUS_S,
            "phase1_level_within_900s": (
                reached.after_s is not None and reached.after_s <= TARGET_LEVEL_S
            ),
            "below_base_at_most_120s": below.longest_s <= TARGET_BELOW_S,
        },
    }


def served_mean_of(buckets: list[Bucket], start_s: float, end_s: float) -> float:
    chosen = [b for b in buckets if start_s <= b.start_s < end_s and b.requests]
    total = sum(b.requests for b in chosen)
    return sum(b.mean_reward * b.requests for b in chosen) / total if total else math.nan


def measure(
    scenario: str,
    pair: int,
    args: argparse.Namespace,
    checkpoint: Path,
    shares: dict[str, float],
    workdir: Path,
) -> dict[str, Any]:
    sets = taste_sets(shares, 3, pair)
    tastes = taste_names(sets)
    bases = {name: set_share(shares, s) for name, s in zip(tastes, sets, strict=True)}
    specs, changes, duration = schedule(scenario, tastes, args)
    log(f"{scenario}:{pair}: tastes {tastes} (bases {bases}); changes {specs or 'none'}")
    started = time.time()
    demo, scrapes, registry = run_demo(
        args, tastes[0], specs, duration, pair, workdir / f"{scenario}-{pair}", checkpoint
    )
    stats = demo.stats
    end_s = min(stats.elapsed_s(), duration)
    answered = sorted(stats.answered)
    buckets = served_buckets(answered, 0.0, end_s, args.bucket_s)
    boundaries = [at for at, _, _ in changes] + [end_s]
    per_change = []
    for (at_s, moved_s, taste), until in zip(changes, boundaries[1:], strict=True):
        level = served_mean(answered, at_s - LEVEL_WINDOW_S, at_s)
        figures = {"at_s": at_s, "until_s": until, "taste": taste} | after_change(
            buckets, at_s, bases[taste], level, until
        )
        if moved_s > at_s:
            # A gradual change counted from its start credits the users who still hold the old
            # taste; from the move's end, every user holds the new one.
            figures["from_move_end"] = {"at_s": moved_s} | after_change(
                buckets, moved_s, bases[taste], level, until
            )
        per_change.append(figures)
    explored = [a.reward for a in answered if a.served_as == "exploration"]
    policy = [a.reward for a in answered if a.served_as != "exploration"]
    distinct = [s["feedloop_served_distinct_phrase_share"] for s in scrapes]
    entropy = [s["feedloop_served_sampled_entropy_nats"] for s in scrapes]
    # Before the first phrase is served the gauges read 0: not a figure of any policy.
    finite = lambda xs: [x for x in xs if math.isfinite(x) and x > 0]  # noqa: E731
    return {
        "scenario": scenario,
        "pair": pair,
        "label": args.label,
        "trainer_args": list(args.trainer_arg),
        "server_args": list(args.server_arg),
        "tastes": tastes,
        "bases": bases,
        "changes": specs,
        "duration_s": duration,
        "wall_s": time.time() - started,
        "requests": stats.requests,
        "feedback_events": stats.feedback_events,
        "errors": dict(stats.errors),
        "phase1_level": served_mean(answered, args.phase_s - LEVEL_WINDOW_S, args.phase_s),
        "served_rate_at_end": served_mean(answered, end_s - LEVEL_WINDOW_S, end_s),
        "after_changes": per_change,
        "served_rate": [[b.start_s, b.mean_reward, b.requests, b.feedback_events] for b in buckets],
        "exploration": {
            "requests": len(explored),
            "share": len(explored) / max(len(answered), 1),
            "mean_reward": statistics.fmean(explored) if explored else math.nan,
            "policy_mean_reward": statistics.fmean(policy) if policy else math.nan,
        },
        "diversity": {
            "every_15s": scrapes,
            "distinct_share_first_min_last": _first_min_last(finite(distinct)),
            "sampled_entropy_first_min_last": _first_min_last(finite(entropy)),
        },
        "perplexity": registry,
        "swaps": [[s.at_s, s.live] for s in stats.swaps],
        "rounds": stats.round_counts(),
        "restarts": [[r.at_s, r.detail] for r in stats.rounds if "trained_from=" in r.detail],
        "drift_detections": [[at, line] for at, line in stats.drift_lines],
    }


def finite_json(value: Any) -> Any:
    """NaN and infinities as null: the JSON stays standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def _first_min_last(values: list[float]) -> list[float]:
    return [values[0], min(values), values[-1]] if values else []


def summary_line(run: dict[str, Any]) -> str:
    bits = [
        f"{run['scenario']}:{run['pair']}{'/' + run['label'] if run['label'] else ''}",
        f"phase 1 {run['phase1_level']:.3f}",
        f"end {run['served_rate_at_end']:.3f}",
    ]
    for change in run["after_changes"]:
        bits.append(
            f"after {change['at_s']:.0f}s -> {change['taste']} (base {change['base']:.3f}): "
            f"+0.15 {change['plus_015']['text']}; phase-1 level "
            f"{change['phase1_level_reached']['text']}; worst {change['worst']:.3f}; below base "
            f"{change['below_base_longest_s']:.0f} s longest"
        )
        end = change.get("from_move_end")
        if end is not None:
            bits.append(
                f"from the move's end at {end['at_s']:.0f}s: +0.15 {end['plus_015']['text']}; "
                f"phase-1 level {end['phase1_level_reached']['text']}"
            )
    div = run["diversity"]
    bits.append(
        f"distinct {div['distinct_share_first_min_last']} entropy "
        f"{div['sampled_entropy_first_min_last']}; ppl ratio live "
        f"{run['perplexity']['live_perplexity_ratio_reference']:.3f} max "
        f"{run['perplexity']['max_perplexity_ratio_reference']:.3f}; "
        f"{len(run['drift_detections'])} drift detections, {len(run['restarts'])} restarts"
    )
    return "; ".join(bits)


def plot(runs: list[dict[str, Any]], path: Path, also: Sequence[dict[str, Any]] = ()) -> None:
    """The runs' served liked rate over time; `also` (another benchmark's runs, e.g. the
    before figure) drawn thin and grey beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(11, 5.5), dpi=110)
    for run in also:
        rate = [(t, m) for t, m, n, _ in run["served_rate"] if n]
        label = f"{run['scenario']}:{run['pair']} {run['label']}".strip()
        axes.plot(
            [t for t, _ in rate],
            [m for _, m in rate],
            color="grey",
            linewidth=1,
            linestyle="-.",
            label=label,
        )
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        label = f"{run['scenario']}:{run['pair']}" + (f" {run['label']}" if run["label"] else "")
        rate = [(t, m) for t, m, n, _ in run["served_rate"] if n]
        axes.plot([t for t, _ in rate], [m for _, m in rate], color=color, label=label)
        for change in run["after_changes"]:
            axes.axvline(change["at_s"], color=color, linestyle=":", linewidth=1)
            axes.hlines(
                change["base"],
                change["at_s"],
                change.get("until_s", change["at_s"] + 60),
                colors=color,
                linestyles="--",
                linewidth=1,
            )
    axes.set_xlabel("seconds since the users started")
    axes.set_ylabel("served liked rate (true reward, exploration included)")
    axes.set_title("bench_drift: served liked rate; dotted: taste changes, dashed: new base")
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def parse_runs(text: str) -> list[tuple[str, int]]:
    runs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        scenario, _, pair = part.partition(":")
        if scenario not in SCENARIOS or not pair.isdigit():
            raise argparse.ArgumentTypeError(
                f"run {part!r}: expected SCENARIO:PAIR, SCENARIO one of {', '.join(SCENARIOS)}"
            )
        runs.append((scenario, int(pair)))
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--runs", type=parse_runs, default=parse_runs("abrupt:0,abrupt:1,abrupt:2,none:0")
    )
    p.add_argument("--phase-s", type=float, default=240.0)
    p.add_argument("--after-s", type=float, default=360.0)
    p.add_argument("--span-s", type=float, default=120.0)
    p.add_argument("--bucket-s", type=float, default=15.0)
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--rate-rps", type=float, default=40.0)
    p.add_argument("--label", default="", help="names this variant (trainer/server args)")
    p.add_argument("--trainer-arg", action="append", default=[])
    p.add_argument("--server-arg", action="append", default=[])
    p.add_argument("--json", type=Path, default=Path("bench/drift.json"))
    p.add_argument("--plot", type=Path, default=Path("bench/drift.png"))
    p.add_argument(
        "--also",
        type=Path,
        help="another run's JSON (e.g. bench/drift_before.json), drawn beside these runs",
    )
    args = p.parse_args(argv)
    # A stopped benchmark stops its server and trainer too (the demo's finally clauses).
    signal.signal(signal.SIGTERM, _raise_interrupt)
    checkpoint = default_checkpoint_dir(default_data_dir())
    if not (checkpoint / "manifest.json").exists():
        log(f"no default policy at {checkpoint}: run `feedloop pretrain` first")
        return 2
    shares = policy_initial_shares(checkpoint, demo_prompts(0)[:SHARE_PROMPTS], seed=0)
    log(f"letter shares of the pretrained policy's phrases: {shares}")
    results: list[dict[str, Any]] = []
    also = json.loads(args.also.read_text())["runs"] if args.also else []
    with tempfile.TemporaryDirectory(prefix="bench-drift-") as tmp:
        for scenario, pair in args.runs:
            run = measure(scenario, pair, args, checkpoint, shares, Path(tmp))
            results.append(run)
            log(summary_line(run))
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(
                json.dumps(
                    finite_json({"command": sys.argv, "letter_shares": shares, "runs": results}),
                    indent=1,
                    default=str,
                )
            )
            plot(results, args.plot, also)
    for run in results:
        print(summary_line(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
