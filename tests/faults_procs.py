"""Real `feedloop serve` / `feedloop train` processes for the fault, fuzz and security tests.

Built on the demo's child-process manager (its own process group, logs to a file, stdout
drained for the child's whole life, SIGKILL if the test process dies), so a server that logs a
lot can never block on a full pipe, and its log file can be searched afterwards.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from feedloop.demo.processes import Child, feedloop_command, start_child

SERVING = health_pb2.HealthCheckResponse.SERVING


def seeded_data_dir(data_dir: Path, checkpoint: Path) -> Path:
    """A data dir holding `checkpoint` as the default policy (what `feedloop pretrain` leaves)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    target = data_dir / "default-policy"
    if not target.exists():
        shutil.copytree(checkpoint, target)
    return data_dir


def serve_argv(data_dir: Path, *extra: str) -> list[str]:
    return feedloop_command(
        "serve",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--data-dir",
        str(data_dir),
        "--registry-poll-interval-s",
        "0.05",
        "--max-queue-delay-ms",
        "1",
        *extra,
    )


def start_server(data_dir: Path, *extra: str, log_name: str = "serve.log") -> Child:
    """`feedloop serve` on free loopback ports over data_dir; returns once its banner is out."""
    return start_child(
        "feedloop serve",
        serve_argv(data_dir, *extra),
        log_path=data_dir / log_name,
        banner_prefix="feedloop serve: listening",
    )


@contextlib.contextmanager
def server_process(data_dir: Path, *extra: str, log_name: str = "serve.log") -> Iterator[Child]:
    child = start_server(data_dir, *extra, log_name=log_name)
    try:
        yield child
    finally:
        child.stop(grace_s=10.0)


def sigkill(child: Child) -> None:
    """kill -9 the child (no drain, no flush) and reap it."""
    if child.alive():
        child.process.send_signal(signal.SIGKILL)
    child.process.wait(timeout=30)


def is_serving(address: str, timeout_s: float = 5.0) -> bool:
    """True when the server at address answers its health check with SERVING."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
    except grpc.RpcError:
        return False
    return reply.status == SERVING


def wait_for(
    condition: Callable[[], Any], *, timeout_s: float = 20.0, interval_s: float = 0.02
) -> Any:
    """Poll condition() until it is truthy (returns its value); AssertionError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(interval_s)
