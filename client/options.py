"""How a client connects: target, credentials, deadlines and the retry policy.

Unary calls are retried by gRPC itself, from the service config the channel is opened with
(client/service_config.py says which methods and codes, and why): UNAVAILABLE, and
RESOURCE_EXHAUSTED when the server invites a retry, waiting at least the delay it names. Other
codes are answers, and repeating the call would only repeat the answer. The feedback stream's
resend of unacknowledged events follows the same policy in Python (RetryPolicy.delay_s). Feedback
stays safe to retry because each event carries an `event_id` fixed before the first attempt,
which the server stores once.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from feedloop.client.service_config import service_config_json

DEFAULT_TARGET = "127.0.0.1:50051"
LOAD_BALANCING_POLICIES = ("round_robin", "pick_first")


def fleet_target(addresses: Sequence[str]) -> str:
    """One gRPC target naming several servers by address: `ipv4:HOST:PORT,HOST:PORT,...` (or
    `ipv6:[HOST]:PORT,...`), gRPC's static address list, which client-side load balancing
    spreads calls over. Host names cannot go in such a list: name them with one DNS name that
    resolves to every replica (`dns:///feedloop.internal:50051`)."""
    addresses = [a.strip() for a in addresses]
    if not addresses:
        raise ValueError("target: no server address given")
    families = set()
    for address in addresses:
        host, sep, port = address.rpartition(":")
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            ip = None
        if not sep or not port.isdigit() or ip is None:
            raise ValueError(
                f"target: {address!r} is not IP:PORT; several servers are named by IP "
                "addresses, or by one DNS name that resolves to all of them "
                "('dns:///NAME:PORT')"
            )
        families.add(ip.version)
    if len(families) > 1:
        raise ValueError("target: IPv4 and IPv6 addresses cannot be mixed in one list")
    return f"ipv{families.pop()}:" + ",".join(addresses)


def normalise_target(target: str | Sequence[str]) -> str:
    """A target as gRPC takes it: a list, or a comma-separated string of several addresses,
    becomes fleet_target's static list; anything else (one address, a URI) is kept as is."""
    if isinstance(target, str):
        if "," not in target or ":/" in target or target.startswith(("ipv4:", "ipv6:")):
            return target
        target = target.split(",")
    addresses = list(target)
    return addresses[0] if len(addresses) == 1 else fleet_target(addresses)


def names_several_servers(target: str) -> bool:
    """Whether calls to target may reach several servers: a static list or a DNS name, whose
    resolver can return one address per replica."""
    return "," in target or target.startswith("dns:")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, on UNAVAILABLE or a server's RetryInfo."""

    # First try included; 1 means no retry. gRPC caps a unary call's attempts at 5.
    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoff times must be >= 0 and multiplier >= 1")

    def backoff_s(self, retry_number: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry `retry_number` (1 for the first retry).

        Full jitter (a uniform draw below the exponential cap) keeps many clients that failed
        together from retrying together.
        """
        exponential_s = self.initial_backoff_s * self.multiplier ** (retry_number - 1)
        cap = min(self.max_backoff_s, exponential_s)
        return (rng or random).uniform(0.0, cap)

    def delay_s(
        self, attempt_number: int, code: grpc.StatusCode, server_delay_s: float | None
    ) -> float | None:
        """Seconds to wait after failed attempt `attempt_number` (1 for the first) before the
        next, or None when the call must not be retried. server_delay_s is the RetryInfo delay
        the failure carried, if any: the server knows how long its queue or rate limit needs."""
        if attempt_number >= self.max_attempts:
            return None
        if code != grpc.StatusCode.UNAVAILABLE and server_delay_s is None:
            return None
        return max(server_delay_s or 0.0, self.backoff_s(attempt_number))


@dataclass(frozen=True)
class ClientOptions:
    """Everything a client needs to reach a server. Paths are read when the channel opens."""

    # One server (HOST:PORT), several (a list, or "HOST:PORT,HOST:PORT"), or any gRPC target URI
    # (`dns:///feedloop.internal:50051`: one name resolving to every replica).
    target: str | Sequence[str] = DEFAULT_TARGET
    # Client-side load balancing across the addresses the target resolves to. None: round_robin
    # where the target names several servers (gRPC's own default, pick_first, would send every
    # call to the first one that answers), gRPC's default otherwise.
    load_balancing: str | None = None
    api_key: str | None = None  # sent as `authorization: Bearer KEY` on every call
    # Who is calling, for a server with auth off (sent as `feedloop-client-name`): the server
    # logs it as the client identity. With auth on, the API key's name is the identity instead.
    client_name: str | None = None
    tls: bool = False  # implied by any of the certificate paths below
    root_ca_path: Path | None = None  # CA bundle that signed the server's certificate
    client_cert_path: Path | None = None  # for mutual TLS, with client_key_path
    client_key_path: Path | None = None
    tls_server_name: str | None = None  # expected name in the server certificate, if not target's
    timeout_s: float = 10.0  # default deadline of one call, retries included
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Longest wait between the channel's attempts to reconnect to a server it lost. gRPC's own
    # default grows to 120 s, so a replica restarted after a few seconds down would get its
    # traffic back only when a doubling backoff next fired; a fleet behind one client wants it
    # back within seconds. Reconnect attempts are one TCP handshake each: cheap.
    max_reconnect_backoff_s: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", normalise_target(self.target))
        if self.load_balancing is not None and self.load_balancing not in LOAD_BALANCING_POLICIES:
            raise ValueError(
                f"load_balancing must be one of {', '.join(LOAD_BALANCING_POLICIES)}, "
                f"not {self.load_balancing!r}"
            )
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if self.max_reconnect_backoff_s <= 0:
            raise ValueError("max_reconnect_backoff_s must be positive")
        if (self.client_cert_path is None) != (self.client_key_path is None):
            raise ValueError("mutual TLS needs both client_cert_path and client_key_path")

    @property
    def grpc_target(self) -> str:
        """The target as gRPC takes it (__post_init__ has made a list of addresses one)."""
        assert isinstance(self.target, str)
        return self.target

    @property
    def uses_tls(self) -> bool:
        return self.tls or any(
            p is not None for p in (self.root_ca_path, self.client_cert_path, self.client_key_path)
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        entries: list[tuple[str, str]] = []
        if self.api_key:
            entries.append(("authorization", f"Bearer {self.api_key}"))
        if self.client_name:
            entries.append(("feedloop-client-name", self.client_name))
        return tuple(entries)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.root_ca_path),
            private_key=read(self.client_key_path),
            certificate_chain=read(self.client_cert_path),
        )

    def channel_args(self) -> list[tuple[str, str | int]]:
        """The channel's options: the retrying service config, the reconnect backoff's bound,
        and TLS's expected name."""
        policy = self.load_balancing
        if policy is None and names_several_servers(self.grpc_target):
            policy = "round_robin"
        # The service config's loadBalancingConfig is gRPC's documented way to choose the
        # policy (grpc.lb_policy_name is the older channel argument for the same thing); one
        # service config per channel, so it travels with the retry policy.
        args: list[tuple[str, str | int]] = [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", service_config_json(self.retry, policy)),
            ("grpc.max_reconnect_backoff_ms", round(self.max_reconnect_backoff_s * 1000)),
        ]
        # gRPC's first reconnect waits 1 s; never longer than the bound asked for.
        if self.max_reconnect_backoff_s < 1.0:
            args.append(
                ("grpc.initial_reconnect_backoff_ms", round(self.max_reconnect_backoff_s * 1000))
            )
        if self.tls_server_name:
            args.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return args
