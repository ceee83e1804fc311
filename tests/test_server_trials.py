"""Trials through ModelAdmin and canary traffic through Generate, on an in-process server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from server_harness import running_server, seeded_registry, test_config, wait_until

from feedloop.core.registry import LivePointer
from feedloop.v1 import feedloop_pb2 as pb


def watched(live) -> LivePointer:
    """The registry's pointer as the server's watcher last read it."""
    return live.server.live_model.pointer or LivePointer(None)


@pytest.fixture
async def live(tmp_path: Path, tiny_checkpoint: Path):
    """v0001 live, v0002 and v0003 published."""
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    registry.publish(tiny_checkpoint, reason="candidate")
    registry.publish(tiny_checkpoint, reason="another candidate")
    async with running_server(test_config(tmp_path), registry=registry) as r:
        yield r


async def test_admin_starts_a_canary_lists_it_and_promotes_it(live) -> None:
    state = await live.admin.StartTrial(
        pb.StartTrialRequest(
            version="v0002", share=0.25, reason="round 4", expected_live_version="v0001"
        ),
        timeout=10,
    )
    assert state.live_version == "v0001" and not state.trainer_paused
    assert (state.trial.version, state.trial.mode, state.trial.share) == (
        "v0002",
        pb.TRIAL_MODE_CANARY,
        0.25,
    )
    assert state.trial.parent_version == "v0001" and state.trial.since.seconds > 0
    models = await live.admin.ListModels(pb.ListModelsRequest(), timeout=10)
    assert models.trial.version == "v0002"
    assert (models.decisions[0].action, models.decisions[0].reason) == ("canary", "round 4")
    seen = await wait_until(lambda: watched(live).trial)
    assert seen.version == "v0002"
    reply = await live.admin.GetStatus(pb.GetStatusRequest(), timeout=10)
    assert reply.trial.version == "v0002" and reply.trial.mode == pb.TRIAL_MODE_CANARY

    promoted = await live.admin.EndTrial(
        pb.EndTrialRequest(promote=True, expected_trial_version="v0002"), timeout=10
    )
    assert promoted.live_version == "v0002" and not promoted.HasField("trial")
    await wait_until(lambda: live.server.live_version == "v0002")


async def test_admin_shadow_rollback_and_trainer_pause(live) -> None:
    state = await live.admin.StartTrial(
        pb.StartTrialRequest(version="v0003", mode=pb.TRIAL_MODE_SHADOW, share=0.5), timeout=10
    )
    assert state.trial.mode == pb.TRIAL_MODE_SHADOW
    ended = await live.admin.EndTrial(pb.EndTrialRequest(promote=False), timeout=10)
    assert ended.live_version == "v0001" and not ended.HasField("trial")
    paused = await live.admin.SetTrainerPaused(
        pb.SetTrainerPausedRequest(paused=True, reason="incident"), timeout=10
    )
    assert paused.trainer_paused
    models = await live.admin.ListModels(pb.ListModelsRequest(), timeout=10)
    assert models.trainer_paused and models.decisions[0].action == "paused"
    await wait_until(lambda: watched(live).paused)
    status = await live.admin.GetStatus(pb.GetStatusRequest(), timeout=10)
    assert status.trainer_paused
    resumed = await live.admin.SetTrainerPaused(pb.SetTrainerPausedRequest(), timeout=10)
    assert not resumed.trainer_paused


@pytest.mark.parametrize(
    ("request_", "code", "fragment"),
    [
        (pb.StartTrialRequest(version="v0002", share=1.5), "INVALID_ARGUMENT", "share"),
        (pb.StartTrialRequest(version="v0002", share=-0.5), "INVALID_ARGUMENT", "share"),
        (pb.StartTrialRequest(version="v0002", share=float("nan")), "INVALID_ARGUMENT", "share"),
        (pb.StartTrialRequest(share=0.1), "INVALID_ARGUMENT", "version"),
        (pb.StartTrialRequest(version="v0002", mode=7, share=0.1), "INVALID_ARGUMENT", "mode"),  # type: ignore[arg-type]
        (pb.StartTrialRequest(version="v0042", share=0.1), "NOT_FOUND", "v0042"),
        (pb.StartTrialRequest(version="v0001", share=0.1), "FAILED_PRECONDITION", "live"),
        (
            pb.StartTrialRequest(version="v0002", share=0.1, expected_live_version="v0003"),
            "ABORTED",
            "v0003",
        ),
        (pb.EndTrialRequest(promote=True), "FAILED_PRECONDITION", "no trial"),
        (pb.SetLiveRequest(version="v0002", expected_live_version="v0003"), "ABORTED", "v0003"),
    ],
)
async def test_refused_admin_calls_change_nothing(live, request_, code: str, fragment: str) -> None:
    registry = live.server.registry
    before, history = registry.pointer(), registry.history()
    method = {
        pb.StartTrialRequest: live.admin.StartTrial,
        pb.EndTrialRequest: live.admin.EndTrial,
        pb.SetLiveRequest: live.admin.SetLive,
    }[type(request_)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await method(request_, timeout=10)
    assert err.value.code().name == code and fragment in (err.value.details() or "")
    assert registry.pointer() == before and registry.history() == history


async def test_a_second_trial_is_refused_and_changes_nothing(live) -> None:
    await live.admin.StartTrial(pb.StartTrialRequest(version="v0002", share=0.1), timeout=10)
    registry = live.server.registry
    before, history = registry.pointer(), registry.history()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await live.admin.StartTrial(pb.StartTrialRequest(version="v0003", share=0.1), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already on trial" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await live.admin.EndTrial(
            pb.EndTrialRequest(promote=True, expected_trial_version="v0003"), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert registry.pointer() == before and registry.history() == history


async def start_canary(live, version: str, share: float) -> None:
    await live.admin.StartTrial(pb.StartTrialRequest(version=version, share=share), timeout=10)
    await wait_until(lambda: live.server.live_model.canary, timeout_s=20)


async def generate_many(live, count: int, **fields) -> list[pb.GenerateResponse]:
    async def one(i: int) -> pb.GenerateResponse:
        request = pb.GenerateRequest(prompt=f"canary {i % 7}", **fields)
        return await live.generation.Generate(request, timeout=20)

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def test_a_canary_serves_its_share_and_each_reply_says_why(live) -> None:
    await start_canary(live, "v0002", 0.3)
    replies = await generate_many(live, 400)
    sides = {(r.model_version, r.served_as) for r in replies}
    assert sides == {("v0001", "live"), ("v0002", "canary")}
    share = sum(r.served_as == "canary" for r in replies) / len(replies)
    assert 0.2 < share < 0.4  # binomial sd 0.023 at n=400: 4 sd each way


async def test_the_same_routing_key_lands_on_the_same_side(live) -> None:
    await start_canary(live, "v0002", 0.5)
    sides: dict[str, set[str]] = {}
    for round_ in range(3):
        keys = [f"user-{i}" for i in range(40)]
        replies = await asyncio.gather(
            *(
                live.generation.Generate(
                    pb.GenerateRequest(prompt=f"round {round_}", routing_key=key), timeout=20
                )
                for key in keys
            )
        )
        for key, reply in zip(keys, replies, strict=True):
            sides.setdefault(key, set()).add(reply.served_as)
    assert all(len(seen) == 1 for seen in sides.values())  # sticky
    assert {side for (side,) in sides.values()} == {"live", "canary"}  # and both sides used


async def test_records_carry_why_each_version_served(live) -> None:
    await start_canary(live, "v0002", 1.0)
    canary = await live.generation.Generate(pb.GenerateRequest(prompt="to canary"), timeout=10)
    pinned = await live.generation.Generate(
        pb.GenerateRequest(prompt="pinned", model_version="v0002"), timeout=10
    )
    await live.admin.EndTrial(pb.EndTrialRequest(promote=False), timeout=10)
    await wait_until(lambda: live.server.live_model.canary is None)
    plain = await live.generation.Generate(pb.GenerateRequest(prompt="to live"), timeout=10)
    assert [(r.model_version, r.served_as) for r in (canary, pinned, plain)] == [
        ("v0002", "canary"),
        ("v0002", "pinned"),
        ("v0001", "live"),
    ]
    await wait_until(lambda: live.server.generation_log.depth == 0)
    ids = {r.candidates[0].generation_id: r.served_as for r in (canary, pinned, plain)}
    stored = live.store.get_generations(list(ids))
    assert {gid: record.served_as for gid, record in stored.items()} == ids


async def test_ending_or_promoting_a_canary_under_load_fails_no_request(live) -> None:
    await start_canary(live, "v0002", 0.5)
    served: list[tuple[str, str]] = []
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async def client(i: int) -> None:
        while not stop.is_set():
            try:
                reply = await live.generation.Generate(
                    pb.GenerateRequest(prompt=f"load {i}", routing_key=f"user-{i}"), timeout=20
                )
            except grpc.aio.AioRpcError as exc:
                failures.append(exc)
                continue
            served.append((reply.model_version, reply.served_as))

    clients = [asyncio.ensure_future(client(i)) for i in range(16)]
    await wait_until(lambda: ("v0002", "canary") in served, timeout_s=20)
    await live.admin.EndTrial(pb.EndTrialRequest(promote=False), timeout=10)
    await wait_until(lambda: live.server.live_model.canary is None)
    mark = len(served)
    await wait_until(lambda: len(served) > mark + 32, timeout_s=20)
    assert ("v0002", "canary") not in served[mark + 16 :]  # only replies already in flight
    await start_canary(live, "v0003", 0.5)
    await wait_until(lambda: ("v0003", "canary") in served, timeout_s=20)
    await live.admin.EndTrial(pb.EndTrialRequest(promote=True), timeout=10)
    await wait_until(lambda: live.server.live_version == "v0003")
    mark = len(served)
    await wait_until(lambda: len(served) > mark + 32, timeout_s=20)
    stop.set()
    await asyncio.gather(*clients)
    assert failures == []
    assert set(served[mark + 16 :]) == {("v0003", "live")}


async def test_a_too_long_routing_key_is_refused_and_nothing_is_logged(live) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await live.generation.Generate(
            pb.GenerateRequest(prompt="x", routing_key="k" * 129), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("routing_key")
    await wait_until(lambda: live.server.generation_log.depth == 0)
    assert live.store.counts().generations == 0
