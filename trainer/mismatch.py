"""How far the server's logged behaviour log-probabilities are from the trainer's recompute.

The importance ratio pi/mu is exact only if mu, the behaviour log-probability the server
logged, is what the trainer's own pass gives for the same tokens under the same weights and
sampling parameters. Inference engines and trainers that compute these differently (other
kernels, other precisions, a cache) drift apart and bias every ratio; the async RL systems now
report the gap each step (verl's rollout-vs-training log-prob difference; TRL's importance-
sampling correction for vLLM). Here the gap is measured each round on the window's generations
from the live version (the weights the trainer holds): the largest and the mean absolute
per-token difference, exported as trainer metrics.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from feedloop.core.policy import Policy
from feedloop.core.sampling import SamplingParams
from feedloop.core.store.base import GenerationRecord

# A round scores at most this many generations for the figure: one teacher-forced pass.
MAX_SCORED = 256


@dataclass(frozen=True)
class LogprobMismatch:
    """|logged behaviour log-prob - recomputed| per token: max and mean over `tokens` tokens."""

    tokens: int
    max_abs: float
    mean_abs: float

    def figures(self) -> dict[str, float | int]:
        return {
            "logprob_mismatch_max": self.max_abs,
            "logprob_mismatch_mean": self.mean_abs,
            "logprob_mismatch_tokens": self.tokens,
        }


def token_gaps(
    logged: Sequence[Sequence[float]], recomputed: Sequence[Sequence[float]]
) -> list[float]:
    """Absolute per-token differences of two log-prob sequences per generation."""
    return [
        abs(a - b)
        for row_logged, row_recomputed in zip(logged, recomputed, strict=True)
        for a, b in zip(row_logged, row_recomputed, strict=True)
    ]


def summarise(gaps: Sequence[float]) -> LogprobMismatch | None:
    if not gaps:
        return None
    return LogprobMismatch(len(gaps), max(gaps), sum(gaps) / len(gaps))


def behaviour_mismatch(
    policy: Policy, version: str, generations: Iterable[GenerationRecord]
) -> LogprobMismatch | None:
    """The gap on the newest generations (at most MAX_SCORED, by store order) that `version`
    served; None if it served none in the window."""
    mine = [g for g in generations if g.model_version == version and g.output_ids]
    served = sorted(mine, key=lambda g: g.seq)[-MAX_SCORED:]
    if not served:
        return None
    recomputed = policy.score(
        [g.prompt_ids for g in served],
        [g.output_ids for g in served],
        [SamplingParams.from_dict(g.sampling) for g in served],
    )
    return summarise(token_gaps([g.behaviour_logprobs for g in served], recomputed))
