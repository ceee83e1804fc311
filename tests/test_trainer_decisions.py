"""The decision policy (trainer/decisions.py) on hand-built outcomes: each branch and its reason.

Radii used below (alpha 0.05 split in two, tightest at 500): 200 ratings 0.238, 2000 ratings
0.075 per side.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from feedloop.core.online_eval import ShadowEstimate
from feedloop.core.registry import CANARY, SHADOW, Trial
from feedloop.core.store.outcomes import VersionOutcomes
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.decisions import (
    PROMOTE,
    ROLL_BACK,
    WAIT,
    compared_versions,
    judge_live,
    judge_trial,
    recent_versions,
)


@pytest.fixture
def config(tmp_path: Path) -> TrainConfig:
    return TrainConfig(
        data_dir=tmp_path,
        decision_alpha=0.05,
        decision_margin=0.05,
        decision_min_ratings=30,
        max_trial_s=600.0,
        watch_s=600.0,
    )


def rated(version: str, n: int, mean: float) -> VersionOutcomes:
    return VersionOutcomes(version, n, n * mean, n * mean * mean)


CANARY_TRIAL = Trial("v3", CANARY, 0.1, "2030-01-01T00:00:00+00:00", "v2")


def test_a_canary_confidently_worse_than_live_is_rolled_back(config: TrainConfig) -> None:
    verdict = judge_trial(
        CANARY_TRIAL, 60.0, rated("v2", 2000, 0.5), rated("v3", 2000, 0.0), config
    )
    assert (verdict.action, verdict.version) == (ROLL_BACK, "v3")
    assert "worse than live" in verdict.reason
    assert verdict.figures["difference"]["high"] == pytest.approx(-0.5 + 2 * 0.07527, abs=1e-4)
    assert verdict.figures["candidate"]["n"] == 2000


def test_a_canary_confidently_not_worse_by_the_margin_is_promoted(config: TrainConfig) -> None:
    verdict = judge_trial(
        CANARY_TRIAL, 60.0, rated("v2", 2000, 0.3), rated("v3", 2000, 0.41), config
    )
    # 0.11 - 2 x 0.075 = -0.04: not confidently better, but within the margin
    assert (verdict.action, verdict.version) == (PROMOTE, "v3")
    assert -0.05 <= verdict.figures["difference"]["low"] < 0
    assert "not worse than live by more than 0.05" in verdict.reason


def test_an_undecided_canary_waits_then_is_rolled_back_at_max_trial_s(config: TrainConfig) -> None:
    live, candidate = rated("v2", 200, 0.3), rated("v3", 200, 0.28)
    waiting = judge_trial(CANARY_TRIAL, 60.0, live, candidate, config)
    assert waiting.action == WAIT and "undecided" in waiting.reason
    timed_out = judge_trial(CANARY_TRIAL, 600.0, live, candidate, config)
    assert timed_out.action == ROLL_BACK and "no verdict after 600 s" in timed_out.reason


def test_too_few_ratings_is_too_little_evidence_whatever_the_means(config: TrainConfig) -> None:
    live, candidate = rated("v2", 500, 0.9), rated("v3", 29, -0.9)
    waiting = judge_trial(CANARY_TRIAL, 60.0, live, candidate, config)
    assert waiting.action == WAIT
    assert "too little evidence: 29 ratings of v3, 500 of v2" in waiting.reason
    timed_out = judge_trial(CANARY_TRIAL, 601.0, live, candidate, config)
    assert timed_out.action == ROLL_BACK and "too little evidence" in timed_out.reason


SHADOW_TRIAL = Trial("v3", SHADOW, 0.1, "2030-01-01T00:00:00+00:00", "v2")


def scored(n: int, low: float) -> ShadowEstimate:
    return ShadowEstimate(n, low, low + 0.1, 0.0, n / 2, 0.01, 2.0)


def test_a_shadow_is_promoted_when_its_lower_bound_clears_lives_upper_less_the_margin(
    config: TrainConfig,
) -> None:
    # live: 2000 ratings of mean 0, upper bound 0.075; less the margin 0.05: 0.025
    live, nothing = rated("v2", 2000, 0.0), rated("v3", 0, 0.0)
    promoted = judge_trial(SHADOW_TRIAL, 60.0, live, nothing, config, scored(500, 0.03))
    assert promoted.action == PROMOTE and promoted.version == "v3"
    assert "lower bound +0.030" in promoted.reason and promoted.figures["shadow"]["n"] == 500
    waiting = judge_trial(SHADOW_TRIAL, 60.0, live, nothing, config, scored(500, 0.02))
    assert waiting.action == WAIT and "undecided" in waiting.reason
    ended = judge_trial(SHADOW_TRIAL, 600.0, live, nothing, config, scored(500, 0.02))
    assert ended.action == ROLL_BACK and "without a promotion" in ended.reason


def test_a_shadow_is_judged_on_its_scores_never_on_ratings_it_cannot_have(
    config: TrainConfig,
) -> None:
    live, rated_high = rated("v2", 2000, 0.0), rated("v3", 2000, 0.9)
    assert judge_trial(SHADOW_TRIAL, 60.0, live, rated_high, config).action == WAIT
    few = judge_trial(SHADOW_TRIAL, 60.0, live, rated_high, config, scored(29, 0.9))
    assert few.action == WAIT and "29 rated generations scored" in few.reason
    timed_out = judge_trial(SHADOW_TRIAL, 600.0, live, rated_high, config, scored(29, 0.9))
    assert timed_out.action == ROLL_BACK and "too little evidence" in timed_out.reason
    thin_live = judge_trial(SHADOW_TRIAL, 60.0, rated("v2", 29, 0.0), live, config, scored(500, 1))
    assert thin_live.action == WAIT


def test_a_fresh_live_version_below_a_recent_one_goes_back_to_the_best_such(
    config: TrainConfig,
) -> None:
    live = rated("v4", 2000, 0.0)
    recent = [rated("v3", 2000, 0.3), rated("v2", 2000, 0.5), rated("v1", 2000, 0.05)]
    verdict = judge_live(live, 100.0, recent, config)
    assert (verdict.action, verdict.version) == (ROLL_BACK, "v2")
    assert verdict.figures["alpha_per_comparison"] == pytest.approx(0.05 / 3)
    assert "difference_to_v1" in verdict.figures
    assert "rates below v2" in verdict.reason


def test_a_live_version_past_its_watch_or_not_confidently_worse_stays(
    config: TrainConfig,
) -> None:
    recent = [rated("v3", 2000, 0.5)]
    assert judge_live(rated("v4", 2000, 0.0), 600.0, recent, config).action == WAIT
    assert judge_live(rated("v4", 2000, 0.45), 100.0, recent, config).action == WAIT
    assert judge_live(rated("v4", 10, -1.0), 100.0, recent, config).action == WAIT  # too few


def test_a_watched_version_is_also_compared_with_the_best_rated_one_on_the_stack() -> None:
    # A chain of promotions, each a little worse: v1 0.5, v2 0.4, v3 0.3, v4 0.2, live v5.
    stack = ("v1", "v2", "v3", "v4")
    outcomes = {v: rated(v, 100, 0.5 - 0.1 * i) for i, v in enumerate(stack)}
    assert compared_versions(stack, "v5", 3, outcomes, 30) == ["v4", "v3", "v2", "v1"]
    # the best already among the recent ones, or too thinly rated to count: nothing added
    assert compared_versions(stack, "v5", 4, outcomes, 30) == ["v4", "v3", "v2", "v1"]
    thin = {**outcomes, "v1": rated("v1", 29, 0.9)}
    assert compared_versions(stack, "v5", 3, thin, 30) == ["v4", "v3", "v2"]
    assert compared_versions((), "v1", 3, {}, 30) == []


def test_recent_versions_are_the_latest_earlier_live_ones_without_live() -> None:
    assert recent_versions(("v1", "v2", "v3", "v2"), "v3", 2) == ["v2", "v1"]
    assert recent_versions((), "v1", 3) == []
