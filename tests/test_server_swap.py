"""Hot swap and ModelAdmin: lossless swaps under load, refused checkpoints, pins, rollback."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from server_harness import running_server, seeded_registry, test_config, wait_until

from feedloop.core.checkpoint import WEIGHTS
from feedloop.v1 import feedloop_pb2 as pb


@pytest.fixture
async def live(tmp_path: Path, tiny_checkpoint: Path):
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    async with running_server(test_config(tmp_path, keep_versions=2), registry=registry) as r:
        yield r


async def test_swap_under_concurrent_load_fails_no_request_and_each_reply_names_one_version(
    live, tiny_checkpoint: Path
) -> None:
    registry = live.server.registry
    versions_seen: list[str] = []
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async def client(i: int) -> None:
        while not stop.is_set():
            try:
                reply = await live.generation.Generate(
                    pb.GenerateRequest(prompt=f"load {i}", num_candidates=2), timeout=10
                )
            except grpc.aio.AioRpcError as exc:
                failures.append(exc)
                continue
            versions_seen.append(reply.model_version)
            # Every candidate of a reply was logged under the version the reply names.
            assert len(reply.candidates) == 2

    clients = [asyncio.ensure_future(client(i)) for i in range(32)]
    await wait_until(lambda: len(versions_seen) >= 50)
    await asyncio.to_thread(registry.publish, tiny_checkpoint, reason="test", make_live=True)
    await wait_until(lambda: versions_seen[-40:].count("v0002") == 40, timeout_s=20)
    stop.set()
    await asyncio.gather(*clients)
    assert failures == []
    assert set(versions_seen) == {"v0001", "v0002"}
    switched_at = versions_seen.index("v0002")
    assert versions_seen[switched_at:].count("v0001") <= 32  # only replies already in flight
    status = await live.admin.GetStatus(pb.GetStatusRequest(), timeout=10)
    assert status.live_version == "v0002" and status.swaps_succeeded == 2
    assert list(status.loaded_versions) == ["v0001", "v0002"]
    await wait_until(lambda: live.server.generation_log.depth == 0)
    logged = live.store.generations_after(0, 100_000)
    assert {g.model_version for g in logged} == {"v0001", "v0002"}
    assert len(logged) == 2 * len(versions_seen)


async def test_corrupt_checkpoint_is_refused_recorded_and_the_old_version_keeps_serving(
    live, tiny_checkpoint: Path
) -> None:
    registry = live.server.registry
    version = await asyncio.to_thread(registry.publish, tiny_checkpoint, reason="to be damaged")
    weights = registry.checkpoint_dir(version) / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\xff" * 8  # flips weights after publication: the checksum no longer matches
    weights.write_bytes(bytes(data))
    await asyncio.to_thread(registry.set_live, version, reason="test")

    await wait_until(lambda: live.server.metrics.tallies.swaps_refused == 1)
    reply = await live.generation.Generate(pb.GenerateRequest(prompt="still ok"), timeout=10)
    assert reply.model_version == "v0001"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await live.generation.Generate(
            pb.GenerateRequest(prompt="pinned", model_version=version), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    refused = [d for d in registry.history() if d.action == "refused"]
    assert refused and refused[0].version == version and "sha256" in refused[0].reason
    models = await live.admin.ListModels(pb.ListModelsRequest(), timeout=10)
    assert any(d.action == "refused" and d.version == version for d in models.decisions)
    status = await live.admin.GetStatus(pb.GetStatusRequest(), timeout=10)
    assert status.live_version == "v0001" and status.swaps_refused == 1


async def test_pinned_previous_version_is_served_after_a_swap_until_evicted(
    live, tiny_checkpoint: Path
) -> None:
    registry = live.server.registry
    for expected in ("v0002", "v0003"):
        await asyncio.to_thread(registry.publish, tiny_checkpoint, make_live=True)
        await wait_until(lambda v=expected: live.server.live_version == v)
        if expected == "v0002":
            pinned = await live.generation.Generate(
                pb.GenerateRequest(prompt="old", model_version="v0001"), timeout=10
            )
            assert pinned.model_version == "v0001"
    # keep_versions=2: v0001 has been evicted, v0002 is still held.
    reply = await live.generation.Generate(
        pb.GenerateRequest(prompt="old", model_version="v0002"), timeout=10
    )
    assert reply.model_version == "v0002"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await live.generation.Generate(
            pb.GenerateRequest(prompt="old", model_version="v0001"), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_admin_lists_sets_live_and_rolls_back(live, tiny_checkpoint: Path) -> None:
    registry = live.server.registry
    await asyncio.to_thread(registry.publish, tiny_checkpoint, reason="candidate")
    models = await live.admin.ListModels(pb.ListModelsRequest(max_decisions=10), timeout=10)
    assert [v.version for v in models.versions] == ["v0002", "v0001"]
    assert models.live_version == "v0001" and models.versions[1].live
    assert models.versions[0].architecture == "gru-seq2seq"
    assert models.versions[0].parameter_count > 0
    json.loads(models.versions[0].summary_json)
    assert models.decisions[0].action == "published" and models.decisions[0].version == "v0002"

    changed = await live.admin.SetLive(pb.SetLiveRequest(version="v0002", reason="go"), timeout=10)
    assert (changed.live_version, changed.previous_version) == ("v0002", "v0001")
    await wait_until(lambda: live.server.live_version == "v0002")

    back = await live.admin.Rollback(pb.RollbackRequest(reason="regret"), timeout=10)
    assert (back.live_version, back.previous_version) == ("v0001", "v0002")
    await wait_until(lambda: live.server.live_version == "v0001")
    history = await live.admin.ListModels(pb.ListModelsRequest(), timeout=10)
    assert history.decisions[0].action == "rolled_back"
    assert history.decisions[0].reason == "regret"


async def test_admin_errors_map_to_clear_codes(live) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await live.admin.SetLive(pb.SetLiveRequest(version="v0042"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "v0042" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await live.admin.SetLive(pb.SetLiveRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("version")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await live.admin.Rollback(pb.RollbackRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "roll back" in err.value.details()


@pytest.mark.postgres
async def test_publication_on_a_postgresql_registry_is_swapped_in_while_serving(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    from pg_support import fresh_schema, schema_url

    from feedloop.core.registry.postgres import PostgresRegistry

    with fresh_schema("srvreg") as schema:
        url = schema_url(schema)
        publisher = PostgresRegistry(url, cache_dir=tmp_path / "publisher-cache")
        try:
            publisher.publish(tiny_checkpoint, reason="seed", make_live=True)
            # A fallback poll far longer than the wait below: LISTEN/NOTIFY (or the watch loop)
            # must bring the new version in.
            config = test_config(tmp_path, registry=url, registry_poll_interval_s=30.0)
            async with running_server(config) as running:
                assert running.server.live_version == "v0001"
                await asyncio.to_thread(publisher.publish, tiny_checkpoint, make_live=True)
                await wait_until(lambda: running.server.live_version == "v0002", timeout_s=5)
                reply = await running.generation.Generate(
                    pb.GenerateRequest(prompt="notified"), timeout=10
                )
                assert reply.model_version == "v0002"
        finally:
            publisher.close()


async def test_a_server_starting_on_a_bad_live_version_serves_the_last_good_one(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    bad = registry.publish(tiny_checkpoint, reason="to be damaged")
    weights = registry.checkpoint_dir(bad) / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-8] + b"\xff" * 8)
    registry.set_live(bad, reason="test")
    async with running_server(test_config(tmp_path), registry=registry) as running:
        reply = await running.generation.Generate(pb.GenerateRequest(prompt="ok"), timeout=10)
        assert reply.model_version == "v0001"
        assert running.server.metrics.tallies.swaps_refused == 1
    assert [d.version for d in registry.history() if d.action == "refused"] == [bad]
