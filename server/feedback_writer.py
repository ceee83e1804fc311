"""The feedback writer: validates against stored generations and commits events in groups.

Concurrent submitters (unary calls and streams) hand their parsed events to one writer thread.
Each round it takes everything queued, looks every named generation up at once (in the
generation log's buffer first, then in the store), rejects events that name unknown
generations, waits for the commit of any generation still buffered (the feedback row must not
be durable before the generation it refers to), and commits the rest in ONE insert_feedback
transaction. Only then are the submitters' futures resolved: an ack always follows durability.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from feedloop.core.store.base import FeedbackRecord, ReplayStore
from feedloop.server.errors import InvalidArgument, NotFound, Unavailable
from feedloop.server.genlog import GenerationLog, GenerationRef
from feedloop.server.metrics import ServerMetrics

log = logging.getLogger("feedloop.server.feedback_writer")
ACCEPTED, DUPLICATE = "accepted", "duplicate"
# How long a feedback commit may wait for the generations it names to be committed.
GENERATION_COMMIT_WAIT_S = 10.0


def normalised_rating(score: float, scale: str) -> float:
    """A rating on its scale mapped to [-1, 1] (stars: 1 -> -1, 3 -> 0, 5 -> 1)."""
    if scale == "stars5":
        return (score - 3.0) / 2.0
    return 2.0 * score - 1.0


def id_fields(record: FeedbackRecord) -> list[str]:
    """The request field naming each of record.generation_ids, for error messages."""
    if record.kind == "ranking":
        return [f"ranking.generation_ids[{i}]" for i in range(len(record.generation_ids))]
    if record.kind == "comparison":
        return ["comparison.preferred_id", "comparison.rejected_id"]
    return [f"{record.kind}.generation_id"]


@dataclass(eq=False, slots=True)
class _Pending:
    record: FeedbackRecord
    future: asyncio.Future[Any]
    outcome: Any = None  # "accepted" | "duplicate" | an exception


class FeedbackWriter:
    def __init__(
        self,
        store: ReplayStore,
        generation_log: GenerationLog,
        metrics: ServerMetrics,
        live_version: Callable[[], str | None],
        *,
        capacity: int,
        batch_max: int,
    ) -> None:
        self.store = store
        self.generation_log = generation_log
        self.metrics = metrics
        self.live_version = live_version
        self.capacity = capacity
        self.batch_max = batch_max
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._depth = metrics.store_buffer_depth.labels("feedback")
        self._duration = metrics.store_write_duration.labels("feedback")
        self._errors = metrics.store_write_errors.labels("feedback")
        self._ratings_live = metrics.ratings.labels("live")
        self._ratings_prev = metrics.ratings.labels("previous")
        self._thread = threading.Thread(target=self._run, name="feedloop-feedback", daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def submit(self, record: FeedbackRecord) -> asyncio.Future[Any]:
        """Queue a parsed event; the future resolves to "accepted"/"duplicate" once durable."""
        if self._stopping:
            raise Unavailable("the server is shutting down")
        if len(self._queue) >= self.capacity:
            raise Unavailable(
                f"the feedback queue is full ({self.capacity} events waiting for the replay "
                f"store); retry later"
            )
        assert self._loop is not None
        future = self._loop.create_future()
        with self._cond:
            self._queue.append(_Pending(record, future))
            self._cond.notify()
        return future

    def stop(self, timeout_s: float) -> None:
        """Commit what is queued, then stop the writer."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=timeout_s)

    # -- the writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                group = self._queue[: self.batch_max]
                del self._queue[: self.batch_max]
                self._depth.set(len(self._queue))
            try:
                self._commit(group)
            except Exception as exc:
                log.warning("feedback commit failed: %s", exc)
                self._errors.inc()
                for item in group:
                    # Not yet decided, or waiting on a first copy that was never stored.
                    if item.outcome is None or isinstance(item.outcome, _Pending):
                        item.outcome = exc
            self._count(group)
            self._resolve(group)

    def _commit(self, group: list[_Pending]) -> None:
        wanted = {gid for item in group for gid in item.record.generation_ids}
        found, buffered = self.generation_log.lookup(wanted)
        missing = wanted - found.keys()
        if missing:
            stored = self.store.get_generations(list(missing))
            found.update((gid, (g.request_id, g.model_version)) for gid, g in stored.items())
        to_insert: list[_Pending] = []
        first_by_event: dict[str, _Pending] = {}
        waits: set[str] = set()
        for item in group:
            problem = self._check(item.record, found)
            if problem is not None:
                item.outcome = problem
                continue
            first = first_by_event.get(item.record.event_id)
            if first is not None:  # a retry inside the same group: stored once
                item.outcome = first
                continue
            first_by_event[item.record.event_id] = item
            to_insert.append(item)
            waits.update(gid for gid in item.record.generation_ids if gid in buffered)
        if not to_insert:
            return
        if waits:
            self.generation_log.wait_committed(waits, GENERATION_COMMIT_WAIT_S)
        started = time.perf_counter()
        fresh = self.store.insert_feedback([item.record for item in to_insert])
        self._duration.observe(time.perf_counter() - started)
        live = self.live_version()
        for item, is_new in zip(to_insert, fresh, strict=True):
            item.outcome = ACCEPTED if is_new else DUPLICATE
            record = item.record
            if is_new and record.kind == "rating" and record.score is not None:
                _, model_version = found[record.generation_ids[0]]
                histogram = self._ratings_live if model_version == live else self._ratings_prev
                histogram.observe(normalised_rating(record.score, record.scale or "unit"))
        for item in group:
            if isinstance(item.outcome, _Pending):
                item.outcome = DUPLICATE

    @staticmethod
    def _check(record: FeedbackRecord, found: dict[str, GenerationRef]) -> BaseException | None:
        for field_name, gid in zip(id_fields(record), record.generation_ids, strict=True):
            if gid not in found:
                return NotFound(f"{field_name}: no generation {gid!r}")
        if record.kind == "ranking":
            requests = {found[gid][0] for gid in record.generation_ids}
            if len(requests) > 1:
                return InvalidArgument(
                    "ranking.generation_ids", "all candidates must come from one Generate reply"
                )
        return None

    def _count(self, group: list[_Pending]) -> None:
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        for item in group:
            outcome = item.outcome
            if isinstance(outcome, str):
                label = outcome
            elif isinstance(outcome, NotFound):
                label = "not_found"
            elif isinstance(outcome, InvalidArgument):
                label = "invalid"
            else:
                label = "error"
            counts[item.record.kind, label] += 1
        for (kind, label), n in counts.items():
            self.metrics.feedback_outcome(kind, label, n)

    def _resolve(self, group: list[_Pending]) -> None:
        if self._loop is None:
            return
        # RuntimeError: the loop is closed, so nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_set_outcomes, group)


def _set_outcomes(group: list[_Pending]) -> None:
    for item in group:
        if item.future.done():
            continue
        if isinstance(item.outcome, BaseException):
            item.future.set_exception(item.outcome)
        else:
            item.future.set_result(item.outcome)
