"""Pins and pruned versions through ModelAdmin and the `feedloop models pin` command."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from server_harness import running_server, seeded_registry, test_config

from feedloop.client.commands import main as client_main
from feedloop.core.registry.retention import RetentionPolicy
from feedloop.v1 import feedloop_pb2 as pb


@pytest.fixture
async def live(tmp_path: Path, tiny_checkpoint: Path):
    """v0003 live after v0001 and v0002 (the rollback stack), v0002 pruned, v0004 published."""
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    for _ in range(2):
        registry.publish(tiny_checkpoint, make_live=True)
    registry.publish(tiny_checkpoint)
    policy = RetentionPolicy(keep_last=1, keep_best=0, keep_rollback=0)
    plan = registry.prune(policy, reference="v0001")
    assert plan.prune == ("v0002",)  # v0001 is the reference, v0003 live, v0004 the newest
    async with running_server(test_config(tmp_path), registry=registry) as r:
        yield r


@pytest.mark.parametrize(
    ("request_", "code", "fragment"),
    [
        (pb.SetLiveRequest(version="v0002"), "FAILED_PRECONDITION", "v0002 was pruned"),
        (pb.RollbackRequest(), "FAILED_PRECONDITION", "v0002 was pruned"),
        (
            pb.StartTrialRequest(version="v0002", share=0.1),
            "FAILED_PRECONDITION",
            "v0002 was pruned",
        ),
        (pb.SetPinnedRequest(version="v0002", pinned=True), "FAILED_PRECONDITION", "v0002"),
        (pb.SetPinnedRequest(version="v0042", pinned=True), "NOT_FOUND", "v0042"),
        (pb.SetPinnedRequest(pinned=True), "INVALID_ARGUMENT", "version"),
    ],
)
async def test_calls_on_a_pruned_version_are_refused_naming_it_and_change_nothing(
    live, request_, code: str, fragment: str
) -> None:
    registry = live.server.registry
    before, history, pins = registry.pointer(), registry.history(), registry.pins()
    method = {
        pb.SetLiveRequest: live.admin.SetLive,
        pb.RollbackRequest: live.admin.Rollback,
        pb.StartTrialRequest: live.admin.StartTrial,
        pb.SetPinnedRequest: live.admin.SetPinned,
    }[type(request_)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await method(request_, timeout=10)
    assert err.value.code().name == code and fragment in (err.value.details() or "")
    assert registry.pointer() == before and registry.history() == history
    assert registry.pins() == pins


async def test_pin_and_unpin_over_the_admin_service_and_the_command_line(live, capsys) -> None:
    reply = await live.admin.SetPinned(
        pb.SetPinnedRequest(version="v0004", pinned=True, reason="keep"), timeout=10
    )
    assert reply.changed and list(reply.pinned_versions) == ["v0004"]
    models = await live.admin.ListModels(pb.ListModelsRequest(), timeout=10)
    assert [(v.version, v.pinned) for v in models.versions] == [
        ("v0004", True),
        ("v0003", False),
        ("v0001", False),
    ]  # v0002 is pruned: not listed; its decisions are
    assert ("v0002", "pruned") in [(d.version, d.action) for d in models.decisions]
    assert (models.decisions[0].version, models.decisions[0].action) == ("v0004", "pinned")

    target = ["--target", f"127.0.0.1:{live.server.grpc_port}"]
    code = await asyncio.to_thread(client_main, ["models", "unpin", "v0004", *target])
    assert code == 0 and "v0004: unpinned; pinned: (none)" in capsys.readouterr().out
    code = await asyncio.to_thread(client_main, ["models", "pin", "v0001", *target])
    assert code == 0 and "v0001: pinned; pinned: v0001" in capsys.readouterr().out
    code = await asyncio.to_thread(client_main, ["models", "pin", "v0001", *target])
    assert code == 0 and "already pinned" in capsys.readouterr().out
    assert live.server.registry.pins() == ["v0001"]
    code = await asyncio.to_thread(client_main, ["models", "pin", "v0002", *target])
    assert code == 5 and "FAILED_PRECONDITION: v0002 was pruned" in capsys.readouterr().err
