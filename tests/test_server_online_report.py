"""ModelAdmin's online report on an in-process server over a store holding two versions'
generations and feedback: its counts, means and intervals are core.online_eval's on the same
outcomes, read in the window it names; a trial adds the trial-minus-live figures since it began;
bad input is refused naming the field.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import grpc
import pytest
from server_harness import rating, running_server, seeded_registry, test_config
from store_support import generation

from feedloop.core.discount import Discount
from feedloop.core.online_eval import (
    mean_rating,
    online_report,
    rating_difference,
    shadow_estimate,
)
from feedloop.core.store import FeedbackRecord, open_store
from feedloop.core.store.base import ShadowScore
from feedloop.v1 import feedloop_pb2 as pb

HOUR_S = 3600.0


def judged(event_id: str, kind: str, ids: list[str], age_s: float, **fields) -> FeedbackRecord:
    return FeedbackRecord(event_id, kind, ids, "app-1", time.time() - age_s, **fields)  # type: ignore[arg-type]


def seconds(ts) -> float:
    return ts.ToNanoseconds() / 1e9


@pytest.fixture
async def live(tmp_path: Path, tiny_checkpoint: Path):
    """v0001 live, v0002 and v0003 published; feedback on v0001 and v0002 in the last hour, and
    one rating of v0002 two hours old."""
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    registry.publish(tiny_checkpoint, reason="candidate")
    registry.publish(tiny_checkpoint, reason="another candidate")
    store = open_store(str(tmp_path / "replay.sqlite3"))
    store.append_generations(
        [generation(f"a{i}", version="v0001") for i in range(1, 5)]
        + [generation(f"b{i}", version="v0002") for i in range(1, 4)]
    )
    store.insert_feedback(
        [
            judged("a1-5", "rating", ["a1"], 60, score=5.0, scale="stars5"),  # +1
            judged("a2-q", "rating", ["a2"], 60, score=0.25, scale="unit"),  # -0.5
            judged("a3-up", "rating", ["a3"], 50, score=1.0, scale="unit"),  # +1 ...
            judged("a3-down", "rating", ["a3"], 40, score=0.0, scale="unit"),  # ... -1: a3 0
            judged("b1-up", "rating", ["b1"], 30, score=1.0, scale="thumbs"),  # +1
            judged("b2-down", "rating", ["b2"], 30, score=0.0, scale="thumbs"),  # -1
            judged("b3>a4", "comparison", ["b3", "a4"], 20),  # v0002 beats v0001
            judged("old", "rating", ["b3"], 2 * HOUR_S, score=1.0, scale="thumbs"),
        ]
    )
    async with running_server(test_config(tmp_path), registry=registry, store=store) as r:
        yield r


async def report(live, **fields) -> pb.OnlineReport:
    return await live.admin.GetOnlineReport(pb.GetOnlineReportRequest(**fields), timeout=10)


def assert_same(got: pb.OnlineEstimate, expected) -> None:
    assert got.count == expected.n
    assert (math.isnan(got.mean) and math.isnan(expected.mean)) or got.mean == expected.mean
    assert (got.low, got.high) == (expected.low, expected.high)


async def test_the_report_is_online_eval_on_the_last_hours_outcomes(live) -> None:
    reply = await report(live, alpha=0.1)
    assert reply.alpha == 0.1 and reply.live_version == "v0001"
    since, until = seconds(reply.since), seconds(reply.until)
    assert until - since == pytest.approx(HOUR_S) and abs(until - time.time()) < 60
    assert [(v.version, v.live, v.on_trial) for v in reply.versions] == [
        ("v0001", True, False),
        ("v0002", False, False),
    ]
    v0001, v0002 = reply.versions
    # By hand: three rated generations of v0001 (+1, -0.5, a3's two ratings averaging 0) and two
    # of v0002 (+1, -1; the two-hour-old rating is outside the window).
    assert (v0001.rating.count, v0001.rating.mean) == (3, pytest.approx(0.5 / 3))
    assert (v0002.rating.count, v0002.rating.mean) == (2, 0.0)
    assert v0001.rating.low < v0001.rating.mean < v0001.rating.high
    [lost], [won] = v0001.win_rates, v0002.win_rates
    assert (lost.opponent_version, lost.estimate.count, lost.estimate.mean) == ("v0002", 1, 0.0)
    assert (won.opponent_version, won.estimate.count, won.estimate.mean) == ("v0001", 1, 1.0)

    expected = online_report(live.store.online_outcomes(since, until), 0.1)
    for version in reply.versions:
        assert_same(version.rating, expected[version.version].rating)
        for win_rate in version.win_rates:
            assert_same(
                win_rate.estimate, expected[version.version].win_rates[win_rate.opponent_version]
            )
    assert not reply.HasField("trial") and not reply.HasField("trial_comparison")


async def test_a_half_life_adds_each_versions_rating_discounted_by_age(live) -> None:
    """Half-life 30 s: v0002's two ratings, 30 s old, weigh 0.5 each (mean 0); v0001's +1 and
    -0.5 are 60 s old (0.25 each) and a3's 0 counts at its latest rating, 40 s old (0.397): the
    weighted mean is (0.25 - 0.125 + 0) / (0.25 + 0.25 + 0.397) = 0.139, below the plain 0.167
    that weighs the older +1 alike. The interval is the discounted sequence's (on three ratings, the
    whole range, as the plain one's)."""
    plain = await report(live, alpha=0.1)
    assert not any(v.HasField("recent_rating") for v in plain.versions)
    reply = await report(live, alpha=0.1, half_life_s=30.0)
    v0001, v0002 = reply.versions
    until = seconds(reply.until)
    assert v0001.rating == plain.versions[0].rating  # the plain figures are unchanged
    w60, w40 = 0.25, 0.5 ** (40 / 30)
    recent = v0001.recent_rating
    assert recent.count == 3
    assert recent.mean == pytest.approx((w60 * 1.0 + w60 * -0.5) / (2 * w60 + w40), abs=2e-3)
    assert (v0002.recent_rating.count, v0002.recent_rating.mean) == (
        2,
        pytest.approx(0.0, abs=1e-6),
    )
    discount = Discount(30.0, until, seconds(reply.since))
    expected = live.store.online_outcomes(seconds(reply.since), until, discount=discount)
    assert_same(recent, mean_rating(expected["v0001"], 0.1))


async def test_the_window_and_alpha_default_and_a_longer_window_reads_older_feedback(
    live,
) -> None:
    default = await report(live)
    assert default.alpha == 0.05
    assert seconds(default.until) - seconds(default.since) == pytest.approx(HOUR_S)
    longer = await report(live, window_s=3 * HOUR_S)
    assert {v.version: v.rating.count for v in longer.versions} == {"v0001": 3, "v0002": 3}


async def test_named_versions_are_reported_even_without_feedback(live) -> None:
    reply = await report(live, versions=["v0003", "v0002"])
    assert [v.version for v in reply.versions] == ["v0003", "v0002"]  # newest first
    v0003 = reply.versions[0]
    assert v0003.rating.count == 0 and math.isnan(v0003.rating.mean)
    assert (v0003.rating.low, v0003.rating.high) == (-1.0, 1.0) and not v0003.win_rates


async def test_a_trial_adds_its_rating_minus_lives_since_it_began(live) -> None:
    await live.admin.StartTrial(pb.StartTrialRequest(version="v0002", share=0.5), timeout=10)
    # Ratings received after the trial started: one more of each side.
    for ack in (
        await live.feedback.Submit(rating("trial-a1", "a1", 0.0), timeout=10),
        await live.feedback.Submit(rating("trial-b1", "b1", 1.0), timeout=10),
    ):
        assert ack.outcome == pb.FEEDBACK_OUTCOME_ACCEPTED
    reply = await report(live, alpha=0.2)
    assert reply.trial.version == "v0002" and reply.trial.mode == pb.TRIAL_MODE_CANARY
    assert [(v.version, v.live, v.on_trial) for v in reply.versions] == [
        ("v0001", True, False),
        ("v0002", False, True),
    ]
    comparison = reply.trial_comparison
    assert (comparison.trial_version, comparison.live_version) == ("v0002", "v0001")
    assert 0 <= comparison.trial_age_s < 60
    trial_since = seconds(reply.until) - comparison.trial_age_s
    outcomes = live.store.online_outcomes(
        trial_since, seconds(reply.until), versions=["v0001", "v0002"]
    )
    trial, current = outcomes["v0002"], outcomes["v0001"]
    assert (trial.ratings, current.ratings) == (1, 1)  # only what came after the start
    assert_same(comparison.trial_rating, mean_rating(trial, 0.2))
    assert_same(comparison.live_rating, mean_rating(current, 0.2))
    assert_same(comparison.difference, rating_difference(trial, current, 0.2))
    assert comparison.difference.mean == 2.0  # +1 minus -1


async def test_without_feedback_live_and_the_trial_are_still_reported(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    registry.publish(tiny_checkpoint, reason="candidate")
    registry.start_trial("v0002", mode="shadow", share=0.1)
    async with running_server(test_config(tmp_path), registry=registry) as running:
        reply = await report(running)
    assert [(v.version, v.rating.count) for v in reply.versions] == [("v0001", 0), ("v0002", 0)]
    assert reply.trial.mode == pb.TRIAL_MODE_SHADOW
    assert reply.trial_comparison.difference.count == 0


async def test_a_shadow_trial_adds_its_off_policy_estimate_from_lives_rated_generations(
    live,
) -> None:
    await live.admin.StartTrial(
        pb.StartTrialRequest(version="v0002", share=0.5, mode=pb.TRIAL_MODE_SHADOW), timeout=10
    )
    # The shadow scored a1 and a2 (behaviour log-prob -1.475 each): ratios 1 and e^-1.
    live.store.append_shadow_scores(
        [
            ShadowScore("a1", "v0002", [-1.475], time.time()),
            ShadowScore("a2", "v0002", [-2.475], time.time()),
        ]
    )
    for ack in (
        await live.feedback.Submit(rating("shadow-a1", "a1", 1.0), timeout=10),  # +1
        await live.feedback.Submit(rating("shadow-a2", "a2", 0.0), timeout=10),  # -1
    ):
        assert ack.outcome == pb.FEEDBACK_OUTCOME_ACCEPTED
    reply = await report(live, alpha=0.2)
    shadow = reply.trial_comparison.shadow
    assert shadow.count == 2 and shadow.live_mean == 0.0
    w = math.exp(-1.0)
    assert shadow.mean == pytest.approx((1.0 - w) / (1.0 + w))
    assert shadow.effective_count == pytest.approx((1 + w) ** 2 / (1 + w * w))
    since = seconds(reply.until) - reply.trial_comparison.trial_age_s
    judged = live.store.judged_generations(since, seconds(reply.until))
    evidence = live.store.shadow_evidence("v0002", "v0001", judged)
    assert shadow.low == shadow_estimate(evidence, 0.2).low
    await live.admin.EndTrial(pb.EndTrialRequest(promote=False), timeout=10)
    await live.admin.StartTrial(pb.StartTrialRequest(version="v0003", share=0.5), timeout=10)
    assert not (await report(live)).trial_comparison.HasField("shadow")


@pytest.mark.parametrize(
    ("fields", "code", "field"),
    [
        ({"window_s": -1.0}, grpc.StatusCode.INVALID_ARGUMENT, "window_s"),
        ({"window_s": math.inf}, grpc.StatusCode.INVALID_ARGUMENT, "window_s"),
        ({"alpha": 1.0}, grpc.StatusCode.INVALID_ARGUMENT, "alpha"),
        ({"alpha": -0.05}, grpc.StatusCode.INVALID_ARGUMENT, "alpha"),
        ({"alpha": math.nan}, grpc.StatusCode.INVALID_ARGUMENT, "alpha"),
        ({"versions": [""]}, grpc.StatusCode.INVALID_ARGUMENT, "versions"),
        ({"half_life_s": -1.0}, grpc.StatusCode.INVALID_ARGUMENT, "half_life_s"),
        ({"half_life_s": math.nan}, grpc.StatusCode.INVALID_ARGUMENT, "half_life_s"),
        ({"half_life_s": math.inf}, grpc.StatusCode.INVALID_ARGUMENT, "half_life_s"),
        ({"versions": ["v0001", "v0099"]}, grpc.StatusCode.NOT_FOUND, "versions"),
    ],
)
async def test_bad_input_is_refused_naming_the_field_and_changes_nothing(
    live, fields, code, field
) -> None:
    before = live.server.registry.history(100)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await report(live, **fields)
    assert refused.value.code() == code
    assert refused.value.details().startswith(f"{field}:")
    assert live.server.registry.history(100) == before
