"""Online evaluation's statistics (core/online_eval.py) against figures worked out by hand, and a
simulation of what a confidence sequence promises: coverage however often it is looked at."""

from __future__ import annotations

import math

import numpy as np
import pytest

from feedloop.core.online_eval import (
    mean_rating,
    mixture_radius,
    online_report,
    rating_difference,
    shadow_estimate,
    win_rate,
)
from feedloop.core.store.outcomes import ShadowEvidence, VersionOutcomes


def rated(version: str, n: int, mean: float) -> VersionOutcomes:
    return VersionOutcomes(version, n, n * mean, n * mean * mean)


def test_the_mixture_radius_is_the_normal_mixture_boundary_over_n() -> None:
    # n = 100, alpha = 0.05, sigma = 1, tightest at 100:
    #   2 log(1/alpha) = 5.99146, log(1 + 5.99146) = 1.94469, rho = 100 / 7.93615 = 12.60056
    #   (V + rho) = 112.60056, log(112.60056 / (12.60056 * 0.0025)) = 8.18157
    #   sqrt(112.60056 * 8.18157) / 100 = 0.303521
    assert mixture_radius(100, 0.05, sigma=1.0, tightest_at=100) == pytest.approx(
        0.303521, abs=1e-6
    )
    # n = 40, alpha = 0.1, sigma = 1/2, tightest at 500: rho = 0.25 * 500 / 6.32883 = 19.75079,
    # V = 10, sqrt(29.75079 * log(29.75079 / 0.1975079)) / 40 = 0.305364
    assert mixture_radius(40, 0.1, sigma=0.5) == pytest.approx(0.305364, abs=1e-6)
    assert mixture_radius(0, 0.05, sigma=1.0) == math.inf
    with pytest.raises(ValueError, match="alpha"):
        mixture_radius(10, 1.0, sigma=1.0)


def test_the_sequence_narrows_as_evidence_grows() -> None:
    radii = [mixture_radius(n, 0.05, sigma=1.0) for n in (10, 100, 1000, 10000)]
    assert radii == sorted(radii, reverse=True)


def test_mean_rating_is_the_mean_with_its_sequence_clipped_to_the_scale() -> None:
    # 100 ratings, mean 0.2, alpha 0.05, tightest at 500: rho = 63.00280, V + rho = 163.00280,
    # radius = sqrt(163.00280 * log(163.00280 / (63.00280 * 0.0025))) / 100 = 0.336389
    estimate = mean_rating(rated("v1", 100, 0.2), 0.05)
    assert estimate.n == 100 and estimate.mean == pytest.approx(0.2)
    assert estimate.low == pytest.approx(0.2 - 0.336389, abs=1e-6)
    assert estimate.high == pytest.approx(0.2 + 0.336389, abs=1e-6)
    one = mean_rating(rated("v1", 1, 1.0), 0.05)
    assert (one.low, one.high) == (-1.0, 1.0)  # the radius exceeds the scale on both sides
    none = mean_rating(VersionOutcomes("v1"), 0.05)
    assert none.n == 0 and math.isnan(none.mean) and (none.low, none.high) == (-1.0, 1.0)


def test_a_difference_of_means_spends_half_of_alpha_on_each_side() -> None:
    # Each side at alpha / 2 = 0.025: 2 log(40) = 7.37776, rho = 500 / 9.50326 = 52.61308;
    # radius(100) = 0.358952, radius(400) = 0.164190.
    difference = rating_difference(rated("a", 100, 0.5), rated("b", 400, 0.1), 0.05)
    assert difference.n == 100
    assert difference.mean == pytest.approx(0.4)
    assert difference.low == pytest.approx(0.4 - 0.358952 - 0.164190, abs=1e-6)
    assert difference.high == pytest.approx(0.4 + 0.358952 + 0.164190, abs=1e-6)


def test_win_rate_counts_pairs_against_one_opponent_with_a_coin_flip_bound() -> None:
    outcomes = VersionOutcomes("v2", wins={"v1": 30, "v3": 1}, losses={"v1": 10})
    estimate = win_rate(outcomes, "v1", 0.1)
    assert (estimate.n, estimate.mean) == (40, 0.75)
    assert estimate.low == pytest.approx(0.75 - 0.305364, abs=1e-6)  # the radius worked above
    assert estimate.high == 1.0
    unseen = win_rate(outcomes, "v9", 0.1)
    assert unseen.n == 0 and math.isnan(unseen.mean) and (unseen.low, unseen.high) == (0.0, 1.0)


def test_the_online_report_gives_each_version_its_rating_and_win_rates() -> None:
    outcomes = {
        "v1": VersionOutcomes("v1", 4, 2.0, 1.5, wins={"v2": 3}, losses={"v2": 1}),
        "v2": VersionOutcomes("v2", 0, wins={"v1": 1}, losses={"v1": 3}),
    }
    report = online_report(outcomes, 0.05)
    assert set(report) == {"v1", "v2"}
    assert report["v1"].rating.mean == 0.5 and report["v1"].rating.n == 4
    assert set(report["v1"].win_rates) == {"v2"}
    assert report["v1"].win_rates["v2"].mean == 0.75
    assert report["v2"].win_rates["v1"].mean == 0.25
    assert report["v2"].as_dict()["rating"]["n"] == 0


def test_the_sequence_covers_under_repeated_looks_where_a_repeated_interval_does_not() -> None:
    # Ratings of +1 or -1 with equal chance (mean 0, the largest variance the scale allows),
    # looked at after every one of 1,000 ratings, in 400 seeded runs.
    alpha, runs, looks = 0.1, 400, 1000
    rng = np.random.default_rng(13)
    ratings = rng.choice([-1.0, 1.0], size=(runs, looks))
    n = np.arange(1, looks + 1)
    means = np.cumsum(ratings, axis=1) / n
    radii = np.array([mixture_radius(int(k), alpha, sigma=1.0) for k in n])
    sequence_missed = (np.abs(means) > radii).any(axis=1).mean()
    assert sequence_missed <= alpha

    # The fixed-n 90% interval (normal quantile, sample variance) re-computed at every look
    # from the 10th on: its miss rate at any single look is 10%, over all of them far more.
    variances = np.cumsum(ratings**2, axis=1) / n - means**2
    naive_radii = 1.6449 * np.sqrt(variances * n / np.maximum(n - 1, 1)) / np.sqrt(n)
    naive_missed = (np.abs(means) > naive_radii)[:, 9:].any(axis=1).mean()
    assert naive_missed > 2 * alpha


# -- shadow trials: the off-policy estimate from exact live propensities --------------------------


def shadow(rating: float, behaviour_p: float, shadow_p: float) -> ShadowEvidence:
    return ShadowEvidence("g", rating, math.log(behaviour_p), math.log(shadow_p))


def test_shadow_estimate_by_hand() -> None:
    evidence = [
        shadow(1.0, 0.5, 0.25),  # w = 0.5
        shadow(-1.0, 0.25, 0.75),  # w = 3: clipped at 2 for the bound
        shadow(0.0, 0.5, 0.5),  # w = 1
    ]
    found = shadow_estimate(evidence, 0.05, max_weight=2.0)
    # clipped terms min(w, 2) (r + 1): 1, 0, 1; the bound is their mean less the radius, less 1
    radius = mixture_radius(3, 0.05, sigma=2.0)
    assert found.low == pytest.approx(max(-1.0, 2 / 3 - radius - 1))
    assert found.mean == pytest.approx((0.5 - 3.0 + 0.0) / 4.5)  # self-normalised
    assert found.live_mean == 0.0 and found.n == 3
    assert found.effective_n == pytest.approx(4.5**2 / (0.25 + 9 + 1))
    assert found.clipped_share == pytest.approx(1 / 3) and found.max_weight == 2.0
    many = shadow_estimate(evidence * 4000, 0.05, max_weight=2.0)
    assert many.low == pytest.approx(2 / 3 - mixture_radius(12000, 0.05, sigma=2.0) - 1)
    assert -1.0 < many.low < 2 / 3 - 1


def test_shadow_estimate_without_evidence_says_nothing() -> None:
    empty = shadow_estimate([], 0.05)
    assert empty.n == 0 and empty.low == -1.0 and math.isnan(empty.mean)
    assert math.isnan(shadow_estimate([shadow(1.0, 0.5, 1e-300)], 0.05).mean) is False
    with pytest.raises(ValueError):
        shadow_estimate([], 0.05, max_weight=0.0)


def test_the_shadow_lower_bound_holds_at_every_look() -> None:
    # Live samples three outputs with p, the shadow version would with q; each output's ratings
    # are +1 or -1 with mean m. The shadow's true mean rating is sum(q m) = 0.23. No ratio is
    # above the clipping (q / p at most 2), so the bound is as tight as it gets: any less radius
    # and it misses.
    p, q, m = np.array([0.5, 0.3, 0.2]), np.array([0.3, 0.3, 0.4]), np.array([-0.5, 0.2, 0.8])
    truth = float(q @ m)
    alpha, runs, looks = 0.1, 100, range(50, 2001, 150)
    rng = np.random.default_rng(7)
    missed, final_lows = 0, []
    for _ in range(runs):
        outputs = rng.choice(3, size=2000, p=p)
        ratings = np.where(rng.random(2000) < (m[outputs] + 1) / 2, 1.0, -1.0)
        evidence = [
            ShadowEvidence("g", float(r), math.log(p[y]), math.log(q[y]))
            for y, r in zip(outputs, ratings, strict=True)
        ]
        lows = [shadow_estimate(evidence[:n], alpha).low for n in looks]
        missed += any(low > truth for low in lows)
        final_lows.append(lows[-1])
    assert missed <= alpha * runs  # time-uniform: a miss at any look counts
    # and it is a bound worth having: within 0.5 of the truth after 2,000 ratings
    assert np.median(final_lows) > truth - 0.5
