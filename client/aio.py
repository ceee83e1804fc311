"""The asyncio feedloop client: the same calls as FeedloopClient, awaitable.

from feedloop.client import AsyncFeedloopClient

async with AsyncFeedloopClient("127.0.0.1:50051") as client:
    result = await client.generate("ocean sunrise", n=3)
    await client.compare(result.candidates[0].generation_id,
                         result.candidates[1].generation_id)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
import grpc.aio
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


def open_aio_channel(options: ClientOptions) -> grpc.aio.Channel:
    if options.uses_tls:
        return grpc.aio.secure_channel(
            options.grpc_target, options.channel_credentials(), options=options.channel_args()
        )
    return grpc.aio.insecure_channel(options.grpc_target, options=options.channel_args())


class AsyncFeedloopClient:
    """An asyncio connection to one feedloop server. Create it inside the running loop."""

    def __init__(self, target: str | None = None, **options: Any) -> None:
        if target is not None:
            options["target"] = target
        self.options = ClientOptions(**options)
        self._channel = open_aio_channel(self.options)
        self._metadata = self.options.metadata()
        self._generation = pb_grpc.GenerationStub(self._channel)
        self._feedback = pb_grpc.FeedbackStub(self._channel)
        self._admin = pb_grpc.ModelAdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncFeedloopClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, method: Any, request: Any, timeout_s: float | None) -> Any:
        """One call; gRPC makes its retries (the channel's service config)."""
        try:
            return await method(
                request, timeout=timeout_s or self.options.timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise FeedloopClientError.from_rpc_error(exc) from None

    async def generate(
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
        reply = await self._unary(self._generation.Generate, request, timeout_s)
        return GenerateResult.from_proto(reply)

    async def submit(
        self, event: FeedbackInput, *, timeout_s: float | None = None
    ) -> FeedbackResult:
        message = event_to_proto(event)  # event_id fixed once, before any attempt
        return FeedbackResult.from_proto(
            await self._unary(self._feedback.Submit, message, timeout_s)
        )

    async def rate(
        self,
        generation_id: str,
        score: float,
        *,
        scale: str = "unit",
        event_id: str | None = None,
        timeout_s: float | None = None,
    ) -> FeedbackResult:
        return await self.submit(Rating(generation_id, score, scale, event_id), timeout_s=timeout_s)

    async def rank(
        self,
        generation_ids: Sequence[str],
        *,
        event_id: str | None = None,
        timeout_s: float | None = None,
    ) -> FeedbackResult:
        return await self.submit(Ranking(tuple(generation_ids), event_id), timeout_s=timeout_s)

    async def compare(
        self,
        preferred_id: str,
        rejected_id: str,
        *,
        event_id: str | None = None,
        timeout_s: float | None = None,
    ) -> FeedbackResult:
        return await self.submit(
            Comparison(preferred_id, rejected_id, event_id), timeout_s=timeout_s
        )

    async def correct(
        self,
        generation_id: str,
        text: str,
        *,
        event_id: str | None = None,
        timeout_s: float | None = None,
    ) -> FeedbackResult:
        return await self.submit(Correction(generation_id, text, event_id), timeout_s=timeout_s)

    async def submit_many(
        self, events: Iterable[FeedbackInput], *, timeout_s: float | None = None
    ) -> list[FeedbackResult]:
        """Send events over one stream; unacknowledged ones are resent (same ids) on UNAVAILABLE."""
        messages = [event_to_proto(e) for e in events]
        results: list[FeedbackResult] = []
        policy = self.options.retry
        deadline = time.monotonic() + (timeout_s or self.options.timeout_s)

        async def attempt(remaining_s: float) -> list[FeedbackResult]:
            pending = messages[len(results) :]
            call = self._feedback.SubmitStream(timeout=remaining_s, metadata=self._metadata)
            # One write, then its ack, in lock-step: when a write is still in flight as the
            # server ends the call (say INVALID_ARGUMENT on a bad event), grpc.aio can report
            # INTERNAL "Internal error from Core" instead of the server's status (seen in about
            # 3% of runs of the broken-stream test), and the caller must get the real code.
            for message in pending:
                try:
                    await call.write(message)
                except asyncio.InvalidStateError:
                    break  # the server ended the call; its status is read below
                ack = await call.read()
                if ack is grpc.aio.EOF:
                    break
                results.append(FeedbackResult.from_proto(ack))
            with contextlib.suppress(asyncio.InvalidStateError):
                await call.done_writing()
            if await call.read() is not grpc.aio.EOF:
                raise FeedloopClientError(grpc.StatusCode.INTERNAL, "more acks than events")
            status = await call.code()
            if status != grpc.StatusCode.OK:
                raise FeedloopClientError(status, await call.details() or "")
            if len(results) != len(messages):
                raise FeedloopClientError(
                    grpc.StatusCode.INTERNAL,
                    f"feedback stream closed with {len(results)} acks for {len(messages)} events",
                )
            return results

        # The stream's resend of unacknowledged events, which no service config can do.
        number = 1
        while True:
            try:
                return await attempt(max(deadline - time.monotonic(), 0.001))
            except grpc.RpcError as exc:
                error = FeedloopClientError.from_rpc_error(exc)
            except FeedloopClientError as exc:  # the stream ended short of its acks
                error = exc
            delay_s = policy.delay_s(number, error.code, error.retry_delay_s)
            if delay_s is None or time.monotonic() + delay_s >= deadline:
                raise error
            await asyncio.sleep(delay_s)
            number += 1

    async def list_models(
        self, *, max_decisions: int = 0, timeout_s: float | None = None
    ) -> ModelsResult:
        request = pb.ListModelsRequest(max_decisions=max_decisions)
        return ModelsResult.from_proto(
            await self._unary(self._admin.ListModels, request, timeout_s)
        )

    async def status(self, *, timeout_s: float | None = None) -> StatusResult:
        reply = await self._unary(self._admin.GetStatus, pb.GetStatusRequest(), timeout_s)
        return StatusResult.from_proto(reply)

    async def set_live(
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
        return SetLiveResult.from_proto(await self._unary(self._admin.SetLive, request, timeout_s))

    async def rollback(self, *, reason: str = "", timeout_s: float | None = None) -> SetLiveResult:
        request = pb.RollbackRequest(reason=reason)
        return SetLiveResult.from_proto(await self._unary(self._admin.Rollback, request, timeout_s))

    async def start_trial(
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
        reply = await self._unary(self._admin.StartTrial, request, timeout_s)
        return RegistryStateResult.from_proto(reply)

    async def end_trial(
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
        reply = await self._unary(self._admin.EndTrial, request, timeout_s)
        return RegistryStateResult.from_proto(reply)

    async def set_pinned(
        self, version: str, pinned: bool = True, *, reason: str = "", timeout_s: float | None = None
    ) -> PinsResult:
        """Pin a published version (registry retention keeps its weights), or unpin it."""
        request = pb.SetPinnedRequest(version=version, pinned=pinned, reason=reason)
        return PinsResult.from_proto(await self._unary(self._admin.SetPinned, request, timeout_s))

    async def set_trainer_paused(
        self, paused: bool, *, reason: str = "", timeout_s: float | None = None
    ) -> RegistryStateResult:
        """Pause (True) or resume (False) the trainer's publication of new versions."""
        request = pb.SetTrainerPausedRequest(paused=paused, reason=reason)
        reply = await self._unary(self._admin.SetTrainerPaused, request, timeout_s)
        return RegistryStateResult.from_proto(reply)

    async def online_report(
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
        reply = await self._unary(self._admin.GetOnlineReport, request, timeout_s)
        return OnlineReportResult.from_proto(reply)

    async def submit_verdict(
        self, verdict: Verdict, *, timeout_s: float | None = None
    ) -> FeedbackResult:
        """Store one blind human-evaluation verdict (a verdict for one side is also stored as
        comparison feedback); idempotent by verdict_id, fixed before the first attempt."""
        message = verdict.to_proto()
        reply = await self._unary(self._feedback.SubmitVerdict, message, timeout_s)
        return FeedbackResult.from_proto(reply)

    async def human_evaluation(
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
        reply = await self._unary(self._admin.GetHumanEvaluation, request, timeout_s)
        return HumanEvaluationResult.from_proto(reply)

    async def load_version(self, version: str, *, timeout_s: float | None = None) -> list[str]:
        """Load a published version on the server for requests that name it (admin); the
        versions loaded after."""
        request = pb.LoadVersionRequest(version=version)
        reply = await self._unary(self._admin.LoadVersion, request, timeout_s or 60.0)
        return list(reply.loaded_versions)

    async def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        request = health_pb2.HealthCheckRequest(service=service)
        return health.status_name(await self._unary(self._health.Check, request, timeout_s))
