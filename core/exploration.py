"""Exploration that never stops: a declared share of requests sampled with declared parameters.

A policy trained on its own samples stops sampling what it has learned to avoid, so what users
would now like among those phrases is never rated again (issue 21's collapse onto yesterday's
taste). Decision services keep a fixed exploration budget for this (Personalizer's exploration
percentage, Vowpal Wabbit's epsilon-greedy); here the explored requests are sampled from the live
policy at a higher temperature (and optionally other top-k / top-p), which puts mass back on
rare phrases while staying a distribution the trainer can correct for: the server logs the
behaviour log-probabilities of exactly the distribution it sampled from, so the importance ratio
pi / mu of an explored generation divides by the exploration distribution, not the policy's.

The server owns which requests are eligible (server.generation); this module owns the choice
and the parameters, so the in-process simulation of the benches explores alike.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from feedloop.core.sampling import InvalidSamplingParams, SamplingParams


@dataclass(frozen=True)
class Exploration:
    """share: fraction of eligible requests explored, in [0, 1]; temperature, top_k, top_p: the
    sampling parameters an explored request is served with (max_tokens and the seed stay the
    request's)."""

    share: float = 0.0
    temperature: float = 1.5
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.share <= 1:  # NaN fails this too
            raise ValueError(f"explore_share must be in [0, 1], got {self.share}")
        if not self.temperature > 0:
            # Greedy decoding explores nothing: it is the policy's single most likely phrase.
            raise ValueError(f"explore_temperature must be > 0, got {self.temperature}")
        try:
            self.params(SamplingParams())
        except InvalidSamplingParams as exc:
            raise ValueError(f"explore_{exc.field}: {exc.problem}") from None

    def explores(self, uniform: float) -> bool:
        """Whether a request whose uniform draw in [0, 1) is `uniform` is explored."""
        return uniform < self.share

    def params(self, requested: SamplingParams) -> SamplingParams:
        """The parameters an explored request is sampled with."""
        return replace(requested, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
