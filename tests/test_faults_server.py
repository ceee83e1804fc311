"""Fault matrix, server side: crashes, damaged checkpoints, misbehaving clients.

Each test breaks something for real and then asserts what survived:
- SIGKILL of `feedloop serve` while several clients stream feedback: after a restart every
  acknowledged event is stored exactly once, and retries with the same event_id are DUPLICATE;
- a damaged checkpoint made live (every way tests/faults_checkpoints.py knows): refused, counted
  in /metrics, the live version keeps serving, and a good version still goes live after it;
- a client that never reads its acks, one that floods past the rate limit, and 1,500 idle
  connections: everyone else keeps being served, and the connections' descriptors are released.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from faults_checkpoints import DAMAGES
from faults_procs import (
    is_serving,
    seeded_data_dir,
    server_process,
    sigkill,
    start_server,
    wait_for,
)
from server_harness import rating, running_server, seeded_registry, test_config, wait_until

from feedloop.core.registry import DirectoryRegistry
from feedloop.core.store import open_store
from feedloop.server.auth import hash_key
from feedloop.v1 import feedloop_pb2 as pb
from feedloop.v1 import feedloop_pb2_grpc as pb_grpc

CALL_TIMEOUT_S = 20.0
ACCEPTED, DUPLICATE = pb.FEEDBACK_OUTCOME_ACCEPTED, pb.FEEDBACK_OUTCOME_DUPLICATE


def generation_ids(channel: grpc.Channel, requests: int = 4, n: int = 4) -> list[str]:
    generation = pb_grpc.GenerationStub(channel)
    return [
        c.generation_id
        for i in range(requests)
        for c in generation.Generate(
            pb.GenerateRequest(prompt=f"crash {i}", num_candidates=n), timeout=CALL_TIMEOUT_S
        ).candidates
    ]


# -- SIGKILL under streaming feedback --------------------------------------------------------------


class StreamingClient(threading.Thread):
    """Streams `count` rating events until the server dies; remembers which were acked."""

    def __init__(self, address: str, name: str, ids: list[str], count: int) -> None:
        super().__init__(name=name, daemon=True)
        self.address = address
        self.events = [rating(f"{name}-{i}", ids[i % len(ids)], i % 2) for i in range(count)]
        self.acked: list[str] = []
        self.error: grpc.StatusCode | None = None

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stream = pb_grpc.FeedbackStub(channel).SubmitStream(
                iter(self.events), timeout=CALL_TIMEOUT_S * 3
            )
            try:
                for ack in stream:
                    assert ack.outcome == ACCEPTED
                    self.acked.append(ack.event_id)
            except grpc.RpcError as exc:
                self.error = exc.code()


@pytest.mark.slow
def test_acked_feedback_survives_sigkill_mid_stream_exactly_once_and_retries_are_duplicates(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    data_dir = seeded_data_dir(tmp_path, tiny_checkpoint)
    child = start_server(data_dir)
    try:
        with grpc.insecure_channel(child.banner["grpc"]) as channel:
            ids = generation_ids(channel)
        clients = [StreamingClient(child.banner["grpc"], f"c{k}", ids, 20_000) for k in range(4)]
        for client in clients:
            client.start()
        # Kill while every stream is mid-flight, with acks still coming.
        wait_for(lambda: all(len(c.acked) >= 200 for c in clients), timeout_s=60)
        sigkill(child)
        for client in clients:
            client.join(timeout=60)
            assert client.error is not None, "a stream finished before the kill: make it longer"
    finally:
        child.stop()

    acked = [event_id for c in clients for event_id in c.acked]
    store = open_store(str(data_dir / "replay.sqlite3"))
    try:
        stored = [f.event_id for f in store.feedback_after(0, 1_000_000)]
    finally:
        store.close()
    assert len(stored) == len(set(stored)), "an event is stored twice"
    assert set(acked) <= set(stored), f"{len(set(acked) - set(stored))} acked events lost"

    # Restarted on the same data, every client resends everything it meant to send.
    with (
        server_process(data_dir, log_name="serve-2.log") as child,
        grpc.insecure_channel(child.banner["grpc"]) as channel,
    ):
        feedback = pb_grpc.FeedbackStub(channel)
        for client in clients:
            acks = list(feedback.SubmitStream(iter(client.events), timeout=CALL_TIMEOUT_S * 6))
            outcomes = {a.event_id: a.outcome for a in acks}
            assert len(acks) == len(client.events)
            assert all(outcomes[event_id] == DUPLICATE for event_id in client.acked)
            assert set(outcomes.values()) <= {ACCEPTED, DUPLICATE}
    store = open_store(str(data_dir / "replay.sqlite3"))
    try:
        stored = [f.event_id for f in store.feedback_after(0, 1_000_000)]
    finally:
        store.close()
    sent = {e.event_id for c in clients for e in c.events}
    assert len(stored) == len(set(stored)) == len(sent)
    assert set(stored) == sent


# -- damaged checkpoints -----------------------------------------------------------------------


@pytest.fixture
async def live(tmp_path: Path, tiny_checkpoint: Path):
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    async with running_server(test_config(tmp_path), registry=registry) as running:
        yield running


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


@pytest.mark.parametrize("damage", list(DAMAGES))
async def test_a_damaged_checkpoint_made_live_is_refused_counted_and_the_live_one_serves(
    live, tiny_checkpoint: Path, damage: str
) -> None:
    registry = live.server.registry
    bad = await asyncio.to_thread(registry.publish, tiny_checkpoint, reason=f"to get {damage}")
    DAMAGES[damage](registry.checkpoint_dir(bad))
    await asyncio.to_thread(registry.set_live, bad, reason="fault matrix")

    await wait_until(lambda: live.server.metrics.tallies.swaps_refused == 1)
    reply = await live.generation.Generate(
        pb.GenerateRequest(prompt="still serving", num_candidates=2), timeout=CALL_TIMEOUT_S
    )
    assert reply.model_version == "v0001" and len(reply.candidates) == 2
    text = await asyncio.to_thread(scrape, live.server.metrics_port)
    assert 'feedloop_model_swaps_total{result="refused"} 1.0' in text
    assert 'feedloop_live_model_info{version="v0001"} 1.0' in text
    refusals = [d for d in registry.history() if d.action == "refused" and d.version == bad]
    assert refusals, "the refusal is recorded in the registry history"

    # The server is not stuck on the bad version: the next good one goes live.
    good = await asyncio.to_thread(registry.publish, tiny_checkpoint, make_live=True)
    await wait_until(lambda: live.server.live_version == good)
    reply = await live.generation.Generate(pb.GenerateRequest(prompt="next"), timeout=10)
    assert reply.model_version == good


async def test_a_garbled_live_pointer_keeps_the_live_version_serving_until_it_is_fixed(
    live, tiny_checkpoint: Path
) -> None:
    registry = live.server.registry
    pointer = registry.root / "LIVE"
    good = pointer.read_text()
    pointer.write_text('{"live": "v00')  # torn by a crash of some tool that ignored the lock
    for i in range(5):
        reply = await live.generation.Generate(pb.GenerateRequest(prompt=f"p{i}"), timeout=10)
        assert reply.model_version == "v0001"
    status = await live.admin.GetStatus(pb.GetStatusRequest(), timeout=10)
    assert status.live_version == "v0001"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await live.admin.ListModels(pb.ListModelsRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "LIVE" in err.value.details()

    pointer.write_text(good)
    version = await asyncio.to_thread(registry.publish, tiny_checkpoint, make_live=True)
    await wait_until(lambda: live.server.live_version == version)


@pytest.mark.slow
def test_a_restarted_server_serves_the_last_good_version_when_the_live_one_is_bad(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """Found here: the restarted server exited with 'cannot load the live model'."""
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    bad = registry.publish(tiny_checkpoint, reason="to be damaged")
    DAMAGES["nan-weights"](registry.checkpoint_dir(bad))
    registry.set_live(bad, reason="fault matrix")
    data_dir = seeded_data_dir(tmp_path, tiny_checkpoint)
    assert isinstance(registry, DirectoryRegistry)
    with (
        server_process(data_dir, "--registry", str(registry.root)) as child,
        grpc.insecure_channel(child.banner["grpc"]) as channel,
    ):
        reply = pb_grpc.GenerationStub(channel).Generate(
            pb.GenerateRequest(prompt="after restart"), timeout=CALL_TIMEOUT_S
        )
        assert reply.model_version == "v0001"


# -- misbehaving clients -----------------------------------------------------------------------


def serve_others_ok(address: str, rounds: int = 10, metadata: tuple = ()) -> None:
    """A well-behaved client: generate, then rate each reply; every call must succeed."""
    with grpc.insecure_channel(address) as channel:
        generation = pb_grpc.GenerationStub(channel)
        feedback = pb_grpc.FeedbackStub(channel)
        for i in range(rounds):
            reply = generation.Generate(
                pb.GenerateRequest(prompt=f"polite {i}"), metadata=metadata, timeout=10
            )
            gid = reply.candidates[0].generation_id
            ack = feedback.Submit(rating(f"polite-{gid}", gid), metadata=metadata, timeout=10)
            assert ack.outcome == ACCEPTED


@pytest.fixture
def server(tmp_path: Path, tiny_checkpoint: Path) -> Iterator:
    with server_process(seeded_data_dir(tmp_path, tiny_checkpoint)) as child:
        yield child


@pytest.mark.slow
def test_a_stream_that_never_reads_its_acks_is_held_back_and_others_are_served(server) -> None:
    address = server.banner["grpc"]
    with grpc.insecure_channel(address) as channel:
        (gid,) = generation_ids(channel, requests=1, n=1)
    pulled = 0

    def endless() -> Iterator[pb.FeedbackEvent]:
        nonlocal pulled
        # The same (longest) id: every ack after the first is a DUPLICATE, and big.
        event = rating("never-read-".ljust(128, "x"), gid)
        while True:
            pulled += 1
            yield event

    rude_channel = grpc.insecure_channel(address)
    rude = pb_grpc.FeedbackStub(rude_channel).SubmitStream(endless(), timeout=120)
    try:
        # Flow control: once the unread acks fill the windows, the server stops reading.
        last = [-1]

        def plateaued() -> bool:
            settled = pulled == last[0] and pulled > 0
            last[0] = pulled
            return settled

        wait_for(plateaued, timeout_s=60, interval_s=1.0)
        print(f"events pulled before the server stopped reading: {pulled}")
        assert pulled < 1_000_000
        serve_others_ok(address)
        assert is_serving(address)
    finally:
        rude.cancel()
        rude_channel.close()
    serve_others_ok(address, rounds=2)


KEYS_TOML = f"""
[[keys]]
name = "flood"
sha256 = "{hash_key("flood-key")}"
roles = ["generate", "feedback"]

[[keys]]
name = "polite"
sha256 = "{hash_key("polite-key")}"
roles = ["generate", "feedback"]
"""


@pytest.mark.slow
def test_a_client_flooding_past_its_rate_limit_is_refused_and_other_keys_are_served(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    data_dir = seeded_data_dir(tmp_path, tiny_checkpoint)
    (data_dir / "keys.toml").write_text(KEYS_TOML)
    args = ("--auth-keys-file", str(data_dir / "keys.toml"))
    with server_process(data_dir, *args, "--rate-limit-rps", "20", "--rate-limit-burst", "20") as s:
        address = s.banner["grpc"]
        flood_md = (("authorization", "Bearer flood-key"),)
        codes: list[grpc.StatusCode] = []
        stop = threading.Event()

        def flood() -> None:
            with grpc.insecure_channel(address) as channel:
                generation = pb_grpc.GenerationStub(channel)
                while not stop.is_set():
                    try:
                        generation.Generate(
                            pb.GenerateRequest(prompt="flood"), metadata=flood_md, timeout=10
                        )
                        codes.append(grpc.StatusCode.OK)
                    except grpc.RpcError as exc:
                        codes.append(exc.code())

        flooders = [threading.Thread(target=flood, daemon=True) for _ in range(4)]
        for thread in flooders:
            thread.start()
        try:
            wait_for(lambda: codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 200)
            # The polite key has its own bucket: 10 rounds of 2 calls stay within its burst.
            serve_others_ok(address, metadata=(("authorization", "Bearer polite-key"),))
        finally:
            stop.set()
            for thread in flooders:
                thread.join(timeout=30)
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert is_serving(address)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.slow
def test_fifteen_hundred_idle_connections_do_not_stop_others_and_are_released(server) -> None:
    address = server.banner["grpc"]
    host, port = address.rsplit(":", 1)
    serve_others_ok(address, rounds=1)
    fds_before = open_fds(server.pid)
    idle: list[socket.socket] = []
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    try:
        for i in range(1500):
            sock = socket.create_connection((host, int(port)), timeout=10)
            if i % 2:  # half of them get as far as the HTTP/2 preface, then go quiet
                sock.sendall(preface)
            idle.append(sock)
        wait_for(lambda: open_fds(server.pid) >= fds_before + 1400, timeout_s=60)
        serve_others_ok(address)
        assert is_serving(address)
    finally:
        for sock in idle:
            sock.close()
    wait_for(lambda: open_fds(server.pid) <= fds_before + 20, timeout_s=60)
    serve_others_ok(address, rounds=2)
