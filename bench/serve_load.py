"""The load generator of bench_serve.py, run as its own process (so its CPU is not the server's).

    python bench/serve_load.py generate --target HOST:PORT --concurrency 64 --duration-s 3
    python bench/serve_load.py generate-h2load --target HOST:PORT --metrics HOST:PORT
    python bench/serve_load.py completions-h2load --target HOST:PORT   # the HTTP API's port
    python bench/serve_load.py feedback-unary --target HOST:PORT --concurrency 64
    python bench/serve_load.py feedback-stream --target HOST:PORT --streams 4
    python bench/serve_load.py echo-server                 # prints its port, serves until killed
    python bench/serve_load.py echo-stream --target HOST:PORT --streams 4
    python bench/serve_load.py swap-load --target HOST:PORT --concurrency 64 --duration-s 8

Each mode prints one JSON object on stdout (echo-server prints its port first). Closed-loop
load: each of `concurrency` workers sends its next request when the previous one is answered.
The first warmup_s seconds are not counted.

generate-h2load drives the same closed loop with h2load (nghttp2's HTTP/2 load generator, C;
Debian package nghttp2-client): one connection, `concurrency` streams, every request the same
gRPC-framed GenerateRequest. It costs a twentieth of the CPU of this Python client per call,
which matters on a 2-core machine where the load generator shares the cores with the server.
h2load sees HTTP status only, not grpc-status (sent in trailers), so the gRPC codes are read
from the server's own counter (feedloop_requests_total, before and after the run): every code
but OK is an error, warm-up included. completions-h2load drives the OpenAI-compatible HTTP API
(POST /v1/completions, the same prompt and max_tokens) with h2load over HTTP/1.1, one connection
per worker as OpenAI clients use it; there the HTTP status is the outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import grpc

from feedloop.v1 import feedloop_pb2 as pb
from feedloop.v1 import feedloop_pb2_grpc as pb_grpc

PROMPTS = (
    "ocean sunrise",
    "quiet forest",
    "city lights",
    "mountain air",
    "autumn rain",
    "morning coffee",
    "winter night",
    "summer garden",
)
ECHO_METHOD = "/bench.Echo/Stream"
# Events in flight per stream, as a pipelining client would keep (--stream-window). The default
# stays what every earlier figure used; a larger one hides more of the server's ack latency.
STREAM_WINDOW = 512


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(latencies_s: list[float], errors: dict[str, int], measured_s: float) -> dict[str, Any]:
    return {
        "count": len(latencies_s),
        "errors": sum(errors.values()),
        "error_codes": errors,
        "per_s": len(latencies_s) / measured_s if measured_s > 0 else 0.0,
        "p50_ms": percentile(latencies_s, 0.50) * 1000,
        "p99_ms": percentile(latencies_s, 0.99) * 1000,
    }


async def closed_loop(
    call: Any,
    make_request: Any,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    on_reply: Any = None,
) -> dict[str, Any]:
    """Run `concurrency` workers calling call(make_request(i)) back to back."""
    started = time.perf_counter()
    measure_from = started + warmup_s
    stop_at = measure_from + duration_s
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def worker(w: int) -> None:
        i = 0
        while True:
            sent = time.perf_counter()
            if sent >= stop_at:
                return
            try:
                reply = await call(make_request(w, i), timeout=30)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                reply = None
            done = time.perf_counter()
            if reply is not None:
                if sent >= measure_from:
                    latencies.append(done - sent)
                if on_reply is not None:
                    on_reply(reply, sent, done)
            i += 1

    await asyncio.gather(*[worker(w) for w in range(concurrency)])
    return summary(latencies, errors, duration_s)


async def run_generate(args: argparse.Namespace) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        params = pb.SamplingParams(max_tokens=args.max_tokens)

        def request(w: int, i: int) -> pb.GenerateRequest:
            return pb.GenerateRequest(prompt=PROMPTS[(w + i) % len(PROMPTS)], sampling=params)

        return await closed_loop(
            stub.Generate, request, args.concurrency, args.warmup_s, args.duration_s
        )


def generate_codes(metrics_address: str) -> dict[str, float]:
    """The server's Generate replies so far, by gRPC code (from its Prometheus endpoint)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    codes: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "feedloop_requests":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("method") == "Generate":
                code = sample.labels["code"]
                codes[code] = codes.get(code, 0.0) + sample.value
    return codes


def settled_codes(metrics_address: str, before: dict[str, float]) -> dict[str, float]:
    """generate_codes once the server has answered (or seen cancelled) every call it had."""
    last = generate_codes(metrics_address)
    for _ in range(50):
        time.sleep(0.2)
        now = generate_codes(metrics_address)
        if now == last and now != before:
            break
        last = now
    return last


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: uncompressed flag, 4-byte big-endian length, bytes."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def run_generate_h2load(args: argparse.Namespace) -> dict[str, Any]:
    h2load = shutil.which("h2load")
    if h2load is None:
        raise SystemExit("h2load not found: apt-get install nghttp2-client")
    if not args.metrics:
        raise SystemExit("generate-h2load needs --metrics HOST:PORT (the server's metrics)")
    request = pb.GenerateRequest(
        prompt=PROMPTS[0], sampling=pb.SamplingParams(max_tokens=args.max_tokens)
    )
    with tempfile.TemporaryDirectory(prefix="feedloop-h2load-") as tmp:
        body, log_path = Path(tmp) / "request.bin", Path(tmp) / "requests.log"
        body.write_bytes(grpc_frame(request.SerializeToString()))
        before = generate_codes(args.metrics)
        out = subprocess.run(
            [
                h2load,
                "--clients=1",
                f"--max-concurrent-streams={args.concurrency}",
                f"--duration={round(args.duration_s * 1000)}ms",
                f"--warm-up-time={round(args.warmup_s * 1000)}ms",
                f"--data={body}",
                "--header=content-type: application/grpc",
                "--header=te: trailers",
                "--header=grpc-timeout: 30S",
                f"--log-file={log_path}",
                f"http://{args.target}/feedloop.v1.Generation/Generate",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        after = settled_codes(args.metrics, before)
        latencies, errors = h2load_latencies(log_path)
    cancelled_at_stop = 0
    for code, count in after.items():
        new = int(count - before.get(code, 0.0))
        if code == "CANCELLED":
            # h2load resets the streams still open when its time is up: at most one a stream.
            cancelled_at_stop = min(new, args.concurrency)
            new -= cancelled_at_stop
        if code != "OK" and new > 0:
            errors[code] = errors.get(code, 0) + new
    failed = re.search(r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    if failed is None:
        raise SystemExit(f"unexpected h2load output:\n{out}")
    lost = sum(int(n) for n in failed.groups())
    if lost:
        errors["H2LOAD_FAILED"] = lost
    result = summary(latencies, errors, args.duration_s)
    result["load_generator"] = "h2load"
    result["cancelled_at_stop"] = cancelled_at_stop
    return result


def h2load_latencies(log_path: Path) -> tuple[list[float], dict[str, int]]:
    """From h2load's log (one line per request of the measured window: start in us, HTTP
    status, duration in us): the latencies of the 200s, and the other statuses counted."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    for line in log_path.read_text().splitlines():
        _, status, duration_us = line.split("\t")[:3]
        if status == "200":
            latencies.append(int(duration_us) / 1e6)
        else:
            errors[f"HTTP_{status}"] = errors.get(f"HTTP_{status}", 0) + 1
    return latencies, errors


def run_completions_h2load(args: argparse.Namespace) -> dict[str, Any]:
    h2load = shutil.which("h2load")
    if h2load is None:
        raise SystemExit("h2load not found: apt-get install nghttp2-client")
    request = {"model": "feedloop", "prompt": PROMPTS[0], "max_tokens": args.max_tokens}
    with tempfile.TemporaryDirectory(prefix="feedloop-h2load-") as tmp:
        body, log_path = Path(tmp) / "request.json", Path(tmp) / "requests.log"
        body.write_text(json.dumps(request))
        out = subprocess.run(
            [
                h2load,
                "--h1",
                f"--clients={args.concurrency}",
                f"--duration={round(args.duration_s * 1000)}ms",
                f"--warm-up-time={round(args.warmup_s * 1000)}ms",
                f"--data={body}",
                "--header=content-type: application/json",
                f"--log-file={log_path}",
                f"http://{args.target}/v1/completions",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        latencies, errors = h2load_latencies(log_path)
    failed = re.search(r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    if failed is None:
        raise SystemExit(f"unexpected h2load output:\n{out}")
    # In timed mode h2load drops the requests still open when its time is up: at most one a
    # connection, counted as failed; they are not the server's.
    lost = max(0, sum(int(n) for n in failed.groups()) - args.concurrency)
    if lost:
        errors["H2LOAD_FAILED"] = lost
    result = summary(latencies, errors, args.duration_s)
    result["load_generator"] = "h2load --h1"
    return result


async def generation_ids(channel: grpc.aio.Channel, n: int) -> list[str]:
    stub = pb_grpc.GenerationStub(channel)
    ids: list[str] = []
    while len(ids) < n:
        reply = await stub.Generate(
            pb.GenerateRequest(prompt="feedback bench", num_candidates=8), timeout=30
        )
        ids.extend(c.generation_id for c in reply.candidates)
    return ids


def rating_event(event_id: str, generation_id: str, i: int) -> pb.FeedbackEvent:
    return pb.FeedbackEvent(
        event_id=event_id,
        rating=pb.Rating(
            generation_id=generation_id, score=float(i % 2), scale=pb.RATING_SCALE_THUMBS
        ),
    )


async def run_feedback_unary(args: argparse.Namespace) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(args.target) as channel:
        ids = await generation_ids(channel, 64)
        stub = pb_grpc.FeedbackStub(channel)
        run = uuid.uuid4().hex[:8]

        def request(w: int, i: int) -> pb.FeedbackEvent:
            return rating_event(f"{run}-{w}-{i}", ids[(w + i) % len(ids)], i)

        return await closed_loop(
            stub.Submit, request, args.concurrency, args.warmup_s, args.duration_s
        )


async def stream_load(
    open_call: Any,
    make_message: Any,
    streams: int,
    window_size: int,
    warmup_s: float,
    duration_s: float,
) -> dict[str, Any]:
    """`streams` bidirectional streams, each keeping `window_size` messages in flight."""
    started = time.perf_counter()
    measure_from = started + warmup_s
    stop_at = measure_from + duration_s
    counted = [0]
    errors: dict[str, int] = {}

    async def one_stream(s: int) -> None:
        window = asyncio.Semaphore(window_size)
        call = open_call()

        async def write() -> None:
            i = 0
            while time.perf_counter() < stop_at:
                await window.acquire()
                await call.write(make_message(s, i))
                i += 1
            await call.done_writing()

        writer = asyncio.ensure_future(write())
        try:
            while True:
                ack = await call.read()
                if ack is grpc.aio.EOF:
                    break
                window.release()
                if measure_from <= time.perf_counter() < stop_at:
                    counted[0] += 1
        except grpc.aio.AioRpcError as exc:
            errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
        await writer

    await asyncio.gather(*[one_stream(s) for s in range(streams)])
    return {
        "count": counted[0],
        "errors": sum(errors.values()),
        "error_codes": errors,
        "per_s": counted[0] / duration_s,
    }


async def run_feedback_stream(args: argparse.Namespace) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(args.target) as channel:
        ids = await generation_ids(channel, 64)
        stub = pb_grpc.FeedbackStub(channel)
        run = uuid.uuid4().hex[:8]
        return await stream_load(
            lambda: stub.SubmitStream(timeout=60),
            lambda s, i: rating_event(f"{run}-s{s}-{i}", ids[(s + i) % len(ids)], i),
            args.streams,
            args.stream_window,
            args.warmup_s,
            args.duration_s,
        )


async def run_echo_stream(args: argparse.Namespace) -> dict[str, Any]:
    """The ceiling: the same client work as feedback-stream (an event built and serialized per
    message, each reply parsed), against a server that only echoes."""
    async with grpc.aio.insecure_channel(args.target) as channel:
        echo = channel.stream_stream(
            ECHO_METHOD,
            request_serializer=pb.FeedbackEvent.SerializeToString,
            response_deserializer=pb.FeedbackEvent.FromString,
        )
        run = uuid.uuid4().hex[:8]
        generation_id = uuid.uuid4().hex
        return await stream_load(
            lambda: echo(timeout=60),
            lambda s, i: rating_event(f"{run}-s{s}-{i}", generation_id, i),
            args.streams,
            args.stream_window,
            args.warmup_s,
            args.duration_s,
        )


async def run_echo_server(args: argparse.Namespace) -> dict[str, Any]:
    """A bare gRPC bidirectional echo stream: the ceiling for streamed feedback."""

    async def stream(request_iterator: Any, context: Any) -> Any:
        async for message in request_iterator:
            yield message

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "bench.Echo", {"Stream": grpc.stream_stream_rpc_method_handler(stream)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
    await server.stop(0)
    return {"stopped": True}


async def run_swap_load(args: argparse.Namespace) -> dict[str, Any]:
    """Closed-loop Generate load recording every reply: (sent, done, version) in Unix time."""
    replies: list[tuple[float, float, str]] = []
    offset = time.time() - time.perf_counter()
    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        params = pb.SamplingParams(max_tokens=args.max_tokens)

        def request(w: int, i: int) -> pb.GenerateRequest:
            return pb.GenerateRequest(prompt=PROMPTS[(w + i) % len(PROMPTS)], sampling=params)

        def on_reply(reply: pb.GenerateResponse, sent: float, done: float) -> None:
            replies.append((sent + offset, done + offset, reply.model_version))

        result = await closed_loop(
            stub.Generate, request, args.concurrency, 0.0, args.duration_s, on_reply
        )
    result["replies"] = replies
    return result


MODES: dict[str, Any] = {
    "generate": run_generate,
    "generate-h2load": run_generate_h2load,
    "feedback-unary": run_feedback_unary,
    "feedback-stream": run_feedback_stream,
    "echo-server": run_echo_server,
    "echo-stream": run_echo_stream,
    "swap-load": run_swap_load,
    "completions-h2load": run_completions_h2load,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--stream-window", type=int, default=STREAM_WINDOW)
    parser.add_argument("--duration-s", type=float, default=3.0)
    parser.add_argument("--warmup-s", type=float, default=0.5)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--metrics", help="the server's metrics HOST:PORT (generate-h2load)")
    args = parser.parse_args(argv)
    run = MODES[args.mode]
    result = asyncio.run(run(args)) if asyncio.iscoroutinefunction(run) else run(args)
    if args.mode != "echo-server":
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
