"""The synchronous feedloop client.

    from feedloop.client import FeedloopClient

    with FeedloopClient("127.0.0.1:50051") as client:
        result = client.generate("ocean sunrise", n=3, temperature=0.8)
        best = result.candidates[0]
        client.rate(best.generation_id, 1.0, scale="thumbs")

Every call takes an optional `timeout_s` (default: the client's) and raises FeedloopClientError
on failure. gRPC retries the unary calls within that deadline, by the service config the channel
is opened with (client/service_config.py); submit_many resends a broken stream's unacknowledged
events itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from feedloop.client import health
from feedloop.client.errors import FeedloopClientError
from feedloop.client.human_eval import HumanEvaluationResult, Verdict
from feedloop.client.online import OnlineReportResult, online_report_request
from feedloop.client.options import ClientOptions
from feedloop.client.types import (
    Comparison,
    Correction,
    FeedbackInput,
    FeedbackResult,
    GenerateResult,
    ModelsResult,
    PinsResult,
    Ranking,
    Rating,
    RegistryStateResult,
    Sampling,
    SetLiveResult,
    StatusResult,
    event_to_proto,
    generate_request,
    start_trial_request,
)
from feedloop.v1 import feedloop_pb2 as pb
from feedloop.v1 import feedloop_pb2_grpc as pb_grpc


def open_channel(options: ClientOptions) -> grpc.Channel:
    if options.uses_tls:
        return grpc.secure_channel(
            options.grpc_target, options.channel_credentials(), options=options.channel_args()
        )
    return grpc.insecure_channel(options.grpc_target, options=options.channel_args())


class FeedloopClient:
    """A connection to one feedloop server (or a load balancer in front of several)."""

    def __init__(self, target: str | None = None, **options: Any) -> None:
        """`options` are ClientOptions fields (api_key, tls, root_ca_path, timeout_s, retry)."""
        if target is not None:
            options["target"] = target
        self.options = ClientOptions(**options)
        self._channel = open_channel(self.options)
        self._metadata = self.options.metadata()
        self._generation = pb_grpc.GenerationStub(self._channel)
        self._feedback = pb_grpc.FeedbackStub(self._channel)
        self._admin = pb_grpc.ModelAdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> FeedloopClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method: Any, request: Any, timeout_s: float | None) -> Any:
        """One call; gRPC makes its retries (the channel's service config)."""
        try:
            return method(
                request, timeout=timeout_s or self.options.timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise FeedloopClientError.from_rpc_error(exc) from None

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompt: str,
        n: int = 1,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        model_version: str | None = None,
        request_id: str | None = None,
        routing_key: str | None = None,
        token_logprobs: bool = False,
        timeout_s: float | None = None,
        end_user: str | None = None,
    ) -> GenerateResult:
        """n candidate phrases for a prompt, all from one model version (named in the result).

        temperature 0 decodes greedily; None (like every None here) takes the server's default.
        token_logprobs: each candidate also carries its per-token log-probabilities.
        end_user: the app's key of its end user, stored with the generations so that
        `feedloop store erase --end-user KEY` can delete them on request.
        """
        request = generate_request(
            prompt,
            n,
            Sampling(temperature, top_k, top_p, max_tokens, seed),
            model_version,
            request_id,
            routing_key,
            token_logprobs,
            end_user,
        )
        return GenerateResult.from_proto(self._unary(self._generation.Generate, request, timeout_s))

    # ------------------------------------------------------------------ feedback

    def submit(self, event: FeedbackInput, *, timeout_s: float | None = None) -> FeedbackResult:
        """Store one event durably; a retry with the same event_id is acknowledged as duplicate."""
        message = event_to_proto(event)  # event_id fixed once, before any attempt
        return FeedbackResult.from_proto(self._unary(self._feedback.Submit, message, timeout_s))

    def rate(
        self,
        generation_id: str,
        score: float,
        *,
        scale: str = "unit",
        event_id: str | None = None,
        timeout_s: float | None = None,
    ) -> FeedbackResult:
        return self.submit(Rating(generation_id, score, scale, event_id), timeout_s=timeout_s)

    def rank(
        self,
        generation_ids: Sequence[str],
        *,
        event_id: str | None = None,
        timeout_s: float | None = None,
    ) -> FeedbackResult:
        """An order over candidates of one reply, best first."""
        return self.submit(Ranking(tuple(generation_ids), event_id), timeout_s=timeout_s)

    def compare(
        self,
        preferred_id: str,
        rejected_id: str,
        *,
        event_id: str | None = None,
        timeout_s: float | None = None,
    ) -> FeedbackResult:
        return self.submit(Comparison(preferred_id, rejected_id, event_id), timeout_s=timeout_s)

    def correct(
        self,
        generation_id: str,
        text: str,
        *,
        event_id: str | None = None,
        timeout_s: float | None = None,
    ) -> FeedbackResult:
        return self.submit(Correction(generation_id, text, event_id), timeout_s=timeout_s)

    def submit_many(
        self, events: Iterable[FeedbackInput], *, timeout_s: float | None = None
    ) -> list[FeedbackResult]:
        """Send events over one stream; one result per event, in order.

        If the stream breaks with UNAVAILABLE, the events not yet acknowledged are sent again
        with the same ids, so none is lost and none is stored twice.
        """
        messages = [event_to_proto(e) for e in events]
        results: list[FeedbackResult] = []
        policy = self.options.retry
        deadline = time.monotonic() + (timeout_s or self.options.timeout_s)

        def attempt(remaining_s: float) -> list[FeedbackResult]:
            pending = messages[len(results) :]
            replies = self._feedback.SubmitStream(
                iter(pending), timeout=remaining_s, metadata=self._metadata
            )
            for ack in replies:
                results.append(FeedbackResult.from_proto(ack))
            if len(results) != len(messages):
                raise FeedloopClientError(
                    grpc.StatusCode.INTERNAL,
                    f"feedback stream closed with {len(results)} acks for {len(messages)} events",
                )
            return results

        # A service config cannot resend a stream's unacknowledged events (gRPC would resend
        # them all, or none once a reply arrived), so this loop does, by the same policy.
        number = 1
        while True:
            try:
                return attempt(max(deadline - time.monotonic(), 0.001))
            except grpc.RpcError as exc:
                error = FeedloopClientError.from_rpc_error(exc)
            except FeedloopClientError as exc:  # the stream ended short of its acks
                error = exc
            delay_s = policy.delay_s(number, error.code, error.retry_delay_s)
            if delay_s is None or time.monotonic() + delay_s >= deadline:
                raise error
            time.sleep(delay_s)
            number += 1

    # ------------------------------------------------------------------ admin

    def list_models(
        self, *, max_decisions: int = 0, timeout_s: float | None = None
    ) -> ModelsResult:
        request = pb.ListModelsRequest(max_decisions=max_decisions)
        return ModelsResult.from_proto(self._unary(self._admin.ListModels, request, timeout_s))

    def status(self, *, timeout_s: float | None = None) -> StatusResult:
        reply = self._unary(self._admin.GetStatus, pb.GetStatusRequest(), timeout_s)
        return StatusResult.from_proto(reply)

    def set_live(
        self,
        version: str,
        *,
        reason: str = "",
        expected_live_version: str | None = None,
        timeout_s: float | None = None,
    ) -> SetLiveResult:
        """Make a published version live; with expected_live_version, only if that version is
        live now (ABORTED otherwise, and nothing changes)."""
        request = pb.SetLiveRequest(
            version=version, reason=reason, expected_live_version=expected_live_version or ""
        )
        return SetLiveResult.from_proto(self._unary(self._admin.SetLive, request, timeout_s))

    def rollback(self, *, reason: str = "", timeout_s: float | None = None) -> SetLiveResult:
        request = pb.RollbackRequest(reason=reason)
        return SetLiveResult.from_proto(self._unary(self._admin.Rollback, request, timeout_s))

    # ------------------------------------------------------------------ health

    def start_trial(
        self,
        version: str,
        *,
        share: float,
        mode: str = "canary",
        reason: str = "",
        expected_live_version: str | None = None,
        timeout_s: float | None = None,
    ) -> RegistryStateResult:
        """Put a published version on trial beside the live one: a canary serves `share` of the
        traffic, a shadow scores `share` of the live version's candidates."""
        request = start_trial_request(version, share, mode, reason, expected_live_version)
        reply = self._unary(self._admin.StartTrial, request, timeout_s)
        return RegistryStateResult.from_proto(reply)

    def end_trial(
        self,
        *,
        promote: bool,
        reason: str = "",
        expected_trial_version: str | None = None,
        timeout_s: float | None = None,
    ) -> RegistryStateResult:
        """End the trial: promote its version to live, or roll it back."""
        request = pb.EndTrialRequest(
            promote=promote, reason=reason, expected_trial_version=expected_trial_version or ""
        )
        reply = self._unary(self._admin.EndTrial, request, timeout_s)
        return RegistryStateResult.from_proto(reply)

    def set_pinned(
        self, version: str, pinned: bool = True, *, reason: str = "", timeout_s: float | None = None
    ) -> PinsResult:
        """Pin a published version (registry retention keeps its weights), or unpin it."""
        request = pb.SetPinnedRequest(version=version, pinned=pinned, reason=reason)
        return PinsResult.from_proto(self._unary(self._admin.SetPinned, request, timeout_s))

    def set_trainer_paused(
        self, paused: bool, *, reason: str = "", timeout_s: float | None = None
    ) -> RegistryStateResult:
        """Pause (True) or resume (False) the trainer's publication of new versions."""
        request = pb.SetTrainerPausedRequest(paused=paused, reason=reason)
        reply = self._unary(self._admin.SetTrainerPaused, request, timeout_s)
        return RegistryStateResult.from_proto(reply)

    def online_report(
        self,
        *,
        window_s: float | None = None,
        alpha: float | None = None,
        versions: Sequence[str] = (),
        half_life_s: float | None = None,
        timeout_s: float | None = None,
    ) -> OnlineReportResult:
        """Online reward by version: each version's mean rating and win rates from the feedback
        of the last window_s seconds (default: an hour), with confidence sequences at level
        1 - alpha (default 0.05); versions: only these; half_life_s: also each version's
        recent_rating, a rating a seconds old weighing 0.5 ** (a / half_life_s) (the trainer's
        evidence_half_life_s rule). While a trial runs, also its rating minus live's since it
        began."""
        request = online_report_request(window_s, alpha, versions, half_life_s)
        reply = self._unary(self._admin.GetOnlineReport, request, timeout_s)
        return OnlineReportResult.from_proto(reply)

    def submit_verdict(self, verdict: Verdict, *, timeout_s: float | None = None) -> FeedbackResult:
        """Store one blind human-evaluation verdict (a verdict for one side is also stored as
        comparison feedback); idempotent by verdict_id, fixed before the first attempt."""
        message = verdict.to_proto()
        reply = self._unary(self._feedback.SubmitVerdict, message, timeout_s)
        return FeedbackResult.from_proto(reply)

    def human_evaluation(
        self,
        version_a: str,
        version_b: str,
        *,
        alpha: float | None = None,
        timeout_s: float | None = None,
    ) -> HumanEvaluationResult:
        """Version A's win rate over B from raters' verdicts, overall and per rater, with Wilson
        intervals at level 1 - alpha (default 0.05)."""
        request = pb.GetHumanEvaluationRequest(
            version_a=version_a, version_b=version_b, alpha=alpha or 0.0
        )
        reply = self._unary(self._admin.GetHumanEvaluation, request, timeout_s)
        return HumanEvaluationResult.from_proto(reply)

    def load_version(self, version: str, *, timeout_s: float | None = None) -> list[str]:
        """Load a published version on the server for requests that name it (admin); the
        versions loaded after."""
        request = pb.LoadVersionRequest(version=version)
        reply = self._unary(self._admin.LoadVersion, request, timeout_s or 60.0)
        return list(reply.loaded_versions)

    def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """The grpc.health.v1 status: SERVING, NOT_SERVING, SERVICE_UNKNOWN or UNKNOWN."""
        request = health_pb2.HealthCheckRequest(service=service)
        return health.status_name(self._unary(self._health.Check, request, timeout_s))

    def wait_until_serving(self, timeout_s: float = 30.0, service: str = "") -> None:
        """Block until the health check says SERVING; FeedloopClientError on timeout."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = self.health(service, timeout_s=max(deadline - time.monotonic(), 0.05))
            except FeedloopClientError as exc:
                last = str(exc)
            if last == "SERVING":
                return
            time.sleep(0.05)
        raise FeedloopClientError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"{self.options.grpc_target} not serving after {timeout_s:g}s (last: {last})",
        )
