"""Evidence that ages (core/discount.py, the discounted sequences of core/online_eval.py, the
discounted tally of core/store/outcomes.py) and bringing an older version back
(trainer/decisions.py bring_back, trainer/evidence.py), against figures worked out by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from feedloop.core.discount import Discount
from feedloop.core.online_eval import (
    mean_rating,
    mixture_radius,
    rating_difference,
    weighted_radius,
)
from feedloop.core.registry import PROMOTED, ROLLED_BACK, Decision, LivePointer
from feedloop.core.store.base import SERVED_EXPLORATION
from feedloop.core.store.outcomes import (
    EXPLORATION,
    JudgedGeneration,
    VersionOutcomes,
    tally_outcomes,
)
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.decisions import ROLL_BACK, WAIT, bring_back
from feedloop.trainer.evidence import bring_back_candidates, made_live_at


def test_the_discount_weighs_by_half_lives_and_spends_alpha_by_block() -> None:
    # half-life 100 s, looks began at 1000, look at 1250: block floor(250 / 100) = 2 from 1200;
    # c = 0.5 ** (50 / 100), rho scale c^2 = 0.25 ** 0.5 = 0.5; alpha / (3 * 4) = alpha / 12.
    discount = Discount(100.0, 1250.0, 1000.0)
    assert (discount.block, discount.block_start_s) == (2, 1200.0)
    assert discount.weight(1150.0) == 0.5 and discount.weight(1250.0) == 1.0
    assert discount.weight(1050.0) == 0.25
    assert discount.rho_scale == pytest.approx(0.5)
    assert discount.alpha(0.05) == pytest.approx(0.05 / 12)
    assert discount.as_dict() == {
        "half_life_s": 100.0,
        "block": 2,
        "block_start_s": 1200.0,
        "rho_scale": discount.rho_scale,
    }
    # read back to the block's start less 10 half-lives, or less the lookback if shorter
    assert discount.cutoff_s(86400.0) == 200.0 and discount.cutoff_s(300.0) == 900.0
    # fixed within a block: a later look of block 2 reads from the same cutoff
    assert Discount(100.0, 1299.0, 1000.0).cutoff_s(86400.0) == 200.0
    off = Discount(0.0, 1250.0, 1000.0)
    assert (off.block, off.weight(0.0), off.rho_scale, off.alpha(0.05)) == (0, 1.0, 1.0, 0.05)
    assert off.cutoff_s(300.0) == 950.0
    with pytest.raises(ValueError, match="half_life_s"):
        Discount(-1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="must not precede"):
        Discount(100.0, 0.0, 1.0)


def test_the_weighted_radius_is_the_mixture_boundary_with_v_the_sum_of_squared_weights() -> None:
    # sum w = 60, sum w^2 = 40, alpha 0.05, sigma 1, tightest at 100, rho scale 0.5:
    #   rho = 12.60056 * 0.5 = 6.30028; V + rho = 46.30028;
    #   log(46.30028 / (6.30028 * 0.0025)) = 7.98602; sqrt(46.30028 * 7.98602) / 60 = 0.320484
    radius = weighted_radius(60.0, 40.0, 0.05, sigma=1.0, rho_scale=0.5, tightest_at=100)
    assert radius == pytest.approx(0.320484, abs=1e-6)
    # every weight 1: the plain boundary (0.303521 for n = 100, test_online_eval's figure)
    assert weighted_radius(100, 100, 0.05, sigma=1.0, tightest_at=100) == pytest.approx(
        mixture_radius(100, 0.05, sigma=1.0, tightest_at=100)
    )
    assert weighted_radius(0.0, 0.0, 0.05, sigma=1.0) == math.inf


def test_a_discounted_mean_rating_uses_the_weights_and_the_looks_alpha_share() -> None:
    # 300 ratings; weights summing to 120 (squares 80), weighted ratings summing to 36: the
    # discounted mean is 36 / 120 = 0.3 (the plain one, 30 / 300 = 0.1, is not what is read).
    # Look in block 2 (alpha 0.05 / 12 = 0.0041667), rho scale 0.5, tightest at 500:
    #   2 log(1 / alpha) = 10.96128, rho = 500 / (10.96128 + log(11.96128)) / 2 = 18.59711;
    #   V + rho = 98.59711; log(98.59711 / (18.59711 * 0.0041667^2)) = 12.62931;
    #   sqrt(98.59711 * 12.62931) / 120 = 0.294063
    outcomes = VersionOutcomes(
        "v1",
        300,
        30.0,
        30.0,
        discount=Discount(100.0, 1250.0, 1000.0),
        rating_weight=120.0,
        rating_weight_sq=80.0,
        weighted_rating_sum=36.0,
    )
    estimate = mean_rating(outcomes, 0.05)
    assert estimate.n == 300 and estimate.mean == pytest.approx(0.3)
    assert estimate.low == pytest.approx(0.3 - 0.294063, abs=1e-6)
    assert estimate.high == pytest.approx(0.3 + 0.294063, abs=1e-6)
    assert estimate.as_dict()["weight"] == 120.0
    assert estimate.as_dict()["alpha"] == pytest.approx(0.05 / 12)


def judged(
    seq: int, generation: str, version: str, score: float, at: float, served_as: str = "live"
) -> JudgedGeneration:
    return JudgedGeneration(seq, "rating", score, "unit", 0, generation, version, at, served_as)


def test_the_tally_discounts_ratings_by_their_latest_receipt_and_counts_explored_versions() -> None:
    # half-life 100 s, look at 1100: weights 1 (at 1100), 0.5 (1000), 0.25 (900).
    discount = Discount(100.0, 1100.0, 1000.0)
    rows = [
        judged(1, "g1", "v1", 1.0, 1100.0),  # +1, w 1
        judged(2, "g2", "v1", 0.0, 1000.0),  # -1, w 0.5
        judged(3, "g3", "v1", 1.0, 800.0),  # rated twice: mean 0.5, weighs its latest (900)
        judged(4, "g3", "v1", 0.5, 900.0),
        judged(5, "g4", "v1", 0.0, 1100.0, SERVED_EXPLORATION),  # -1, w 1, if explored
        judged(6, "g5", "v2", 1.0, 1100.0, SERVED_EXPLORATION),
    ]
    plain = tally_outcomes(rows, ["v1", "v2"], discount=discount)
    v1 = plain["v1"]
    # weighted: 1 * 1 + 0.5 * (-1) + 0.25 * 0.5 = 0.625 over 1.75; squares 1 + 0.25 + 0.0625
    assert (v1.ratings, v1.rating_sum) == (3, 0.5)
    assert v1.rating_weight == pytest.approx(1.75)
    assert v1.rating_weight_sq == pytest.approx(1.3125)
    assert v1.weighted_rating_sum == pytest.approx(0.625)
    assert v1.mean == pytest.approx(0.625 / 1.75)
    assert plain["v2"].ratings == 0  # exploration rows count only for explored versions
    explored = tally_outcomes(rows, ["v1"], discount=discount, explored=["v1"])["v1"]
    assert explored.ratings == 4 and explored.rating_weight == pytest.approx(2.75)
    assert explored.weighted_rating_sum == pytest.approx(-0.375)
    undiscounted = tally_outcomes(rows, ["v1"])["v1"]
    assert undiscounted.discount is None and undiscounted.mean == pytest.approx(0.5 / 3)
    assert EXPLORATION == SERVED_EXPLORATION


def test_the_discounted_sequence_covers_a_drifting_mean_at_every_look() -> None:
    # One rating of +1 or -1 a second, mean 0.6 for 300 s, then -0.6 (a change of taste), 400
    # seeded runs, looked at every second for 600 s, half-life 50 s, alpha 0.1. The target at
    # each look is the discounted mean of the means; the sequence must miss it at SOME look in
    # at most 10% of the runs.
    alpha, runs, looks, half_life = 0.1, 400, 600, 50.0
    rng = np.random.default_rng(21)
    means = np.where(np.arange(looks) < 300, 0.6, -0.6)
    ratings = np.where(rng.random((runs, looks)) < (1 + means) / 2, 1.0, -1.0)
    decay = 0.5 ** (1 / half_life)
    weighted = np.zeros(runs)
    target = weight = weight_sq = 0.0
    missed = np.zeros(runs, dtype=bool)
    plain_missed = np.zeros(runs, dtype=bool)
    total = np.zeros(runs)
    for t in range(looks):
        weighted = weighted * decay + ratings[:, t]
        target, weight = target * decay + means[t], weight * decay + 1
        weight_sq = weight_sq * decay**2 + 1
        total += ratings[:, t]
        discount = Discount(half_life, float(t), 0.0)
        radius = weighted_radius(
            weight, weight_sq, discount.alpha(alpha), sigma=1.0, rho_scale=discount.rho_scale
        )
        missed |= np.abs(weighted / weight - target / weight) > radius
        # the plain sequence of all ratings so far, read as if it told the discounted target
        plain = mixture_radius(t + 1, alpha, sigma=1.0)
        plain_missed |= np.abs(total / (t + 1) - target / weight) > plain
    assert missed.mean() <= alpha
    assert plain_missed.mean() > 0.9  # undiscounted evidence says nothing true after a change


@pytest.fixture
def config(tmp_path: Path) -> TrainConfig:
    return TrainConfig(data_dir=tmp_path, decision_alpha=0.05, decision_min_ratings=30)


def rated(version: str, n: int, mean: float) -> VersionOutcomes:
    return VersionOutcomes(version, n, n * mean, n * mean * mean)


def test_an_older_version_confidently_above_live_is_brought_back(config: TrainConfig) -> None:
    # Two comparisons: alpha 0.025 each, each side at 0.0125 (rho 45.27853 at 500):
    # radius(2000) = 0.080185, radius(200) = 0.253182. live -0.9 minus v1 -0.4: -0.5, high
    # -0.5 + 0.080185 + 0.253182 = -0.166633 < 0: v1 is brought back; live minus v2 (-0.85):
    # high -0.05 + 2 x 0.080185 = 0.110370: not confidently better.
    live = rated("v3", 2000, -0.9)
    verdict = bring_back(live, [rated("v1", 200, -0.4), rated("v2", 2000, -0.85)], config)
    assert (verdict.action, verdict.version) == (ROLL_BACK, "v1")
    assert verdict.figures["alpha_per_comparison"] == pytest.approx(0.025)
    assert verdict.figures["difference_to_v1"]["high"] == pytest.approx(-0.166633, abs=1e-5)
    assert verdict.figures["difference_to_v2"]["high"] == pytest.approx(0.110370, abs=1e-5)
    assert verdict.figures["brought_back"] is True
    assert "brought back v1" in verdict.reason and "alpha 0.025 per comparison" in verdict.reason
    # of two confidently better, the better-rated one
    both = bring_back(live, [rated("v1", 200, -0.4), rated("v2", 2000, -0.2)], config)
    assert both.version == "v2"


def test_no_older_version_comes_back_without_confident_evidence(
    config: TrainConfig, tmp_path: Path
) -> None:
    live = rated("v3", 2000, -0.9)
    close = bring_back(live, [rated("v1", 2000, -0.8)], config)  # -0.1 + 2 x 0.07527 > 0
    assert close.action == WAIT and close.version is None
    assert bring_back(live, [rated("v1", 29, 1.0)], config).action == WAIT  # too few ratings
    assert bring_back(live, [], config).action == WAIT
    off = TrainConfig(data_dir=tmp_path, bring_back=False)
    assert bring_back(live, [rated("v1", 2000, 0.9)], off).action == WAIT
    with pytest.raises(ValueError, match="evidence_half_life_s"):
        TrainConfig(data_dir=tmp_path, evidence_half_life_s=-1.0)


def test_the_candidates_are_the_reference_and_the_stack_that_still_has_weights() -> None:
    pointer = LivePointer("v5", ("v1", "v2", "v4", "v2"), None, False)
    available = ["v1", "v2", "v3", "v5"]  # v4 pruned
    assert bring_back_candidates(pointer, "v1", available) == ["v1", "v2"]
    assert bring_back_candidates(pointer, "v3", available) == ["v3", "v2", "v1"]
    assert bring_back_candidates(pointer, "v5", available) == ["v2", "v1"]  # live is no candidate
    assert bring_back_candidates(pointer, None, []) == []


def test_when_live_became_live_passes_over_a_trials_rollback() -> None:
    at = "2030-01-01T00:00:00+00:00"
    later = "2030-01-01T00:10:00+00:00"
    history = [  # newest first
        Decision("v2", ROLLED_BACK, "canary worse", {"from": "v3", "trial": "canary"}, later),
        Decision("v2", PROMOTED, "canary better", {"previous": "v1"}, at),
    ]
    assert made_live_at(history, "v2") == 1893456000.0
    brought = [Decision("v1", ROLLED_BACK, "brought back", {"previous": "v2"}, later)]
    assert made_live_at(brought + history, "v1") == 1893456600.0
    assert made_live_at(history, "v9") is None
    # the two-sided boundary of a difference, as bring_back reads it, on discounted outcomes
    discount = Discount(100.0, 1100.0, 1000.0)
    a = VersionOutcomes("a", 10, 0.0, discount=discount, rating_weight=0.0)
    assert math.isnan(rating_difference(a, a, 0.05).mean)
