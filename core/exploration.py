"""Exploration that never stops: a declared share of requests sampled with declared parameters.

A policy trained on its own samples stops sampling what it has learned to avoid, so what users
would now like among those phrases is never rated again (issue 21's collapse onto yesterday's
taste). Decision services keep a fixed exploration budget for this (Personalizer's exploration
percentage, Vowpal Wabbit's epsilon-greedy); here the explored requests are sampled from the live
policy at a higher temperature (and optionally other top-k / top-p), which puts mass back on
rare phrases while staying a distribution the trainer can correct for: the server logs the
behaviour log-probabilities of exactly the distribution it sampled from, so the importance ratio
pi / mu of an explored generation divides by the exploration distribution, not the policy's.

A declared part of the explored requests (`version_share`) is served instead by an older version
(the reference, the root of the live version's lineage, and the latest earlier live versions,
in turn), with the request's own sampling parameters: that version's policy as it served when it
was live, its exact behaviour log-probabilities and its version logged, served_as exploration.
Its ratings are what keeps the evidence about older versions current, so the trainer can bring
one back when users now prefer it (issue 21; feedloop.trainer.evidence counts those ratings as
the older version's own). What it costs shows in the exploration arm's served reward.

The server owns which requests are eligible (server.generation) and holds the older versions
(server.live_model); this module owns the choices and the parameters, so the in-process
simulation of the benches explores alike.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace

from feedloop.core.sampling import InvalidSamplingParams, SamplingParams


@dataclass(frozen=True)
class Exploration:
    """share: fraction of eligible requests explored, in [0, 1]; temperature, top_k, top_p: the
    sampling parameters an explored request is served with (max_tokens and the seed stay the
    request's); version_share: fraction of the explored requests served by an older version
    with the request's own parameters instead; versions: how many older versions take turns."""

    share: float = 0.0
    temperature: float = 1.5
    top_k: int = 0
    top_p: float = 1.0
    version_share: float = 0.0
    versions: int = 2

    def __post_init__(self) -> None:
        if not 0 <= self.share <= 1:  # NaN fails this too
            raise ValueError(f"explore_share must be in [0, 1], got {self.share}")
        if not 0 <= self.version_share <= 1:
            raise ValueError(f"explore_version_share must be in [0, 1], got {self.version_share}")
        if self.versions < 0:
            raise ValueError(f"explore_versions must be >= 0, got {self.versions}")
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

    def by_version(self, uniform: float) -> bool:
        """Whether an explored request whose second uniform draw is `uniform` goes to an older
        version (when one is held)."""
        return uniform < self.version_share

    def params(self, requested: SamplingParams) -> SamplingParams:
        """The parameters an explored request is sampled with."""
        return replace(requested, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


def exploration_versions(
    live: str,
    previous: Sequence[str],
    reference: str | None,
    available: Collection[str],
    count: int,
    *,
    exclude: Collection[str] = (),
) -> list[str]:
    """The older versions that take turns serving the version part of the exploration share:
    the reference (the root of live's lineage), then the earlier live versions newest first,
    each once, at most `count`, leaving out live, `exclude` (the trial's version) and any whose
    weights are no longer `available`."""
    ordered = dict.fromkeys([reference, *reversed(previous)] if reference else reversed(previous))
    present, left_out = set(available), {live, *exclude}
    return [v for v in ordered if v is not None and v in present and v not in left_out][:count]
