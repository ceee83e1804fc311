"""`feedloop serve` as a real process: banner, seeding, SIGTERM drain, and kill -9 durability."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from server_harness import (
    BANNER_RE,
    rating,
    seeded_data_dir,
    serve_args,
    serve_process,
    start_serve,
)

from feedloop.core.registry import DirectoryRegistry
from feedloop.core.store import open_store
from feedloop.v1 import feedloop_pb2 as pb
from feedloop.v1 import feedloop_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow


def test_empty_registry_without_a_default_checkpoint_fails_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "feedloop.server.cli", *serve_args(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    message = [line for line in result.stderr.splitlines() if line.startswith("feedloop serve:")]
    assert len(message) == 1 and "feedloop pretrain" in message[0]


def test_serve_seeds_an_empty_registry_prints_the_banner_and_drains_on_sigterm(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    seeded_data_dir(tmp_path, tiny_checkpoint)
    proc = start_serve(serve_args(tmp_path))
    try:
        assert BANNER_RE.match(
            f"feedloop serve: listening grpc={proc.grpc_address} metrics={proc.metrics_address} "
            f"live={proc.live} auth={proc.auth}"
        )
        assert proc.live == "v0001" and proc.auth == "off"
        assert proc.grpc_address.startswith("127.0.0.1:")
        with grpc.insecure_channel(proc.grpc_address) as channel:
            generation = pb_grpc.GenerationStub(channel)
            replies = [
                generation.Generate(
                    pb.GenerateRequest(prompt=f"p {i}", num_candidates=2), timeout=20
                )
                for i in range(20)
            ]
        assert {r.model_version for r in replies} == {"v0001"}
        assert proc.terminate() == 0
        _, stderr = proc.process.communicate(timeout=10)
        assert "auth is off" in stderr
    finally:
        proc.kill()
    # Every served generation was flushed to the store before the process exited.
    store = open_store(str(tmp_path / "replay.sqlite3"))
    ids = [c.generation_id for r in replies for c in r.candidates]
    assert set(store.get_generations(ids)) == set(ids)
    store.close()
    assert DirectoryRegistry(tmp_path / "registry").live() == "v0001"


def test_acknowledged_feedback_survives_sigkill_and_restart(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    seeded_data_dir(tmp_path, tiny_checkpoint)
    acked: list[str] = []
    with (
        serve_process(serve_args(tmp_path)) as proc,
        grpc.insecure_channel(proc.grpc_address) as channel,
    ):
        generation = pb_grpc.GenerationStub(channel)
        feedback = pb_grpc.FeedbackStub(channel)
        ids = [
            c.generation_id
            for i in range(10)
            for c in generation.Generate(
                pb.GenerateRequest(prompt=f"k {i}", num_candidates=4), timeout=20
            ).candidates
        ]
        for i in range(50):
            ack = feedback.Submit(rating(f"unary-{i}", ids[i % len(ids)], 1.0), timeout=20)
            acked.append(ack.event_id)
        events = (rating(f"stream-{i}", ids[i % len(ids)], 0.0) for i in range(500))
        stream = feedback.SubmitStream(events, timeout=60)
        for ack in stream:
            acked.append(ack.event_id)
            if len(acked) >= 400:
                break  # the last acks read; the process dies with more in flight
        proc.process.send_signal(signal.SIGKILL)
        proc.process.wait(timeout=20)
        stream.cancel()

    store = open_store(str(tmp_path / "replay.sqlite3"))
    stored = {f.event_id for f in store.feedback_after(0, 100_000)}
    store.close()
    assert set(acked) <= stored

    # Restarted on the same store, retries of acknowledged events are duplicates.
    with (
        serve_process(serve_args(tmp_path)) as proc,
        grpc.insecure_channel(proc.grpc_address) as channel,
    ):
        feedback = pb_grpc.FeedbackStub(channel)
        # A retry resends the same event (the same id with another body is ALREADY_EXISTS).
        sent = {f"unary-{i}": (ids[i % len(ids)], 1.0) for i in range(50)}
        sent.update({f"stream-{i}": (ids[i % len(ids)], 0.0) for i in range(500)})
        for event_id in (acked[0], acked[-1]):
            ack = feedback.Submit(rating(event_id, *sent[event_id]), timeout=20)
            assert ack.outcome == pb.FEEDBACK_OUTCOME_DUPLICATE
