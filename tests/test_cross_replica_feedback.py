"""Two replicas share one PostgreSQL replay store: feedback that reaches one replica before the
other has committed the generation it names is not lost, and the client need not retry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
from pg_support import fresh_schema, schema_url
from server_harness import Running, running_server, seeded_registry, test_config

from feedloop.client import AsyncFeedloopClient, FeedloopClientError, RetryPolicy
from feedloop.core.store import open_store
from feedloop.core.store.base import GenerationRecord
from feedloop.v1 import feedloop_pb2 as pb

pytestmark = pytest.mark.postgres

WAIT_MS = 1500.0  # the replicas' unknown_generation_wait_ms


class HeldGenerationLog:
    """Replica A's store, whose generation commits wait until the test opens the gate: the
    window in which A has answered Generate and B cannot see the generations yet."""

    def __init__(self, location: str, loop: asyncio.AbstractEventLoop) -> None:
        self.inner = open_store(location)
        self.gate = asyncio.Event()
        self.loop = loop

    def append_generations(self, records: Sequence[GenerationRecord]) -> None:
        asyncio.run_coroutine_threadsafe(self.gate.wait(), self.loop).result()
        self.inner.append_generations(records)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)


@pytest.fixture
async def replicas(
    tmp_path: Path, tiny_checkpoint: Path
) -> AsyncIterator[tuple[Running, Running, HeldGenerationLog]]:
    with fresh_schema("xr") as schema:
        url = schema_url(schema)
        held = HeldGenerationLog(url, asyncio.get_running_loop())
        configs, registries = [], []
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            registries.append(seeded_registry(tmp_path / name / "registry", tiny_checkpoint))
            configs.append(
                test_config(tmp_path / name, store=url, unknown_generation_wait_ms=WAIT_MS)
            )
        try:
            async with (
                running_server(configs[0], registry=registries[0], store=held) as a,
                running_server(configs[1], registry=registries[1]) as b,
            ):
                yield a, b, held
        finally:
            held.gate.set()  # let replica A's log drain so that it stops
            held.inner.close()


def without_retries(replica: Running) -> AsyncFeedloopClient:
    return AsyncFeedloopClient(
        f"127.0.0.1:{replica.server.grpc_port}", retry=RetryPolicy(max_attempts=1), timeout_s=10
    )


async def test_feedback_arriving_before_the_other_replica_commits_is_accepted(
    replicas: tuple[Running, Running, HeldGenerationLog],
) -> None:
    a, b, held = replicas
    reply = await a.generation.Generate(pb.GenerateRequest(prompt="green hills"), timeout=10)
    gid = reply.candidates[0].generation_id
    assert gid not in b.store.get_generations([gid])  # B cannot see it yet
    async with without_retries(b) as client:
        rated = asyncio.ensure_future(client.rate(gid, 1.0, scale="thumbs", event_id="early"))
        await asyncio.sleep(0.5)
        assert not rated.done()  # waiting for the generation, not NOT_FOUND
        held.gate.set()  # replica A commits the generation now
        result = await asyncio.wait_for(rated, timeout=WAIT_MS / 1000)
    assert result.outcome == "accepted"
    assert [f.event_id for f in b.store.feedback_for([gid])] == ["early"]


async def test_an_id_no_replica_served_is_not_found_after_the_wait(
    replicas: tuple[Running, Running, HeldGenerationLog],
) -> None:
    _, b, _ = replicas
    async with without_retries(b) as client:
        started = time.monotonic()
        with pytest.raises(FeedloopClientError) as err:
            await client.rate("never-served", 1.0, scale="thumbs", event_id="lost")
        waited_s = time.monotonic() - started
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert "never-served" in str(err.value)
    assert WAIT_MS / 1000 <= waited_s < WAIT_MS / 1000 + 1.5
    assert b.store.feedback_for(["never-served"]) == []
