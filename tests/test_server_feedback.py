"""Feedback through a real server, on both store backends: validated, deduplicated, durable."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from pg_support import fresh_schema, schema_url
from server_harness import rating, running_server, seeded_registry, test_config, wait_until

from feedloop.core.store import open_store
from feedloop.v1 import feedloop_pb2 as pb

ACCEPTED = pb.FEEDBACK_OUTCOME_ACCEPTED
DUPLICATE = pb.FEEDBACK_OUTCOME_DUPLICATE


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_location(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        yield str(tmp_path / "replay.sqlite3")
    else:
        with fresh_schema("srv") as schema:
            yield schema_url(schema)


@pytest.fixture
async def live(tmp_path: Path, tiny_checkpoint: Path, store_location: str):
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    config = test_config(tmp_path, store=store_location)
    async with running_server(config, registry=registry) as running:
        yield running


async def generate(live, n: int = 3, prompt: str = "green hills") -> list[str]:
    reply = await live.generation.Generate(
        pb.GenerateRequest(prompt=prompt, num_candidates=n), timeout=10
    )
    return [c.generation_id for c in reply.candidates]


def stored_feedback(live) -> list:
    return live.store.feedback_after(0, 10_000)


async def test_every_kind_is_accepted_and_stored_before_the_ack(live) -> None:
    a, b, c = await generate(live)
    events = [
        rating("e-rating", a, 4.5, pb.RATING_SCALE_STARS_5),
        pb.FeedbackEvent(event_id="e-ranking", ranking=pb.Ranking(generation_ids=[c, a, b])),
        pb.FeedbackEvent(
            event_id="e-comparison", comparison=pb.Comparison(preferred_id=b, rejected_id=a)
        ),
        pb.FeedbackEvent(
            event_id="e-correction",
            correction=pb.Correction(generation_id=c, text="a better phrase"),
        ),
    ]
    for event in events:
        ack = await live.feedback.Submit(event, timeout=10)
        assert ack.event_id == event.event_id and ack.outcome == ACCEPTED
        # Durable before the ack: the store already has it, no waiting.
        assert event.event_id in {f.event_id for f in stored_feedback(live)}
    by_id = {f.event_id: f for f in stored_feedback(live)}
    assert by_id["e-rating"].score == 4.5 and by_id["e-rating"].scale == "stars5"
    assert by_id["e-ranking"].generation_ids == [c, a, b]
    assert by_id["e-comparison"].generation_ids == [b, a]
    assert by_id["e-correction"].text == "a better phrase"
    assert by_id["e-rating"].client_id == "anonymous"


async def test_repeated_event_id_is_acked_duplicate_and_stored_once(live) -> None:
    (a,) = await generate(live, 1)
    first = await live.feedback.Submit(rating("same", a, 1.0), timeout=10)
    again = await live.feedback.Submit(rating("same", a, 1.0), timeout=10)
    # The same id saying something else is not a retry: refused, not silently dropped.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await live.feedback.Submit(rating("same", a, 0.0), timeout=10)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert err.value.details().startswith("event_id: 'same' was already used")
    concurrent = await asyncio.gather(
        *[live.feedback.Submit(rating("race", a, 1.0), timeout=10) for _ in range(8)]
    )
    assert first.outcome == ACCEPTED and again.outcome == DUPLICATE
    assert sorted(ack.outcome for ack in concurrent) == [ACCEPTED] + [DUPLICATE] * 7
    ids = [f.event_id for f in stored_feedback(live)]
    assert ids.count("same") == 1 and ids.count("race") == 1
    status = await live.admin.GetStatus(pb.GetStatusRequest(), timeout=10)
    assert status.feedback_accepted == 2 and status.feedback_duplicates == 8


def bad_events(a: str, b: str, other_request: str) -> list[tuple[str, grpc.StatusCode, object]]:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    return [
        ("event_id", invalid, rating("", a)),
        ("event_id", invalid, rating("x" * 129, a)),
        ("kind", invalid, pb.FeedbackEvent(event_id="k")),
        ("rating.generation_id", invalid, rating("r0", "")),
        ("rating.score", invalid, rating("r1", a, 1.5)),
        ("rating.score", invalid, rating("r2", a, -0.1, pb.RATING_SCALE_UNIT)),
        ("rating.score", invalid, rating("r3", a, math.nan)),
        ("rating.score", invalid, rating("r4", a, math.inf, pb.RATING_SCALE_STARS_5)),
        ("rating.score", invalid, rating("r5", a, 0.5, pb.RATING_SCALE_THUMBS)),
        ("rating.score", invalid, rating("r6", a, 0.5, pb.RATING_SCALE_STARS_5)),
        ("rating.score", invalid, rating("r7", a, 6.0, pb.RATING_SCALE_STARS_5)),
        ("rating.scale", invalid, rating("r8", a, 1.0, 7)),
        (
            "ranking.generation_ids",
            invalid,
            pb.FeedbackEvent(event_id="k1", ranking=pb.Ranking(generation_ids=[a])),
        ),
        (
            "ranking.generation_ids",
            invalid,
            pb.FeedbackEvent(event_id="k2", ranking=pb.Ranking(generation_ids=[a, a])),
        ),
        (
            "ranking.generation_ids",
            invalid,
            pb.FeedbackEvent(event_id="k3", ranking=pb.Ranking(generation_ids=[a, other_request])),
        ),
        (
            "ranking.generation_ids[1]",
            grpc.StatusCode.NOT_FOUND,
            pb.FeedbackEvent(event_id="k4", ranking=pb.Ranking(generation_ids=[a, "nope"])),
        ),
        (
            "comparison.rejected_id",
            invalid,
            pb.FeedbackEvent(
                event_id="c1", comparison=pb.Comparison(preferred_id=a, rejected_id=a)
            ),
        ),
        (
            "comparison.preferred_id",
            invalid,
            pb.FeedbackEvent(event_id="c2", comparison=pb.Comparison(rejected_id=a)),
        ),
        (
            "comparison.rejected_id",
            grpc.StatusCode.NOT_FOUND,
            pb.FeedbackEvent(
                event_id="c3", comparison=pb.Comparison(preferred_id=a, rejected_id="nope")
            ),
        ),
        (
            "correction.text",
            invalid,
            pb.FeedbackEvent(event_id="t1", correction=pb.Correction(generation_id=a, text="  ")),
        ),
        (
            "correction.text",
            invalid,
            pb.FeedbackEvent(
                event_id="t2", correction=pb.Correction(generation_id=a, text="w" * 1025)
            ),
        ),
        ("rating.generation_id", grpc.StatusCode.NOT_FOUND, rating("n1", "no-such-id")),
    ]


async def test_bad_events_get_their_code_naming_the_field_and_write_nothing(live) -> None:
    a, b = await generate(live, 2)
    (other,) = await generate(live, 1, prompt="another request")
    for field, code, event in bad_events(a, b, other):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await live.feedback.Submit(event, timeout=10)
        assert err.value.code() == code, (field, err.value.details())
        assert err.value.details().startswith(field), (field, err.value.details())
    assert stored_feedback(live) == []


async def test_stream_acks_every_event_in_order(live) -> None:
    ids = await generate(live, 4)

    async def events() -> AsyncIterator[pb.FeedbackEvent]:
        for i in range(300):
            yield rating(f"s-{i}", ids[i % 4], (i % 2) * 1.0, pb.RATING_SCALE_THUMBS)
        yield rating("s-0", ids[0], 0.0, pb.RATING_SCALE_THUMBS)  # a retry

    acks = [ack async for ack in live.feedback.SubmitStream(events(), timeout=30)]
    assert [a.event_id for a in acks] == [f"s-{i}" for i in range(300)] + ["s-0"]
    assert [a.outcome for a in acks] == [ACCEPTED] * 300 + [DUPLICATE]
    assert len(stored_feedback(live)) == 300


async def test_invalid_event_ends_the_stream_naming_it_and_keeps_earlier_acks(live) -> None:
    (a,) = await generate(live, 1)

    async def events() -> AsyncIterator[pb.FeedbackEvent]:
        yield rating("ok-1", a)
        yield rating("ok-2", a)
        yield rating("bad-3", a, 9.0)
        yield rating("after-4", a)

    acks = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for ack in live.feedback.SubmitStream(events(), timeout=30):
            acks.append(ack.event_id)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'bad-3'" in err.value.details() and "rating.score" in err.value.details()
    assert acks == ["ok-1", "ok-2"]
    stored = {f.event_id for f in stored_feedback(live)}
    assert {"ok-1", "ok-2"} <= stored and "bad-3" not in stored and "after-4" not in stored


async def test_unknown_generation_in_a_stream_is_not_found_naming_the_event(live) -> None:
    (a,) = await generate(live, 1)

    async def events() -> AsyncIterator[pb.FeedbackEvent]:
        yield rating("ok", a)
        yield rating("missing", "never-generated")

    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in live.feedback.SubmitStream(events(), timeout=30):
            pass
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'missing'" in err.value.details()
    assert {f.event_id for f in stored_feedback(live)} == {"ok"}


async def test_feedback_on_a_generation_still_in_the_write_buffer_is_accepted(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    store = open_store(str(tmp_path / "replay.sqlite3"))
    gate = asyncio.Event()
    original = store.append_generations
    loop = asyncio.get_running_loop()

    def held_append(records):  # the generation log cannot commit until the gate opens
        asyncio.run_coroutine_threadsafe(gate.wait(), loop).result()
        return original(records)

    store.append_generations = held_append  # type: ignore[method-assign]
    async with running_server(test_config(tmp_path), registry=registry, store=store) as running:
        (gid,) = await generate(running, 1)
        assert running.server.generation_log.depth == 1  # still buffered
        submit = asyncio.ensure_future(running.feedback.Submit(rating("early", gid), timeout=10))
        await asyncio.sleep(0.05)
        assert not submit.done()  # the ack waits for the generation's commit
        gate.set()
        ack = await submit
        assert ack.outcome == ACCEPTED
        assert gid in store.get_generations([gid])
        assert [f.event_id for f in store.feedback_for([gid])] == ["early"]


async def test_store_unavailable_answers_unavailable_and_acks_nothing(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    from feedloop.core.errors import StoreUnavailableError

    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    store = open_store(str(tmp_path / "replay.sqlite3"))

    def broken_insert(records):
        raise StoreUnavailableError("disk went away")

    async with running_server(test_config(tmp_path), registry=registry, store=store) as running:
        (gid,) = await generate(running, 1)
        await wait_until(lambda: running.server.generation_log.depth == 0)
        store.insert_feedback = broken_insert  # type: ignore[method-assign]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await running.feedback.Submit(rating("lost", gid), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "disk went away" in err.value.details()


async def test_store_failure_answers_every_copy_of_a_repeated_event(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    from feedloop.core.errors import StoreUnavailableError

    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    store = open_store(str(tmp_path / "replay.sqlite3"))
    async with running_server(test_config(tmp_path), registry=registry, store=store) as running:
        (gid,) = await generate(running, 1)
        await wait_until(lambda: running.server.generation_log.depth == 0)
        writer = running.server.feedback_writer
        log = running.server.generation_log
        original_lookup, original_insert = log.lookup, store.insert_feedback
        gate, held, failing = threading.Event(), threading.Event(), [True]

        def held_lookup(ids):  # holds the writer inside its first group
            held.set()
            gate.wait(10)
            return original_lookup(ids)

        def flaky_insert(records):
            if failing[0]:
                raise StoreUnavailableError("disk went away")
            return original_insert(records)

        log.lookup = held_lookup  # type: ignore[method-assign]
        store.insert_feedback = flaky_insert  # type: ignore[method-assign]
        opener = asyncio.ensure_future(running.feedback.Submit(rating("opener", gid), timeout=10))
        await wait_until(held.is_set)
        copies = [
            asyncio.ensure_future(running.feedback.Submit(rating("twice", gid), timeout=10))
            for _ in range(4)
        ]
        await wait_until(lambda: len(writer._queue) == 4)  # the four copies share one group
        gate.set()
        results = await asyncio.gather(opener, *copies, return_exceptions=True)
        codes = [r.code() if isinstance(r, grpc.aio.AioRpcError) else r for r in results]
        assert codes == [grpc.StatusCode.UNAVAILABLE] * 5
        failing[0] = False
        ack = await running.feedback.Submit(rating("twice", gid), timeout=10)
        assert ack.outcome == ACCEPTED


async def test_the_commit_interval_setting_reaches_the_feedback_writer(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    config = test_config(tmp_path, feedback_commit_interval_ms=7.0)
    async with running_server(config, registry=registry) as running:
        assert running.server.feedback_writer.commit_interval_s == pytest.approx(0.007)
        (gid,) = await generate(running, 1)
        ack = await running.feedback.Submit(rating("paced", gid), timeout=10)
        assert ack.outcome == pb.FEEDBACK_OUTCOME_ACCEPTED
