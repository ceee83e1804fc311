"""The OpenAI-compatible HTTP API: a second front door on the server's event loop (aiohttp).

    POST /v1/completions, POST /v1/chat/completions  ─▶ GenerationService.generate (the batcher)
    GET  /v1/models                                   ─▶ the loaded versions
    POST /v1/feedback (feedloop's extension)          ─▶ FeedbackService.submit (durable, deduped)

Every handler translates (openai_wire.py), calls the one domain method the gRPC servicer calls,
and maps errors through errors.status_of, so HTTP and gRPC requests are checked, batched,
logged and stored alike. Keys and roles are the gRPC ones (`Authorization: Bearer KEY`, decided
by auth.admit), and so is the rate limit: one bucket per key whichever door a call comes in by.
Errors are OpenAI's JSON error bodies; `param` names the offending parameter.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format

from feedloop.server.auth import RATE_LIMITED, Authenticator, Caller, Refused, admit
from feedloop.server.errors import InvalidArgument, NotFound, status_of
from feedloop.server.feedback import FeedbackService
from feedloop.server.generation import GenerationService
from feedloop.server.live_model import LiveModel, LoadedModel
from feedloop.server.metrics import ServerMetrics
from feedloop.server.openai_wire import (
    MODEL_ALIAS,
    completion_chunks,
    completion_json,
    openai_param,
    parse_completion,
)
from feedloop.server.ratelimit import RateLimiter
from feedloop.server.rpc import CallMetrics
from feedloop.v1 import feedloop_pb2 as pb

log = logging.getLogger("feedloop.server.http")

# google.rpc's mapping of status codes to HTTP (google/rpc/code.proto).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# OpenAI's error `type` by HTTP status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
}
OUTCOMES = {pb.FEEDBACK_OUTCOME_ACCEPTED: "accepted", pb.FEEDBACK_OUTCOME_DUPLICATE: "duplicate"}

CODE = web.ResponseKey("feedloop_code", grpc.StatusCode)  # what a response counts as
RATE_LIMITED_REFUSAL = web.ResponseKey("feedloop_rate_limited", bool)  # counted apart
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: BaseException, *, chat: bool = False) -> web.Response:
    """OpenAI's error body for any error, with the HTTP status of its gRPC code."""
    code, message = status_of(exc)
    status = HTTP_STATUS.get(code, 500)
    param = None
    if isinstance(exc, InvalidArgument):
        param = openai_param(exc.field, chat=chat)
        message = f"{param}: {message.removeprefix(exc.field + ': ')}"
    elif isinstance(exc, NotFound) and exc.field is not None:
        param = openai_param(exc.field, chat=chat)
    if status == 500:
        log.error("internal error", exc_info=exc)
    error = {
        "message": message,
        "type": ERROR_TYPES.get(status, "server_error"),
        "param": param,
        "code": code.name.lower(),
    }
    response = web.json_response({"error": error}, status=status)
    delay_s = getattr(exc, "retry_delay_s", None)
    if delay_s is not None:
        # HTTP's Retry-After counts whole seconds; the OpenAI SDKs also read retry-after-ms.
        response.headers["Retry-After"] = str(max(1, math.ceil(delay_s)))
        response.headers["retry-after-ms"] = str(round(delay_s * 1000))
    response[CODE] = code
    response[RATE_LIMITED_REFUSAL] = isinstance(exc, Refused) and exc.reason == RATE_LIMITED
    return response


class HttpApi:
    def __init__(
        self,
        generation: GenerationService,
        feedback: FeedbackService,
        live_model: LiveModel,
        authenticator: Authenticator,
        limiter: RateLimiter,
        metrics: ServerMetrics,
        *,
        max_body_bytes: int,
    ) -> None:
        self.generation = generation
        self.feedback = feedback
        self.live_model = live_model
        self.authenticator = authenticator
        self.limiter = limiter
        self.metrics = metrics
        self.app = web.Application(client_max_size=max_body_bytes)
        routes = (
            ("POST", "/v1/completions", self.completions),
            ("POST", "/v1/chat/completions", self.chat_completions),
            ("GET", "/v1/models", self.models),
            ("POST", "/v1/feedback", self.submit_feedback),
        )
        for method, path, handler in routes:
            self.app.router.add_route(method, path, self._counted(path, handler))
        self._runner: web.AppRunner | None = None

    def _counted(self, path: str, handler: Handler) -> Handler:
        """Count and time every call in feedloop_requests{method="HTTP /v1/..."} (or, refused
        by its key's rate limit, in feedloop_rate_limited)."""
        calls = CallMetrics(self.metrics, f"HTTP {path}")

        async def counted(request: web.Request) -> web.StreamResponse:
            started = time.perf_counter()
            code = grpc.StatusCode.CANCELLED  # unless it finishes: the client went away
            rate_limited = False
            try:
                response = await handler(request)
                code = response.get(CODE, grpc.StatusCode.OK)
                rate_limited = response.get(RATE_LIMITED_REFUSAL, False)
                return response
            finally:
                if rate_limited:
                    calls.rate_limited()
                else:
                    calls.done(code, started)

        return counted

    def _caller(self, request: web.Request, role: str) -> Caller:
        header = request.headers.get("Authorization")
        metadata = [("authorization", header)] if header is not None else []
        try:
            return admit(self.authenticator, self.limiter, metadata, role)
        except Refused as refused:
            self.metrics.auth_denied.labels(refused.reason).inc()
            raise

    async def start(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None, *, grace_s: float
    ) -> int:
        """Serve on host:port (0 picks a free port); returns the bound port. grace_s: how long
        calls in flight may take to finish once `stop` is called."""
        # handler_cancellation: a client that hangs up cancels its handler, so the batcher
        # drops its queued job (as it does for a cancelled gRPC call).
        self._runner = web.AppRunner(
            self.app, handler_cancellation=True, access_log=None, shutdown_timeout=grace_s
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        await site.start()
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop taking calls and let those in flight finish (within start's grace_s)."""
        if self._runner is not None:
            await self._runner.cleanup()

    # -- handlers --------------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def _complete(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            caller = self._caller(request, "generate")
            call = parse_completion(await _json_body(request), chat=chat)
            reply = await self.generation.generate(
                call.request,
                client_id=caller.client_id,
                deadline=None,
                key_name=caller.key_name,
            )
        except Exception as exc:
            return error_response(exc, chat=chat)
        if not call.stream:
            return web.json_response(completion_json(call, reply))
        # Server-sent events, as OpenAI streams; the reply is whole by now, so nothing can fail
        # after the 200 has gone out except the connection.
        stream = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await stream.prepare(request)
        for chunk in completion_chunks(call, reply):
            await stream.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await stream.write(b"data: [DONE]\n\n")
        await stream.write_eof()
        return stream

    async def models(self, request: web.Request) -> web.StreamResponse:
        try:
            self._caller(request, "generate")
        except Refused as exc:
            return error_response(exc)
        live = self.live_model.live
        models = [_model_entry(MODEL_ALIAS, live)]
        models += [_model_entry(model.version, model) for model in self.live_model.servable()]
        return web.json_response({"object": "list", "data": models})

    async def submit_feedback(self, request: web.Request) -> web.StreamResponse:
        """The body is a feedloop.v1.FeedbackEvent in protobuf's JSON form."""
        try:
            caller = self._caller(request, "feedback")
            body = await _json_body(request)
            if not isinstance(body, dict):
                raise InvalidArgument("body", "must be a JSON object (a FeedbackEvent)")
            try:
                event = json_format.ParseDict(body, pb.FeedbackEvent())
            except json_format.ParseError as exc:
                raise InvalidArgument("body", f"not a FeedbackEvent: {exc}") from None
            ack = await self.feedback.submit(event, caller)
        except Exception as exc:
            return error_response(exc)
        return web.json_response({"event_id": ack.event_id, "outcome": OUTCOMES[ack.outcome]})


def _model_entry(name: str, model: LoadedModel | None) -> dict[str, Any]:
    """One /v1/models entry; `feedloop_version` says which version the name serves now."""
    return {
        "id": name,
        "object": "model",
        "created": int(model.loaded_at) if model else 0,
        "owned_by": "feedloop",
        "feedloop_version": model.version if model else None,
    }


async def _json_body(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except web.HTTPRequestEntityTooLarge as exc:
        raise InvalidArgument("body", exc.text or "too large") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument("body", f"not valid JSON: {exc}") from None


def server_ssl_context(
    cert: Path | None, key: Path | None, client_ca: Path | None
) -> ssl.SSLContext | None:
    """The gRPC server's TLS settings, for HTTPS (None without a certificate: plain HTTP)."""
    if cert is None or key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca is not None:  # mutual TLS, as on gRPC
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
