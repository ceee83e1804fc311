"""One training round on 5,000 logged generations with feedback, broken into its phases.

    .venv/bin/python bench/bench_train.py [--generations 5000] [--runs 3] [--torch-threads 1]

Fills a fresh SQLite store with generations of the default pretrained policy answered by a
simulated user (ratings, comparisons, rankings, corrections), then runs the same round `runs`
times (cursor and live pointer reset in between) and prints the median wall time of each phase:
reading, rewards + reward model, updates, evaluation (gate), publish. For scale it also times
one actor-critic gradient step on 256 sequences of 12 tokens in the same process (the
"step" unit; target: a round under 30 s).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from feedloop.core.checkpoint import load_checkpoint
from feedloop.core.config import default_data_dir
from feedloop.core.corpus import load_phrases, split_corpus
from feedloop.core.policy import TokenBatch, token_logprobs
from feedloop.core.pretrain import ensure_default_checkpoint
from feedloop.core.registry import open_registry
from feedloop.core.store import open_store
from feedloop.demo.simulate import Simulation, corpus_prompts
from feedloop.demo.simusers import IncludeWord, SimulatedUser
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.loop import Trainer

PHASES = ("read", "rewards", "update", "evaluate", "publish")


def step_seconds(checkpoint: Path, runs: int = 5) -> float:
    """Median time of one forward+backward+Adam step on 256 sequences of 12 tokens."""
    policy, _ = load_checkpoint(checkpoint)
    batch = TokenBatch.from_lists([[10, 11]] * 256, [[12] * 11 + [2]] * 256)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-5)
    times = []
    for _ in range(runs + 1):
        started = time.perf_counter()
        out = policy.teacher_forced(batch)
        loss = -token_logprobs(out.logits, batch.output_ids).mean() + out.values.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])  # the first step pays one-off allocations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--algorithm", default="actor-critic")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    checkpoint = ensure_default_checkpoint(default_data_dir())
    root = Path(tempfile.mkdtemp(prefix="feedloop-bench-train-"))
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
    started = time.perf_counter()
    while store.max_seq()[0] < args.generations:
        sim.serve_batch()
    generations, events = store.max_seq()
    print(
        f"store: {generations} generations, {events} feedback events "
        f"(filled in {time.perf_counter() - started:.1f} s)",
        flush=True,
    )

    config = TrainConfig(
        data_dir=root,
        join_window_s=0.0,
        publish_as="live",  # the round's cost; deployment is not measured here
        torch_threads=args.torch_threads,
        algorithm=args.algorithm,
        max_new_generations=args.generations,
        max_feedback_events=events,
    )
    trainer = Trainer(config, store, registry, log=lambda _: None)
    phase_times: dict[str, list[float]] = {p: [] for p in PHASES}
    totals, steps, sequences = [], [], []
    for run in range(args.runs):
        store.set_cursor(config.cursor_name, {"generation_seq": 0, "feedback_seq": 0})
        registry.set_live("v0001", reason="bench reset")
        result = trainer.run_round()
        figures = result.figures
        totals.append(figures["round_seconds"])
        steps.append(figures.get("update_steps", 0))
        sequences.append(figures.get("train_sequences", 0))
        for phase in PHASES:
            phase_times[phase].append(figures["phase_seconds"].get(phase, 0.0))
        print(
            f"run {run + 1}: {result.outcome} in {figures['round_seconds']:.1f} s "
            f"({figures.get('update_steps')} steps on {figures.get('train_sequences')} "
            f"sequences)",
            flush=True,
        )
    unit = step_seconds(checkpoint)
    total = statistics.median(totals)
    print(
        f"\none round on {generations} generations / {events} events, algorithm "
        f"{args.algorithm}, torch threads {args.torch_threads} (median of {args.runs}):"
    )
    for phase in PHASES:
        print(f"  {phase:<9} {statistics.median(phase_times[phase]):7.2f} s")
    print(f"  {'total':<9} {total:7.2f} s   (target < 30 s: {'met' if total < 30 else 'MISSED'})")
    print(
        f"  update steps {statistics.median(steps):.0f} on {statistics.median(sequences):.0f} "
        f"sequences; one step on 256x12 tokens here: {unit:.3f} s; round = "
        f"{total / unit:.0f} steps"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
