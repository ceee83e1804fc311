"""How a client connects: target, credentials, deadlines and the retry policy.

Retries cover UNAVAILABLE, the one code that says the request was not processed (the server was
unreachable, restarting or shedding load), and any refusal that carries a google.rpc.RetryInfo:
the server sends one only when it turned the call away before doing anything (a full queue, a
rate limit), and its delay is then the least the client waits. Other codes are answers, and
repeating the call would only repeat the answer. Feedback stays safe to retry because each event
carries an `event_id` fixed before the first attempt, which the server stores once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import grpc

DEFAULT_TARGET = "127.0.0.1:50051"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, on UNAVAILABLE or a server's RetryInfo."""

    max_attempts: int = 4  # first try included; 1 means no retry
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

    target: str = DEFAULT_TARGET
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

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if (self.client_cert_path is None) != (self.client_key_path is None):
            raise ValueError("mutual TLS needs both client_cert_path and client_key_path")

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
        args: list[tuple[str, str | int]] = []
        if self.tls_server_name:
            args.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return args
