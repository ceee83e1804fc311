"""The Feedback service: validate an event, hand it to the group-commit writer, ack once durable.

Checks that need no lookup run here, on the loop (they are cheap); checks that need the stored
generations (ids exist, a ranking's candidates share one request) run in the writer thread,
which sees the generation log's buffer too. A rejected event is never written.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from feedloop.core.store.base import FeedbackRecord
from feedloop.server.auth import Authenticator
from feedloop.server.edge import Undecodable, streaming, unary
from feedloop.server.errors import InvalidArgument, ServiceError, in_context, require_text
from feedloop.server.feedback_writer import ACCEPTED, FeedbackWriter
from feedloop.server.metrics import ServerMetrics
from feedloop.v1 import feedloop_pb2 as pb
from feedloop.v1 import feedloop_pb2_grpc as pb_grpc

MAX_EVENT_ID_CHARS = 128
# Events of one stream in flight between "read" and "acknowledged": the stream is pipelined so
# its events share group commits instead of paying one commit each.
STREAM_WINDOW = 256

SCALES: dict[int, tuple[str, float, float]] = {
    pb.RATING_SCALE_UNSPECIFIED: ("unit", 0.0, 1.0),
    pb.RATING_SCALE_UNIT: ("unit", 0.0, 1.0),
    pb.RATING_SCALE_THUMBS: ("thumbs", 0.0, 1.0),
    pb.RATING_SCALE_STARS_5: ("stars5", 1.0, 5.0),
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
    event: pb.FeedbackEvent, client_id: str, *, max_correction_chars: int
) -> FeedbackRecord:
    """A FeedbackRecord from a wire event, or InvalidArgument naming the bad field."""
    if not event.event_id:
        raise InvalidArgument("event_id", "required (the client's idempotency key)")
    if len(event.event_id) > MAX_EVENT_ID_CHARS:
        raise InvalidArgument("event_id", f"at most {MAX_EVENT_ID_CHARS} characters")
    require_text(event.event_id, "event_id")
    given_at = None
    if event.HasField("given_at"):
        try:  # a Timestamp outside years 1-9999 or with nanos outside [0, 1e9) is invalid
            given_at = event.given_at.ToNanoseconds() / 1e9
        except (ValueError, OverflowError) as exc:
            raise InvalidArgument("given_at", f"not a valid timestamp: {exc}") from None
    kind = event.WhichOneof("kind")
    common: dict[str, Any] = {
        "event_id": event.event_id,
        "client_id": client_id,
        "received_at": time.time(),
        "given_at": given_at,
    }
    if kind == "rating":
        rating = event.rating
        gid = _require_id(rating.generation_id, "rating.generation_id")
        scale = SCALES.get(rating.scale)
        if scale is None:
            raise InvalidArgument("rating.scale", f"unknown scale {rating.scale}")
        name, low, high = scale
        score = rating.score
        if not math.isfinite(score):
            raise InvalidArgument("rating.score", "must be a finite number")
        if name == "thumbs" and score not in (0.0, 1.0):
            raise InvalidArgument("rating.score", f"thumbs are 0 (down) or 1 (up), got {score}")
        if not low <= score <= high:
            raise InvalidArgument(
                "rating.score", f"{score} is outside the {name} scale [{low:g}, {high:g}]"
            )
        return FeedbackRecord(
            kind="rating", generation_ids=[gid], score=score, scale=name, **common
        )
    if kind == "ranking":
        ids = list(event.ranking.generation_ids)
        if len(ids) < 2:
            raise InvalidArgument("ranking.generation_ids", "rank at least two candidates")
        for i, gid in enumerate(ids):
            _require_id(gid, f"ranking.generation_ids[{i}]")
        if len(set(ids)) != len(ids):
            raise InvalidArgument("ranking.generation_ids", "ids must be distinct")
        return FeedbackRecord(kind="ranking", generation_ids=ids, **common)
    if kind == "comparison":
        comparison = event.comparison
        preferred = _require_id(comparison.preferred_id, "comparison.preferred_id")
        rejected = _require_id(comparison.rejected_id, "comparison.rejected_id")
        if preferred == rejected:
            raise InvalidArgument("comparison.rejected_id", "must differ from preferred_id")
        return FeedbackRecord(kind="comparison", generation_ids=[preferred, rejected], **common)
    if kind == "correction":
        correction = event.correction
        gid = _require_id(correction.generation_id, "correction.generation_id")
        if not correction.text.strip():
            raise InvalidArgument("correction.text", "must not be empty")
        if len(correction.text) > max_correction_chars:
            raise InvalidArgument("correction.text", f"at most {max_correction_chars} characters")
        require_text(correction.text, "correction.text")
        return FeedbackRecord(
            kind="correction", generation_ids=[gid], text=correction.text, **common
        )
    raise InvalidArgument("kind", "set exactly one of rating, ranking, comparison, correction")


class FeedbackService(pb_grpc.FeedbackServicer):
    def __init__(
        self,
        writer: FeedbackWriter,
        auth: Authenticator,
        metrics: ServerMetrics,
        *,
        max_correction_chars: int,
    ) -> None:
        self.writer = writer
        self.auth = auth
        self.metrics = metrics
        self.max_correction_chars = max_correction_chars

    def _parse(self, event: pb.FeedbackEvent, client_id: str) -> FeedbackRecord:
        try:
            return parse_event(event, client_id, max_correction_chars=self.max_correction_chars)
        except InvalidArgument:
            self.metrics.feedback_outcome(event.WhichOneof("kind") or "none", "invalid")
            raise

    @unary("Submit")
    async def Submit(
        self, request: pb.FeedbackEvent, context: grpc.aio.ServicerContext
    ) -> pb.FeedbackAck:
        record = self._parse(request, self.auth.client_id(context))
        outcome = await self.writer.submit(record)
        return pb.FeedbackAck(event_id=request.event_id, outcome=OUTCOMES[outcome])

    @streaming("SubmitStream")
    async def SubmitStream(
        self,
        request_iterator: AsyncIterator[pb.FeedbackEvent],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.FeedbackAck]:
        client_id = self.auth.client_id(context)
        # (event_id, future or error) in arrival order; None ends it. Unbounded, so the reader
        # never blocks on it; `slots` bounds how many events are in flight instead.
        window: asyncio.Queue[tuple[str, Any] | None] = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_WINDOW)

        async def read() -> None:
            # Reads ahead of the acks; stops at the first event that fails the cheap checks,
            # so nothing after an invalid event is submitted by this reader.
            try:
                async for event in request_iterator:
                    if type(event) is Undecodable:
                        window.put_nowait(("", event.problem()))
                        return
                    await slots.acquire()
                    try:
                        future: Any = self.writer.submit(self._parse(event, client_id))
                    except ServiceError as exc:
                        window.put_nowait((event.event_id, exc))
                        return
                    window.put_nowait((event.event_id, future))
            except Exception as exc:  # the request stream itself failed
                window.put_nowait(("", exc))
            finally:
                window.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await window.get()) is not None:
                event_id, pending = item
                try:
                    if isinstance(pending, BaseException):
                        raise pending
                    outcome = await pending
                except Exception as exc:
                    if not event_id:  # the request stream failed, not one event
                        raise
                    raise in_context(exc, f"event {event_id!r}") from exc
                yield pb.FeedbackAck(event_id=event_id, outcome=OUTCOMES[outcome])
                slots.release()
        finally:
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
            _forget_pending(window)


def _forget_pending(window: asyncio.Queue[tuple[str, Any] | None]) -> None:
    """Events submitted but never acknowledged (the stream ended first) are still committed by
    the writer; consume their outcomes so asyncio does not report them as never retrieved."""
    while not window.empty():
        item = window.get_nowait()
        if item is not None and isinstance(item[1], asyncio.Future):
            item[1].add_done_callback(_consume)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
