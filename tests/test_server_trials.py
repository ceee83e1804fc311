"""Trials through ModelAdmin and canary traffic through Generate, on an in-process server."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from server_harness import running_server, seeded_registry, test_config, wait_until

from feedloop.v1 import feedloop_pb2 as pb


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
    seen = await wait_until(lambda: live.server.live_model.pointer.trial)
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
    await wait_until(lambda: live.server.live_model.pointer.paused)
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
