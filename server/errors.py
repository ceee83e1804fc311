"""The server's named errors and the one place that maps every error to a gRPC status.

Servicers and the parts behind them raise these (or the core's errors); `status_of` turns any of
them into (code, message) for the caller, with a message that says what to fix.
"""

from __future__ import annotations

import grpc

from feedloop.core.errors import (
    CheckpointError,
    LiveChanged,
    RegistryError,
    StoreFullError,
    StoreUnavailableError,
    UnknownVersionError,
)


class ServiceError(Exception):
    """Base of the errors a caller sees; `code` is the gRPC status it maps to."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    """A request field is invalid; the message starts with the field's name."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(ServiceError):
    """A named generation or model version does not exist (or is not loaded); `field`, when
    known, names the request field that named it."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Overloaded(ServiceError):
    """A bounded queue is full: the caller should back off and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    """The server cannot serve now (draining, no model, store down); retrying may succeed."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(ServiceError):
    """The system is not in a state where the call makes sense (nothing to roll back to)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


def require_text(value: str, field: str) -> str:
    """Refuse NUL characters: PostgreSQL text cannot hold them, so such a record could never be
    stored (and SQLite would store it while PostgreSQL refused it)."""
    if "\x00" in value:
        raise InvalidArgument(field, "must not contain NUL characters")
    return value


def in_context(exc: BaseException, prefix: str) -> ServiceError:
    """The same status as exc, with a message that starts with prefix (e.g. the event id)."""
    code, message = status_of(exc)
    wrapped = ServiceError(f"{prefix}: {message}")
    wrapped.code = code
    return wrapped


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for any error raised while serving a call."""
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, UnknownVersionError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, CheckpointError):
        return grpc.StatusCode.FAILED_PRECONDITION, f"checkpoint refused: {exc}"
    # gRPC's code for a failed compare-and-set: the caller should read again and decide anew.
    if isinstance(exc, LiveChanged):
        return grpc.StatusCode.ABORTED, str(exc)
    if isinstance(exc, RegistryError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    # A full disk is a capacity problem the operator must fix; RESOURCE_EXHAUSTED tells clients
    # not to hammer it, unlike UNAVAILABLE (which well-behaved clients retry at once).
    if isinstance(exc, StoreFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"replay store is full: {exc}"
    if isinstance(exc, StoreUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, f"replay store unavailable: {exc}"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
