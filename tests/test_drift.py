"""The drift detector, the restart rule and the stale-data weight, against hand-worked numbers
(trainer/drift.py, trainer/data.py's stale_weight)."""

from __future__ import annotations

import math

import pytest

from feedloop.core.store.outcomes import VersionOutcomes
from feedloop.trainer.data import before_change, stale_weight
from feedloop.trainer.drift import RatingBucket, detect_drop, restart_version


def buckets(*sides: tuple[int, float]) -> list[RatingBucket]:
    """10 s buckets from t=0: (ratings, mean rating) each."""
    return [
        RatingBucket(10.0 * i, 10.0 * (i + 1), n, n * mean) for i, (n, mean) in enumerate(sides)
    ]


# The normal-mixture radius (core/online_eval.mixture_radius, sigma 1, tightest at 500), worked
# by hand for n = 400 at the per-side level of 4 buckets: alpha / (2 * 3 splits) = 0.05 / 6.
#   log(1/a) = log(120) = 4.7875; 2 log(1/a) = 9.5750; log(1 + 9.5750) = 2.3585
#   rho = 500 / (9.5750 + 2.3585) = 41.899; v + rho = 441.899
#   log(441.899 / (41.899 * (0.05 / 6) ** 2)) = log(151,885) = 11.931
#   radius = sqrt(441.899 * 11.931) / 400 = 72.61 / 400 = 0.18153
RADIUS_400 = 0.18153


def test_a_sharp_drop_is_detected_at_the_split_where_it_happened() -> None:
    """0.8 for 20 s, then -0.8: the best split is at 20 s, its drop's lower bound is the drop
    less both radii, 1.6 - 2 * 0.18153 = 1.2369 (other splits mix the two levels: lower)."""
    check = detect_drop(
        buckets((200, 0.8), (200, 0.8), (200, -0.8), (200, -0.8)),
        min_drop=0.3,
        alpha=0.05,
        min_ratings=100,
    )
    assert check.detected
    assert check.change_at == 20.0
    assert check.splits == 3
    assert check.before.n == check.after.n == 400
    assert check.before.mean == pytest.approx(0.8) and check.after.mean == pytest.approx(-0.8)
    assert check.drop_low == pytest.approx(1.6 - 2 * RADIUS_400, abs=1e-4)


def test_a_small_drop_is_reported_but_not_declared() -> None:
    """0.5 -> 0.3: the drop's bound, 0.2 - 0.36306 = -0.16306, is not above 0.3."""
    check = detect_drop(
        buckets((200, 0.5), (200, 0.5), (200, 0.3), (200, 0.3)),
        min_drop=0.3,
        alpha=0.05,
        min_ratings=100,
    )
    assert not check.detected
    assert check.change_at == 20.0
    assert check.drop_low == pytest.approx(0.2 - 2 * RADIUS_400, abs=1e-4)


def test_a_rise_is_not_a_drop() -> None:
    check = detect_drop(
        buckets((200, -0.8), (200, -0.8), (200, 0.8), (200, 0.8)),
        min_drop=0.3,
        alpha=0.05,
        min_ratings=100,
    )
    assert not check.detected and check.drop_low < 0


def test_sides_with_too_few_ratings_are_not_judged() -> None:
    """A drop from 1 to -1 on 50 ratings a side: below min_ratings, so no split is judged."""
    check = detect_drop(buckets((50, 1.0), (50, -1.0)), min_drop=0.3, alpha=0.05, min_ratings=100)
    assert not check.detected
    assert check.change_at is None and check.drop_low == -math.inf


def test_the_detector_refuses_a_bad_alpha() -> None:
    with pytest.raises(ValueError, match="alpha"):
        detect_drop(buckets((200, 0.8), (200, -0.8)), min_drop=0.3, alpha=0.0, min_ratings=1)


# mixture_radius(200, 0.05, sigma=1), by hand: log 20 = 2.9957; 2 log 20 = 5.9915;
# log(6.9915) = 1.9447; rho = 500 / 7.9362 = 63.003; v + rho = 263.003;
# log(263.003 / (63.003 * 0.0025)) = log(1669.8) = 7.4205; sqrt(263.003 * 7.4205) / 200 = 0.22089
RADIUS_200 = 0.22089


def outcomes(**versions: tuple[int, float]) -> dict[str, VersionOutcomes]:
    return {
        v: VersionOutcomes(v, n, n * mean, n * mean * mean) for v, (n, mean) in versions.items()
    }


def test_after_a_change_the_best_version_confidently_above_the_collapse_is_trained_from() -> None:
    """Collapsed live v0005 (-0.9), v0007 at -0.2 on 200 ratings (bound -0.2 - 0.22089 =
    -0.42089 > -0.9): v0007. v0005's bound is below its own mean, the collapsed level."""
    choice = restart_version(
        outcomes(v0005=(300, -0.9), v0007=(200, -0.2)),
        reference="v0001",
        collapsed_level=-0.9,
        alpha=0.05,
        min_ratings=100,
    )
    assert choice.version == "v0007"
    assert choice.bar == -0.9
    assert "-0.421" in choice.reason


def test_without_a_version_confidently_above_the_collapse_the_reference_is_trained_from() -> None:
    """v0007 at -0.75 on 200: bound -0.97089 < -0.9; v0008 has too few ratings to count."""
    choice = restart_version(
        outcomes(v0005=(300, -0.9), v0007=(200, -0.75), v0008=(99, 0.9)),
        reference="v0001",
        collapsed_level=-0.9,
        alpha=0.05,
        min_ratings=100,
    )
    assert choice.version == "v0001"
    assert "no version" in choice.reason


@pytest.mark.parametrize(("mean", "chosen"), [(-0.2, "v0007"), (-0.3, "v0001")])
def test_the_references_own_rating_since_the_change_is_the_bar_when_it_has_one(
    mean: float, chosen: str
) -> None:
    """The reference served 150 rated generations at -0.5 since the change (exploration): the
    bar is -0.5. v0007's bound: -0.2 - 0.22089 = -0.421 > -0.5, trained from; at -0.3 it is
    -0.521 < -0.5, and the reference is."""
    choice = restart_version(
        outcomes(v0001=(150, -0.5), v0007=(200, mean)),
        reference="v0001",
        collapsed_level=-0.9,
        alpha=0.05,
        min_ratings=100,
    )
    assert choice.bar == pytest.approx(-0.5)
    assert choice.version == chosen
    assert abs(mean - RADIUS_200 - (-0.5)) > 0.02  # each case clear of the boundary


def test_data_before_a_detected_change_weighs_the_declared_factor() -> None:
    assert stale_weight(99.0, 100.0, 0.05) == 0.05
    assert stale_weight(100.0, 100.0, 0.05) == 1.0
    assert stale_weight(99.0, None, 0.05) == 1.0
    assert before_change(99.0, 100.0) and not before_change(101.0, 100.0)
    assert not before_change(0.0, None)
