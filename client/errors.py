"""The one exception the client raises: a failed call, with its gRPC status code and message,
and what the server's google.rpc details say (the fields at fault, how long to wait)."""

from __future__ import annotations

from typing import Any, NamedTuple

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

# The trailer that carries a google.rpc.Status (grpc's convention in every language).
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class FieldViolation(NamedTuple):
    """One request field the server refused, and why."""

    field: str
    description: str


class FeedloopClientError(Exception):
    """A call failed. `code` is the gRPC status code, `message` the server's explanation;
    `field_violations` names the request fields at fault (INVALID_ARGUMENT) and
    `retry_delay_s` how long the server asks the caller to wait before trying again (None when
    it does not say)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        field_violations: tuple[FieldViolation, ...] = (),
        retry_delay_s: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.field_violations = field_violations
        self.retry_delay_s = retry_delay_s

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> FeedloopClientError:
        # grpc.RpcError raised by a call is also a grpc.Call (sync) or an AioRpcError (asyncio);
        # both expose code(), details() and trailing_metadata().
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
        violations, retry_delay_s = _read_details(_status_of(trailers))
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", violations, retry_delay_s)


def _status_of(trailers: Any) -> status_pb2.Status | None:
    for key, value in trailers or ():
        if key == STATUS_DETAILS_KEY:
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                return None  # a garbled trailer leaves the code and message, which still hold
    return None


def _read_details(
    status: status_pb2.Status | None,
) -> tuple[tuple[FieldViolation, ...], float | None]:
    violations: list[FieldViolation] = []
    retry_delay_s = None
    for detail in status.details if status is not None else ():
        bad_request = error_details_pb2.BadRequest()
        retry_info = error_details_pb2.RetryInfo()
        if detail.Unpack(bad_request):
            violations.extend(
                FieldViolation(v.field, v.description) for v in bad_request.field_violations
            )
        elif detail.Unpack(retry_info):
            retry_delay_s = retry_info.retry_delay.ToNanoseconds() / 1e9
    return tuple(violations), retry_delay_s
