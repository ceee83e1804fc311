"""The ModelAdmin service: the registry's versions and decisions, this replica's status, SetLive,
Rollback, trials, the trainer's pause, pins, the online report by version, human evaluation and
loading a version for requests that name it. Registry and store
calls block (disk, PostgreSQL), so they run in worker threads.

The online report gives figures, not the decision policy's verdict: the policy's margin, minimum
counts and time limit are the trainer's configuration, which the server does not read (server
and trainer never import each other); the trainer's verdicts are in the registry's decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from dataclasses import replace
from datetime import datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from feedloop import __version__
from feedloop.core.discount import Discount
from feedloop.core.online_eval import (
    Estimate,
    mean_rating,
    online_report,
    rating_difference,
    shadow_estimate,
)
from feedloop.core.registry import CANARY, SHADOW, Decision, LivePointer, ModelRegistry, Trial
from feedloop.core.registry.pointer import unix_seconds, valid_share
from feedloop.core.store import ReplayStore
from feedloop.core.store.outcomes import VersionOutcomes, tally_outcomes
from feedloop.server.batcher import Batcher
from feedloop.server.errors import MODEL_VERSION, InvalidArgument, NotFound, quote
from feedloop.server.human_eval import (
    evaluation_request,
    human_evaluation,
    publish_human_evaluation,
    report_pb,
)
from feedloop.server.limits import (
    MAX_DECISIONS_PER_REPLY,
    require_reason,
    require_version,
    require_versions,
    shorten,
)
from feedloop.server.live_model import LiveModel
from feedloop.server.metrics import ServerMetrics
from feedloop.server.rpc import unary
from feedloop.v1 import feedloop_pb2 as pb
from feedloop.v1 import feedloop_pb2_grpc as pb_grpc

DEFAULT_MAX_DECISIONS = 100
DEFAULT_ONLINE_WINDOW_S = 3600.0
DEFAULT_ONLINE_ALPHA = 0.05
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
        # Reasons stored before they were bounded must not make the listing fail.
        reason=shorten(decision.reason),
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
    pins = set(registry.pins())
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
                pinned=version in pins,
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


def timestamp_at(unix_s: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(round(unix_s * 1e9))
    return ts


def estimate_pb(estimate: Estimate) -> pb.OnlineEstimate:
    return pb.OnlineEstimate(
        count=estimate.n, mean=estimate.mean, low=estimate.low, high=estimate.high
    )


def online_window(request: pb.GetOnlineReportRequest) -> tuple[float, float, float]:
    """(window_s, alpha, half_life_s) with defaults filled in; InvalidArgument naming a bad
    field."""
    if not (math.isfinite(request.window_s) and request.window_s >= 0):
        raise InvalidArgument("window_s", f"must be seconds >= 0, got {request.window_s!r}")
    alpha = request.alpha or DEFAULT_ONLINE_ALPHA
    if not 0 < alpha < 1:  # NaN fails too
        raise InvalidArgument("alpha", f"must be in (0, 1), got {request.alpha!r}")
    if not (math.isfinite(request.half_life_s) and request.half_life_s >= 0):
        got = request.half_life_s
        raise InvalidArgument("half_life_s", f"must be seconds >= 0 (0: off), got {got!r}")
    return request.window_s or DEFAULT_ONLINE_WINDOW_S, alpha, request.half_life_s


def trial_comparison(
    store: ReplayStore, live: str, trial: Trial, alpha: float, now: float
) -> pb.TrialComparison:
    """Blocking: the trial against live on the feedback since the trial began, as the trainer's
    decision policy reads it."""
    since = unix_seconds(trial.since)
    judged = store.judged_generations(since, now)  # read once: the tally and the shadow's
    outcomes = tally_outcomes(judged, [live, trial.version])
    candidate, current = outcomes[trial.version], outcomes[live]
    comparison = pb.TrialComparison(
        trial_version=trial.version,
        live_version=live,
        trial_age_s=now - since,
        trial_rating=estimate_pb(mean_rating(candidate, alpha)),
        live_rating=estimate_pb(mean_rating(current, alpha)),
        difference=estimate_pb(rating_difference(candidate, current, alpha)),
    )
    if trial.mode == SHADOW:
        shadow = shadow_estimate(store.shadow_evidence(trial.version, live, judged), alpha)
        comparison.shadow.CopyFrom(
            pb.ShadowOffPolicyEstimate(
                count=shadow.n,
                low=shadow.low,
                mean=shadow.mean,
                live_mean=shadow.live_mean,
                effective_count=shadow.effective_n,
                clipped_share=shadow.clipped_share,
                max_weight=shadow.max_weight,
            )
        )
    return comparison


def get_online_report(
    registry: ModelRegistry,
    store: ReplayStore,
    versions: list[str],
    window_s: float,
    alpha: float,
    now: float,
    half_life_s: float = 0.0,
) -> pb.OnlineReport:
    """Blocking: read the pointer and the store's outcomes in [now - window_s, now).

    versions: exactly these (NotFound for one the registry does not hold); empty: every version
    with feedback in the window, and live and the trial's version with or without.
    half_life_s > 0: each version's recent_rating too, its ratings discounted by age from the
    window's start (core/discount.py: the looks' blocks begin there).
    """
    pointer = registry.pointer()
    # A pruned version's feedback stays in the store: its online figures can still be reported.
    published = sorted(registry.versions() + registry.pruned_versions(), key=lambda v: (len(v), v))
    unknown = [v for v in versions if v not in published]
    if unknown:
        raise NotFound(
            f"versions: not in the registry: {', '.join(map(quote, unknown))}",
            field="versions",
            resource=(MODEL_VERSION, unknown[0]),
        )
    since = now - window_s
    trial = pointer.trial
    discount = Discount(half_life_s, now, since) if half_life_s > 0 else None
    if versions:
        outcomes = store.online_outcomes(since, now, versions=versions, discount=discount)
    else:
        outcomes = store.online_outcomes(since, now, discount=discount)
        for always in (pointer.live, trial.version if trial else None):
            if always is not None and always not in outcomes:
                outcomes[always] = VersionOutcomes(always, discount=discount)
    # The plain report reads the same tally without its discount: one read of the store.
    reports = online_report({v: replace(o, discount=None) for v, o in outcomes.items()}, alpha)
    recent = {v: mean_rating(o, alpha) for v, o in outcomes.items()} if discount else {}
    newest_first = {v: i for i, v in enumerate(reversed(published))}
    order = sorted(
        reports,
        key=lambda v: (
            v != pointer.live,
            trial is None or v != trial.version,
            newest_first.get(v, len(newest_first)),
            v,
        ),
    )
    report = pb.OnlineReport(
        since=timestamp_at(since),
        until=timestamp_at(now),
        alpha=alpha,
        versions=[
            pb.VersionOnlineReport(
                version=version,
                live=version == pointer.live,
                on_trial=trial is not None and version == trial.version,
                rating=estimate_pb(reports[version].rating),
                recent_rating=estimate_pb(recent[version]) if version in recent else None,
                win_rates=[
                    pb.WinRate(opponent_version=opponent, estimate=estimate_pb(estimate))
                    for opponent, estimate in reports[version].win_rates.items()
                ],
            )
            for version in order
        ],
        live_version=pointer.live or "",
        trial=trial_pb(trial),
    )
    if trial is not None and pointer.live is not None:
        report.trial_comparison.CopyFrom(trial_comparison(store, pointer.live, trial, alpha, now))
    return report


class ModelAdminService(pb_grpc.ModelAdminServicer):
    def __init__(
        self,
        registry: ModelRegistry,
        store: ReplayStore,
        live_model: LiveModel,
        batcher: Batcher,
        metrics: ServerMetrics,
        *,
        started_at: float,
    ) -> None:
        self.registry = registry
        self.store = store
        self.live_model = live_model
        self.batcher = batcher
        self.metrics = metrics
        self.started_at = started_at

    @unary("ListModels")
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        if not 0 <= request.max_decisions <= MAX_DECISIONS_PER_REPLY:
            raise InvalidArgument("max_decisions", f"must be 0 to {MAX_DECISIONS_PER_REPLY}")
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
        require_version(request.version, "version", required=True)
        require_version(request.expected_live_version, "expected_live_version")
        require_reason(request.reason)
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
        require_reason(request.reason)
        before = await asyncio.to_thread(self.registry.live)
        pointer = await asyncio.to_thread(
            self.registry.rollback, reason=request.reason or "rollback via ModelAdmin"
        )
        return pb.SetLiveResponse(live_version=pointer.live or "", previous_version=before or "")

    @unary("StartTrial")
    async def StartTrial(
        self, request: pb.StartTrialRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegistryState:
        require_version(request.version, "version", required=True)
        require_version(request.expected_live_version, "expected_live_version")
        require_reason(request.reason)
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
        require_version(request.expected_trial_version, "expected_trial_version")
        require_reason(request.reason)
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
        require_reason(request.reason)
        verb = "paused" if request.paused else "resumed"
        pointer = await asyncio.to_thread(
            self.registry.set_paused,
            request.paused,
            reason=request.reason or f"trainer {verb} via ModelAdmin",
        )
        return registry_state_pb(pointer)

    @unary("SetPinned")
    async def SetPinned(
        self, request: pb.SetPinnedRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetPinnedResponse:
        require_version(request.version, "version", required=True)
        require_reason(request.reason)
        verb = "pinned" if request.pinned else "unpinned"
        change = self.registry.pin if request.pinned else self.registry.unpin
        changed = await asyncio.to_thread(
            change, request.version, reason=request.reason or f"{verb} via ModelAdmin"
        )
        pins = await asyncio.to_thread(self.registry.pins)
        return pb.SetPinnedResponse(changed=changed, pinned_versions=pins)

    @unary("GetHumanEvaluation")
    async def GetHumanEvaluation(
        self, request: pb.GetHumanEvaluationRequest, context: grpc.aio.ServicerContext
    ) -> pb.HumanEvaluationReport:
        alpha = evaluation_request(request)
        evaluation = await asyncio.to_thread(
            human_evaluation, self.store, request.version_a, request.version_b
        )
        publish_human_evaluation(self.metrics, evaluation, alpha, self.live_model.loaded_versions())
        return report_pb(evaluation, alpha)

    @unary("LoadVersion")
    async def LoadVersion(
        self, request: pb.LoadVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadVersionResponse:
        if not request.version:
            raise InvalidArgument("version", "required")
        loaded = await asyncio.to_thread(self.live_model.load_version, request.version)
        return pb.LoadVersionResponse(loaded_versions=loaded)

    @unary("GetOnlineReport")
    async def GetOnlineReport(
        self, request: pb.GetOnlineReportRequest, context: grpc.aio.ServicerContext
    ) -> pb.OnlineReport:
        window_s, alpha, half_life_s = online_window(request)
        versions = require_versions(request.versions, "versions")
        return await asyncio.to_thread(
            get_online_report,
            self.registry,
            self.store,
            versions,
            window_s,
            alpha,
            time.time(),
            half_life_s,
        )
