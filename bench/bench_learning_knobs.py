"""Learning figures of the declared knobs: entropy bonus, rebalancing, exploration under drift.

    .venv/bin/python bench/bench_learning_knobs.py entropy [--coefs 0,0.01,0.03] [--events 2500]
    .venv/bin/python bench/bench_learning_knobs.py imbalance [--events 2500]
    .venv/bin/python bench/bench_learning_knobs.py explore [--shares 0,0.1] [--events 2500]
        [--first-taste include:little] [--second-taste include:old]

Every arm is a fresh store and registry whose live version is the default pretrained policy, the
default TrainConfig (candidates live at once, as in bench/learning_curves.py) but for the knob
under test, and a simulated user (noisy ratings, comparisons, rankings, corrections) answering
the live version's phrases in the trainer's process; one round runs every --events-per-round
events. After each round: the live version's mean true reward under the current taste on
validation prompts, and the gate's diversity figures of the round's candidate (its sampled
entropy and distinct-phrase share). The arms of one run interleave round by round, so a shared
machine slows them alike.

entropy: entropy_coef arms on one taste (learned to its top): reward, diversity, perplexity.
imbalance: a 90/10 stream: users rate every phrase they like but only a share of those they do
not, so ratings are 90% liked on the pretrained policy (reporting bias); rating_class_balance 0
against 1.
explore: the taste changes after --events (from --first-taste to --second-taste, disjoint);
explore_share arms (the server's exploration share, temperature --explore-temperature), each run
--events more after the change: how fast the new taste is learned, and exploration's cost on the
first taste (served liked rate of both arms).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from feedloop.core.checkpoint import load_checkpoint
from feedloop.core.config import default_data_dir
from feedloop.core.corpus import load_phrases, split_corpus
from feedloop.core.evaluation import perplexity
from feedloop.core.exploration import Exploration
from feedloop.core.pretrain import ensure_default_checkpoint
from feedloop.core.registry import open_registry
from feedloop.core.store import open_store
from feedloop.demo.simulate import Simulation, corpus_prompts, mean_true_reward
from feedloop.demo.simusers import (
    Candidate,
    Preference,
    SimulatedFeedback,
    SimulatedUser,
    parse_preference,
)
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.gate import heldout_pairs
from feedloop.trainer.loop import Trainer

EVAL_SEED = 5
SPLIT = split_corpus(load_phrases(), seed=0)


@dataclass
class ReportingBiasUser(SimulatedUser):
    """A user who rates (thumbs) every phrase they like but a phrase they dislike only with
    probability `rate_disliked`: the stream of ratings is mostly thumbs-up."""

    rate_disliked: float = 1.0

    def respond(self, prompt: str, candidates: Sequence[Candidate]) -> list[SimulatedFeedback]:
        kept = []
        for answer in super().respond(prompt, candidates):
            liked = answer.score is not None and answer.score > 0.5
            if answer.kind != "rating" or liked or self.rng.random() < self.rate_disliked:
                kept.append(answer)
        return kept


@dataclass
class Arm:
    name: str
    config: TrainConfig
    sim: Simulation
    trainer: Trainer
    registry: Any
    store: Any
    events: list[int] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    distinct: list[float] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)
    liked_share: list[float] = field(default_factory=list)
    explore_cost: list[float] = field(default_factory=list)
    consumed: int = 0


def make_arm(
    name: str,
    checkpoint: Path,
    user: SimulatedUser,
    *,
    exploration: Exploration | None = None,
    torch_threads: int,
    seed: int = 0,
    **overrides: Any,
) -> Arm:
    root = Path(tempfile.mkdtemp(prefix="feedloop-knobs-"))
    registry = open_registry(root / "registry")
    registry.publish(checkpoint, reason="pretrained", make_live=True)
    store = open_store(str(root / "replay.sqlite3"))
    config = TrainConfig(
        data_dir=root,
        publish_as="live",
        torch_threads=torch_threads,
        join_window_s=30.0,
        **overrides,
    )
    sim = Simulation(
        store,
        registry,
        user,
        corpus_prompts(SPLIT.train, seed=1),
        seed=12 + 100 * seed,
        requests_per_batch=32,
        exploration=exploration or Exploration(),
    )
    trainer = Trainer(config, store, registry, log=lambda _: None)
    return Arm(name, config, sim, trainer, registry, store)


def live_reward(arm: Arm, preference: Preference, prompts: Sequence[str]) -> float:
    live, _ = load_checkpoint(arm.registry.checkpoint_dir(str(arm.registry.live())))
    return mean_true_reward(live, preference, prompts, seed=EVAL_SEED)


def step(arm: Arm, preference: Preference, prompts: Sequence[str], events_per_round: int) -> None:
    arm.consumed += arm.sim.serve_events(events_per_round)
    result = arm.trainer.run_round()
    f = result.figures
    arm.events.append(arm.consumed)
    arm.rewards.append(live_reward(arm, preference, prompts))
    arm.entropies.append(float(f.get("candidate_sampled_entropy_nats", float("nan"))))
    arm.distinct.append(float(f.get("candidate_distinct_phrase_share", float("nan"))))
    classes = f.get("rating_classes") or {}
    arm.liked_share.append(classes.get("liked", 0) / max(1, sum(classes.values())))
    arms = f.get("reward_by_arm") or {}
    gap = (arms.get("policy") or {}).get("mean_rating", float("nan")) - (
        arms.get("exploration") or {}
    ).get("mean_rating", float("nan"))
    arm.explore_cost.append(gap)
    arm.outcomes.append(result.outcome)
    print(
        f"  {arm.name:<22} events={arm.consumed:5d} reward={arm.rewards[-1]:.3f} "
        f"entropy={arm.entropies[-1]:.2f} distinct={arm.distinct[-1]:.3f} "
        f"liked={arm.liked_share[-1]:.2f} {result.outcome}",
        flush=True,
    )


def perplexity_ratio(arm: Arm, base_ppl: float) -> float:
    live, _ = load_checkpoint(arm.registry.checkpoint_dir(str(arm.registry.live())))
    return perplexity(live, heldout_pairs(SPLIT.test, 0)) / base_ppl


def first_reaching(arm: Arm, target: float, start: int = 0) -> int | None:
    for events, reward in zip(arm.events[start:], arm.rewards[start:], strict=True):
        if reward >= target:
            return events
    return None


def plot(arms: list[Arm], title: str, output: Path, change_at: int | None = None) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for arm in arms:
        axes[0].plot(arm.events, arm.rewards, marker="o", label=arm.name)
        axes[1].plot(arm.events, arm.entropies, marker="o", label=arm.name)
        axes[2].plot(arm.events, arm.distinct, marker="o", label=arm.name)
    for ax, label in zip(
        axes,
        (
            "mean true reward of live (current taste)",
            "candidate sampled entropy (nats/phrase)",
            "candidate distinct-phrase share",
        ),
        strict=True,
    ):
        ax.set_xlabel("feedback events consumed")
        ax.set_ylabel(label)
        if change_at is not None:
            ax.axvline(change_at, ls="--", c="grey", label="taste changes")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=90)


def summary_row(arm: Arm, base_ppl: float, **extra: Any) -> dict[str, Any]:
    finite = [x for x in arm.entropies if x == x]
    distinct = [x for x in arm.distinct if x == x]
    return {
        "arm": arm.name,
        "final_reward": arm.rewards[-1],
        "best_reward": max(arm.rewards),
        "min_candidate_entropy": min(finite) if finite else None,
        "min_candidate_distinct_share": min(distinct) if distinct else None,
        "final_perplexity_ratio": perplexity_ratio(arm, base_ppl),
        "published": sum(o == "published" for o in arm.outcomes),
        "rounds": len(arm.outcomes),
        **extra,
    }


def run_entropy(args: argparse.Namespace, checkpoint: Path, prompts: list[str]) -> list[dict]:
    preference = parse_preference(args.taste)
    arms = [
        make_arm(
            f"entropy_coef={coef}",
            checkpoint,
            SimulatedUser(preference, seed=11 + 100 * args.seed),
            torch_threads=args.torch_threads,
            seed=args.seed,
            entropy_coef=coef,
        )
        for coef in (float(c) for c in args.coefs.split(","))
    ]
    for arm in arms:
        arm.events.append(0)
        arm.rewards.append(live_reward(arm, preference, prompts))
        arm.entropies.append(float("nan"))
        arm.distinct.append(float("nan"))
        arm.outcomes.append("pretrained")
    while arms[0].consumed < args.events:
        for arm in arms:
            step(arm, preference, prompts, args.events_per_round)
    plot(arms, f"entropy bonus, taste {args.taste}", args.output)
    base = arms[0].rewards[0]
    return [
        summary_row(
            arm, args.base_ppl, half_gap_events=first_reaching(arm, base + 0.5 * (1 - base))
        )
        for arm in arms
    ]


def run_imbalance(args: argparse.Namespace, checkpoint: Path, prompts: list[str]) -> list[dict]:
    preference = parse_preference(args.taste)
    pretrained, _ = load_checkpoint(checkpoint)
    base = mean_true_reward(pretrained, preference, prompts, seed=EVAL_SEED)
    # liked / (liked + q disliked) = liked_share at the pretrained policy's liked rate (q is
    # capped at 1: a share below the pretrained policy's own is its natural stream).
    share = args.liked_share
    rate_disliked = min(1.0, base * (1.0 - share) / (share * (1.0 - base)))
    print(f"  pretrained liked rate {base:.3f}: disliked phrases rated with p={rate_disliked:.3f}")
    arms = [
        make_arm(
            f"rating_class_balance={power}",
            checkpoint,
            ReportingBiasUser(
                preference,
                seed=11 + 100 * args.seed,
                scale="thumbs",
                mix={"rating": 1.0},
                rate_disliked=rate_disliked,
            ),
            torch_threads=args.torch_threads,
            seed=args.seed,
            rating_class_balance=power,
        )
        for power in (0.0, 1.0)
    ]
    for arm in arms:
        arm.events.append(0)
        arm.rewards.append(base)
        arm.entropies.append(float("nan"))
        arm.distinct.append(float("nan"))
        arm.outcomes.append("pretrained")
    while arms[0].consumed < args.events:
        for arm in arms:
            step(arm, preference, prompts, args.events_per_round)
    title = f"{share:.0%} liked rating stream (reporting bias), taste {args.taste}"
    plot(arms, title, args.output)
    return [
        summary_row(
            arm,
            args.base_ppl,
            half_gap_events=first_reaching(arm, base + 0.5 * (1 - base)),
            mean_liked_share=sum(arm.liked_share) / len(arm.liked_share),
        )
        for arm in arms
    ]


def run_explore(args: argparse.Namespace, checkpoint: Path, prompts: list[str]) -> list[dict]:
    first, second = parse_preference(args.first_taste), parse_preference(args.second_taste)
    arms = [
        make_arm(
            f"explore_share={share}",
            checkpoint,
            SimulatedUser(first, seed=11 + 100 * args.seed),
            exploration=Exploration(share=share, temperature=args.explore_temperature),
            torch_threads=args.torch_threads,
            seed=args.seed,
        )
        for share in (float(s) for s in args.shares.split(","))
    ]
    for arm in arms:
        arm.events.append(0)
        arm.rewards.append(live_reward(arm, first, prompts))
        arm.entropies.append(float("nan"))
        arm.distinct.append(float("nan"))
        arm.outcomes.append("pretrained")
    while arms[0].consumed < args.events:
        for arm in arms:
            step(arm, first, prompts, args.events_per_round)
    change_index = len(arms[0].events)
    change_at = arms[0].consumed
    first_rewards = {arm.name: arm.rewards[-1] for arm in arms}
    pretrained, _ = load_checkpoint(checkpoint)
    second_base = mean_true_reward(pretrained, second, prompts, seed=EVAL_SEED)
    for arm in arms:
        arm.sim.user = SimulatedUser(second, seed=13 + 100 * args.seed)
        arm.events.append(arm.consumed)
        arm.rewards.append(live_reward(arm, second, prompts))
        arm.entropies.append(arm.entropies[-1])
        arm.distinct.append(arm.distinct[-1])
        arm.outcomes.append("taste changed")
    while arms[0].consumed < change_at + args.events:
        for arm in arms:
            step(arm, second, prompts, args.events_per_round)
    plot(
        arms,
        f"taste {args.first_taste} then {args.second_taste}: exploration share",
        args.output,
        change_at,
    )
    rows = []
    for arm in arms:
        after = arm.rewards[change_index:]
        costs = [c for c in arm.explore_cost if c == c]
        rows.append(
            summary_row(
                arm,
                args.base_ppl,
                first_taste_reward_at_change=first_rewards[arm.name],
                second_taste_pretrained=second_base,
                second_taste_at_change=after[0],
                second_taste_worst=min(after),
                events_to_plus_015=(
                    None
                    if (e := first_reaching(arm, second_base + 0.15, change_index)) is None
                    else e - change_at
                ),
                mean_rating_gap_policy_minus_exploration=(
                    sum(costs) / len(costs) if costs else None
                ),
            )
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mode", choices=("entropy", "imbalance", "explore"))
    p.add_argument("--events", type=int, default=2500)
    p.add_argument("--events-per-round", type=int, default=256)
    p.add_argument("--eval-prompts", type=int, default=300)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--taste", default="include:little")
    p.add_argument("--coefs", default="0,0.01,0.03")
    p.add_argument("--shares", default="0,0.1")
    p.add_argument("--explore-temperature", type=float, default=1.5)
    p.add_argument("--first-taste", default="include:little")
    p.add_argument("--second-taste", default="include:old")
    p.add_argument(
        "--liked-share", type=float, default=0.9, help="imbalance: share of liked ratings"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the users and the traffic")
    p.add_argument("--output", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--checkpoint", type=Path, help="start policy (default: the default pretrained policy)"
    )
    args = p.parse_args()
    args.output = args.output or Path(f"bench/knobs_{args.mode}.png")
    torch.set_num_threads(args.torch_threads)
    random.seed(0)
    checkpoint = args.checkpoint or ensure_default_checkpoint(default_data_dir())
    pretrained, _ = load_checkpoint(checkpoint)
    args.base_ppl = perplexity(pretrained, heldout_pairs(SPLIT.test, 0))
    prompts = corpus_prompts(SPLIT.validation, seed=2)[: args.eval_prompts]
    started = time.perf_counter()
    run = {"entropy": run_entropy, "imbalance": run_imbalance, "explore": run_explore}[args.mode]
    rows = run(args, checkpoint, prompts)
    print(f"\n{args.mode}: {time.perf_counter() - started:.0f} s, plot {args.output}")
    for row in rows:
        print("  " + json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
