"""Online evaluation, pure: each version's mean rating and win rates from users' feedback, with
confidence sequences that stay valid however often they are looked at.

A confidence interval re-computed every minute while evidence accumulates and acted on the first
time it excludes a value is wrong far more often than its level says (each look is another chance
to be fooled). A confidence sequence (CS) covers the true value at every sample size at once with
probability at least 1 - alpha, so a decision taken at any look, by any stopping rule, keeps
that guarantee.

The CS here is the two-sided normal-mixture boundary (Robbins' method of mixtures) as stated by
Howard, Ramdas, McAuliffe & Sekhon, "Time-uniform, nonparametric, nonasymptotic confidence
sequences", Ann. Statist. 49(2), 2021 (arXiv:1810.08240). The mixture of exp(lambda S_n -
lambda^2 V_n / 2) over lambda ~ N(0, 1/rho) is a nonnegative supermartingale, and Ville's
inequality bounds the chance it ever reaches 1/alpha. For n independent observations that are
sigma-sub-Gaussian around their mean mu (any variable within an interval of width 2 sigma is,
by Hoeffding's lemma), with V = sigma^2 n, that reads:

    P( for some n: |sum_i x_i - n mu| >= sqrt((V + rho) log((V + rho) / (rho alpha^2))) ) <= alpha.

Dividing by n gives the radius around the mean. rho only sets where the boundary is tightest:
rho = sigma^2 m / (2 log(1/alpha) + log(1 + 2 log(1/alpha))) (the zero of its derivative in rho
at n = m, less a lower-order term) makes it nearly the narrowest possible at n = m, and the
boundary stays valid at every n whatever m is. Ratings normalised to [-1, 1] use sigma = 1, win
or loss outcomes (0 or 1) sigma = 1/2: the boundary needs no variance estimate, at the price of
being conservative for ratings that vary less than a coin flip between -1 and 1.

A version on shadow trial serves no one, so its mean rating is estimated off-policy from the live
version's rated generations that it scored (shadow_estimate): each one's importance ratio
w = pi_shadow(y) / pi_live(y) is exact, both log-probabilities being of the same output under
each version's own sampling distribution. The decision needs a lower bound it can trust under
repeated looks, and clipped importance sampling gives one (Thomas, Theocharous & Ghavamzadeh,
"High-confidence off-policy evaluation", AAAI 2015): shifted to r + 1 >= 0,
E_live[min(w, W) (r + 1)] <= E_live[w (r + 1)] <= E_shadow[r + 1], whatever the clipping W
costs in tightness, provided a user's rating depends on the text, not on who served it. The
clipped terms lie in [0, 2W], so the same mixture boundary with sigma = W bounds their mean at
every look. The self-normalised estimate (sum w r / sum w) rides along as the point figure, with
the effective sample size (sum w)^2 / sum w^2 that says how much of the sample it rests on.

Evidence that ages (feedloop.core.discount): outcomes tallied with a discount carry, for their
ratings, the weights w_i = 0.5 ** (age_i / H) <= 1. Their mean rating is the discounted mean
sum w x / sum w, and its sequence is the same boundary with V = sigma^2 sum w_i^2, rho scaled by
the look's c^2 and alpha by the look's block share, divided by sum w (the derivation is in
feedloop.core.discount's docstring). With every weight 1 this is the plain sequence above, so
the undiscounted figures are the special case, not a second formula.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from feedloop.core.store.outcomes import ShadowEvidence, VersionOutcomes

RATING_SIGMA = 1.0  # ratings lie in [-1, 1]
WIN_SIGMA = 0.5  # a pair's outcome lies in {0, 1}
# Observations at which the boundary is tightest: about what a trial gathers per version.
TIGHTEST_AT = 500.0


def mixture_rho(alpha: float, sigma: float, tightest_at: float = TIGHTEST_AT) -> float:
    """The mixture's rho that makes the boundary nearly narrowest at tightest_at observations."""
    log_inverse = 2 * math.log(1 / alpha)
    return sigma**2 * tightest_at / (log_inverse + math.log(1 + log_inverse))


def weighted_radius(
    weight: float,
    weight_sq: float,
    alpha: float,
    *,
    sigma: float,
    rho_scale: float = 1.0,
    tightest_at: float = TIGHTEST_AT,
) -> float:
    """Radius of the normal-mixture CS around a weighted mean sum w x / sum w: weight is sum w,
    weight_sq sum w^2 (V = sigma^2 weight_sq), rho_scale the look's c^2
    (feedloop.core.discount); inf when weight is 0."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), not {alpha}")
    if weight <= 0:
        return math.inf
    rho = mixture_rho(alpha, sigma, tightest_at) * rho_scale
    v = sigma**2 * weight_sq
    return math.sqrt((v + rho) * math.log((v + rho) / (rho * alpha**2))) / weight


def mixture_radius(
    n: int, alpha: float, *, sigma: float, tightest_at: float = TIGHTEST_AT
) -> float:
    """Radius of the normal-mixture CS around the mean of n observations (inf when n is 0)."""
    return weighted_radius(n, n, alpha, sigma=sigma, tightest_at=tightest_at)


@dataclass(frozen=True)
class Estimate:
    """A mean with its confidence sequence [low, high] at level 1 - alpha (n: observations)."""

    n: int
    mean: float  # nan without observations
    low: float
    high: float
    # Discounted estimates: sum of the weights (the evidence's discounted count), and the share
    # of alpha the look spent (feedloop.core.discount); None for plain ones.
    weight: float | None = None
    alpha: float | None = None

    def as_dict(self) -> dict[str, float | int]:
        plain = {"n": self.n, "mean": self.mean, "low": self.low, "high": self.high}
        if self.weight is None or self.alpha is None:
            return plain
        return {**plain, "weight": self.weight, "alpha": self.alpha}


def _bounded(n: int, mean: float, radius: float, lowest: float, highest: float) -> Estimate:
    # The true mean lies in [lowest, highest] anyway: clipping keeps the coverage.
    return Estimate(n, mean, max(lowest, mean - radius), min(highest, mean + radius))


def mean_rating(outcomes: VersionOutcomes, alpha: float) -> Estimate:
    """The version's mean normalised rating, one observation per rated generation; discounted
    (and its sequence with it) when the outcomes were tallied with a discount."""
    n, discount = outcomes.ratings, outcomes.discount
    if discount is not None:
        spent = discount.alpha(alpha)
        weight = outcomes.rating_weight
        if n == 0 or weight <= 0:
            return Estimate(n, math.nan, -1.0, 1.0, weight, spent)
        radius = weighted_radius(
            weight,
            outcomes.rating_weight_sq,
            spent,
            sigma=RATING_SIGMA,
            rho_scale=discount.rho_scale,
        )
        bounded = _bounded(n, outcomes.mean, radius, -1.0, 1.0)
        return Estimate(n, bounded.mean, bounded.low, bounded.high, weight, spent)
    if n == 0:
        return Estimate(0, math.nan, -1.0, 1.0)
    radius = mixture_radius(n, alpha, sigma=RATING_SIGMA)
    return _bounded(n, outcomes.rating_sum / n, radius, -1.0, 1.0)


def rating_difference(a: VersionOutcomes, b: VersionOutcomes, alpha: float) -> Estimate:
    """Mean rating of a minus b: each mean's CS at alpha/2 (a union bound), so the difference's
    covers at 1 - alpha whenever both are looked at. n is the smaller of the two counts."""
    mean_a, mean_b = mean_rating(a, alpha / 2), mean_rating(b, alpha / 2)
    return Estimate(
        min(mean_a.n, mean_b.n),
        mean_a.mean - mean_b.mean,
        mean_a.low - mean_b.high,
        mean_a.high - mean_b.low,
    )


def win_rate(outcomes: VersionOutcomes, opponent: str, alpha: float) -> Estimate:
    """Share of the pairs between this version and the opponent that this version won."""
    wins, losses = outcomes.wins.get(opponent, 0), outcomes.losses.get(opponent, 0)
    n = wins + losses
    if n == 0:
        return Estimate(0, math.nan, 0.0, 1.0)
    return _bounded(n, wins / n, mixture_radius(n, alpha, sigma=WIN_SIGMA), 0.0, 1.0)


@dataclass(frozen=True)
class VersionReport:
    """What users' feedback says about one version: mean rating and win rates, each with its CS."""

    version: str
    rating: Estimate
    win_rates: dict[str, Estimate] = field(default_factory=dict)  # by opponent version

    def as_dict(self) -> dict[str, object]:
        return {
            "version": self.version,
            "rating": self.rating.as_dict(),
            "win_rates": {v: e.as_dict() for v, e in self.win_rates.items()},
        }


def online_report(outcomes: dict[str, VersionOutcomes], alpha: float) -> dict[str, VersionReport]:
    """Each version's report (the ModelAdmin online report and the trainer's decisions read it)."""
    return {
        version: VersionReport(
            version,
            mean_rating(o, alpha),
            {opponent: win_rate(o, opponent, alpha) for opponent in sorted({*o.wins, *o.losses})},
        )
        for version, o in outcomes.items()
    }


SHADOW_MAX_WEIGHT = 2.0  # W: importance ratios above it are clipped for the lower bound


@dataclass(frozen=True)
class ShadowEstimate:
    """What a shadow version's ratings would have been, from the live generations it scored.

    n: rated live generations it scored; low: time-uniform lower bound (1 - alpha) on its mean
    rating; mean: the self-normalised estimate (nan when n is 0 or every ratio is 0);
    live_mean: the same generations' mean rating as served; effective_n: (sum w)^2 / sum w^2;
    clipped_share: share of ratios above max_weight.
    """

    n: int
    low: float
    mean: float
    live_mean: float
    effective_n: float
    clipped_share: float
    max_weight: float

    def as_dict(self) -> dict[str, float | int]:
        return {
            "n": self.n,
            "low": self.low,
            "mean": self.mean,
            "live_mean": self.live_mean,
            "effective_n": self.effective_n,
            "clipped_share": self.clipped_share,
            "max_weight": self.max_weight,
        }


def shadow_estimate(
    evidence: Sequence[ShadowEvidence], alpha: float, max_weight: float = SHADOW_MAX_WEIGHT
) -> ShadowEstimate:
    """The shadow version's mean rating from its scores of rated live generations (module
    docstring: a clipped-importance lower bound and a self-normalised point estimate)."""
    if max_weight <= 0:
        raise ValueError(f"max_weight must be positive, not {max_weight}")
    n = len(evidence)
    if n == 0:
        return ShadowEstimate(0, -1.0, math.nan, math.nan, 0.0, 0.0, max_weight)
    weights = [math.exp(e.shadow_logprob - e.behaviour_logprob) for e in evidence]
    ratings = [e.rating for e in evidence]
    clipped_mean = (
        sum(min(w, max_weight) * (r + 1) for w, r in zip(weights, ratings, strict=True)) / n
    )
    radius = mixture_radius(n, alpha, sigma=max_weight)
    total = sum(weights)
    squares = sum(w * w for w in weights)
    return ShadowEstimate(
        n=n,
        low=min(1.0, max(-1.0, clipped_mean - radius - 1.0)),
        mean=sum(w * r for w, r in zip(weights, ratings, strict=True)) / total
        if total > 0
        else math.nan,
        live_mean=sum(ratings) / n,
        effective_n=total * total / squares if squares > 0 else 0.0,
        clipped_share=sum(w > max_weight for w in weights) / n,
        max_weight=max_weight,
    )
