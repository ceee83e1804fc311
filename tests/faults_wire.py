"""Wire-level tools of the fault and fuzz tests: bytes the real proto classes refuse to build.

- `TWIN`: a twin of every feedloop.v1 message in which each `string` field is `bytes`. The field
  numbers and wire types are the same (both are length-delimited), so a twin serialises to what
  the real message would, except that its "strings" may hold invalid UTF-8, which the real
  classes cannot even be built with.
- `raw_stub`: a method callable with identity (de)serializers, to send arbitrary bytes.
- `METHOD_PATHS`: every feedloop.v1 RPC with its request/response shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2

from feedloop.v1 import feedloop_pb2 as pb

TWIN_PACKAGE = "feedlooptwin.v1"


def _twin_pool() -> descriptor_pool.DescriptorPool:
    """A private pool holding feedloop.proto re-typed: string -> bytes, package renamed."""
    file_proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(file_proto)
    file_proto.name = "feedlooptwin/v1/feedloop_twin.proto"
    file_proto.package = TWIN_PACKAGE
    del file_proto.service[:]  # the twin is only for encoding messages
    for message in file_proto.message_type:
        for field in message.field:
            if field.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
                field.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
            if field.type_name.startswith(".feedloop.v1."):
                field.type_name = field.type_name.replace(".feedloop.v1.", f".{TWIN_PACKAGE}.")
    pool = descriptor_pool.DescriptorPool()
    timestamp_proto = descriptor_pb2.FileDescriptorProto()
    timestamp_pb2.DESCRIPTOR.CopyToProto(timestamp_proto)
    pool.Add(timestamp_proto)
    pool.Add(file_proto)
    return pool


class _Twins:
    def __init__(self) -> None:
        pool = _twin_pool()
        self._classes: dict[str, Any] = {}
        for name in pb.DESCRIPTOR.message_types_by_name:
            descriptor = pool.FindMessageTypeByName(f"{TWIN_PACKAGE}.{name}")
            self._classes[name] = message_factory.GetMessageClass(descriptor)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._classes[name]
        except KeyError:
            raise AttributeError(name) from None


TWIN = _Twins()


@dataclass(frozen=True)
class Method:
    path: str
    request: Any  # the real request class
    client_streaming: bool


METHOD_PATHS: tuple[Method, ...] = (
    Method("/feedloop.v1.Generation/Generate", pb.GenerateRequest, False),
    Method("/feedloop.v1.Feedback/Submit", pb.FeedbackEvent, False),
    Method("/feedloop.v1.Feedback/SubmitStream", pb.FeedbackEvent, True),
    Method("/feedloop.v1.ModelAdmin/ListModels", pb.ListModelsRequest, False),
    Method("/feedloop.v1.ModelAdmin/GetStatus", pb.GetStatusRequest, False),
    Method("/feedloop.v1.ModelAdmin/SetLive", pb.SetLiveRequest, False),
    Method("/feedloop.v1.ModelAdmin/Rollback", pb.RollbackRequest, False),
)


def _identity(data: bytes) -> bytes:
    return data


def raw_stub(channel: grpc.Channel, method: Method) -> Any:
    """A callable sending raw bytes to method (stream methods take an iterator of bytes)."""
    if method.client_streaming:
        return channel.stream_stream(
            method.path, request_serializer=_identity, response_deserializer=_identity
        )
    return channel.unary_unary(
        method.path, request_serializer=_identity, response_deserializer=_identity
    )


def parses(message_class: Any, data: bytes) -> bool:
    """True when data is a message of message_class by the real (UTF-8 checking) parser."""
    try:
        message_class.FromString(data)
    except Exception:
        return False
    return True
