"""The drift detector, the restart rule and the stale-data weight, against hand-worked numbers
(trainer/drift.py, trainer/data.py's stale_weight)."""

from __future__ import annotations

import math

import pytest

from feedloop.core.online_eval import mean_rating
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
    assert check.figures() == {
        "detected": True,
        "change_at": 20.0,
        "before_mean": check.before.mean,
        "after_mean": check.after.mean,
        "before_ratings": 400,
        "after_ratings": 400,
        "drop_low": check.drop_low,
        "splits": 3,
    }


def test_a_thin_first_bucket_does_not_end_the_search_for_the_split() -> None:
    """The first split's earlier side has 50 ratings (< 100, not judged); the later splits
    are judged all the same, and the drop at 30 s is found."""
    check = detect_drop(
        buckets((50, 0.8), (200, 0.8), (200, 0.8), (200, -0.8), (200, -0.8)),
        min_drop=0.3,
        alpha=0.05,
        min_ratings=100,
    )
    assert check.detected and check.change_at == 30.0
    assert (check.before.n, check.after.n) == (450, 400)


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


@pytest.mark.parametrize("alpha", [0.0, 1.0, 1.5, -0.1])
def test_the_detector_refuses_an_alpha_outside_0_1(alpha: float) -> None:
    # with ratings and without: no radius is computed on empty buckets to catch it later
    for sides in (buckets((200, 0.8), (200, -0.8)), buckets((0, 0.0), (0, 0.0))):
        with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\), not "):
            detect_drop(sides, min_drop=0.3, alpha=alpha, min_ratings=1)


def test_one_split_of_two_buckets_is_judged_on_one_rating_a_side() -> None:
    check = detect_drop(buckets((1, 1.0), (1, -1.0)), min_drop=0.3, alpha=0.05, min_ratings=1)
    assert check.splits == 1 and check.change_at == 10.0
    assert (check.before.n, check.after.n) == (1, 1) and math.isfinite(check.drop_low)


def test_sides_of_exactly_min_ratings_are_judged() -> None:
    check = detect_drop(buckets((200, 0.8), (200, -0.8)), min_drop=0.3, alpha=0.05, min_ratings=200)
    assert check.detected and check.change_at == 10.0


def test_the_change_can_be_the_first_split() -> None:
    check = detect_drop(
        buckets((200, 0.8), (200, -0.8), (200, -0.8)), min_drop=0.3, alpha=0.05, min_ratings=100
    )
    assert check.detected and check.change_at == 10.0


def test_a_too_thin_later_side_is_not_judged_even_when_it_would_show_the_largest_drop() -> None:
    """50 ratings at -1 after 400 at 0.8: not judged (< 100). The one judged split, at 10 s,
    mixes the two levels on its later side and shows no confident drop."""
    check = detect_drop(
        buckets((200, 0.8), (200, 0.8), (50, -1.0)), min_drop=0.3, alpha=0.05, min_ratings=100
    )
    assert not check.detected
    assert check.change_at == 10.0 and check.after.n == 250


def test_quiet_buckets_leave_the_change_point_at_the_earliest_of_equal_splits() -> None:
    """No rating in the first bucket nor between the two levels: the splits at 10 s and 20 s
    have the same sides, and the earlier one is the change point."""
    check = detect_drop(
        buckets((0, 0.0), (200, 0.8), (0, 0.0), (200, -0.8)),
        min_drop=0.3,
        alpha=0.05,
        min_ratings=100,
    )
    assert check.detected and check.change_at == 20.0
    assert (check.before.n, check.after.n) == (200, 200)


def test_a_drop_bound_equal_to_min_drop_is_not_declared() -> None:
    sides = buckets((200, 0.8), (200, -0.8))
    bound = detect_drop(sides, min_drop=0.0, alpha=0.05, min_ratings=1).drop_low
    assert not detect_drop(sides, min_drop=bound, alpha=0.05, min_ratings=1).detected


def test_the_detector_judges_no_side_on_zero_ratings() -> None:
    with pytest.raises(ValueError, match="min_ratings"):
        detect_drop(buckets((200, 0.8), (200, -0.8)), min_drop=0.3, alpha=0.05, min_ratings=0)


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
    assert choice.reason == (
        "no version's rating since the change is confidently above "
        "the mean rating after the change point (-0.900)"
    )


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


def test_a_version_with_exactly_min_ratings_counts() -> None:
    choice = restart_version(
        outcomes(v0005=(300, -0.9), v0007=(100, -0.2)),
        reference="v0001",
        collapsed_level=-0.9,
        alpha=0.05,
        min_ratings=100,
    )
    assert choice.version == "v0007"


def test_a_lower_bound_equal_to_the_bar_is_not_above_it() -> None:
    versions = outcomes(v0007=(200, -0.2))
    at_bar = mean_rating(versions["v0007"], 0.05).low
    choice = restart_version(
        versions, reference="v0001", collapsed_level=at_bar, alpha=0.05, min_ratings=100
    )
    assert choice.version == "v0001"


def test_of_two_equally_good_versions_the_first_by_name_is_trained_from() -> None:
    choice = restart_version(
        outcomes(v0008=(200, -0.2), v0007=(200, -0.2)),
        reference="v0001",
        collapsed_level=-0.9,
        alpha=0.05,
        min_ratings=100,
    )
    assert choice.version == "v0007"


def test_a_reference_with_exactly_min_ratings_sets_the_bar() -> None:
    choice = restart_version(
        outcomes(v0001=(100, -0.5), v0007=(200, -0.3)),
        reference="v0001",
        collapsed_level=-0.9,
        alpha=0.05,
        min_ratings=100,
    )
    assert choice.bar == pytest.approx(-0.5)
    assert "the reference's mean rating since the change (-0.500, 100 rated)" in choice.reason


def test_data_before_a_detected_change_weighs_the_declared_factor() -> None:
    assert stale_weight(99.0, 100.0, 0.05) == 0.05
    assert stale_weight(100.0, 100.0, 0.05) == 1.0
    assert stale_weight(99.0, None, 0.05) == 1.0
    assert before_change(99.0, 100.0) and not before_change(101.0, 100.0)
    assert not before_change(0.0, None)
