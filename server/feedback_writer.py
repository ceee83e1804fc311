"""The feedback writer: validates against stored generations and commits events in groups.

Concurrent submitters (unary calls and streams) hand their parsed events to one writer thread.
Each round it takes everything queued, looks every named generation up at once (in the
generation log's buffer first, then in the store), parks events that name generations it cannot
find (another replica sharing the store may not have committed them yet: they are looked up
again on later rounds, and answered NOT_FOUND only once `unknown_generation_wait_s` has passed),
answers NOT_FOUND as well for generations served to another tenant (unless the caller's key is
a labeller's: the answer does not tell whether such a generation exists), rejects events whose
generations do not fit them (a ranking spanning server-issued replies), waits for the commit
of any generation still buffered (the feedback row must not be durable before the generation
it refers to), and
commits the rest in ONE insert_feedback transaction. Only then are the submitters told, in one
callback on the event loop per group: a unary call's future resolves, and each stream is woken
once however many of its events the group held. An ack always follows durability.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from feedloop.core.feedback_kinds import normalise_rating
from feedloop.core.store.base import FeedbackRecord, ReplayStore
from feedloop.server.errors import (
    GENERATION,
    AlreadyExists,
    InvalidArgument,
    NotFound,
    Unavailable,
    quote,
)
from feedloop.server.generation_log import GenerationLog, GenerationRef
from feedloop.server.metrics import ServerMetrics

log = logging.getLogger("feedloop.server.feedback_writer")
ACCEPTED, DUPLICATE = "accepted", "duplicate"
# How long a feedback commit may wait for the generations it names to be committed.
GENERATION_COMMIT_WAIT_S = 10.0
# Group commit pacing. Committing as soon as the previous commit ends makes groups as small as
# the fsync is fast, and every commit costs CPU whatever its size (the transaction, the fsync,
# waking the waiters) on a machine whose CPU the event loop needs: under load, fewer and larger
# groups serve more events per second (docs/performance.md). So after a group of
# PACED_FROM_ROWS or more, the next commit waits until as many events are queued (the last
# group's callers are back), and, when the last group held stream events (streams pipeline:
# their acks can wait), for as long as events keep arriving (one at least every QUIET_S); never
# past commit_interval_s (ServeConfig.feedback_commit_interval_ms) after the previous commit
# started. A lone event after a small group is committed at once.
QUIET_S = 0.001
PACED_FROM_ROWS = 8
# How often parked events (naming generations not found yet) are looked up again while no new
# event starts a round; another replica commits its generations within milliseconds.
UNKNOWN_RECHECK_S = 0.05


def id_fields(record: FeedbackRecord) -> list[str]:
    """The request field naming each of record.generation_ids, for error messages."""
    if record.kind == "ranking":
        return [f"ranking.generation_ids[{i}]" for i in range(len(record.generation_ids))]
    if record.kind == "comparison":
        return ["comparison.preferred_id", "comparison.rejected_id"]
    return [f"{record.kind}.generation_id"]


class Waker(Protocol):
    """What a stream hands the writer instead of one future per event: woken on the loop once
    per group that decided any of its events."""

    def wake(self) -> None: ...


@dataclass(eq=False, slots=True)
class Pending:
    """One submitted event. `outcome` is written by the writer thread; `decided` is set on the
    loop only after the outcome is final (durable, or failed), so the loop reads only that."""

    record: FeedbackRecord
    waiter: asyncio.Future[Any] | Waker
    outcome: Any = None  # "accepted" | "duplicate" | an exception
    decided: bool = False
    # Monotonic time after which generations still not found make it NOT_FOUND (0: not parked).
    not_found_at: float = 0.0
    # Whether it may name generations served to other tenants (a labeller's key).
    any_tenant: bool = False


class FeedbackWriter:
    def __init__(
        self,
        store: ReplayStore,
        generation_log: GenerationLog,
        metrics: ServerMetrics,
        *,
        capacity: int,
        batch_max: int,
        commit_interval_s: float,
        unknown_generation_wait_s: float,
    ) -> None:
        self.store = store
        self.generation_log = generation_log
        self.metrics = metrics
        self.capacity = capacity
        self.batch_max = batch_max
        self.commit_interval_s = commit_interval_s
        self.unknown_generation_wait_s = unknown_generation_wait_s
        self._cond = threading.Condition()
        # Appended to by the loop without the lock (list.append is atomic); the writer takes from
        # the front. The writer sets `_wake_at`, under the lock, before it looks at the queue and
        # waits for that many events; the submitter whose append makes the queue that long
        # notifies, so no wake-up is lost, and submitters take no lock otherwise.
        self._queue: list[Pending] = []
        # Events naming generations not found yet, looked up again each round (writer thread
        # only; the loop reads its length for the capacity check).
        self._parked: list[Pending] = []
        self._wake_at = 0
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._depth = metrics.store_buffer_depth.labels("feedback")
        self._duration = metrics.store_write_duration.labels("feedback")
        self._errors = metrics.store_write_errors.labels("feedback")
        self._thread = threading.Thread(target=self._run, name="feedloop-feedback", daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def submit(self, record: FeedbackRecord, *, any_tenant: bool = False) -> asyncio.Future[Any]:
        """Queue a parsed event; the future resolves to "accepted"/"duplicate" once durable."""
        assert self._loop is not None
        future = self._loop.create_future()
        self._enqueue(Pending(record, future, any_tenant=any_tenant))
        return future

    def submit_waking(
        self, record: FeedbackRecord, waker: Waker, *, any_tenant: bool = False
    ) -> Pending:
        """Queue a parsed event of a stream: its outcome is on the returned Pending once
        `decided`, and waker.wake() is called then (once per group, not per event)."""
        pending = Pending(record, waker, any_tenant=any_tenant)
        self._enqueue(pending)
        return pending

    def _enqueue(self, pending: Pending) -> None:
        if self._stopping:
            raise Unavailable("the server is shutting down")
        if len(self._queue) + len(self._parked) >= self.capacity:
            raise Unavailable(
                f"the feedback queue is full ({self.capacity} events waiting for the replay "
                f"store); retry later"
            )
        self._queue.append(pending)
        if len(self._queue) == self._wake_at:
            with self._cond:
                self._cond.notify()

    def stop(self, timeout_s: float) -> None:
        """Commit what is queued, then stop the writer."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=timeout_s)

    # -- the writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        last_started, last_rows, last_streamed = 0.0, 0, False
        while True:
            with self._cond:
                self._wait_for(1, last_started + UNKNOWN_RECHECK_S if self._parked else None)
                if not self._queue and not self._parked:
                    return  # stopping, and everything is committed
                if self._queue and last_rows >= PACED_FROM_ROWS:
                    deadline = last_started + self.commit_interval_s
                    self._wait_for(min(last_rows, self.batch_max), deadline)
                    if last_streamed:
                        self._gather_while_arriving(deadline)
                last_started = time.monotonic()
                group = self._queue[: self.batch_max]
                del self._queue[: len(group)]  # not [:batch_max]: an append may land in between
                self._depth.set(len(self._queue))
            last_rows = len(group)
            last_streamed = any(not isinstance(item.waiter, asyncio.Future) for item in group)
            group = self._parked + group
            try:
                self._parked = self._commit(group)
            except Exception as exc:
                log.warning("feedback commit failed: %s", exc)
                self._errors.inc()
                self._parked = []
                for item in group:
                    # Not yet decided, or waiting on a first copy that was never stored.
                    if item.outcome is None or isinstance(item.outcome, Pending):
                        item.outcome = exc
            decided = [item for item in group if item.outcome is not None]  # not parked
            self._count(decided)
            self._resolve(decided)

    def _wait_for(self, rows: int, deadline: float | None) -> None:
        """Under the lock: wait until `rows` events are queued, the deadline passes (None: no
        deadline) or the writer is stopping."""
        self._wake_at = rows
        while len(self._queue) < rows and not self._stopping:
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                break
            self._cond.wait(timeout)
        self._wake_at = 0

    def _gather_while_arriving(self, deadline: float) -> None:
        """Under the lock: wait for more events while they keep coming (one at least every
        QUIET_S), up to the deadline."""
        queued = len(self._queue)
        while queued < self.batch_max and not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(min(QUIET_S, remaining))
            if len(self._queue) == queued:
                return
            queued = len(self._queue)

    def _commit(self, group: list[Pending]) -> list[Pending]:
        """Decide and commit what the group can; returns the events to look up again later."""
        wanted = {gid for item in group for gid in item.record.generation_ids}
        found, buffered = self.generation_log.lookup(wanted)
        missing = wanted - found.keys()
        if missing:
            stored = self.store.get_generations(list(missing))
            found.update((gid, GenerationRef.of(g)) for gid, g in stored.items())
        to_insert: list[Pending] = []
        parked: list[Pending] = []
        first_by_event: dict[tuple[str, str], Pending] = {}
        waits: set[str] = set()
        now = time.monotonic()
        for item in group:
            record = item.record
            problem = self._check(record, found, item.any_tenant)
            if problem is not None:
                if isinstance(problem, NotFound) and self._stopping:
                    # Another replica may know it: UNAVAILABLE sends the client there.
                    problem = Unavailable(f"the server is shutting down; {problem}")
                elif isinstance(problem, NotFound) and self._may_wait(item, now):
                    parked.append(item)
                    continue
                item.outcome = problem
                continue
            key = (record.client_id, record.event_id)
            first = first_by_event.get(key)
            if first is not None:  # a retry inside the same group: stored once
                item.outcome = first if first.record.same_event(record) else _reused(record)
                continue
            first_by_event[key] = item
            to_insert.append(item)
            if buffered:
                waits.update(gid for gid in record.generation_ids if gid in buffered)
        if not to_insert:
            return parked
        if waits:
            self.generation_log.wait_committed(waits, GENERATION_COMMIT_WAIT_S)
        started = time.perf_counter()
        fresh = self.store.insert_feedback([item.record for item in to_insert])
        self._duration.observe(time.perf_counter() - started)
        repeats = [item.record for item, is_new in zip(to_insert, fresh, strict=True) if not is_new]
        stored_events = (
            self.store.get_feedback([(r.client_id, r.event_id) for r in repeats]) if repeats else {}
        )
        ratings: list[tuple[str, float]] = []
        wins: list[tuple[str, str]] = []
        for item, is_new in zip(to_insert, fresh, strict=True):
            record = item.record
            if not is_new:
                earlier = stored_events.get((record.client_id, record.event_id))
                same = earlier is None or earlier.same_event(record)
                item.outcome = DUPLICATE if same else _reused(record)
                continue
            item.outcome = ACCEPTED
            ids = record.generation_ids
            if record.kind == "rating" and record.score is not None:
                ratings.append((found[ids[0]][1], normalise_rating(record.score, record.scale)))
            elif record.kind == "comparison":
                wins.append((found[ids[0]][1], found[ids[1]][1]))
            # A ranking's candidates come from one reply, so from one version: no win between
            # versions. A correction prefers a text nobody served.
        if ratings or wins:
            self.metrics.version_feedback.observe(ratings, wins)
        if len(to_insert) < len(group):
            for item in group:
                if isinstance(item.outcome, Pending):
                    # A copy of an event stored or refused in this group: its fate.
                    first = item.outcome.outcome
                    item.outcome = (
                        _reused(item.record) if isinstance(first, AlreadyExists) else DUPLICATE
                    )
        return parked

    def _may_wait(self, item: Pending, now: float) -> bool:
        """Whether an event naming generations not found yet may wait longer for them; its
        first time here starts its wait."""
        if not item.not_found_at:
            item.not_found_at = now + self.unknown_generation_wait_s
        return now < item.not_found_at

    @staticmethod
    def _check(
        record: FeedbackRecord, found: dict[str, GenerationRef], any_tenant: bool
    ) -> BaseException | None:
        ids = record.generation_ids
        if len(ids) == 1:  # rating, correction: the common case
            ref = found.get(ids[0])
            if ref is not None and (any_tenant or ref.client_id == record.client_id):
                return None
        for field_name, gid in zip(id_fields(record), ids, strict=True):
            ref = found.get(gid)
            if ref is None or not (any_tenant or ref.client_id == record.client_id):
                # Another tenant's generation reads as unknown: the answer must not tell a
                # guesser which ids exist.
                return NotFound(
                    f"{field_name}: no generation {quote(gid)}",
                    field=field_name,
                    resource=(GENERATION, gid),
                )
        if record.kind == "ranking":
            replies = {found[gid].reply for gid in record.generation_ids}
            if len(replies) > 1:
                return InvalidArgument(
                    "ranking.generation_ids", "all candidates must come from one Generate reply"
                )
        return None

    def _count(self, group: list[Pending]) -> None:
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        for item in group:
            outcome = item.outcome
            if outcome.__class__ is str:
                label = outcome
            elif isinstance(outcome, NotFound):
                label = "not_found"
            elif isinstance(outcome, InvalidArgument):
                label = "invalid"
            elif isinstance(outcome, AlreadyExists):
                label = "conflict"
            else:
                label = "error"
            counts[item.record.kind, label] += 1
        for (kind, label), n in counts.items():
            self.metrics.feedback_outcome(kind, label, n)

    def _resolve(self, group: list[Pending]) -> None:
        if self._loop is None:
            return
        # RuntimeError: the loop is closed, so nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_set_outcomes, group)


def _reused(record: FeedbackRecord) -> AlreadyExists:
    return AlreadyExists(
        "event_id",
        f"{quote(record.event_id)} was already used by this client for a different event; "
        "a retry must resend the same event, a new event needs a new id",
    )


def _set_outcomes(group: list[Pending]) -> None:
    """On the loop: mark the group decided, resolve unary futures, wake each stream once."""
    wakers: dict[int, Waker] = {}
    for item in group:
        item.decided = True
        waiter = item.waiter
        if isinstance(waiter, asyncio.Future):
            if waiter.done():
                continue
            if isinstance(item.outcome, BaseException):
                waiter.set_exception(item.outcome)
            else:
                waiter.set_result(item.outcome)
        else:
            wakers[id(waiter)] = waiter
    for waker in wakers.values():
        waker.wake()
