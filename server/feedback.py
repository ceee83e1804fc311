"""The Feedback service: validate an event, hand it to the group-commit writer, ack once durable.

Checks that need no lookup run here, on the loop (they are cheap); checks that need the stored
generations (ids exist and were served to the caller's tenant, a ranking's candidates share one
server-issued reply) run in the writer thread, which sees the generation log's buffer too. A
rejected event is never written.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc

from feedloop.core.feedback_kinds import DEFAULT_RATING_SCALE, RATING_SCALES, RatingScaleName
from feedloop.core.store.base import FeedbackRecord
from feedloop.server.auth import Authenticator, Caller, Refused, rate_limited
from feedloop.server.errors import (
    DeadlineExceeded,
    InContext,
    InvalidArgument,
    ServiceError,
    Unavailable,
    require_text,
)
from feedloop.server.feedback_writer import ACCEPTED, FeedbackWriter, Pending
from feedloop.server.human_eval import VerdictRecorder, parse_verdict
from feedloop.server.metrics import ServerMetrics
from feedloop.server.ratelimit import RateLimiter
from feedloop.server.rpc import Undecodable, streaming, unary
from feedloop.v1 import feedloop_pb2 as pb
from feedloop.v1 import feedloop_pb2_grpc as pb_grpc

MAX_EVENT_ID_CHARS = 128
# Events of one stream in flight between "read" and "acknowledged": the stream is pipelined so
# its events share group commits instead of paying one commit each. A stream can carry at most
# STREAM_WINDOW events per commit cycle (the commit interval plus the commit itself, which takes
# tens of ms under load). A window deeper than one cycle's worth of events keeps a pipelining
# client from idling between acks (the runs behind this value are in docs/performance.md).
STREAM_WINDOW = 1024

# The wire's rating scales by their names in the core, which holds their bounds.
SCALE_NAMES: dict[int, RatingScaleName] = {
    pb.RATING_SCALE_UNSPECIFIED: DEFAULT_RATING_SCALE,
    pb.RATING_SCALE_UNIT: "unit",
    pb.RATING_SCALE_THUMBS: "thumbs",
    pb.RATING_SCALE_STARS_5: "stars5",
}
OUTCOMES = {
    ACCEPTED: pb.FEEDBACK_OUTCOME_ACCEPTED,
    "duplicate": pb.FEEDBACK_OUTCOME_DUPLICATE,
}


def _require_id(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(field, "a generation id is required")
    if len(value) > MAX_EVENT_ID_CHARS:
        raise InvalidArgument(field, f"at most {MAX_EVENT_ID_CHARS} characters")
    return require_text(value, field)


def parse_event(
    event: pb.FeedbackEvent,
    client_id: str,
    *,
    max_correction_chars: int,
    max_ranking_ids: int = 64,
) -> FeedbackRecord:
    """A FeedbackRecord from a wire event, or InvalidArgument naming the bad field.

    max_ranking_ids: the most candidates one Generate reply can hold (the server's
    max_candidates): a longer ranking cannot come from one reply.

    Runs on the event loop for every event of every stream, so each field is read once.
    """
    event_id = event.event_id
    if not event_id:
        raise InvalidArgument("event_id", "required (the client's idempotency key)")
    if len(event_id) > MAX_EVENT_ID_CHARS:
        raise InvalidArgument("event_id", f"at most {MAX_EVENT_ID_CHARS} characters")
    require_text(event_id, "event_id")
    given_at = _given_at(event.given_at) if event.HasField("given_at") else None
    kind = event.WhichOneof("kind")
    score: float | None = None
    scale: RatingScaleName | None = None
    text: str | None = None
    if kind == "rating":
        ids, score, scale = _rating(event.rating)
    elif kind == "ranking":
        ids = _ranking(event.ranking, max_ranking_ids)
    elif kind == "comparison":
        ids = _comparison(event.comparison)
    elif kind == "correction":
        ids, text = _correction(event.correction, max_correction_chars)
    else:
        raise InvalidArgument("kind", "set exactly one of rating, ranking, comparison, correction")
    return FeedbackRecord(
        event_id=event_id,
        kind=kind,
        generation_ids=ids,
        client_id=client_id,
        received_at=time.time(),
        score=score,
        scale=scale,
        text=text,
        given_at=given_at,
    )


def _given_at(stamp: Any) -> float:
    try:  # a Timestamp outside years 1-9999 or with nanos outside [0, 1e9) is invalid
        return float(stamp.ToNanoseconds() / 1e9)
    except (ValueError, OverflowError) as exc:
        raise InvalidArgument("given_at", f"not a valid timestamp: {exc}") from None


def _rating(rating: pb.Rating) -> tuple[list[str], float, RatingScaleName]:
    gid = _require_id(rating.generation_id, "rating.generation_id")
    name = SCALE_NAMES.get(rating.scale)
    if name is None:
        raise InvalidArgument("rating.scale", f"unknown scale {rating.scale}")
    low, high = RATING_SCALES[name].low, RATING_SCALES[name].high
    score = rating.score
    if not math.isfinite(score):
        raise InvalidArgument("rating.score", "must be a finite number")
    if name == "thumbs" and score not in (0.0, 1.0):
        raise InvalidArgument("rating.score", f"thumbs are 0 (down) or 1 (up), got {score}")
    if not low <= score <= high:
        raise InvalidArgument(
            "rating.score", f"{score} is outside the {name} scale [{low:g}, {high:g}]"
        )
    return [gid], score, name


def _ranking(ranking: pb.Ranking, max_ids: int) -> list[str]:
    ids = list(ranking.generation_ids)
    if len(ids) < 2:
        raise InvalidArgument("ranking.generation_ids", "rank at least two candidates")
    if len(ids) > max_ids:
        raise InvalidArgument(
            "ranking.generation_ids",
            f"at most {max_ids} ids (the candidates of one Generate reply), got {len(ids)}",
        )
    for i, gid in enumerate(ids):
        _require_id(gid, f"ranking.generation_ids[{i}]")
    if len(set(ids)) != len(ids):
        raise InvalidArgument("ranking.generation_ids", "ids must be distinct")
    return ids


def _comparison(comparison: pb.Comparison) -> list[str]:
    preferred = _require_id(comparison.preferred_id, "comparison.preferred_id")
    rejected = _require_id(comparison.rejected_id, "comparison.rejected_id")
    if preferred == rejected:
        raise InvalidArgument("comparison.rejected_id", "must differ from preferred_id")
    return [preferred, rejected]


def _correction(correction: pb.Correction, max_chars: int) -> tuple[list[str], str]:
    gid = _require_id(correction.generation_id, "correction.generation_id")
    text = correction.text
    if not text.strip():
        raise InvalidArgument("correction.text", "must not be empty")
    if len(text) > max_chars:
        raise InvalidArgument("correction.text", f"at most {max_chars} characters")
    return [gid], require_text(text, "correction.text")


log = logging.getLogger("feedloop.server")


class FeedbackService(pb_grpc.FeedbackServicer):
    def __init__(
        self,
        writer: FeedbackWriter,
        auth: Authenticator,
        metrics: ServerMetrics,
        *,
        max_correction_chars: int,
        max_ranking_ids: int = 64,
        limiter: RateLimiter | None = None,
        max_streams_per_key: int = 16,
        stream_idle_timeout_s: float = 0.0,
        verdicts: VerdictRecorder | None = None,
    ) -> None:
        self.verdicts = verdicts
        self.writer = writer
        self.auth = auth
        self.metrics = metrics
        self.max_correction_chars = max_correction_chars
        self.max_ranking_ids = max_ranking_ids
        # Charged per event of a stream (the stream's opening paid for one call at the door).
        self.limiter = limiter if limiter is not None and limiter.enabled else None
        self.max_streams_per_key = max_streams_per_key
        self.stream_idle_timeout_s = stream_idle_timeout_s
        self._open_streams: collections.Counter[str] = collections.Counter()

    def _parse(self, event: pb.FeedbackEvent, client_id: str) -> FeedbackRecord:
        try:
            return parse_event(
                event,
                client_id,
                max_correction_chars=self.max_correction_chars,
                max_ranking_ids=self.max_ranking_ids,
            )
        except InvalidArgument:
            self.metrics.feedback_outcome(event.WhichOneof("kind") or "none", "invalid")
            raise

    @unary("Submit")
    async def Submit(
        self, request: pb.FeedbackEvent, context: grpc.aio.ServicerContext
    ) -> pb.FeedbackAck:
        return await self.submit(request, self.auth.caller_of(context))

    async def submit(self, event: pb.FeedbackEvent, caller: Caller) -> pb.FeedbackAck:
        """Check one event and acknowledge it once durable: every front door (gRPC, HTTP)
        comes here, so each one is checked, stored and deduplicated alike."""
        record = self._parse(event, caller.client_id)
        outcome = await self.writer.submit(record, any_tenant=caller.any_tenant)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "feedback %s %s from %s",
                record.kind,
                outcome,
                caller.client_id,
                extra={
                    "event_id": record.event_id,
                    "generation_ids": record.generation_ids,
                    "outcome": outcome,
                },
            )
        return pb.FeedbackAck(event_id=event.event_id, outcome=OUTCOMES[outcome])

    @unary("SubmitVerdict")
    async def SubmitVerdict(
        self, request: pb.EvaluationVerdict, context: grpc.aio.ServicerContext
    ) -> pb.FeedbackAck:
        if self.verdicts is None:
            raise Unavailable("this server does not record human evaluation verdicts")
        caller = self.auth.caller_of(context)
        draft = dataclasses.replace(
            parse_verdict(request, caller.client_id), any_tenant=caller.any_tenant
        )
        outcome = await self.verdicts.record(draft)
        return pb.FeedbackAck(event_id=request.verdict_id, outcome=OUTCOMES[outcome])

    # grpc sees the coroutine `streaming` makes of this generator (rpc.py), whose signature the
    # generated servicer's base class does not know.
    @streaming("SubmitStream")
    async def SubmitStream(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[pb.FeedbackEvent],
        context: grpc.aio.ServicerContext,
    ) -> AsyncGenerator[pb.FeedbackAck, None]:
        # Events are read with context.read() (request_iterator is an async generator around
        # it: one layer less per event), by a task of their own so that reading runs ahead of
        # the acks and one stream's events share group commits.
        caller = self.auth.caller_of(context)
        if self._open_streams[caller.key_name] >= self.max_streams_per_key:
            self.metrics.rate_limited.labels("SubmitStream").inc()
            raise Refused(
                "too_many_streams",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"at most {self.max_streams_per_key} feedback streams may be open per API key; "
                "send on an open one, or close one first",
                retry_delay_s=1.0,
            )
        self._open_streams[caller.key_name] += 1
        window = AckWindow()
        reader = asyncio.create_task(self._read_stream(context, caller, window))
        watchdog = (
            asyncio.create_task(self._close_when_idle(reader, window))
            if self.stream_idle_timeout_s > 0
            else None
        )
        in_flight = window.in_flight
        try:
            while True:
                while in_flight and in_flight[0].decided:
                    item = in_flight.popleft()
                    window.made_room()
                    outcome = item.outcome
                    if isinstance(outcome, BaseException):
                        raise InContext(outcome, f"event {item.record.event_id!r}") from outcome
                    yield pb.FeedbackAck(event_id=item.record.event_id, outcome=OUTCOMES[outcome])
                if not in_flight and reader.done():
                    break
                await window.changed()
            if window.failure is not None:
                event_id, exc = window.failure
                if not event_id:  # the request stream failed, not one event
                    raise exc
                raise InContext(exc, f"event {event_id!r}") from exc
        finally:
            self._open_streams[caller.key_name] -= 1
            if self._open_streams[caller.key_name] <= 0:
                del self._open_streams[caller.key_name]
            if watchdog is not None:
                watchdog.cancel()
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader

    async def _close_when_idle(self, reader: asyncio.Task[None], window: AckWindow) -> None:
        """End the stream once its client has sent nothing for stream_idle_timeout_s (while the
        reader waits for an event, not for room in the window): an open stream holds a slot of
        max_streams_per_key and memory, so a silent one must not hold them for ever."""
        timeout_s = self.stream_idle_timeout_s
        loop = asyncio.get_running_loop()
        while not reader.done():
            idle_s = loop.time() - window.last_read
            if idle_s < timeout_s or len(window.in_flight) >= STREAM_WINDOW:
                await asyncio.sleep(max(timeout_s - idle_s, 0.01))
                continue
            window.failure = (
                "",
                DeadlineExceeded(
                    f"the feedback stream sent no event for {timeout_s:g} s and was closed; "
                    "events acknowledged so far are stored: open a new stream for more"
                ),
            )
            reader.cancel()
            return

    async def _read_stream(
        self, context: grpc.aio.ServicerContext, caller: Caller, window: AckWindow
    ) -> None:
        """Read ahead of the acks, at most STREAM_WINDOW events in flight; stop at the first
        event that fails the cheap checks, so nothing after an invalid event is submitted."""
        in_flight = window.in_flight
        read = context.read
        client_id, any_tenant = caller.client_id, caller.any_tenant
        limiter, key_name = self.limiter, caller.key_name
        loop = asyncio.get_running_loop()
        try:
            while (event := await read()) is not grpc.aio.EOF:
                window.last_read = loop.time()
                if type(event) is Undecodable:
                    window.failure = ("", event.problem())
                    return
                if limiter is not None and not limiter.allow(key_name):
                    self.metrics.rate_limited.labels("SubmitStream").inc()
                    window.failure = (
                        event.event_id,
                        rate_limited(limiter, key_name, "one token per streamed event"),
                    )
                    return
                if len(in_flight) >= STREAM_WINDOW:
                    await window.room()
                try:
                    in_flight.append(
                        self.writer.submit_waking(
                            self._parse(event, client_id), window, any_tenant=any_tenant
                        )
                    )
                except ServiceError as exc:
                    window.failure = (event.event_id, exc)
                    return
        except Exception as exc:  # the request stream itself failed
            window.failure = ("", exc)
        finally:
            window.wake()


class AckWindow:
    """One stream's submitted events, oldest first, between "read" and "acknowledged".

    The writer wakes it once per group commit (not once per event); the acknowledging side waits
    in `changed`, the reading side in `room` when STREAM_WINDOW events are in flight. Events
    submitted but never acknowledged (the stream ended first) are still committed: nothing waits
    on them, so nothing is left unretrieved.
    """

    __slots__ = ("_changed", "_room", "failure", "in_flight", "last_read")

    def __init__(self) -> None:
        self.in_flight: collections.deque[Pending] = collections.deque()
        # loop.time() of the last event read (or of the stream's start): idle streams close.
        self.last_read = asyncio.get_running_loop().time()
        # (event_id or "" for the stream itself, error): why the reader stopped early.
        self.failure: tuple[str, BaseException] | None = None
        self._changed: asyncio.Future[None] | None = None
        self._room: asyncio.Future[None] | None = None

    def wake(self) -> None:
        """Events were decided, or the reader stopped (on the loop)."""
        waiter, self._changed = self._changed, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def changed(self) -> None:
        self._changed = asyncio.get_running_loop().create_future()
        await self._changed

    def made_room(self) -> None:
        """An event left the window (on the loop): let a waiting reader go on."""
        waiter = self._room
        if waiter is not None and len(self.in_flight) < STREAM_WINDOW:
            self._room = None
            if not waiter.done():
                waiter.set_result(None)

    async def room(self) -> None:
        self._room = asyncio.get_running_loop().create_future()
        await self._room
