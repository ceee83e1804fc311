"""An in-process feedloop.v1 server with scripted failures, for the client's own tests.

It answers like the real server on the happy path (ids, versions, duplicate detection by
event_id) and can be told to fail the next calls with given status codes, or to break a feedback
stream after some acknowledgements, which the real server cannot be made to do on demand. The
client's end-to-end behaviour against the real `feedloop serve` is tested separately.
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from feedloop.v1 import feedloop_pb2 as pb
from feedloop.v1 import feedloop_pb2_grpc as pb_grpc


@dataclass
class Script:
    """What the fake does next; tests mutate it between calls."""

    # (code, message) or (code, message, trailing metadata), e.g. a grpc-retry-pushback-ms
    fail_next: deque[tuple[Any, ...]] = field(default_factory=deque)
    break_stream_after_acks: int | None = None  # once: UNAVAILABLE after this many acks
    invalid_event_ids: set[str] = field(default_factory=set)  # INVALID_ARGUMENT naming them
    required_api_key: str | None = None
    calls: list[str] = field(default_factory=list)
    metadata_seen: list[dict[str, str]] = field(default_factory=list)
    stored_events: dict[str, pb.FeedbackEvent] = field(default_factory=dict)
    live_version: str = "v0001"
    previous_versions: list[str] = field(default_factory=list)
    trial: pb.Trial | None = None
    routing_keys: list[str] = field(default_factory=list)  # of each Generate request
    end_users: list[str] = field(default_factory=list)  # of each Generate request
    trainer_paused: bool = False
    online_requests: list[pb.GetOnlineReportRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Base:
    def __init__(self, script: Script) -> None:
        self.script = script

    def _enter(self, name: str, context: grpc.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata())
        with self.script.lock:
            self.script.calls.append(name)
            self.script.metadata_seen.append(metadata)
            failure = self.script.fail_next.popleft() if self.script.fail_next else None
        key = self.script.required_api_key
        if key is not None and metadata.get("authorization") != f"Bearer {key}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key")
        if failure is not None:
            if len(failure) > 2:
                context.set_trailing_metadata(failure[2])
            context.abort(failure[0], failure[1])


class Generation(_Base, pb_grpc.GenerationServicer):
    def Generate(self, request, context):
        self._enter("Generate", context)
        if not request.prompt.strip():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt: must not be empty")
        if request.model_version and request.model_version != self.script.live_version:
            context.abort(grpc.StatusCode.NOT_FOUND, f"model_version {request.model_version!r}")
        self.script.routing_keys.append(request.routing_key)
        self.script.end_users.append(request.end_user)
        words = request.prompt.split()
        candidates = [
            pb.Candidate(
                generation_id=uuid.uuid4().hex,
                text=" ".join([*words, f"#{i}"]),
                tokens=[*words, f"#{i}"],
                log_prob=-1.5 * (i + 1),
                finished=True,
                token_logprobs=[-0.5] * (len(words) + 1) if request.return_token_logprobs else [],
            )
            for i in range(request.num_candidates or 1)
        ]
        return pb.GenerateResponse(
            request_id=request.request_id or uuid.uuid4().hex,
            model_version=self.script.live_version,
            candidates=candidates,
            seed=request.sampling.seed or 42,
            served_as="pinned" if request.model_version else "live",
        )


class Feedback(_Base, pb_grpc.FeedbackServicer):
    def _store(self, event: pb.FeedbackEvent) -> pb.FeedbackAck:
        with self.script.lock:
            if event.event_id in self.script.stored_events:
                return pb.FeedbackAck(
                    event_id=event.event_id, outcome=pb.FEEDBACK_OUTCOME_DUPLICATE
                )
            self.script.stored_events[event.event_id] = event
        return pb.FeedbackAck(event_id=event.event_id, outcome=pb.FEEDBACK_OUTCOME_ACCEPTED)

    def Submit(self, request, context):
        self._enter("Submit", context)
        return self._store(request)

    def SubmitStream(self, request_iterator, context):
        self._enter("SubmitStream", context)
        for acks, event in enumerate(request_iterator):
            with self.script.lock:
                limit = self.script.break_stream_after_acks
                if limit is not None and acks >= limit:
                    self.script.break_stream_after_acks = None
                    broke = True
                else:
                    broke = False
            if broke:
                context.abort(grpc.StatusCode.UNAVAILABLE, "stream broken on purpose")
            if event.event_id in self.script.invalid_event_ids:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"event {event.event_id}: score out of range"
                )
            yield self._store(event)


class Admin(_Base, pb_grpc.ModelAdminServicer):
    def ListModels(self, request, context):
        self._enter("ListModels", context)
        versions = [
            pb.ModelVersion(
                version=v,
                architecture="gru-seq2seq",
                parameter_count=1234,
                summary_json='{"perplexity": 12.5}',
                live=v == self.script.live_version,
            )
            for v in sorted(
                {self.script.live_version, *self.script.previous_versions}, reverse=True
            )
        ]
        decision = pb.Decision(
            version=self.script.live_version,
            action="promoted",
            reason="gate passed",
            details_json='{"kl": 0.01}',
        )
        decision.at.GetCurrentTime()
        return pb.ListModelsResponse(
            versions=versions,
            live_version=self.script.live_version,
            decisions=[decision],
            trial=self.script.trial,
            trainer_paused=self.script.trainer_paused,
        )

    def GetStatus(self, request, context):
        self._enter("GetStatus", context)
        return pb.ServerStatus(
            trial=self.script.trial,
            trainer_paused=self.script.trainer_paused,
            live_version=self.script.live_version,
            loaded_versions=[self.script.live_version],
            uptime_s=1.5,
            generations_served=7,
            feedback_accepted=len(self.script.stored_events),
            server_version="fake",
        )

    def SetLive(self, request, context):
        self._enter("SetLive", context)
        if request.version not in ("v0001", "v0002"):
            context.abort(grpc.StatusCode.NOT_FOUND, f"version {request.version!r} is unknown")
        expected = request.expected_live_version
        if expected and expected != self.script.live_version:
            context.abort(grpc.StatusCode.ABORTED, f"expected live version {expected!r}")
        previous = self.script.live_version
        self.script.previous_versions.append(previous)
        self.script.live_version = request.version
        return pb.SetLiveResponse(live_version=request.version, previous_version=previous)

    def Rollback(self, request, context):
        self._enter("Rollback", context)
        if not self.script.previous_versions:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "nothing to roll back to")
        previous = self.script.live_version
        self.script.live_version = self.script.previous_versions.pop()
        return pb.SetLiveResponse(live_version=self.script.live_version, previous_version=previous)

    def _state(self) -> pb.RegistryState:
        return pb.RegistryState(
            live_version=self.script.live_version,
            trial=self.script.trial,
            trainer_paused=self.script.trainer_paused,
        )

    def StartTrial(self, request, context):
        self._enter("StartTrial", context)
        if not 0 <= request.share <= 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "share: must be in [0, 1]")
        if self.script.trial is not None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "a trial is already running")
        self.script.trial = pb.Trial(
            version=request.version,
            mode=request.mode or pb.TRIAL_MODE_CANARY,
            share=request.share,
            parent_version=self.script.live_version,
        )
        self.script.trial.since.GetCurrentTime()
        return self._state()

    def EndTrial(self, request, context):
        self._enter("EndTrial", context)
        if self.script.trial is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no trial is running")
        if request.promote:
            self.script.previous_versions.append(self.script.live_version)
            self.script.live_version = self.script.trial.version
        self.script.trial = None
        return self._state()

    def SetTrainerPaused(self, request, context):
        self._enter("SetTrainerPaused", context)
        self.script.trainer_paused = request.paused
        return self._state()

    def GetOnlineReport(self, request, context):
        self._enter("GetOnlineReport", context)
        if request.window_s < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "window_s: must be seconds >= 0")
        if not 0 < (request.alpha or 0.05) < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "alpha: must be in (0, 1)")
        if request.half_life_s < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "half_life_s: must be seconds >= 0")
        known = {self.script.live_version, *self.script.previous_versions, "v0002"}
        if set(request.versions) - known:
            context.abort(grpc.StatusCode.NOT_FOUND, "versions: not in the registry")
        self.script.online_requests.append(request)
        live = self.script.live_version
        other = "v0002" if live != "v0002" else "v0001"
        reply = pb.OnlineReport(
            alpha=request.alpha or 0.05,
            live_version=live,
            trial=self.script.trial,
            versions=[
                pb.VersionOnlineReport(
                    version=live,
                    live=True,
                    rating=pb.OnlineEstimate(count=40, mean=0.25, low=-0.125, high=0.625),
                    recent_rating=(
                        pb.OnlineEstimate(count=40, mean=0.5, low=-0.25, high=1.0)
                        if request.half_life_s
                        else None
                    ),
                    win_rates=[
                        pb.WinRate(
                            opponent_version=other,
                            estimate=pb.OnlineEstimate(count=8, mean=0.75, low=0.25, high=1.0),
                        )
                    ],
                ),
                pb.VersionOnlineReport(
                    version=other,
                    on_trial=self.script.trial is not None,
                    rating=pb.OnlineEstimate(count=0, mean=float("nan"), low=-1.0, high=1.0),
                ),
            ],
        )
        reply.until.GetCurrentTime()
        reply.since.FromNanoseconds(
            reply.until.ToNanoseconds() - round((request.window_s or 3600) * 1e9)
        )
        if self.script.trial is not None:
            reply.trial_comparison.CopyFrom(
                pb.TrialComparison(
                    trial_version=self.script.trial.version,
                    live_version=live,
                    trial_age_s=90.0,
                    trial_rating=pb.OnlineEstimate(count=12, mean=0.5, low=0.0, high=1.0),
                    live_rating=pb.OnlineEstimate(count=30, mean=0.25, low=0.0, high=0.5),
                    difference=pb.OnlineEstimate(count=12, mean=0.25, low=-0.5, high=1.0),
                )
            )
            if self.script.trial.mode == pb.TRIAL_MODE_SHADOW:
                reply.trial_comparison.shadow.CopyFrom(
                    pb.ShadowOffPolicyEstimate(
                        count=25,
                        low=-0.4,
                        mean=0.125,
                        live_mean=0.25,
                        effective_count=20.4,
                        clipped_share=0.04,
                        max_weight=2.0,
                    )
                )
        return reply


class FakeServer:
    """Start with `with FakeServer() as fake:`; `fake.target` is its 127.0.0.1 address."""

    def __init__(self, credentials: grpc.ServerCredentials | None = None, *, port: int = 0) -> None:
        self.script = Script()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_GenerationServicer_to_server(Generation(self.script), self.server)
        pb_grpc.add_FeedbackServicer_to_server(Feedback(self.script), self.server)
        pb_grpc.add_ModelAdminServicer_to_server(Admin(self.script), self.server)
        self.health = health.HealthServicer()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if credentials is None:
            self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        else:
            self.port = self.server.add_secure_port(f"127.0.0.1:{port}", credentials)
        self.target = f"127.0.0.1:{self.port}"

    def __enter__(self) -> FakeServer:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(grace=None).wait()
