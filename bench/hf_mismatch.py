"""The behaviour log-prob mismatch of every training round a registry recorded.

    .venv/bin/python bench/hf_mismatch.py DATA_DIR/registry

Each published version's training summary carries the round's figure (trainer/mismatch.py):
the logged behaviour log-probs of the live version's generations against the trainer's
recompute, max and mean per token. Run after a demo or soak (e.g. `feedloop demo --checkpoint
HF_CHECKPOINT --trainer-arg=--publish-as --trainer-arg=live`, so every round swaps) to see the
figure across versions and swaps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from feedloop.core.registry import DirectoryRegistry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("registry", type=Path, help="a directory registry")
    args = parser.parse_args()
    registry = DirectoryRegistry(args.registry)
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


if __name__ == "__main__":
    sys.exit(main())
