"""The standard grpc.health.v1 check, with grpcio-health-checking's generated messages and stub.

That package needs only grpcio and protobuf, so the base (client) install carries it.
"""

from __future__ import annotations

from grpc_health.v1 import health_pb2

_STATUS = health_pb2.HealthCheckResponse.ServingStatus


def status_name(response: health_pb2.HealthCheckResponse) -> str:
    """SERVING, NOT_SERVING, SERVICE_UNKNOWN or UNKNOWN; UNKNOWN(n) for a status these
    messages do not know (a newer server's)."""
    try:
        return _STATUS.Name(response.status)
    except ValueError:
        return f"UNKNOWN({response.status})"
