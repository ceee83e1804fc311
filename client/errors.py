"""The one exception the client raises: a failed call, with its gRPC status code and message."""

from __future__ import annotations

import grpc


class FeedloopClientError(Exception):
    """A call failed. `code` is the gRPC status code, `message` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> FeedloopClientError:
        # grpc.RpcError raised by a call is also a grpc.Call (sync) or an AioRpcError (asyncio);
        # both expose code() and details().
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")
