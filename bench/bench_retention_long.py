"""An accelerated long run: weeks of traffic and publications written straight into two replay
stores and two registries, one pair under retention and one without, disk measured as it goes.

Each simulated hour writes --generations-per-day / 24 generations (synthetic rows the size of
real ones: 12 output tokens, both log-probability lists) and a rating for every second one,
in group commits of 1,000, with created_at/received_at on the simulated clock. The trainer's
cursor is moved as the trainer would move it (everything older than the current hour
consumed), and every --publish-every-h simulated hours both registries get a publication of the
same checkpoint (default-size policy, 6 MB) made live. Every 6 simulated hours the retention arm
runs `StorePruner.run_once` (--retain-days, a day protected, batches of 500, no pause: the clock
is simulated) and the registry's retention (the trainer's default policy). Both arms get the same
rows in the same order in one run.

    .venv/bin/python bench/bench_retention_long.py [--days 30] [--generations-per-day 50000]
        [--plot docs/retention_long_run.png] [--json out.json] [--backend sqlite|postgres]

On PostgreSQL each prune ends with a plain VACUUM of the pruned tables (the store's
reclaim_space), so later rows reuse the space: the size levels off rather than shrinking.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from bench_serve import pg_schema, prepare_checkpoint

from feedloop.core.registry import DirectoryRegistry
from feedloop.core.registry.retention import RetentionPolicy
from feedloop.core.store import FeedbackRecord, GenerationRecord, ReplayStore, open_store
from feedloop.core.store.retention import DAY_S, StorePruner, StoreRetentionPolicy

HOUR_S = 3600.0
BATCH = 1000
RATED_EVERY = 2  # every second generation gets a rating: 0.5 events a generation


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def generation(i: int, t: float) -> GenerationRecord:
    return GenerationRecord(
        generation_id=f"g{i:09d}",
        request_id=f"r{i // 4:09d}",
        prompt="ocean sunrise",
        prompt_ids=[2, 17, 33],
        output_ids=[(i + k) % 900 + 4 for k in range(12)],
        behaviour_logprobs=[-0.5 - (i + k) % 7 / 10 for k in range(12)],
        policy_logprobs=[-0.6 - (i + k) % 5 / 10 for k in range(12)],
        finished=True,
        text="the quiet sea holds the morning light",
        sampling={"temperature": 0.9, "top_k": 40, "top_p": 0.95, "max_tokens": 16, "seed": i},
        model_version="v0001",
        client_id=f"app-{i % 50}",
        created_at=t,
        candidate_index=i % 4,
        num_candidates=4,
    )


def rating(j: int, generation_id: str, t: float) -> FeedbackRecord:
    return FeedbackRecord(
        event_id=f"e{j:09d}",
        kind="rating",
        generation_ids=[generation_id],
        client_id=f"app-{j % 50}",
        received_at=t,
        score=float(j % 5),
        scale="five-star",
        given_at=t,
    )


@dataclass
class Arm:
    name: str
    store: ReplayStore
    registry: DirectoryRegistry
    pruner: StorePruner | None
    prune_s: list[float] = field(default_factory=list)


def run(args: argparse.Namespace, workdir: Path, locations: dict[str, str]) -> dict[str, Any]:
    checkpoint, checkpoint_kind = prepare_checkpoint(None, workdir)
    clock = {"now": 0.0}
    arms = []
    for name, retained in (("off", False), ("on", True)):
        store = open_store(locations[name])
        registry = DirectoryRegistry(workdir / name / "registry")
        registry.publish(checkpoint, reason="seed", make_live=True)
        pruner = (
            StorePruner(
                store,
                StoreRetentionPolicy(retain_s=args.retain_days * DAY_S, pause_s=0.0),
                clock=lambda: clock["now"],
            )
            if retained
            else None
        )
        arms.append(Arm(name, store, registry, pruner))
    per_hour = args.generations_per_day // 24
    samples: list[dict[str, Any]] = []
    gen_i = event_j = 0
    started = time.monotonic()
    for hour in range(args.days * 24):
        t0 = hour * HOUR_S
        clock["now"] = t0 + HOUR_S
        gens = [generation(gen_i + k, t0 + k * HOUR_S / per_hour) for k in range(per_hour)]
        gen_i += per_hour
        rated = gens[::RATED_EVERY]
        events = [
            rating(event_j + k, g.generation_id, g.created_at + 30.0) for k, g in enumerate(rated)
        ]
        event_j += len(events)
        for arm in arms:
            for start in range(0, len(gens), BATCH):
                arm.store.append_generations(gens[start : start + BATCH])
            for start in range(0, len(events), BATCH):
                arm.store.insert_feedback(events[start : start + BATCH])
            generation_seq, feedback_seq = arm.store.max_seq()
            # The trainer consumed everything but the newest hour's unrated generations.
            arm.store.set_cursor(
                "trainer",
                {"generation_seq": generation_seq - per_hour // 2, "feedback_seq": feedback_seq},
            )
        if (hour + 1) % args.publish_every_h == 0:
            for arm in arms:
                arm.registry.publish(checkpoint, reason="round", make_live=True)
                if arm.pruner is not None:
                    arm.registry.prune(RetentionPolicy(), reference="v0001")
        if (hour + 1) % 6 == 0:
            for arm in arms:
                if arm.pruner is not None:
                    began = time.monotonic()
                    arm.pruner.run_once()
                    arm.prune_s.append(time.monotonic() - began)
            sample = {
                "day": (hour + 1) / 24,
                "generations_written": gen_i,
                "events_written": gen_i + event_j,
            }
            for arm in arms:
                arm.store.reclaim_space()  # both: checkpoints and truncates the WAL
                sample[f"store_bytes_{arm.name}"] = arm.store.size_bytes()
                sample[f"registry_bytes_{arm.name}"] = arm.registry.size_bytes()
                sample[f"rows_{arm.name}"] = arm.store.counts().generations
            samples.append(sample)
            if (hour + 1) % 24 == 0:
                log(
                    f"day {sample['day']:.0f}: {gen_i + event_j:,} events written; store "
                    f"off {sample['store_bytes_off'] / 1e6:.0f} MB, on "
                    f"{sample['store_bytes_on'] / 1e6:.0f} MB; registry off "
                    f"{sample['registry_bytes_off'] / 1e6:.0f} MB, on "
                    f"{sample['registry_bytes_on'] / 1e6:.0f} MB "
                    f"({time.monotonic() - started:.0f} s)"
                )
    on = arms[1]
    return {
        "backend": args.backend,
        "checkpoint": checkpoint_kind,
        "days": args.days,
        "generations_per_day": per_hour * 24,
        "retain_days": args.retain_days,
        "publish_every_h": args.publish_every_h,
        "samples": samples,
        "prune_s_median": sorted(on.prune_s)[len(on.prune_s) // 2],
        "prune_s_max": max(on.prune_s),
        "wall_s": time.monotonic() - started,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    samples = result["samples"]
    days = [s["day"] for s in samples]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, style in (("off", "--"), ("on", "-")):
        label = "retention on" if arm == "on" else "retention off"
        left.plot(days, [s[f"store_bytes_{arm}"] / 1e6 for s in samples], style, label=label)
        right.plot(days, [s[f"registry_bytes_{arm}"] / 1e6 for s in samples], style, label=label)
    left.set_title(
        f"replay store ({result['backend']}), {result['generations_per_day']:,} generations "
        f"+ {result['generations_per_day'] // RATED_EVERY:,} ratings a day; "
        f"keep {result['retain_days']:g} days",
        fontsize=9,
    )
    right.set_title(
        f"registry (directory), a 6 MB version every {result['publish_every_h']} h; "
        "default retention",
        fontsize=9,
    )
    for axis in (left, right):
        axis.set_xlabel("simulated days")
        axis.set_ylabel("MB on disk")
        axis.legend()
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--generations-per-day", type=int, default=50_000)
    parser.add_argument("--retain-days", type=float, default=3.0)
    parser.add_argument("--publish-every-h", type=int, default=6)
    parser.add_argument("--plot", type=Path, default=Path("docs/retention_long_run.png"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--replot", type=Path, help="only redraw --plot from a --json file")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.plot)
        return
    with (
        tempfile.TemporaryDirectory(prefix="bench-retention-") as workdir,
        pg_schema() as off_url,
        pg_schema() as on_url,
    ):
        if args.backend == "postgres":
            if off_url is None or on_url is None:
                raise SystemExit("no PostgreSQL at 127.0.0.1:5432")
            locations = {"off": off_url, "on": on_url}
        else:
            locations = {arm: str(Path(workdir) / arm / "replay.sqlite3") for arm in ("off", "on")}
        result = run(args, Path(workdir), locations)
    plot(result, args.plot)
    last = result["samples"][-1]
    summary = {k: v for k, v in result.items() if k != "samples"} | {"last": last}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
