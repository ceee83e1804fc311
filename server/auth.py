"""API keys, roles and the auth interceptor (with the per-key rate limit).

Clients send `authorization: Bearer KEY` metadata. Keys are defined in a TOML file:

    [[keys]]
    name = "web-app"                      # the client identity logged with generations
    sha256 = "9f86d081884c7d65..."        # hex sha256 of the key (preferred: no secret on disk)
    roles = ["generate", "feedback"]

    [[keys]]
    name = "ops"
    key = "a-plain-key"                   # accepted too, for throwaway set-ups
    roles = ["admin"]

`hash_key` gives the sha256 form (`python -m feedloop.server.auth KEY` prints it). Roles per
method: Generate needs `generate`, Feedback/* needs `feedback`, ModelAdmin/* needs `admin`. A
missing or unknown key is UNAUTHENTICATED, a key without the role PERMISSION_DENIED, an empty
token bucket RESOURCE_EXHAUSTED. Health and reflection stay open (load balancers probe them).
"""

from __future__ import annotations

import hashlib
import sys
import tomllib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from feedloop.core.errors import ConfigError
from feedloop.server.errors import ServiceError
from feedloop.server.metrics import ServerMetrics
from feedloop.server.ratelimit import RateLimiter
from feedloop.server.rpc import abort

ROLES = ("generate", "feedback", "admin")
ANONYMOUS = "anonymous"
# With auth off (a loopback server), a caller may name itself in this metadata entry: the name is
# then its client identity (logged with its generations and feedback, and its rate-limit
# bucket), so people at one console are told apart. With auth on, the API key names the caller
# and this entry is ignored: a key is what proves who someone is.
CLIENT_NAME_METADATA = "feedloop-client-name"
MAX_CLIENT_NAME_CHARS = 64


def declared_name(metadata: Iterable[Any] | None) -> str | None:
    """The caller's declared name, if it sent a usable one (printable, 1 to 64 characters)."""
    for item in metadata or ():
        if item[0] == CLIENT_NAME_METADATA:
            value = item[1].decode() if isinstance(item[1], bytes) else item[1]
            name = value.strip()
            if 0 < len(name) <= MAX_CLIENT_NAME_CHARS and name.isprintable():
                return name
    return None


_PACKAGE = "/feedloop.v1."
# method path -> (role, whether the request side is a stream)
METHODS: dict[str, tuple[str, bool]] = {
    _PACKAGE + "Generation/Generate": ("generate", False),
    _PACKAGE + "Feedback/Submit": ("feedback", False),
    _PACKAGE + "Feedback/SubmitStream": ("feedback", True),
    _PACKAGE + "ModelAdmin/ListModels": ("admin", False),
    _PACKAGE + "ModelAdmin/GetStatus": ("admin", False),
    _PACKAGE + "ModelAdmin/SetLive": ("admin", False),
    _PACKAGE + "ModelAdmin/Rollback": ("admin", False),
    _PACKAGE + "ModelAdmin/StartTrial": ("admin", False),
    _PACKAGE + "ModelAdmin/EndTrial": ("admin", False),
    _PACKAGE + "ModelAdmin/SetTrainerPaused": ("admin", False),
    _PACKAGE + "ModelAdmin/SetPinned": ("admin", False),
    _PACKAGE + "ModelAdmin/GetOnlineReport": ("admin", False),
    _PACKAGE + "Feedback/SubmitVerdict": ("feedback", False),
    _PACKAGE + "ModelAdmin/GetHumanEvaluation": ("admin", False),
    _PACKAGE + "ModelAdmin/LoadVersion": ("admin", False),
}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    name: str
    roles: frozenset[str]


def load_keys(path: Path) -> dict[str, ApiKey]:
    """Keys by sha256 hex digest, from the TOML key file (ConfigError names what is wrong)."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"auth keys file {path}: {exc}") from None
    entries = data.get("keys")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"auth keys file {path}: no [[keys]] entries")
    keys: dict[str, ApiKey] = {}
    for i, entry in enumerate(entries):
        where = f"auth keys file {path}, keys[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a table")
        name = entry.get("name")
        roles = entry.get("roles")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: 'name' is required")
        if not isinstance(roles, list) or not roles or any(r not in ROLES for r in roles):
            raise ConfigError(f"{where}: 'roles' must be a non-empty list from {ROLES}")
        if isinstance(entry.get("sha256"), str):
            digest = entry["sha256"].strip().lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ConfigError(f"{where}: 'sha256' must be 64 hex digits")
        elif isinstance(entry.get("key"), str) and entry["key"]:
            digest = hash_key(entry["key"])
        else:
            raise ConfigError(f"{where}: give 'sha256' (preferred) or 'key'")
        if digest in keys:
            raise ConfigError(f"{where}: the same key appears twice")
        keys[digest] = ApiKey(name, frozenset(roles))
    return keys


def bearer_token(metadata: Iterable[Any] | None) -> str | None:
    for item in metadata or ():
        key, value = item[0], item[1]
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class Authenticator:
    """Who a call comes from. With no keys (auth off) every caller is 'anonymous'."""

    def __init__(self, keys: dict[str, ApiKey] | None) -> None:
        self.keys = keys

    @property
    def enabled(self) -> bool:
        return self.keys is not None

    def key_of(self, metadata: Iterable[Any] | None) -> ApiKey | None:
        token = bearer_token(metadata)
        if token is None or self.keys is None:
            return None
        return self.keys.get(hash_key(token))

    def client_id(self, context: grpc.aio.ServicerContext) -> str:
        """The key's name for the call in context (the identity logged with generations); with
        auth off, the name the caller declared, else 'anonymous'."""
        if self.keys is None:
            return declared_name(context.invocation_metadata()) or ANONYMOUS
        key = self.key_of(context.invocation_metadata())
        return key.name if key else ANONYMOUS


# Refused's reason for a call past its key's rate: counted in feedloop_rate_limited, not with the
# answered calls, so one client over its limit does not read as server errors.
RATE_LIMITED = "rate_limited"


class Refused(ServiceError):
    """A call turned away before its handler ran; `reason` labels feedloop_auth_denied."""

    def __init__(
        self,
        reason: str,
        code: grpc.StatusCode,
        message: str,
        retry_delay_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.code = code
        self.retry_delay_s = retry_delay_s


def admit(
    authenticator: Authenticator, limiter: RateLimiter, metadata: Iterable[Any] | None, role: str
) -> str:
    """The caller's name (the key's; with auth off, the declared one or 'anonymous') if its key
    may call a method that needs role and its rate allows one more call; else Refused. Every
    front door (the gRPC interceptor, the HTTP API) decides here."""
    name = declared_name(metadata) or ANONYMOUS
    if authenticator.enabled:
        key = authenticator.key_of(metadata)
        if key is None:
            raise Refused(
                "unauthenticated",
                grpc.StatusCode.UNAUTHENTICATED,
                "unknown API key"
                if bearer_token(metadata) is not None
                else "missing API key: send 'authorization: Bearer KEY' "
                "(gRPC metadata or HTTP header)",
            )
        if role not in key.roles:
            raise Refused(
                "permission_denied",
                grpc.StatusCode.PERMISSION_DENIED,
                f"API key {key.name!r} lacks the {role!r} role this method needs",
            )
        name = key.name
    if not limiter.allow(name):
        raise Refused(
            RATE_LIMITED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"rate limit of {limiter.rate_per_s:g} requests/s exceeded for {name!r}; retry later",
            retry_delay_s=limiter.wait_s(name),
        )
    return name


def _deny(streaming: bool, refused: Refused) -> grpc.RpcMethodHandler:
    if streaming:

        async def deny_stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
            await abort(context, refused)

        return grpc.stream_stream_rpc_method_handler(deny_stream)

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await abort(context, refused)

    return grpc.unary_unary_rpc_method_handler(deny)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates, authorises and rate-limits feedloop calls before their handler runs."""

    def __init__(
        self, authenticator: Authenticator, limiter: RateLimiter, metrics: ServerMetrics
    ) -> None:
        self.authenticator = authenticator
        self.limiter = limiter
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        spec = METHODS.get(details.method)
        if spec is None:
            return await continuation(details)  # health, reflection: open
        role, streaming = spec
        try:
            admit(self.authenticator, self.limiter, details.invocation_metadata, role)
        except Refused as refused:
            self.metrics.auth_denied.labels(refused.reason).inc()
            method = details.method.rsplit("/", 1)[-1]
            if refused.reason == RATE_LIMITED:
                self.metrics.rate_limited.labels(method).inc()
            else:
                self.metrics.requests.labels(method, refused.code.name).inc()
            return _deny(streaming, refused)
        return await continuation(details)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(hash_key(arg))
