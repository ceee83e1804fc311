"""When users' taste changes, the trainer notices and adapts: pure decision math.

Detector (`detect_drop`): users' ratings of what the policies serve (every rated generation
but the exploration share's, normalised to [-1, 1]) in time buckets over the last
`drift_window_s`. For each split of the buckets into an earlier and a later stretch, the drop
of the mean rating from the earlier to the later has a lower confidence bound: each side's mean
with the normal-mixture confidence sequence of core/online_eval (valid however often the trainer
looks), at alpha / (2 (B - 1)) per side for B buckets, a Bonferroni bound over both sides and
every split looked at. A drop is declared when the largest lower bound over the splits exceeds
`drift_min_drop`, and the change point is that split's time: a mean-shift change point (binary
segmentation's first step) with a bound a chosen split cannot fool.

After a detected change:
- `restart_version`: until live is a version trained after the change, each round trains from
  the best version under the evidence since the change instead of live (which collapsed onto the
  old taste and sits at the KL leash's end): among the versions with at least
  `drift_min_ratings` ratings since the change, the one with the highest lower bound on its mean
  rating, provided that bound is above the bar; else the reference. The bar is the reference's
  own mean rating since the change if it has that many ratings (exploration served by it), else
  the mean rating served after the change point when it was detected (the collapsed level).
- `stale_weight` (trainer/data.py) down-weights data from before the change point.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from feedloop.core.online_eval import RATING_SIGMA, Estimate, mean_rating, mixture_radius
from feedloop.core.store.outcomes import VersionOutcomes


@dataclass(frozen=True)
class RatingBucket:
    """Rated generations whose feedback arrived in [start, end) (Unix seconds)."""

    start: float
    end: float
    ratings: int
    rating_sum: float  # of normalised ratings in [-1, 1]


@dataclass(frozen=True)
class DropCheck:
    """The detector's verdict on one look. change_at: the split with the largest lower bound
    on the drop (None when no split had enough ratings on both sides)."""

    detected: bool
    change_at: float | None
    before: Estimate
    after: Estimate
    drop_low: float  # lower bound of before.mean - after.mean at the split (-inf: none)
    splits: int  # splits looked at (the Bonferroni divisor)

    def figures(self) -> dict[str, Any]:
        return {
            "detected": self.detected,
            "change_at": self.change_at,
            "before_mean": self.before.mean,
            "after_mean": self.after.mean,
            "before_ratings": self.before.n,
            "after_ratings": self.after.n,
            "drop_low": self.drop_low,
            "splits": self.splits,
        }


_NONE = Estimate(0, math.nan, -1.0, 1.0)


def _side(buckets: Sequence[RatingBucket], alpha: float) -> Estimate:
    n = sum(b.ratings for b in buckets)
    if n == 0:
        return _NONE
    mean = sum(b.rating_sum for b in buckets) / n
    radius = mixture_radius(n, alpha, sigma=RATING_SIGMA)
    return Estimate(n, mean, mean - radius, mean + radius)


def detect_drop(
    buckets: Sequence[RatingBucket], *, min_drop: float, alpha: float, min_ratings: int
) -> DropCheck:
    """Whether the mean rating dropped by more than min_drop, confidently (module docstring).

    buckets: oldest first, contiguous. A side with fewer than min_ratings ratings is not judged.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), not {alpha}")
    if min_ratings < 1:
        raise ValueError(f"min_ratings must be at least 1, not {min_ratings}")
    splits = max(len(buckets) - 1, 1)
    side_alpha = alpha / (2 * splits)
    best = DropCheck(False, None, _NONE, _NONE, -math.inf, splits)
    for k in range(1, len(buckets)):
        before, after = _side(buckets[:k], side_alpha), _side(buckets[k:], side_alpha)
        if before.n < min_ratings or after.n < min_ratings:
            continue
        drop_low = before.low - after.high
        if drop_low > best.drop_low:
            best = DropCheck(False, buckets[k].start, before, after, drop_low, splits)
    if best.drop_low > min_drop:
        return DropCheck(True, best.change_at, best.before, best.after, best.drop_low, splits)
    return best


@dataclass(frozen=True)
class RestartChoice:
    version: str
    reason: str
    bar: float  # the rating a version's lower bound had to beat


def restart_version(
    outcomes: Mapping[str, VersionOutcomes],
    *,
    reference: str,
    collapsed_level: float,
    alpha: float,
    min_ratings: int,
) -> RestartChoice:
    """The version to train from after a change (module docstring): outcomes are each
    servable version's ratings since the change."""
    ref = outcomes.get(reference)
    if ref is not None and ref.ratings >= min_ratings:
        bar = ref.rating_sum / ref.ratings
        bar_is = f"the reference's mean rating since the change ({bar:.3f}, {ref.ratings} rated)"
    else:
        bar = collapsed_level
        bar_is = f"the mean rating after the change point ({bar:.3f})"
    best: tuple[str, Estimate] | None = None
    for version in sorted(outcomes):
        o = outcomes[version]
        if version == reference or o.ratings < min_ratings:
            continue
        estimate = mean_rating(o, alpha)
        if estimate.low > bar and (best is None or estimate.low > best[1].low):
            best = (version, estimate)
    if best is None:
        return RestartChoice(
            reference, f"no version's rating since the change is confidently above {bar_is}", bar
        )
    version, estimate = best
    return RestartChoice(
        version,
        f"its rating since the change, {estimate.mean:.3f} (lower bound {estimate.low:.3f}, "
        f"{estimate.n} rated), is the best confidently above {bar_is}",
        bar,
    )
