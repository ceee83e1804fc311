"""The server's named errors and the one place that maps every error to a gRPC status.

Servicers and the parts behind them raise these (or the core's errors); `status_of` turns any of
them into (code, message) for the caller, with a message that says what to fix, and
`rich_status` adds the google.rpc details a client in any language can read without parsing
the message: BadRequest naming the field, RetryInfo on back-pressure, ResourceInfo naming what
was not found, ErrorInfo with a machine-readable reason.
"""

from __future__ import annotations

import dataclasses
import math
import re

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from feedloop.core.errors import (
    CheckpointError,
    LiveChanged,
    RegistryError,
    StoreFullError,
    StoreUnavailableError,
    UnknownVersionError,
)

# ErrorInfo's domain, and ResourceInfo's types of what a caller can name.
ERROR_DOMAIN = "feedloop"
MODEL_VERSION = "model_version"
GENERATION = "generation"
# A status message or detail never exceeds this (a 100,000-character name echoed whole once made
# a NOT_FOUND larger than gRPC's metadata limit, which default clients see as RESOURCE_EXHAUSTED).
MAX_MESSAGE_CHARS = 512
# How much of a caller's value a message quotes.
QUOTE_CHARS = 40
# The directories of an absolute file system path (two components or more): the server's layout
# is not the caller's business; the last component (a file's name, "LIVE") stays, as it says
# what is wrong. The look-behind spares "requests/s" and "a/b"-style words.
_PATH = re.compile(r"(?<![\w.])/(?:[^\s/'\"]+/)+")


def quote(value: str) -> str:
    """repr of value, or of its first QUOTE_CHARS characters and its length when longer."""
    if len(value) <= QUOTE_CHARS:
        return repr(value)
    return f"{value[:QUOTE_CHARS]!r}... ({len(value)} characters)"


def scrub(message: str) -> str:
    """A message fit for a caller: file system paths replaced, at most MAX_MESSAGE_CHARS long."""
    message = _PATH.sub("<path>/", message)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    return message


class ServiceError(Exception):
    """Base of the errors a caller sees; `code` is the gRPC status it maps to."""

    code = grpc.StatusCode.INTERNAL
    # Seconds the caller should wait before retrying (sent as RetryInfo); None: do not say.
    retry_delay_s: float | None = None
    # A machine-readable cause in UPPER_SNAKE_CASE (sent as ErrorInfo); None: the code says it.
    reason: str | None = None


class InvalidArgument(ServiceError):
    """A request field is invalid; the message starts with the field's name."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class NotFound(ServiceError):
    """A named generation or model version does not exist (or is not loaded); `field`, when
    known, names the request field that named it, and `resource` the (type, name) missing."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(
        self, message: str, field: str | None = None, resource: tuple[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.field = field
        self.resource = resource


class AlreadyExists(ServiceError):
    """An idempotency key (a feedback event id) is already taken by a different request."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "EVENT_ID_REUSED"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class Overloaded(ServiceError):
    """A bounded queue is full: the caller should back off and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    # A full queue drains in about a batch or two: long enough not to refill it at once.
    retry_delay_s = 0.5
    reason = "QUEUE_FULL"


class Unavailable(ServiceError):
    """The server cannot serve now (draining, no model, store down); retrying may succeed."""

    code = grpc.StatusCode.UNAVAILABLE
    # A restarting model process or a draining server (whose replacement, or another replica
    # behind the same address, takes over) is back within about a second.
    retry_delay_s = 1.0


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NonFiniteOutput(ServiceError):
    """The model returned a non-finite log-probability for a request's samples: they are not
    served and not logged (the store would refuse them; training would divide by them). Valid
    sampling parameters never lead here, so this is the server's fault: INTERNAL."""

    code = grpc.StatusCode.INTERNAL


class FailedPrecondition(ServiceError):
    """The system is not in a state where the call makes sense (nothing to roll back to)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


def require_text(value: str, field: str) -> str:
    """Refuse NUL characters: PostgreSQL text cannot hold them, so such a record could never be
    stored (and SQLite would store it while PostgreSQL refused it)."""
    if "\x00" in value:
        raise InvalidArgument(field, "must not contain NUL characters")
    return value


class InContext(ServiceError):
    """Another error's status, with a message that starts with prefix (e.g. the event id); its
    details are the inner error's."""

    def __init__(self, inner: BaseException, prefix: str) -> None:
        code, message = status_of(inner)
        super().__init__(f"{prefix}: {message}")
        self.code = code
        self.inner = inner


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for any error raised while serving a call (its message scrubbed)."""
    code, message = _status_of(exc)
    return code, scrub(message)


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
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


def details_of(exc: BaseException) -> list[Message]:
    """The google.rpc detail messages for any error raised while serving a call."""
    if isinstance(exc, InContext):
        return details_of(exc.inner)
    details: list[Message] = []
    if isinstance(exc, InvalidArgument):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=exc.field[: QUOTE_CHARS * 2], description=scrub(exc.problem)
        )
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    elif isinstance(exc, NotFound) and exc.resource is not None:
        resource_type, resource_name = exc.resource
        details.append(
            error_details_pb2.ResourceInfo(
                resource_type=resource_type,
                resource_name=resource_name[:QUOTE_CHARS],
                description=scrub(str(exc)),
            )
        )
    elif isinstance(exc, UnknownVersionError):
        details.append(
            error_details_pb2.ResourceInfo(resource_type=MODEL_VERSION, description=scrub(str(exc)))
        )
    if isinstance(exc, ServiceError):
        if exc.retry_delay_s is not None:
            delay = Duration()
            delay.FromNanoseconds(round(exc.retry_delay_s * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        if exc.reason is not None:
            details.append(
                error_details_pb2.ErrorInfo(reason=exc.reason.upper(), domain=ERROR_DOMAIN)
            )
    return details


def retry_delay_of(exc: BaseException) -> float | None:
    """The seconds exc asks the caller to wait before retrying (its RetryInfo), or None."""
    if isinstance(exc, InContext):
        return retry_delay_of(exc.inner)
    return exc.retry_delay_s if isinstance(exc, ServiceError) else None


# gRFC A6 server pushback: a client whose gRPC service config retries this code waits this many
# milliseconds before its next attempt, or, for a negative value, does not retry at all. It is
# RetryInfo said in the words every gRPC library's retry policy reads.
PUSHBACK_KEY = "grpc-retry-pushback-ms"
# The codes the service config in client/service_config.py retries.
RETRIED_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


def pushback_ms(exc: BaseException, time_remaining_s: float | None) -> str | None:
    """The pushback trailer's value for an error, or None to leave the client's backoff alone.

    RESOURCE_EXHAUSTED without a delay (a full disk) is an answer, not a moment's refusal: no
    retry. Nor is there one when the wait would outlast the call's deadline (time_remaining_s):
    the caller then gets the refusal and its RetryInfo at once, not a DEADLINE_EXCEEDED later.
    """
    code = status_of(exc)[0]
    if code not in RETRIED_CODES:
        return None
    delay_s = retry_delay_of(exc)
    if delay_s is None:
        return "-1" if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None
    if time_remaining_s is not None and delay_s >= time_remaining_s:
        return "-1"
    return str(math.ceil(delay_s * 1000))


def rich_status(exc: BaseException, time_remaining_s: float | None = None) -> grpc.Status:
    """status_of's code and message with details_of's details, as grpc sends them: the
    google.rpc.Status in the `grpc-status-details-bin` trailer, and beside it, for a retried
    code, the A6 pushback (see pushback_ms; time_remaining_s is the call's)."""
    code, message = status_of(exc)
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details_of(exc):
        status.details.add().Pack(detail)
    wire = rpc_status.to_status(status)
    pushback = pushback_ms(exc, time_remaining_s)
    if pushback is None:
        return wire
    trailers = (*wire.trailing_metadata, (PUSHBACK_KEY, pushback))
    return _Status(wire.code, wire.details, trailers)


@dataclasses.dataclass(frozen=True)
class _Status(grpc.Status):
    """grpc.Status is an interface with these three attributes (grpc_status makes its own)."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]
