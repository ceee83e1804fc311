"""The ModelAdmin service: the registry's versions and decisions, this replica's status, SetLive,
Rollback, trials and the trainer's pause. Registry calls block (disk, PostgreSQL), so they run in
worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from feedloop import __version__
from feedloop.core.registry import CANARY, SHADOW, Decision, LivePointer, ModelRegistry, Trial
from feedloop.core.registry.pointer import valid_share
from feedloop.server.batcher import Batcher
from feedloop.server.errors import InvalidArgument
from feedloop.server.live_model import LiveModel
from feedloop.server.metrics import ServerMetrics
from feedloop.server.rpc import unary
from feedloop.v1 import feedloop_pb2 as pb
from feedloop.v1 import feedloop_pb2_grpc as pb_grpc

DEFAULT_MAX_DECISIONS = 100
TRIAL_MODES_PB = {CANARY: pb.TRIAL_MODE_CANARY, SHADOW: pb.TRIAL_MODE_SHADOW}


def timestamp(iso: str) -> Timestamp:
    ts = Timestamp()
    # An unparseable time is left unset rather than failing the listing.
    with contextlib.suppress(TypeError, ValueError):
        ts.FromDatetime(datetime.fromisoformat(iso))
    return ts


def decision_pb(decision: Decision) -> pb.Decision:
    return pb.Decision(
        at=timestamp(decision.at),
        version=decision.version,
        action=decision.action,
        reason=decision.reason,
        details_json=json.dumps(decision.details, sort_keys=True),
    )


def trial_pb(trial: Trial | None) -> pb.Trial | None:
    if trial is None:
        return None
    return pb.Trial(
        version=trial.version,
        mode=TRIAL_MODES_PB[trial.mode],
        share=trial.share,
        since=timestamp(trial.since),
        parent_version=trial.parent,
    )


def registry_state_pb(pointer: LivePointer) -> pb.RegistryState:
    return pb.RegistryState(
        live_version=pointer.live or "",
        trial=trial_pb(pointer.trial),
        trainer_paused=pointer.paused,
    )


def list_models(registry: ModelRegistry, max_decisions: int) -> pb.ListModelsResponse:
    """Blocking: read versions, manifests and history from the registry."""
    pointer = registry.pointer()
    live = pointer.live
    versions = []
    for version in reversed(registry.versions()):
        manifest = registry.manifest(version)
        versions.append(
            pb.ModelVersion(
                version=version,
                parent_version=manifest.parent_version or "",
                created_at=timestamp(manifest.created_at),
                architecture=manifest.architecture,
                parameter_count=manifest.parameter_count,
                summary_json=json.dumps(manifest.training_summary, sort_keys=True),
                live=version == live,
            )
        )
    decisions = [decision_pb(d) for d in registry.history(max_decisions)]
    return pb.ListModelsResponse(
        versions=versions,
        live_version=live or "",
        decisions=decisions,
        trial=trial_pb(pointer.trial),
        trainer_paused=pointer.paused,
    )


class ModelAdminService(pb_grpc.ModelAdminServicer):
    def __init__(
        self,
        registry: ModelRegistry,
        live_model: LiveModel,
        batcher: Batcher,
        metrics: ServerMetrics,
        *,
        started_at: float,
    ) -> None:
        self.registry = registry
        self.live_model = live_model
        self.batcher = batcher
        self.metrics = metrics
        self.started_at = started_at

    @unary("ListModels")
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        if request.max_decisions < 0:
            raise InvalidArgument("max_decisions", "must be >= 0")
        limit = request.max_decisions or DEFAULT_MAX_DECISIONS
        return await asyncio.to_thread(list_models, self.registry, limit)

    @unary("GetStatus")
    async def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerStatus:
        live = self.live_model.live
        pointer = self.live_model.pointer
        tallies = self.metrics.tallies
        return pb.ServerStatus(
            live_version=live.version if live else "",
            loaded_versions=self.live_model.loaded_versions(),
            uptime_s=time.monotonic() - self.started_at,
            generations_served=tallies.generations_served,
            feedback_accepted=tallies.feedback_accepted,
            feedback_duplicates=tallies.feedback_duplicates,
            swaps_succeeded=tallies.swaps_succeeded,
            swaps_refused=tallies.swaps_refused,
            queue_depth=self.batcher.queue_depth,
            server_version=__version__,
            trial=trial_pb(pointer.trial) if pointer else None,
            trainer_paused=pointer.paused if pointer else False,
        )

    @unary("SetLive")
    async def SetLive(
        self, request: pb.SetLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetLiveResponse:
        if not request.version:
            raise InvalidArgument("version", "required")
        before = await asyncio.to_thread(self.registry.live)
        pointer = await asyncio.to_thread(
            self.registry.set_live,
            request.version,
            reason=request.reason or "set via ModelAdmin",
            expect_live=request.expected_live_version or None,
        )
        return pb.SetLiveResponse(live_version=pointer.live or "", previous_version=before or "")

    @unary("Rollback")
    async def Rollback(
        self, request: pb.RollbackRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetLiveResponse:
        before = await asyncio.to_thread(self.registry.live)
        pointer = await asyncio.to_thread(
            self.registry.rollback, reason=request.reason or "rollback via ModelAdmin"
        )
        return pb.SetLiveResponse(live_version=pointer.live or "", previous_version=before or "")

    @unary("StartTrial")
    async def StartTrial(
        self, request: pb.StartTrialRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegistryState:
        if not request.version:
            raise InvalidArgument("version", "required")
        if not valid_share(request.share):
            raise InvalidArgument("share", f"must be in [0, 1], got {request.share!r}")
        if request.mode not in (pb.TRIAL_MODE_UNSPECIFIED, *TRIAL_MODES_PB.values()):
            raise InvalidArgument("mode", f"unknown trial mode {request.mode}")
        mode = SHADOW if request.mode == pb.TRIAL_MODE_SHADOW else CANARY
        pointer = await asyncio.to_thread(
            self.registry.start_trial,
            request.version,
            mode=mode,
            share=request.share,
            reason=request.reason or f"{mode} via ModelAdmin",
            expect_live=request.expected_live_version or None,
        )
        return registry_state_pb(pointer)

    @unary("EndTrial")
    async def EndTrial(
        self, request: pb.EndTrialRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegistryState:
        verb = "promoted" if request.promote else "rolled back"
        pointer = await asyncio.to_thread(
            self.registry.end_trial,
            promote=request.promote,
            reason=request.reason or f"trial {verb} via ModelAdmin",
            expect_version=request.expected_trial_version or None,
        )
        return registry_state_pb(pointer)

    @unary("SetTrainerPaused")
    async def SetTrainerPaused(
        self, request: pb.SetTrainerPausedRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegistryState:
        verb = "paused" if request.paused else "resumed"
        pointer = await asyncio.to_thread(
            self.registry.set_paused,
            request.paused,
            reason=request.reason or f"trainer {verb} via ModelAdmin",
        )
        return registry_state_pb(pointer)
