"""Benchmark the Hugging Face policy's sampler against transformers' own `model.generate`.

    .venv/bin/python bench/bench_hf.py --checkpoint DIR
    (DIR: e.g. what `feedloop pretrain --architecture hf-causal-lm --output DIR` writes)

Both arms sample the same model, the same prompts (keywords from the corpus's test split, in
the checkpoint's prompt template, left-padded) and the same settings: temperature 1, no top-k
or top-p, at most `max_tokens` phrase tokens plus the one step that may draw <eos>, a KV cache,
rows ending at <eos>. generate's settings are built here, not read from the checkpoint, and a
check before timing proves it samples the raw softmax (its processed scores equal the model's
logits). The arms are interleaved within each repeat, each going first every other repeat, so
load on a shared machine hits both alike; the first repeat warms both up; each figure is the
median over the repeats, and the ratio (our generations/s over generate's) is taken in the
same run. Both run at `--threads` torch threads (1 by default: the server's model process
runs at 1, `serve --torch-threads`). `generate` does not return the log-probabilities of the
distribution it sampled from; ours do, and the mismatch of those against the trainer's
teacher-forced recompute is reported (max and mean per token, over every sampled token).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from feedloop.core.checkpoint import load_checkpoint
from feedloop.core.corpus import keywords_of, load_phrases, split_corpus
from feedloop.core.hf_policy import HFCausalPolicy, left_aligned
from feedloop.core.policy import SampleRequest, pad
from feedloop.core.sampling import SamplingParams
from feedloop.core.tokenizer import EOS_ID, PAD_ID


def requests_for(policy: HFCausalPolicy, prompts: list[str], seed: int, max_tokens: int):
    return [
        SampleRequest(policy.encode_prompt(p), SamplingParams(max_tokens=max_tokens, seed=seed + i))
        for i, p in enumerate(prompts)
    ]


def run_ours(policy: HFCausalPolicy, requests) -> tuple[float, list]:
    started = time.perf_counter()
    outputs = policy.sample(requests)
    return time.perf_counter() - started, outputs


def generation_config(policy: HFCausalPolicy, max_tokens: int) -> Any:
    """generate's settings, built here rather than read from the checkpoint's
    generation_config.json (a user's model may ship top_k=50 or a repetition penalty there):
    temperature 1, no top-k or top-p, one step more than max_tokens (ours: the step that may
    draw <eos>), stopping each row at end-of-text, a KV cache."""
    from transformers import GenerationConfig

    eos = policy.tokenizer.model_eos_id
    return GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_tokens + 1,
        eos_token_id=eos,
        pad_token_id=eos if policy.tokenizer.offset else PAD_ID,
        use_cache=True,
    )


def generate_inputs(policy: HFCausalPolicy, requests) -> tuple[torch.Tensor, torch.Tensor]:
    ids, lengths = pad([r.prompt_ids for r in requests])
    prompt, mask = left_aligned(ids, lengths)
    return policy._model_input(prompt), mask


@torch.inference_mode()
def run_generate(policy: HFCausalPolicy, requests, config: Any) -> tuple[float, int]:
    """Seconds, and the tokens generated (up to each row's end-of-text, included)."""
    prompt, mask = generate_inputs(policy, requests)
    started = time.perf_counter()
    sequences = policy.model.generate(
        input_ids=prompt, attention_mask=mask, generation_config=config
    )
    elapsed = time.perf_counter() - started
    new = sequences[:, prompt.shape[1] :]
    ended = (new == policy.tokenizer.model_eos_id).long().cumsum(dim=1)
    tokens = int(((ended == 0) | ((ended == 1) & (new == policy.tokenizer.model_eos_id))).sum())
    return elapsed, tokens


@torch.inference_mode()
def check_generate_samples_the_raw_softmax(policy: HFCausalPolicy, requests, config: Any) -> None:
    """Like with like: the scores generate samples from (after every logits processor it
    builds from its settings) equal the model's raw logits, so it draws from the same
    distribution as ours at temperature 1 without filters; refuses to time anything else."""
    prompt, mask = generate_inputs(policy, requests)
    out = policy.model.generate(
        input_ids=prompt,
        attention_mask=mask,
        generation_config=config,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
    )
    for processed, raw in zip(out.scores, out.logits, strict=True):
        if not torch.equal(processed, raw):
            raise SystemExit("generate processes the logits: the two arms would differ")


def mismatch(policy: HFCausalPolicy, requests, outputs) -> list[float]:
    flat = [o[0] for o in outputs]
    recomputed = policy.score(
        [r.prompt_ids for r in requests], [o.token_ids for o in flat], [r.params for r in requests]
    )
    return [
        abs(a - b)
        for o, row in zip(flat, recomputed, strict=True)
        for a, b in zip(o.behaviour_logprobs, row, strict=True)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="an hf-causal-lm checkpoint")
    parser.add_argument("--batches", default="1,8,32", help="batch sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per batch size")
    parser.add_argument(
        "--min-phrases",
        type=int,
        default=128,
        help="at least this many phrases per arm and batch size (more repeats for small batches)",
    )
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads of both arms (1: the server's model process default)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    policy, manifest = load_checkpoint(args.checkpoint)
    if not isinstance(policy, HFCausalPolicy):
        print(f"{args.checkpoint}: not an hf-causal-lm checkpoint", file=sys.stderr)
        return 2
    config = generation_config(policy, args.max_tokens)
    prompts = [" ".join(keywords_of(p)[:2]) for p in split_corpus(load_phrases(), seed=0).test]
    rows, gaps = [], []
    for batch in [int(b) for b in args.batches.split(",")]:
        ours_s, theirs_s, tokens, their_tokens = [], [], [], []
        # A phrase's length is drawn, and the steps a batch takes follow its longest phrase:
        # small batches take more repeats, so both arms' medians cover the same spread.
        repeats = max(args.repeats, math.ceil(args.min_phrases / batch))
        for r in range(repeats + 1):
            chosen = [prompts[(r * batch + i) % len(prompts)] for i in range(batch)]
            requests = requests_for(policy, chosen, 1 + r * batch, args.max_tokens)
            if r == 0:
                check_generate_samples_the_raw_softmax(policy, requests, config)
            # Each arm goes first in every other repeat, so neither always runs on the
            # caches (and the load) the other leaves behind.
            if r % 2:
                generate_s, generated = run_generate(policy, requests, config)
                elapsed, outputs = run_ours(policy, requests)
            else:
                elapsed, outputs = run_ours(policy, requests)
                generate_s, generated = run_generate(policy, requests, config)
            if r == 0:
                continue  # warm-up of both arms
            ours_s.append(elapsed)
            theirs_s.append(generate_s)
            tokens.append(sum(len(o[0].token_ids) for o in outputs))
            their_tokens.append(generated)
            gaps.extend(mismatch(policy, requests, outputs))
        ours, theirs = statistics.median(ours_s), statistics.median(theirs_s)
        rows.append(
            {
                "batch": batch,
                "repeats": repeats,
                "ours_generations_per_s": batch / ours,
                "generate_generations_per_s": batch / theirs,
                "ratio": theirs / ours,
                "ours_tokens_per_phrase": statistics.mean(tokens) / batch,
                "generate_tokens_per_phrase": statistics.mean(their_tokens) / batch,
            }
        )
        row = rows[-1]
        print(
            f"batch {batch:3d}: ours {batch / ours:8.1f} gen/s   generate {batch / theirs:8.1f} "
            f"gen/s   ratio {theirs / ours:5.2f}x   (tokens/phrase: "
            f"ours {row['ours_tokens_per_phrase']:.1f}, "
            f"generate {row['generate_tokens_per_phrase']:.1f})",
            flush=True,
        )
    summary = {
        "checkpoint": str(args.checkpoint),
        "parameters": manifest.parameter_count,
        "threads": args.threads,
        "repeats": args.repeats,
        "max_tokens": args.max_tokens,
        "rows": rows,
        "logprob_mismatch_max": max(gaps),
        "logprob_mismatch_mean": sum(gaps) / len(gaps),
        "logprob_mismatch_tokens": len(gaps),
        "eos_id": EOS_ID,
    }
    print(
        f"behaviour log-prob vs teacher-forced recompute over {len(gaps)} tokens: "
        f"max {summary['logprob_mismatch_max']:.2e}, mean {summary['logprob_mismatch_mean']:.2e}"
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
