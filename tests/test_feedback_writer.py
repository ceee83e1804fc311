"""The feedback writer's group commit, against a real SQLite store: events share commits, a
stream is woken once per commit rather than once per event, and pacing never holds an event past
the commit interval."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from store_support import comparison as other_clients_comparison
from store_support import generation, rating

from feedloop.core.store import FeedbackRecord, open_store
from feedloop.server.errors import NotFound, Unavailable
from feedloop.server.feedback_writer import (
    ACCEPTED,
    DUPLICATE,
    PACED_FROM_ROWS,
    FeedbackWriter,
    Pending,
)
from feedloop.server.generation_log import GenerationLog
from feedloop.server.metrics import OTHER_VERSION, ServerMetrics


def comparison(event_id: str, preferred: str, rejected: str) -> FeedbackRecord:
    """A comparison by the tenant the test generations were served to (store_support's is
    another client's, which may not judge them)."""
    return dataclasses.replace(
        other_clients_comparison(event_id, preferred, rejected), client_id="app-1"
    )


def loop_time() -> float:
    return asyncio.get_running_loop().time()


class CountingStore:
    """The real store, counting its feedback commits."""

    def __init__(self, path: Path) -> None:
        self.inner = open_store(str(path))
        self.commits: list[int] = []

    def insert_feedback(self, records):  # type: ignore[no-untyped-def]
        self.commits.append(len(records))
        return self.inner.insert_feedback(records)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)


class CountingWaker:
    def __init__(self) -> None:
        self.wakes = 0
        self.woken = asyncio.Event()

    def wake(self) -> None:
        self.wakes += 1
        self.woken.set()


async def started_writer(
    tmp_path: Path, commit_interval_s: float, unknown_generation_wait_s: float = 0.0
) -> tuple[FeedbackWriter, CountingStore]:
    store = CountingStore(tmp_path / "replay.sqlite3")
    metrics = ServerMetrics()
    log = GenerationLog(store, metrics, capacity=1000, batch_max=1000)  # type: ignore[arg-type]
    log.add([generation("g1"), generation("old", version="v0000")])
    assert log.flush(10)
    writer = FeedbackWriter(
        store,  # type: ignore[arg-type]
        log,
        metrics,
        capacity=10_000,
        batch_max=2048,
        commit_interval_s=commit_interval_s,
        unknown_generation_wait_s=unknown_generation_wait_s,
    )
    writer.start(asyncio.get_running_loop())
    return writer, store


async def test_a_stream_is_woken_once_per_commit_not_once_per_event(tmp_path: Path) -> None:
    writer, store = await started_writer(tmp_path, commit_interval_s=0.025)
    waker = CountingWaker()
    pending: list[Pending] = [
        writer.submit_waking(rating(f"e{i}", "g1"), waker) for i in range(300)
    ]
    while True:
        waker.woken.clear()
        if all(p.decided for p in pending):
            break
        await asyncio.wait_for(waker.woken.wait(), timeout=10)
    writer.stop(10)
    assert [p.outcome for p in pending] == [ACCEPTED] * 300
    assert sum(store.commits) == 300
    assert waker.wakes == len(store.commits) < 300


async def test_pacing_holds_no_event_past_the_commit_interval(tmp_path: Path) -> None:
    # A big group makes the writer wait for as many again; a lone event that follows is still
    # committed once the interval has passed, instead of waiting for company that never comes.
    writer, store = await started_writer(tmp_path, commit_interval_s=0.2)
    first = [writer.submit(rating(f"a{i}", "g1")) for i in range(2 * PACED_FROM_ROWS)]
    assert await asyncio.gather(*first) == [ACCEPTED] * len(first)
    assert await asyncio.wait_for(writer.submit(rating("lone", "g1")), timeout=10) == ACCEPTED
    writer.stop(10)
    assert store.commits[-1] == 1


async def test_accepted_feedback_is_counted_by_the_version_that_served_each_generation(
    tmp_path: Path,
) -> None:
    writer, _ = await started_writer(tmp_path, commit_interval_s=0.025)
    # g1 is v0001's and "old" v0000's, both loaded; "gone" is v0002's, no longer loaded.
    writer.metrics.set_loaded_versions(["v0000", "v0001"])
    writer.generation_log.add([generation("g1b"), generation("gone", version="v0002")])
    events = [rating("up", "g1", 1.0), rating("down", "g1", 0.0), rating("old", "old", 0.75)]
    events += [rating("gone", "gone", 0.25), rating("up", "g1", 1.0)]  # a duplicate: once
    events += [
        comparison("c1", "g1", "old"),
        comparison("c2", "old", "gone"),
        comparison("c3", "g1b", "g1"),  # one version against itself: no win between versions
        comparison("c1", "g1", "old"),  # a duplicate: once
    ]
    outcomes = await asyncio.gather(*(writer.submit(e) for e in events))
    writer.stop(10)
    assert outcomes == [ACCEPTED] * 4 + [DUPLICATE] + [ACCEPTED] * 3 + [DUPLICATE]
    sample = writer.metrics.registry.get_sample_value
    name = "feedloop_feedback_rating_normalised"
    assert sample(f"{name}_count", {"version": "v0001"}) == 2
    assert sample(f"{name}_sum", {"version": "v0001"}) == 0.0  # +1 and -1
    assert sample(f"{name}_bucket", {"version": "v0001", "le": "-1.0"}) == 1
    assert sample(f"{name}_count", {"version": "v0000"}) == 1
    assert sample(f"{name}_sum", {"version": "v0000"}) == 0.5
    assert sample(f"{name}_count", {"version": OTHER_VERSION}) == 1
    assert sample(f"{name}_sum", {"version": OTHER_VERSION}) == -0.5
    assert sample(f"{name}_count", {"version": "v0002"}) is None
    wins = "feedloop_feedback_version_wins_total"
    assert sample(wins, {"winner": "v0001", "loser": "v0000"}) == 1
    assert sample(wins, {"winner": "v0000", "loser": OTHER_VERSION}) == 1
    assert sample(wins, {"winner": "v0000", "loser": "v0001"}) == 0
    assert sample(wins, {"winner": "v0001", "loser": "v0001"}) is None


async def test_feedback_on_a_generation_committed_after_it_arrived_waits_for_it(
    tmp_path: Path,
) -> None:
    # "late" is another replica's generation, committed to the shared store after the event.
    writer, store = await started_writer(tmp_path, 0.025, unknown_generation_wait_s=10.0)
    waiting = writer.submit(rating("on-late", "late"))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    # Meanwhile other events are committed as usual, not held behind the waiting one.
    assert await asyncio.wait_for(writer.submit(rating("meanwhile", "g1")), timeout=2) == ACCEPTED
    store.append_generations([generation("late", version="v0002")])
    assert await asyncio.wait_for(waiting, timeout=2) == ACCEPTED
    writer.stop(10)
    assert {f.event_id for f in store.feedback_after(0, 10)} == {"on-late", "meanwhile"}


async def test_an_id_that_never_appears_is_not_found_once_the_wait_is_over(tmp_path: Path) -> None:
    writer, store = await started_writer(tmp_path, 0.025, unknown_generation_wait_s=0.5)
    started = loop_time()
    with pytest.raises(NotFound, match=r"rating\.generation_id: no generation 'nowhere'"):
        await asyncio.wait_for(writer.submit(rating("lost", "nowhere")), timeout=5)
    assert 0.5 <= loop_time() - started < 1.5
    writer.stop(10)
    assert store.feedback_after(0, 10) == []
    assert (
        writer.metrics.registry.get_sample_value(
            "feedloop_feedback_events_total", {"kind": "rating", "outcome": "not_found"}
        )
        == 1
    )


async def test_a_stopping_writer_answers_a_waiting_event_unavailable(tmp_path: Path) -> None:
    # UNAVAILABLE, not NOT_FOUND: the client retries it, and another replica may know the id.
    writer, _ = await started_writer(tmp_path, 0.025, unknown_generation_wait_s=30.0)
    waiting = writer.submit(rating("pending", "elsewhere"))
    await asyncio.sleep(0.2)
    await asyncio.to_thread(writer.stop, 10)
    with pytest.raises(Unavailable):
        await asyncio.wait_for(waiting, timeout=2)
