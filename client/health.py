"""The standard grpc.health.v1 check, spoken without the grpcio-health-checking package.

The base install promises grpcio and protobuf only, and the health messages are two one-field
messages, so their wire format is written here by hand:
    HealthCheckRequest  { string service = 1; }        -> tag 0x0a, length, bytes
    HealthCheckResponse { ServingStatus status = 1; }  -> tag 0x08, varint
"""

from __future__ import annotations

CHECK_METHOD = "/grpc.health.v1.Health/Check"
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_request(service: str) -> bytes:
    name = service.encode("utf-8")
    return b"\x0a" + _varint(len(name)) + name if name else b""


def decode_response(data: bytes) -> str:
    """The serving status name; fields other than `status` are skipped per the wire rules."""
    status, i = 0, 0
    while i < len(data):
        key, i = _read_varint(data, i)
        field_number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, i = _read_varint(data, i)
            if field_number == 1:
                status = value
        elif wire_type == 2:
            length, i = _read_varint(data, i)
            i += length
        elif wire_type == 1:
            i += 8
        elif wire_type == 5:
            i += 4
        else:
            raise ValueError(f"unexpected wire type {wire_type} in a health response")
    return STATUS_NAMES.get(status, f"UNKNOWN({status})")


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= len(data):
            raise ValueError("truncated varint in a health response")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
