"""One reading of a rating everywhere: the server's rating metrics and the trainer's rewards give
the same [-1, 1] value on every scale, at its bounds and beyond them, and both refuse a scale
they do not know; the server validates against the same scales and bounds."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
from store_support import generation, rating

from feedloop.core.feedback_kinds import RATING_SCALES
from feedloop.core.store import FeedbackRecord, open_store
from feedloop.server.errors import InvalidArgument
from feedloop.server.feedback import SCALE_NAMES, parse_event
from feedloop.server.feedback_writer import ACCEPTED, FeedbackWriter
from feedloop.server.generation_log import GenerationLog
from feedloop.server.metrics import ServerMetrics
from feedloop.trainer.rewards import rated_generations
from feedloop.v1 import feedloop_pb2 as pb


def edge_scores(low: float, high: float) -> list[float]:
    """The bounds, the middle, a point inside, and beyond each bound."""
    return [low, high, (low + high) / 2, low + 0.3 * (high - low), low - 1.0, high + 1.0]


CASES = [
    (name, score)
    for name, scale in RATING_SCALES.items()
    for score in edge_scores(scale.low, scale.high)
] + [(None, score) for score in edge_scores(0.0, 1.0)]  # no scale named: the default, unit


async def metered_rating(tmp_path: Path, event: FeedbackRecord) -> float:
    """The value the server's feedback writer puts into its rating histogram for one event."""
    store = open_store(str(tmp_path / "replay.sqlite3"))
    metrics = ServerMetrics()
    metrics.set_loaded_versions(["v0001"])
    log = GenerationLog(store, metrics, capacity=10, batch_max=10)
    log.add([generation("g1")])
    assert log.flush(10)
    writer = FeedbackWriter(
        store,
        log,
        metrics,
        capacity=10,
        batch_max=10,
        commit_interval_s=0.01,
        unknown_generation_wait_s=0.0,
    )
    writer.start(asyncio.get_running_loop())
    try:
        assert await asyncio.wait_for(writer.submit(event), timeout=10) == ACCEPTED
    finally:
        writer.stop(10)
        store.close()
    sample = metrics.registry.get_sample_value
    assert sample("feedloop_feedback_rating_normalised_count", {"version": "v0001"}) == 1
    value = sample("feedloop_feedback_rating_normalised_sum", {"version": "v0001"})
    assert value is not None
    return value


def trainer_reward(event: FeedbackRecord) -> float:
    return rated_generations([event], {}, "mean")["g1"].reward


@pytest.mark.parametrize(("scale", "score"), CASES)
async def test_server_rating_metrics_and_trainer_rewards_agree(
    tmp_path: Path, scale: str | None, score: float
) -> None:
    event = replace(rating("e1", "g1", score), scale=scale)
    bounds = RATING_SCALES[scale or "unit"]
    linear = 2.0 * (score - bounds.low) / (bounds.high - bounds.low) - 1.0
    expected = max(-1.0, min(1.0, linear))  # clamped to [-1, 1] beyond the bounds
    metered = await metered_rating(tmp_path, event)
    assert metered == trainer_reward(event)
    assert metered == pytest.approx(expected)


def wire_rating(scale: int, score: float) -> pb.FeedbackEvent:
    return pb.FeedbackEvent(
        event_id="e1", rating=pb.Rating(generation_id="g1", score=score, scale=scale)
    )


def test_a_scale_neither_side_knows_is_refused_by_both() -> None:
    with pytest.raises(InvalidArgument) as refused:
        parse_event(wire_rating(7, 1.0), "app-1", max_correction_chars=100)
    assert refused.value.field == "rating.scale"
    with pytest.raises(ValueError, match="scale"):
        trainer_reward(replace(rating("e1", "g1", 1.0), scale="percent"))  # type: ignore[arg-type]


def test_the_server_accepts_every_scale_of_the_core_within_its_bounds_only() -> None:
    assert set(SCALE_NAMES.values()) == set(RATING_SCALES)
    for wire_scale, name in SCALE_NAMES.items():
        bounds = RATING_SCALES[name]
        for score in (bounds.low, bounds.high):
            parsed = parse_event(wire_rating(wire_scale, score), "app-1", max_correction_chars=100)
            assert (parsed.scale, parsed.score) == (name, score)
        for score in (bounds.low - 1.0, bounds.high + 1.0):
            with pytest.raises(InvalidArgument) as refused:
                parse_event(wire_rating(wire_scale, score), "app-1", max_correction_chars=100)
            assert refused.value.field == "rating.score"
