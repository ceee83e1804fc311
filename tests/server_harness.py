"""Helpers of the server tests: a registry seeded with a checkpoint, an in-process server on
free loopback ports, a `feedloop serve` subprocess, and awaiting conditions instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc

from feedloop.core.registry import DirectoryRegistry
from feedloop.server.app import FeedloopServer
from feedloop.server.config import ServeConfig
from feedloop.v1 import feedloop_pb2 as pb
from feedloop.v1 import feedloop_pb2_grpc as pb_grpc

BANNER_RE = re.compile(
    r"^feedloop serve: listening grpc=(?P<grpc>\S+) metrics=(?P<metrics>\S+) "
    r"live=(?P<live>\S*) auth=(?P<auth>on|off)(?: http=(?P<http>\S+))?$"
)


def seeded_registry(root: Path, checkpoint: Path) -> DirectoryRegistry:
    registry = DirectoryRegistry(root, poll_interval_s=0.02)
    registry.publish(checkpoint, reason="test seed", make_live=True)
    return registry


def test_config(tmp_path: Path, **overrides: Any) -> ServeConfig:
    config = ServeConfig(
        port=0,
        metrics_port=0,
        data_dir=tmp_path,
        store=str(tmp_path / "replay.sqlite3"),
        registry=str(tmp_path / "registry"),
        max_queue_delay_ms=1.0,
        registry_poll_interval_s=0.02,
        shutdown_grace_s=5.0,
        # One server per test, so nothing another replica commits late: a short wait keeps
        # the answers on unknown ids quick.
        unknown_generation_wait_ms=200.0,
        # Exploration re-samples a random share of default requests at another temperature:
        # tests of what a request is served with turn it on themselves.
        explore_share=0.0,
    )
    return replace(config, **overrides)


test_config.__test__ = False  # type: ignore[attr-defined]  # not a test despite its name


@dataclass
class Running:
    server: FeedloopServer
    channel: grpc.aio.Channel
    generation: pb_grpc.GenerationStub
    feedback: pb_grpc.FeedbackStub
    admin: pb_grpc.ModelAdminStub

    @property
    def store(self) -> Any:
        return self.server.store


@contextlib.asynccontextmanager
async def running_server(
    config: ServeConfig, *, metadata: tuple[tuple[str, str], ...] = (), **backends: Any
) -> AsyncIterator[Running]:
    """Start a FeedloopServer in this process and a channel to it; always stop both."""
    server = FeedloopServer(config, **backends)
    try:
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        try:
            yield Running(
                server,
                channel,
                pb_grpc.GenerationStub(channel),
                pb_grpc.FeedbackStub(channel),
                pb_grpc.ModelAdminStub(channel),
            )
        finally:
            await channel.close()
    finally:
        await server.stop(5.0)


async def flood_generate(running: Running, calls: int = 40) -> list[Any]:
    """Send calls long Generates at once: their replies, or the AioRpcErrors of those refused."""
    requests = [
        running.generation.Generate(
            pb.GenerateRequest(prompt=f"p {i}", sampling=pb.SamplingParams(max_tokens=48)),
            timeout=30,
        )
        for i in range(calls)
    ]
    return await asyncio.gather(*requests, return_exceptions=True)


async def wait_until(
    condition: Callable[[], Any], *, timeout_s: float = 10.0, interval_s: float = 0.01
) -> Any:
    """Await until condition() is truthy (returns its value); fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(interval_s)


def rating(event_id: str, generation_id: str, score: float = 1.0, scale: int = 0) -> Any:
    return pb.FeedbackEvent(
        event_id=event_id,
        rating=pb.Rating(generation_id=generation_id, score=score, scale=scale),  # type: ignore[arg-type]
    )


# -- a `feedloop serve` subprocess ---------------------------------------------------------------


@dataclass
class ServeProcess:
    process: subprocess.Popen[str]
    grpc_address: str
    metrics_address: str
    live: str
    auth: str
    http_address: str | None = None  # with --http-port

    def terminate(self, timeout_s: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=20)


def serve_args(tmp_path: Path, *extra: str) -> list[str]:
    """`feedloop serve` arguments: free loopback ports, data under tmp_path, a fast registry."""
    return [
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--data-dir",
        str(tmp_path),
        "--registry-poll-interval-s",
        "0.05",
        *extra,
    ]


def seeded_data_dir(tmp_path: Path, checkpoint: Path) -> Path:
    """A data dir holding the default checkpoint, as `feedloop pretrain` leaves it."""
    shutil.copytree(checkpoint, tmp_path / "default-policy")
    return tmp_path


def start_serve(
    args: list[str], *, env: dict[str, str] | None = None, timeout_s: float = 60.0
) -> ServeProcess:
    """Run `feedloop serve ARGS` and wait for its banner line."""
    command = [sys.executable, "-m", "feedloop.server.cli", *args]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert process.stdout is not None
    line = process.stdout.readline().strip()  # blocks until the banner or exit
    match = BANNER_RE.match(line)
    if not match:
        process.kill()
        _, err = process.communicate(timeout=timeout_s)
        raise AssertionError(f"no banner from feedloop serve: {line!r}\nstderr:\n{err}")
    return ServeProcess(
        process, match["grpc"], match["metrics"], match["live"], match["auth"], match["http"]
    )


@contextlib.contextmanager
def serve_process(args: list[str], **kwargs: Any) -> Iterator[ServeProcess]:
    proc = start_serve(args, **kwargs)
    try:
        yield proc
    finally:
        proc.kill()
