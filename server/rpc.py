"""What every feedloop RPC goes through: count it, time it, and map its errors to a gRPC status.

Servicer methods are decorated with `unary` or `streaming`; they raise ServiceError (or core
errors) and never call context.abort themselves, so `errors.status_of` stays the one place that
decides status codes (and `errors.rich_status` the one that adds their google.rpc details).
The metric children are bound once per (method, code), not per call.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from feedloop.server.errors import InvalidArgument, rich_status, status_of
from feedloop.server.metrics import ServerMetrics
from feedloop.v1 import feedloop_pb2 as pb

log = logging.getLogger("feedloop.server")


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What a request deserializes to when its bytes are not a valid message (or hold a string
    that is not UTF-8): the handler answers INVALID_ARGUMENT, instead of grpc's UNKNOWN."""

    type_name: str
    error: str

    def problem(self) -> InvalidArgument:
        return InvalidArgument("request", f"not a valid {self.type_name}: {self.error}")


def _tolerant(message_cls: Any) -> Any:
    parse = message_cls.FromString
    name = message_cls.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return Undecodable(name, str(exc))

    return deserialize


_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_service(server: grpc.aio.Server, servicer: Any, service_name: str) -> None:
    """Register a feedloop.v1 service, like the generated add_*_to_server but with request
    deserializers that turn undecodable bytes into Undecodable rather than raising."""
    service = pb.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        make = _HANDLERS[method.client_streaming, method.server_streaming]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_tolerant(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


class CallMetrics:
    """Bound metric children of one method."""

    def __init__(self, metrics: ServerMetrics, method: str) -> None:
        self.duration = metrics.request_duration.labels(method)
        self._requests = metrics.requests
        self._rate_limited = metrics.rate_limited.labels(method)
        self._method = method
        self._by_code: dict[grpc.StatusCode, Any] = {}

    def done(self, code: grpc.StatusCode, started: float) -> None:
        child = self._by_code.get(code)
        if child is None:
            child = self._by_code[code] = self._requests.labels(self._method, code.name)
        child.inc()
        self.duration.observe(time.perf_counter() - started)

    def rate_limited(self) -> None:
        """A call its key's rate limit refused: counted apart from the answered calls."""
        self._rate_limited.inc()


def _call_metrics(servicer: Any, method: str) -> CallMetrics:
    cache: dict[str, CallMetrics] = servicer.__dict__.setdefault("_call_metrics", {})
    found = cache.get(method)
    if found is None:
        metrics: ServerMetrics = servicer.metrics
        found = cache[method] = CallMetrics(metrics, method)
    return found


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> grpc.StatusCode:
    """End the call with exc's status: its code, its message and its google.rpc details."""
    status = rich_status(exc, context.time_remaining())
    if status.code == grpc.StatusCode.INTERNAL:
        log.error("internal error", exc_info=exc)
    await context.abort(status.code, status.details, status.trailing_metadata)
    return status.code  # not reached: abort raises


def unary(method: str) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    def wrap(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(fn)
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            calls = _call_metrics(self, method)
            code = grpc.StatusCode.OK
            try:
                if type(request) is Undecodable:
                    raise request.problem()
                return await fn(self, request, context)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                code = status_of(exc)[0]
                await abort(context, exc)
            finally:
                calls.done(code, started)

        return handler

    return wrap


def streaming(
    method: str,
) -> Callable[[Callable[..., AsyncGenerator[Any, None]]], Callable[..., Awaitable[None]]]:
    """For a servicer method written as an async generator of responses. The handler grpc sees
    is a coroutine that writes each response itself (context.write): one async-generator layer
    per message fewer than handing grpc a generator wrapped around the method's own."""

    def wrap(fn: Callable[..., AsyncGenerator[Any, None]]) -> Callable[..., Awaitable[None]]:
        @functools.wraps(fn)
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> None:
            started = time.perf_counter()
            calls = _call_metrics(self, method)
            code = grpc.StatusCode.OK
            responses = fn(self, request, context)
            write = context.write
            writing = False
            try:
                async for response in responses:
                    writing = True
                    await write(response)
                    writing = False
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                if writing:  # the call broke under a write (the client went away): grpc's case
                    code = grpc.StatusCode.CANCELLED
                    raise
                code = status_of(exc)[0]
                await abort(context, exc)
            finally:
                try:
                    await responses.aclose()
                finally:
                    calls.done(code, started)

        return handler

    return wrap
