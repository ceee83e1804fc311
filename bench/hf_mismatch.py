"""The behaviour log-prob mismatch: per training round, or over every generation of a store.

    .venv/bin/python bench/hf_mismatch.py DATA_DIR/registry
    .venv/bin/python bench/hf_mismatch.py DATA_DIR/registry --store DATA_DIR/replay.sqlite3

Without --store: each published version's training summary carries its round's figure
(trainer/mismatch.py): the logged behaviour log-probs of the live version's newest generations
(at most 256) against the trainer's recompute, max and mean per token. Run after a demo or soak
(e.g. `feedloop demo --checkpoint HF_CHECKPOINT --trainer-arg=--publish-as --trainer-arg=live`,
so every round swaps) to see the figure across versions and swaps.

With --store: every generation the store holds, each recomputed under the weights of the
version that served it (loaded from the registry) with its own sampling parameters: max and
mean per token over all of them, and per version. bench/soak.py --logprob-mismatch runs this
after a soak with swaps.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from feedloop.core.checkpoint import load_checkpoint
from feedloop.core.registry import DirectoryRegistry
from feedloop.core.sampling import SamplingParams
from feedloop.core.store import open_store
from feedloop.core.store.base import GenerationRecord
from feedloop.trainer.mismatch import summarise, token_gaps

READ_CHUNK = 2000  # generations read from the store at a time
SCORE_CHUNK = 256  # generations per teacher-forced pass


def store_mismatch(store_location: str, registry_dir: Path) -> dict[str, Any]:
    """|logged behaviour log-prob - recompute| per token over every generation in the store."""
    by_version: dict[str, list[GenerationRecord]] = defaultdict(list)
    store = open_store(store_location)
    try:
        seq = 0
        while batch := store.generations_after(seq, READ_CHUNK):
            for generation in batch:
                if generation.output_ids:
                    by_version[generation.model_version].append(generation)
            seq = batch[-1].seq
    finally:
        store.close()
    registry = DirectoryRegistry(registry_dir)
    all_gaps: list[float] = []
    versions: dict[str, dict[str, Any]] = {}
    try:
        for version, served in sorted(by_version.items()):
            policy, _ = load_checkpoint(registry.checkpoint_dir(version))
            gaps: list[float] = []
            for start in range(0, len(served), SCORE_CHUNK):
                chunk = served[start : start + SCORE_CHUNK]
                recomputed = policy.score(
                    [g.prompt_ids for g in chunk],
                    [g.output_ids for g in chunk],
                    [SamplingParams.from_dict(g.sampling) for g in chunk],
                )
                gaps.extend(token_gaps([g.behaviour_logprobs for g in chunk], recomputed))
            figure = summarise(gaps)
            versions[version] = {
                "generations": len(served),
                "tokens": len(gaps),
                "max": figure.max_abs if figure else 0.0,
                "mean": figure.mean_abs if figure else 0.0,
            }
            all_gaps.extend(gaps)
    finally:
        registry.close()
    overall = summarise(all_gaps)
    return {
        "generations": sum(v["generations"] for v in versions.values()),
        "tokens": len(all_gaps),
        "max": overall.max_abs if overall else 0.0,
        "mean": overall.mean_abs if overall else 0.0,
        "versions": versions,
    }


def print_store_mismatch(figures: dict[str, Any]) -> None:
    for version, row in figures["versions"].items():
        print(
            f"{version}: {row['generations']:6d} generations {row['tokens']:7d} tokens  "
            f"max {row['max']:.2e}  mean {row['mean']:.2e}"
        )
    print(
        f"{len(figures['versions'])} versions, {figures['generations']} generations, "
        f"{figures['tokens']} tokens: max {figures['max']:.2e}, mean {figures['mean']:.2e}"
    )


def round_figures(registry_dir: Path) -> int:
    registry = DirectoryRegistry(registry_dir)
    try:
        rows = []
        for version in registry.versions():
            summary = registry.manifest(version).training_summary
            if "logprob_mismatch_max" in summary:
                rows.append(
                    (
                        version,
                        registry.manifest(version).parent_version,
                        summary["logprob_mismatch_tokens"],
                        summary["logprob_mismatch_max"],
                        summary["logprob_mismatch_mean"],
                    )
                )
    finally:
        registry.close()
    if not rows:
        print("no round recorded a mismatch figure", file=sys.stderr)
        return 1
    for version, parent, tokens, worst, mean in rows:
        print(
            f"{version} (data from {parent}): {tokens:6d} tokens  max {worst:.2e}  mean {mean:.2e}"
        )
    tokens = sum(r[2] for r in rows)
    mean = sum(r[2] * r[4] for r in rows) / tokens
    print(
        f"{len(rows)} rounds, {tokens} tokens: max {max(r[3] for r in rows):.2e}, "
        f"token-weighted mean {mean:.2e}"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("registry", type=Path, help="a directory registry")
    parser.add_argument(
        "--store", help="a replay store (SQLite path or postgresql:// URL): every generation"
    )
    args = parser.parse_args()
    if args.store is None:
        return round_figures(args.registry)
    figures = store_mismatch(args.store, args.registry)
    if not figures["tokens"]:
        print("the store holds no generation with tokens", file=sys.stderr)
        return 1
    print_store_mismatch(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
