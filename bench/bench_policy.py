"""Benchmark the policy alone: generation throughput by batch size, and the default pretraining.

    python bench/bench_policy.py                 # throughput of the default checkpoint
    python bench/bench_policy.py --pretrain      # also run the default pretraining, timed

Throughput: prompts drawn from the corpus's test split, `max_tokens` 12, sampling at
temperature 1; each batch size is timed over several repeats and the median is reported, with
the batch-128 / batch-1 ratio measured in the same run. Phrases that end early (<eos>) stop
costing compute, so tokens/s is reported beside generations/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from feedloop.core.checkpoint import load_checkpoint
from feedloop.core.config import default_data_dir
from feedloop.core.corpus import keywords_of, load_phrases, split_corpus
from feedloop.core.policy import SampleRequest
from feedloop.core.pretrain import PretrainConfig, default_checkpoint_dir, pretrain
from feedloop.core.sampling import SamplingParams


def throughput(policy, prompts: list[str], batch: int, repeats: int, max_tokens: int) -> dict:
    rates, token_rates = [], []
    for r in range(repeats + 1):
        requests = [
            SampleRequest(
                policy.encode_prompt(prompts[(r * batch + i) % len(prompts)]),
                SamplingParams(max_tokens=max_tokens, seed=1 + r * batch + i),
            )
            for i in range(batch)
        ]
        started = time.perf_counter()
        outputs = policy.sample(requests)
        elapsed = time.perf_counter() - started
        if r == 0:
            continue  # warm-up
        rates.append(batch / elapsed)
        token_rates.append(sum(len(o[0].token_ids) for o in outputs) / elapsed)
    return {
        "batch": batch,
        "generations_per_s": statistics.median(rates),
        "tokens_per_s": statistics.median(token_rates),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=default_checkpoint_dir(default_data_dir())
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--pretrain", action="store_true", help="also time the default pretraining")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    figures: dict = {"threads": args.threads, "max_tokens": args.max_tokens}
    if args.pretrain:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.monotonic()
            result = pretrain(PretrainConfig(data_dir=Path(tmp), resume=False), progress=False)
            s = result.summary
            figures["pretrain"] = {
                "wall_time_s": round(time.monotonic() - started, 1),
                "epochs": s["epochs_run"],
                "validation_perplexity": s["validation_perplexity"],
                "test_perplexity": s["test_perplexity"],
                "keyword_inclusion_t1": s["keyword_inclusion_t1"],
                "keyword_inclusion_chance": s["keyword_inclusion_chance"],
            }
    if not (args.checkpoint / "manifest.json").exists():
        print(f"no checkpoint at {args.checkpoint}: run `feedloop pretrain` first", file=sys.stderr)
        return 1
    policy, manifest = load_checkpoint(args.checkpoint)
    prompts = [k for p in split_corpus(load_phrases()).test for k in keywords_of(p)[:1]]
    figures["parameters"] = policy.parameter_count()
    figures["checkpoint_summary"] = {
        k: manifest.training_summary.get(k)
        for k in (
            "test_perplexity",
            "keyword_inclusion_t1",
            "keyword_inclusion_chance",
            "wall_time_s",
        )
    }
    rows = [
        throughput(policy, prompts, int(b), args.repeats, args.max_tokens)
        for b in args.batches.split(",")
    ]
    figures["throughput"] = rows
    by_batch = {r["batch"]: r["generations_per_s"] for r in rows}
    if 1 in by_batch and 128 in by_batch:
        figures["ratio_128_over_1"] = by_batch[128] / by_batch[1]

    print(
        f"policy alone: {figures['parameters']:,} parameters, {args.threads} threads, "
        f"max_tokens {args.max_tokens}, median of {args.repeats}"
    )
    print(f"{'batch':>6} {'generations/s':>14} {'tokens/s':>10}")
    for r in rows:
        print(f"{r['batch']:>6} {r['generations_per_s']:>14,.0f} {r['tokens_per_s']:>10,.0f}")
    if "ratio_128_over_1" in figures:
        print(f"batch-128 / batch-1: {figures['ratio_128_over_1']:.1f}x")
    if "pretrain" in figures:
        p = figures["pretrain"]
        print(
            f"pretraining (default run): {p['wall_time_s']} s, {p['epochs']} epochs, "
            f"test perplexity {p['test_perplexity']:.2f}, "
            f"keyword inclusion {p['keyword_inclusion_t1']:.1%} "
            f"(chance {p['keyword_inclusion_chance']:.1%})"
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
