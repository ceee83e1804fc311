"""The model process: the server survives its death or a hang, and it never outlives the server."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from faults_procs import server_process, sigkill
from server_harness import running_server, seeded_registry, test_config, wait_until

from feedloop.client import FeedloopClient
from feedloop.core.checkpoint import load_checkpoint
from feedloop.core.policy import SampleRequest
from feedloop.core.sampling import SamplingParams
from feedloop.demo.processes import process_tree
from feedloop.server import batcher as batcher_module
from feedloop.server.errors import Unavailable
from feedloop.server.metrics import ServerMetrics
from feedloop.server.model_client import ModelProcessClient
from feedloop.v1 import feedloop_pb2 as pb
from feedloop.v1 import feedloop_pb2_grpc as pb_grpc


def alive(pid: int) -> bool:
    return bool(process_tree(pid))


async def generate_until_ok(running, prompt: str, timeout_s: float = 20.0) -> pb.GenerateResponse:
    """Generate, retrying UNAVAILABLE (what callers see while the model process restarts)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await running.generation.Generate(pb.GenerateRequest(prompt=prompt), timeout=5)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_a_killed_model_process_is_restarted_with_every_loaded_version(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    async with running_server(test_config(tmp_path), registry=registry) as running:
        await asyncio.to_thread(registry.publish, tiny_checkpoint, reason="t", make_live=True)
        await wait_until(lambda: running.server.live_version == "v0002")
        worker = running.server.model_client
        first_pid = worker.pid
        os.kill(first_pid, signal.SIGKILL)
        await wait_until(lambda: worker.pid != first_pid, timeout_s=20)
        reply = await generate_until_ok(running, "after the crash")
        assert reply.model_version == "v0002" and reply.candidates
        pinned = await running.generation.Generate(
            pb.GenerateRequest(prompt="pinned", model_version="v0001"), timeout=10
        )
        assert pinned.model_version == "v0001"  # the older loaded version came back too
        restarts = running.server.metrics.model_process_restarts._value.get()
        assert restarts == 1
        assert not alive(first_pid)


async def test_calls_in_flight_when_the_model_process_dies_fail_unavailable(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    async with running_server(test_config(tmp_path), registry=registry) as running:
        worker = running.server.model_client
        os.kill(worker.pid, signal.SIGSTOP)  # batches pile up unanswered
        calls = [
            running.generation.Generate(pb.GenerateRequest(prompt=f"p{i}"), timeout=20)
            for i in range(8)
        ]
        await wait_until(lambda: running.server.batcher._in_flight > 0)
        os.kill(worker.pid, signal.SIGKILL)
        results = await asyncio.gather(*calls, return_exceptions=True)
        codes = {r.code() for r in results if isinstance(r, grpc.aio.AioRpcError)}
        assert codes <= {grpc.StatusCode.UNAVAILABLE}
        assert codes, "the calls sent to the dead process should have failed"
        assert (await generate_until_ok(running, "healed")).candidates


async def test_a_hung_model_process_is_killed_and_replaced(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batcher_module, "STALL_TIMEOUT_S", 1.0)
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    async with running_server(test_config(tmp_path), registry=registry) as running:
        worker = running.server.model_client
        hung_pid = worker.pid
        os.kill(hung_pid, signal.SIGSTOP)  # alive, but it answers nothing
        stuck = running.generation.Generate(pb.GenerateRequest(prompt="stuck"), timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stuck
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        await wait_until(lambda: worker.pid != hung_pid, timeout_s=20)
        assert (await generate_until_ok(running, "unstuck")).candidates
        assert not alive(hung_pid)


def test_the_model_process_ends_with_a_killed_server(tmp_path: Path, tiny_checkpoint: Path) -> None:
    seeded_registry(tmp_path / "registry", tiny_checkpoint).close()
    data_dir = tmp_path / "data"
    with server_process(data_dir, "--registry", str(tmp_path / "registry")) as child:
        with FeedloopClient(child.banner["grpc"]) as client:
            assert client.generate("before").candidates
        below = process_tree(child.process.pid)[1:]
        assert below, "the server should have a model process"
        sigkill(child)
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in below) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in below)


async def test_sigterm_to_the_whole_group_still_drains_in_flight_calls(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """The model process ignores the group's SIGTERM: the server drains, then stops it."""
    seeded_registry(tmp_path / "registry", tiny_checkpoint).close()
    data_dir = tmp_path / "data"
    with server_process(data_dir, "--registry", str(tmp_path / "registry")) as child:
        channel = grpc.aio.insecure_channel(child.banner["grpc"])
        generation = pb_grpc.GenerationStub(channel)
        calls = [
            generation.Generate(
                pb.GenerateRequest(prompt=f"drain {i}", num_candidates=4), timeout=20
            )
            for i in range(32)
        ]
        await asyncio.sleep(0.01)
        os.killpg(child.process.pid, signal.SIGTERM)
        results = await asyncio.gather(*calls, return_exceptions=True)
        await channel.close()
        assert child.process.wait(timeout=30) == 0
    answered = [r for r in results if isinstance(r, pb.GenerateResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    # Calls the server had taken are answered. Calls gRPC had not handed to it yet when the
    # drain began are refused by gRPC itself (UNAVAILABLE or CANCELLED); none fails because
    # the model process went away under the server.
    assert answered
    assert {r.code() for r in refused} <= {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
    }
    assert not [r for r in refused if "model process" in (r.details() or "")]
    assert "model process exited" not in (data_dir / "serve.log").read_text()


def test_scores_are_the_policys_own_and_wait_for_the_samples_sent_beside_them(
    tiny_checkpoint: Path,
) -> None:
    policy = load_checkpoint(tiny_checkpoint)[0]
    prompt = policy.encode_prompt("ocean")
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=3)
    samples = policy.sample([SampleRequest(prompt, params, 3)])[0]
    outputs = [s.token_ids for s in samples]
    client = ModelProcessClient(ServerMetrics(), torch_threads=1)
    client.start()
    try:
        client.load("v0001", tiny_checkpoint)
        os.kill(client.pid, signal.SIGSTOP)  # all three calls wait in the pipe together
        calls = {
            "score 1": client.score("v0001", [prompt] * 3, outputs, [params] * 3),
            "score 2": client.score("v0001", [prompt] * 3, outputs, [params] * 3),
            "sample": client.sample("v0001", [SampleRequest(prompt, params, 1)]),
        }
        answered: list[str] = []
        for name, future in calls.items():
            future.add_done_callback(lambda _, name=name: answered.append(name))
        os.kill(client.pid, signal.SIGCONT)
        logprobs, _ = calls["score 2"].result(20)
        assert answered == ["sample", "score 1", "score 2"]
        expected = policy.score([prompt] * 3, outputs, [params] * 3)
        for scored, own, sample in zip(logprobs, expected, samples, strict=True):
            assert scored == pytest.approx(own, abs=1e-5)
            assert scored == pytest.approx(sample.behaviour_logprobs, abs=1e-5)
        with pytest.raises(Unavailable, match="v0009"):
            client.score("v0009", [prompt], outputs[:1], [params]).result(20)
    finally:
        client.stop()
