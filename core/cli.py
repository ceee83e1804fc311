"""`feedloop pretrain` and `feedloop sample`: build the default policy, look at its phrases."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from feedloop.core.config import add_config_flags, config_from_args, default_data_dir
from feedloop.core.errors import CheckpointError, FeedloopError
from feedloop.core.pretrain import PretrainConfig, default_checkpoint_dir, pretrain

EXAMPLES_PRETRAIN = """examples:
  feedloop pretrain                          # the default policy, into ~/.local/share/feedloop
  feedloop pretrain --corpus my_phrases.txt --output ./my-policy --epochs 20
  feedloop pretrain --if-missing             # do nothing if the default checkpoint exists
"""

EXAMPLES_SAMPLE = """examples:
  feedloop sample ocean "morning coffee"     # two prompts, default checkpoint
  feedloop sample garden -n 5 --temperature 0.8 --top-p 0.9 --seed 7
  feedloop sample --checkpoint ./my-policy travel
"""


def pretrain_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="feedloop pretrain",
        description="Supervised pretraining (teacher forcing) of the policy on a phrase corpus.",
        epilog=EXAMPLES_PRETRAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="TOML file (table [pretrain] or top level)")
    parser.add_argument(
        "--if-missing", action="store_true", help="skip if the output checkpoint already exists"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_flags(parser, PretrainConfig)
    args = parser.parse_args(argv)
    config = config_from_args(PretrainConfig, args, section="pretrain")
    if args.if_missing and (config.output_dir / "manifest.json").exists():
        from feedloop.core.checkpoint import load_checkpoint

        try:
            load_checkpoint(config.output_dir)
        except CheckpointError as exc:
            # Typically a checkpoint from an older feedloop whose architecture has changed.
            print(f"pretrain: {config.output_dir} does not verify ({exc}); building it again")
        else:
            print(f"pretrain: {config.output_dir} already exists; nothing to do")
            return 0
    result = pretrain(config, progress=not args.quiet)
    s = result.summary
    print(
        f"pretrain: wrote {result.checkpoint}\n"
        f"  epochs {s['epochs_run']} (stopped by {s['stopped_by']}), {s['wall_time_s']} s, "
        f"vocabulary {s['vocab_size']}\n"
        f"  perplexity: validation {s['validation_perplexity']:.2f}, "
        f"test {s['test_perplexity']:.2f}\n"
        f"  keyword inclusion at temperature 1: {s['keyword_inclusion_t1']:.1%} "
        f"(chance {s['keyword_inclusion_chance']:.1%})"
    )
    return 0


def sample_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="feedloop sample",
        description="Print phrases sampled from a checkpoint (no server needed).",
        epilog=EXAMPLES_SAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prompts", nargs="*", help="keyword prompts (default: a few examples)")
    parser.add_argument(
        "--checkpoint", type=Path, help="checkpoint directory (default: the default policy)"
    )
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("-n", "--num-candidates", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt")
    args = parser.parse_args(argv)

    from feedloop.core.checkpoint import load_checkpoint
    from feedloop.core.policy import SampleRequest
    from feedloop.core.sampling import SamplingParams

    checkpoint = args.checkpoint or default_checkpoint_dir(args.data_dir)
    if not (checkpoint / "manifest.json").exists():
        print(
            f"feedloop sample: no checkpoint at {checkpoint}; run `feedloop pretrain` first",
            file=sys.stderr,
        )
        return 1
    policy, manifest = load_checkpoint(checkpoint)
    prompts = args.prompts or ["ocean", "morning coffee", "garden", "music", "winter"]
    params = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    requests = [
        SampleRequest(policy.encode_prompt(p), params, args.num_candidates) for p in prompts
    ]
    for prompt, outputs in zip(prompts, policy.sample(requests), strict=True):
        texts = [policy.decode(o.token_ids) for o in outputs]
        if args.json:
            print(json.dumps({"prompt": prompt, "version": manifest.version, "phrases": texts}))
        else:
            print(f"{prompt}:")
            for text, o in zip(texts, outputs, strict=True):
                print(f"  {text:<60}  log-prob {sum(o.behaviour_logprobs):7.2f}")
    return 0


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    try:
        return pretrain_main(rest) if command == "pretrain" else sample_main(rest)
    except FeedloopError as exc:
        print(f"feedloop {command}: {exc}", file=sys.stderr)
        return 2 if "config" in type(exc).__name__.lower() else 1
    except ValueError as exc:
        print(f"feedloop {command}: {exc}", file=sys.stderr)
        return 2
