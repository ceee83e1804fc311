"""The edge of every feedloop RPC: count it, time it, and map its errors to a gRPC status.

Servicer methods are decorated with `unary` or `streaming`; they raise ServiceError (or core
errors) and never call context.abort themselves, so `errors.status_of` stays the one place that
decides status codes. The metric children are bound once per (method, code), not per call.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from feedloop.server.errors import status_of
from feedloop.server.metrics import ServerMetrics

log = logging.getLogger("feedloop.server")


class CallMetrics:
    """Bound metric children of one method."""

    def __init__(self, metrics: ServerMetrics, method: str) -> None:
        self.duration = metrics.request_duration.labels(method)
        self._requests = metrics.requests
        self._method = method
        self._by_code: dict[grpc.StatusCode, Any] = {}

    def done(self, code: grpc.StatusCode, started: float) -> None:
        child = self._by_code.get(code)
        if child is None:
            child = self._by_code[code] = self._requests.labels(self._method, code.name)
        child.inc()
        self.duration.observe(time.perf_counter() - started)


def _call_metrics(servicer: Any, method: str) -> CallMetrics:
    cache: dict[str, CallMetrics] = servicer.__dict__.setdefault("_call_metrics", {})
    found = cache.get(method)
    if found is None:
        metrics: ServerMetrics = servicer.metrics
        found = cache[method] = CallMetrics(metrics, method)
    return found


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> grpc.StatusCode:
    code, message = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("internal error", exc_info=exc)
    await context.abort(code, message)
    return code  # not reached: abort raises


def unary(method: str) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    def wrap(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(fn)
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            calls = _call_metrics(self, method)
            code = grpc.StatusCode.OK
            try:
                return await fn(self, request, context)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                code = status_of(exc)[0]
                await _abort(context, exc)
            finally:
                calls.done(code, started)

        return handler

    return wrap


def streaming(
    method: str,
) -> Callable[[Callable[..., AsyncIterator[Any]]], Callable[..., AsyncIterator[Any]]]:
    def wrap(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        @functools.wraps(fn)
        async def handler(
            self: Any, request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            started = time.perf_counter()
            calls = _call_metrics(self, method)
            code = grpc.StatusCode.OK
            try:
                async for response in fn(self, request, context):
                    yield response
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                code = status_of(exc)[0]
                await _abort(context, exc)
            finally:
                calls.done(code, started)

        return handler

    return wrap
