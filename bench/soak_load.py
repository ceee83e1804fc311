"""The soak's load generator: its own process, one asyncio loop, a steady open-loop mix.

    python bench/soak_load.py --target 127.0.0.1:50051 --duration-s 120 --out DIR

Generate calls and feedback events are launched on a fixed schedule (open loop: a slow reply
never slows the schedule down, so overload shows up as latency or errors, not as a quieter
test). Feedback rates the load's own replies, every kind in turn (rating on each scale,
ranking, comparison, correction), half as unary Submit calls and half over SubmitStream
sessions that are reopened every few seconds. Raw grpc.aio stubs are used on purpose: the
client library retries UNAVAILABLE, which would hide exactly what the soak must see.

Writes DIR/load_summary.json (counts by method and code, latencies per minute) and
DIR/acked.txt (every acknowledged event_id, one per line: the soak checks them against the
store). Prints one progress line per minute.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from feedloop.v1 import feedloop_pb2 as pb
from feedloop.v1 import feedloop_pb2_grpc as pb_grpc

CALL_TIMEOUT_S = 10.0
STREAM_SESSION_S = 5.0
MAX_IN_FLIGHT = 512
SCALES = (
    (pb.RATING_SCALE_UNIT, lambda rng: rng.random()),
    (pb.RATING_SCALE_THUMBS, lambda rng: float(rng.random() < 0.5)),
    (pb.RATING_SCALE_STARS_5, lambda rng: float(rng.randint(1, 5))),
)


@dataclass
class Tally:
    """Counts and latencies, by method and by minute of the run."""

    started: float = field(default_factory=time.monotonic)
    sent: collections.Counter[str] = field(default_factory=collections.Counter)
    codes: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    latencies_s: dict[int, dict[str, list[float]]] = field(
        default_factory=lambda: collections.defaultdict(lambda: collections.defaultdict(list))
    )
    acked: list[str] = field(default_factory=list)
    duplicates: int = 0

    def minute(self) -> int:
        return int((time.monotonic() - self.started) // 60)

    def done(self, method: str, code: grpc.StatusCode, latency_s: float | None) -> None:
        self.codes[method][code.name] += 1
        if code == grpc.StatusCode.OK and latency_s is not None:
            self.latencies_s[self.minute()][method].append(latency_s)

    def failed(self) -> int:
        return sum(n for c in self.codes.values() for name, n in c.items() if name != "OK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class Load:
    def __init__(self, target: str, args: argparse.Namespace) -> None:
        self.args = args
        self.channel = grpc.aio.insecure_channel(target)
        self.generation = pb_grpc.GenerationStub(self.channel)
        self.feedback = pb_grpc.FeedbackStub(self.channel)
        self.rng = random.Random(args.seed)
        self.tally = Tally()
        self.replies: collections.deque[list[str]] = collections.deque(maxlen=512)
        self.in_flight: set[asyncio.Task[None]] = set()
        self.stream_queue: asyncio.Queue[pb.FeedbackEvent] = asyncio.Queue(maxsize=10_000)
        self.stopping = asyncio.Event()
        self.kind_counter = 0

    # -- one request of each sort ---------------------------------------------------------------

    async def generate(self) -> None:
        self.tally.sent["Generate"] += 1
        started = time.monotonic()
        try:
            reply = await self.generation.Generate(
                pb.GenerateRequest(
                    prompt=self.rng.choice(self.args.prompts), num_candidates=self.rng.randint(1, 4)
                ),
                timeout=CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            self.tally.done("Generate", exc.code(), None)
            return
        self.tally.done("Generate", grpc.StatusCode.OK, time.monotonic() - started)
        self.replies.append([c.generation_id for c in reply.candidates])

    def next_event(self) -> pb.FeedbackEvent | None:
        """A valid event about one of our own replies, kinds in turn; None before any reply."""
        if not self.replies:
            return None
        ids = self.rng.choice(self.replies)
        event = pb.FeedbackEvent(event_id=f"soak-{uuid.uuid4().hex}")
        self.kind_counter += 1
        kind = self.kind_counter % 4
        if kind == 1 and len(ids) >= 2:
            event.ranking.generation_ids.extend(self.rng.sample(ids, len(ids)))
        elif kind == 2 and len(ids) >= 2:
            a, b = self.rng.sample(ids, 2)
            event.comparison.preferred_id, event.comparison.rejected_id = a, b
        elif kind == 3:
            event.correction.generation_id = ids[0]
            event.correction.text = "a calmer phrase about the sea"
        else:
            scale, score = self.rng.choice(SCALES)
            event.rating.generation_id = self.rng.choice(ids)
            event.rating.scale = scale  # type: ignore[assignment]
            event.rating.score = score(self.rng)
        return event

    async def submit(self) -> None:
        event = self.next_event()
        if event is None:
            return
        self.tally.sent["Submit"] += 1
        started = time.monotonic()
        try:
            ack = await self.feedback.Submit(event, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            self.tally.done("Submit", exc.code(), None)
            return
        self.tally.done("Submit", grpc.StatusCode.OK, time.monotonic() - started)
        self.record_ack(ack)

    def record_ack(self, ack: pb.FeedbackAck) -> None:
        self.tally.acked.append(ack.event_id)
        if ack.outcome == pb.FEEDBACK_OUTCOME_DUPLICATE:
            self.tally.duplicates += 1  # fresh ids every time: a duplicate would be a bug

    async def stream_sessions(self) -> None:
        """SubmitStream sessions of STREAM_SESSION_S each, fed from stream_queue."""
        while not (self.stopping.is_set() and self.stream_queue.empty()):
            await self.one_stream_session()

    async def one_stream_session(self) -> None:
        sent_at: dict[str, float] = {}
        session_ends = time.monotonic() + STREAM_SESSION_S

        async def events():
            while time.monotonic() < session_ends:
                try:
                    event = await asyncio.wait_for(self.stream_queue.get(), timeout=0.2)
                except TimeoutError:
                    if self.stopping.is_set():
                        return
                    continue
                sent_at[event.event_id] = time.monotonic()
                self.tally.sent["SubmitStream"] += 1
                yield event

        call = self.feedback.SubmitStream(events(), timeout=STREAM_SESSION_S + CALL_TIMEOUT_S)
        try:
            async for ack in call:
                started = sent_at.pop(ack.event_id, None)
                latency = None if started is None else time.monotonic() - started
                self.tally.done("SubmitStream", grpc.StatusCode.OK, latency)
                self.record_ack(ack)
        except grpc.aio.AioRpcError as exc:
            for _ in sent_at:  # every event of the session still waiting for its ack failed
                self.tally.done("SubmitStream", exc.code(), None)
            sent_at.clear()
        for _ in sent_at:  # stream ended cleanly but some events were never acked
            self.tally.done("SubmitStream", grpc.StatusCode.DATA_LOSS, None)

    # -- scheduling ------------------------------------------------------------------------------

    def launch(self, coroutine: Any) -> None:
        if len(self.in_flight) >= MAX_IN_FLIGHT:
            coroutine.close()
            self.tally.done("Schedule", grpc.StatusCode.RESOURCE_EXHAUSTED, None)
            return
        task = asyncio.ensure_future(coroutine)
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)

    async def paced(self, rate_per_s: float, action: Any) -> None:
        """Call action() at rate_per_s on a fixed schedule until stopping."""
        if rate_per_s <= 0:
            return
        interval_s = 1.0 / rate_per_s
        next_at = time.monotonic()
        while not self.stopping.is_set():
            action()
            next_at += interval_s
            delay = next_at - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), timeout=delay)

    def queue_stream_event(self) -> None:
        event = self.next_event()
        if event is not None:
            self.stream_queue.put_nowait(event)

    async def progress(self) -> None:
        shown = -1
        while not self.stopping.is_set():
            await asyncio.sleep(1.0)
            minute = self.tally.minute()
            if minute != shown and minute > 0:
                shown = minute
                self.print_minute(minute - 1)

    def print_minute(self, minute: int) -> None:
        lat = self.tally.latencies_s.get(minute, {})
        parts = [
            f"{method} n={len(v)} p50={percentile(v, 50) * 1e3:.1f}ms "
            f"p99={percentile(v, 99) * 1e3:.1f}ms"
            for method, v in sorted(lat.items())
        ]
        print(
            f"soak_load: minute {minute + 1}: {'; '.join(parts)}; failed={self.tally.failed()}",
            flush=True,
        )

    async def run(self) -> None:
        args = self.args
        feedback_rps = args.feedback_rps
        runners = [
            asyncio.ensure_future(
                self.paced(args.generate_rps, lambda: self.launch(self.generate()))
            ),
            asyncio.ensure_future(
                self.paced(
                    feedback_rps * (1 - args.stream_share), lambda: self.launch(self.submit())
                )
            ),
            asyncio.ensure_future(
                self.paced(feedback_rps * args.stream_share, self.queue_stream_event)
            ),
            asyncio.ensure_future(self.progress()),
        ]
        streams = asyncio.ensure_future(self.stream_sessions())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=args.duration_s)
        self.stopping.set()
        await asyncio.gather(*runners)
        await streams
        if self.in_flight:
            await asyncio.wait(self.in_flight, timeout=CALL_TIMEOUT_S * 2)
        await self.channel.close()

    def summary(self, elapsed_s: float) -> dict[str, Any]:
        tally = self.tally
        minutes = []
        for minute in sorted(tally.latencies_s):
            row: dict[str, Any] = {"minute": minute + 1}
            for method, values in sorted(tally.latencies_s[minute].items()):
                row[method] = {
                    "n": len(values),
                    "p50_ms": percentile(values, 50) * 1e3,
                    "p99_ms": percentile(values, 99) * 1e3,
                }
            minutes.append(row)
        return {
            "elapsed_s": elapsed_s,
            "sent": dict(tally.sent),
            "codes": {method: dict(codes) for method, codes in tally.codes.items()},
            "failed": tally.failed(),
            "acked": len(tally.acked),
            "duplicates": tally.duplicates,
            "per_minute": minutes,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", required=True, help="HOST:PORT of the feedloop server")
    parser.add_argument("--duration-s", type=float, default=120.0)
    parser.add_argument("--generate-rps", type=float, default=20.0)
    parser.add_argument("--feedback-rps", type=float, default=20.0)
    parser.add_argument("--stream-share", type=float, default=0.5, help="of feedback, streamed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="folder for the result files")
    args = parser.parse_args(argv)
    args.prompts = ["ocean sunrise", "quiet forest", "city night", "green hills", "warm rain"]
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"soak_load: started target={args.target} duration_s={args.duration_s:g}", flush=True)

    async def go() -> Load:
        load = Load(args.target, args)
        await load.run()
        return load

    started = time.monotonic()
    load = asyncio.run(go())
    summary = load.summary(time.monotonic() - started)
    (args.out / "acked.txt").write_text("\n".join(load.tally.acked) + "\n", encoding="utf-8")
    (args.out / "load_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"soak_load: done sent={sum(summary['sent'].values())} failed={summary['failed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
