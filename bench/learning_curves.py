"""Learning curves: reward of each live version against feedback events consumed.

    .venv/bin/python bench/learning_curves.py [--events 2000] [--events-per-round 256]
        [--algorithms actor-critic,reinforce,q-learning]
        [--preferences include:good,length:3,avoid:a] [--offpolicy-preferences include:good]
        [--offpolicy-lag 1] [--output bench/learning_curves.png] [--torch-threads 2]
        [--join-window-s 30] [--policies gru=default,hf=HF_CHECKPOINT]

For every algorithm and preference: a fresh store and registry whose live version is the
default pretrained policy; a simulated user with that preference (noisy ratings, comparisons,
rankings, corrections, the default mix) answers the live version's phrases; after every
`events-per-round` events one trainer round runs with the default TrainConfig, its join window
included (`--join-window-s`): the simulated users answer at once, so the window only holds
unrated generations back for a later round, as in production. After each round the live
version's mean true reward is measured on held-out prompts (validation split), with its
perplexity on the corpus test split relative to the pretrained policy's.

Off-policy traffic (`--offpolicy-preferences`, every algorithm): the same users, prompts and
seeds, but served by the live version's ancestor `--offpolicy-lag` versions back (replicas that
have not swapped yet) with a mix of tempered and filtered sampling (temperature 0.7 with top-k
20, top-p 0.9, temperature 1.3 with top-k 50): the behaviour policy is then neither the policy
being trained nor its raw softmax, and only a correct off-policy correction learns as fast as on
the plain traffic (live, temperature 1), the same curve in the plain arm.

Other policies (`--policies NAME=DIR,...`, `default` for the default pretrained GRU): every arm
runs once per policy, each from its own checkpoint, with the same users, prompts, seeds and event
budget; the figure draws one line per policy and algorithm (e.g. the tiny Hugging Face GPT-2
from `feedloop pretrain --architecture hf-causal-lm` beside the GRU).

Printed for each algorithm and preference: the feedback events needed to close half the gap
between the pretrained policy's reward and the best reachable reward (1.0: every preference here
has phrases that satisfy it fully), and the perplexity ratio then and at the end. Writes a PNG.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from feedloop.core.checkpoint import load_checkpoint
from feedloop.core.config import default_data_dir
from feedloop.core.corpus import load_phrases, split_corpus
from feedloop.core.evaluation import perplexity
from feedloop.core.pretrain import ensure_default_checkpoint
from feedloop.core.registry import open_registry
from feedloop.core.sampling import SamplingParams
from feedloop.core.store import open_store
from feedloop.demo.simulate import Simulation, corpus_prompts, mean_true_reward
from feedloop.demo.simusers import SimulatedUser, parse_preference
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.gate import heldout_pairs
from feedloop.trainer.loop import Trainer

BEST_REACHABLE = 1.0
EVAL_SEED = 5
PLAIN = "live, t=1"
OFF_POLICY = "older, tempered"
OFF_POLICY_SAMPLING = (
    SamplingParams(temperature=0.7, top_k=20, max_tokens=16),
    SamplingParams(top_p=0.9, max_tokens=16),
    SamplingParams(temperature=1.3, top_k=50, max_tokens=16),
)


@dataclass
class Curve:
    algorithm: str
    preference: str
    traffic: str = PLAIN
    policy: str = "default"
    events: list[int] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    perplexity_ratios: list[float] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)

    def half_gap_events(self) -> int | None:
        target = self.rewards[0] + 0.5 * (BEST_REACHABLE - self.rewards[0])
        for events, reward in zip(self.events, self.rewards, strict=True):
            if reward >= target:
                return events
        return None


def run_curve(
    algorithm: str,
    spec: str,
    traffic: str,
    checkpoint: Path,
    args: argparse.Namespace,
    policy_name: str = "default",
) -> Curve:
    preference = parse_preference(spec)
    split = split_corpus(load_phrases(), seed=0)
    train_prompts = corpus_prompts(split.train, seed=1)
    eval_prompts = corpus_prompts(split.validation, seed=2)[: args.eval_prompts]
    ppl_pairs = heldout_pairs(split.test, 0)
    root = Path(tempfile.mkdtemp(prefix="feedloop-curves-"))
    registry = open_registry(root / "registry")
    registry.publish(checkpoint, reason="pretrained", make_live=True)
    store = open_store(str(root / "replay.sqlite3"))
    config = TrainConfig(
        data_dir=root,
        algorithm=algorithm,
        join_window_s=args.join_window_s,
        publish_as="live",  # learning alone: the simulated users answer the live version only
        torch_threads=args.torch_threads,
    )
    trainer = Trainer(config, store, registry, log=lambda _: None)
    sim = Simulation(
        store,
        registry,
        SimulatedUser(preference, seed=11),
        train_prompts,
        seed=12,
        requests_per_batch=32,
    )
    if traffic == OFF_POLICY:
        sim.sampling_mix, sim.version_lag = OFF_POLICY_SAMPLING, args.offpolicy_lag
    pretrained, _ = load_checkpoint(checkpoint)
    base_ppl = perplexity(pretrained, ppl_pairs)
    curve = Curve(algorithm, spec, traffic, policy_name)

    def measure(events: int, outcome: str) -> None:
        live, _ = load_checkpoint(registry.checkpoint_dir(str(registry.live())))
        curve.events.append(events)
        curve.rewards.append(mean_true_reward(live, preference, eval_prompts, seed=EVAL_SEED))
        curve.perplexity_ratios.append(perplexity(live, ppl_pairs) / base_ppl)
        curve.outcomes.append(outcome)
        print(
            f"  {policy_name:<8} {algorithm:<12} {spec:<13} {traffic:<15} events={events:5d} "
            f"reward={curve.rewards[-1]:.3f} "
            f"ppl_ratio={curve.perplexity_ratios[-1]:.3f} {outcome}",
            flush=True,
        )

    measure(0, "pretrained")
    consumed = 0
    while consumed < args.events:
        consumed += sim.serve_events(args.events_per_round)
        result = trainer.run_round()
        measure(consumed, f"{result.outcome} {result.version or ''}".strip())
    store.close()
    return curve


def label(curve: Curve, curves: list[Curve]) -> str:
    """The algorithm, with the policy's name in front when the run compares policies."""
    if len({c.policy for c in curves}) == 1:
        return curve.algorithm
    return f"{curve.policy} {curve.algorithm}"


def plot(curves: list[Curve], output: Path) -> None:
    panels = list(dict.fromkeys((c.preference, c.traffic) for c in curves))
    fig, axes = plt.subplots(
        2, len(panels), figsize=(5 * len(panels), 7), squeeze=False, sharex=True
    )
    for col, (spec, traffic) in enumerate(panels):
        for curve in (c for c in curves if (c.preference, c.traffic) == (spec, traffic)):
            name = label(curve, curves)
            axes[0][col].plot(curve.events, curve.rewards, marker="o", label=name)
            axes[1][col].plot(curve.events, curve.perplexity_ratios, marker="o", label=name)
        policies = list(dict.fromkeys(c.policy for c in curves))
        for policy, style in zip(policies, itertools.cycle(["--", ":", "-."])):
            base = next(c for c in curves if (c.preference, c.policy) == (spec, policy)).rewards[0]
            axes[0][col].axhline(
                base + 0.5 * (BEST_REACHABLE - base),
                ls=style,
                c="grey",
                label="half the gap" + (f" ({policy})" if len(policies) > 1 else ""),
            )
        axes[0][col].set_title(f"{spec} ({traffic} traffic)")
        axes[0][col].set_ylabel("mean true reward of live version")
        axes[1][col].axhline(1.3, ls="--", c="red", label="perplexity bound")
        axes[1][col].set_ylabel("held-out perplexity / pretrained")
        axes[1][col].set_xlabel("feedback events consumed")
        axes[0][col].legend()
        axes[1][col].legend()
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)


def policy_checkpoint(item: str) -> tuple[str, Path]:
    """`NAME=DIR` (or `default`, or `NAME=default`): the policy's name and its checkpoint."""
    name, _, directory = item.partition("=")
    directory = directory or name
    if directory == "default":
        return name, ensure_default_checkpoint(default_data_dir())
    path = Path(directory)
    if not (path / "manifest.json").is_file():
        raise SystemExit(f"--policies {item}: {path} is not a checkpoint (no manifest.json)")
    return name, path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--events-per-round", type=int, default=256)
    parser.add_argument("--algorithms", default="actor-critic,reinforce,q-learning")
    parser.add_argument("--preferences", default="include:good,length:3,avoid:a")
    parser.add_argument(
        "--offpolicy-preferences",
        default="include:good",
        help="preferences also learned on off-policy traffic (empty: none)",
    )
    parser.add_argument(
        "--offpolicy-lag", type=int, default=1, help="versions behind live that serve it"
    )
    parser.add_argument("--eval-prompts", type=int, default=300)
    parser.add_argument("--output", type=Path, default=Path("bench/learning_curves.png"))
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument(
        "--policies",
        default="default",
        help="NAME=DIR,... checkpoints to learn from, each with every arm; default: the "
        "default pretrained policy",
    )
    parser.add_argument(
        "--join-window-s", type=float, default=TrainConfig.join_window_s, help="see TrainConfig"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    policies = [policy_checkpoint(item) for item in args.policies.split(",")]
    started = time.perf_counter()
    arms = [(spec, PLAIN) for spec in args.preferences.split(",")]
    arms += [(spec, OFF_POLICY) for spec in args.offpolicy_preferences.split(",") if spec]
    curves = []
    for spec, traffic in arms:
        for algorithm in args.algorithms.split(","):
            for name, checkpoint in policies:
                curves.append(run_curve(algorithm, spec, traffic, checkpoint, args, name))
    plot(curves, args.output)
    print(
        f"\nfeedback events to close half the gap to the best reachable reward "
        f"({BEST_REACHABLE}), budget {args.events} events:"
    )
    print(
        f"  {'policy':<8} {'algorithm':<12} {'preference':<13} {'traffic':<15} "
        f"{'pretrained':>10} {'final':>6} "
        f"{'half-gap events':>15} {'ppl ratio there':>15} {'final ppl ratio':>15}"
    )
    for c in curves:
        events = c.half_gap_events()
        at = c.perplexity_ratios[c.events.index(events)] if events is not None else float("nan")
        print(
            f"  {c.policy:<8} {c.algorithm:<12} {c.preference:<13} {c.traffic:<15} "
            f"{c.rewards[0]:10.3f} "
            f"{c.rewards[-1]:6.3f} "
            f"{events if events is not None else 'not reached':>15} {at:15.3f} "
            f"{c.perplexity_ratios[-1]:15.3f}"
        )
    print(f"\nplot: {args.output} ({time.perf_counter() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
