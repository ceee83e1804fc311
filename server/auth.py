"""API keys, roles and the auth interceptor (with the per-key rate limit).

Clients send `authorization: Bearer KEY` metadata. Keys are defined in a TOML file:

    [[keys]]
    name = "web-app"                      # the client identity logged with generations
    sha256 = "9f86d081884c7d65..."        # hex sha256 of the key (preferred: no secret on disk)
    roles = ["generate", "feedback"]

    [[keys]]
    name = "web-app-canary"
    tenant = "web-app"                    # keys of one tenant share its data (default: name)
    sha256 = "2c26b46b68ffc68f..."
    roles = ["generate", "feedback"]

    [[keys]]
    name = "rating-console"
    sha256 = "fcde2b2edba56bf4..."
    roles = ["feedback", "labeller"]      # may give feedback on any tenant's generations

    [[keys]]
    name = "ops"
    key = "a-plain-key"                   # accepted too, for throwaway set-ups
    roles = ["admin"]

    [[keys]]
    name = "billing-service"
    subject = "billing.internal"          # with mutual TLS: the client certificate's common name
    roles = ["generate"]                  # names this identity when the call sends no key

`hash_key` gives the sha256 form (`python -m feedloop.server.auth KEY` prints it). Roles per
method: Generate needs `generate`, Feedback/* needs `feedback`, ModelAdmin/* needs `admin`. A
missing or unknown key is UNAUTHENTICATED, a key without the role PERMISSION_DENIED, an empty
token bucket RESOURCE_EXHAUSTED. Health and reflection stay open (load balancers probe them).

Tenants: a key's `tenant` (its own name when it declares none) is the client id logged with
its generations and feedback. A tenant's event ids are its own (another tenant's "order-42" is
another event), and it gives feedback only on generations served to it, unless its key holds
the `labeller` role (a rating console, a back-office labeller: feedback on any generation).
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

ROLES = ("generate", "feedback", "admin", "labeller")
# The role that lets a key's feedback name generations served to other tenants.
LABELLER = "labeller"
ANONYMOUS = "anonymous"
# load_keys files a certificate identity under this prefix and its subject (never a digest).
SUBJECT_PREFIX = "subject:"
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
    tenant: str = ""  # "": the key is a tenant of its own

    @property
    def client_id(self) -> str:
        """The tenant this key acts for: the identity stored with its data."""
        return self.tenant or self.name


@dataclass(frozen=True)
class Caller:
    """Who a call comes from: the key (rate limits are per key), the tenant whose data it may
    touch, and whether its feedback may name other tenants' generations."""

    key_name: str
    client_id: str
    any_tenant: bool = False


# With auth off (loopback only) there are no tenants to keep apart: every caller may judge
# every generation, as before tenants existed.
ANONYMOUS_CALLER = Caller(ANONYMOUS, ANONYMOUS, any_tenant=True)


def anonymous_caller(metadata: Iterable[Any] | None) -> Caller:
    """A caller with auth off: no tenants (it may rate anything), named by the name it declared
    (CLIENT_NAME_METADATA) or 'anonymous'; the name is its identity and rate-limit bucket."""
    name = declared_name(metadata)
    return ANONYMOUS_CALLER if name is None else Caller(name, name, any_tenant=True)


# Tenant names are stored with every row and named by erasure: bounded, printable.
MAX_TENANT_CHARS = 128


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
        tenant = entry.get("tenant", "")
        if not isinstance(tenant, str) or len(tenant) > MAX_TENANT_CHARS:
            raise ConfigError(f"{where}: 'tenant' must be a name of at most {MAX_TENANT_CHARS}")
        if any(not ch.isprintable() for ch in tenant + name) or len(name) > MAX_TENANT_CHARS:
            raise ConfigError(
                f"{where}: 'name' and 'tenant' must be printable, at most {MAX_TENANT_CHARS}"
            )
        if isinstance(entry.get("subject"), str) and entry["subject"]:
            # A certificate identity: found by the subject, never by a token's digest.
            digest = SUBJECT_PREFIX + entry["subject"]
        elif isinstance(entry.get("sha256"), str):
            digest = entry["sha256"].strip().lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ConfigError(f"{where}: 'sha256' must be 64 hex digits")
        elif isinstance(entry.get("key"), str) and entry["key"]:
            digest = hash_key(entry["key"])
        else:
            raise ConfigError(f"{where}: give 'sha256' (preferred), 'key' or 'subject'")
        if digest in keys:
            raise ConfigError(f"{where}: the same key appears twice")
        keys[digest] = ApiKey(name, frozenset(roles), tenant)
    return keys


def bearer_token(metadata: Iterable[Any] | None) -> str | None:
    for item in metadata or ():
        key, value = item[0], item[1]
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def common_name(context: grpc.aio.ServicerContext) -> str | None:
    """The common name of the verified client certificate of a mutual-TLS call, or None."""
    names = context.auth_context().get("x509_common_name") or ()
    return names[0].decode("utf-8", "replace") if names else None


class Authenticator:
    """Who a call comes from. With no keys (auth off) every caller is 'anonymous'."""

    def __init__(self, keys: dict[str, ApiKey] | None) -> None:
        self.keys = keys
        # Certificate identities by subject (load_keys files them under SUBJECT_PREFIX).
        self.subjects = {
            digest[len(SUBJECT_PREFIX) :]: key
            for digest, key in (keys or {}).items()
            if digest.startswith(SUBJECT_PREFIX)
        }

    @property
    def enabled(self) -> bool:
        return self.keys is not None

    def key_of(self, metadata: Iterable[Any] | None) -> ApiKey | None:
        token = bearer_token(metadata)
        if token is None or self.keys is None:
            return None
        return self.keys.get(hash_key(token))

    def caller(self, metadata: Iterable[Any] | None) -> Caller:
        """Who sends a call with this metadata (anonymous with auth off, or no valid key)."""
        if self.keys is None:
            return anonymous_caller(metadata)
        key = self.key_of(metadata)
        if key is None:  # refused at the door: a caller of no tenant, allowed nothing
            return Caller(ANONYMOUS, ANONYMOUS)
        return Caller(key.name, key.client_id, LABELLER in key.roles)

    def caller_of(self, context: grpc.aio.ServicerContext) -> Caller:
        """Who sends the call in context: its API key's identity, or, when it sends no key,
        the identity its mutual-TLS certificate's subject names in the key file."""
        metadata = context.invocation_metadata()
        if self.subjects and bearer_token(metadata) is None:
            key = self.subjects.get(common_name(context) or "")
            if key is not None:
                return _caller(key)
        return self.caller(metadata)

    def client_id(self, context: grpc.aio.ServicerContext) -> str:
        """The tenant of the call in context (the identity logged with generations)."""
        return self.caller_of(context).client_id


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


def _caller(key: ApiKey) -> Caller:
    return Caller(key.name, key.client_id, LABELLER in key.roles)


def admit(
    authenticator: Authenticator,
    limiter: RateLimiter,
    metadata: Iterable[Any] | None,
    role: str,
    *,
    subject: str | None = None,
) -> Caller:
    """The caller (its key, or anonymous with auth off) if its key may call a method that
    needs role and its rate allows one more call; else Refused. Every front door (the gRPC
    interceptor, the HTTP API) decides here; with auth off, the name the caller declared (or
    'anonymous'). subject: the verified client certificate's
    common name, which names the identity of a call that sends no key."""
    caller = anonymous_caller(metadata)
    if authenticator.enabled:
        key = authenticator.key_of(metadata)
        if key is None and subject is not None and bearer_token(metadata) is None:
            key = authenticator.subjects.get(subject)
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
        caller = _caller(key)
    name = caller.key_name
    if not limiter.allow(name):
        raise rate_limited(limiter, name, "one token per call")
    return caller


def rate_limited(limiter: RateLimiter, name: str, what: str) -> Refused:
    """The refusal of a call (or an event of a stream) past name's rate."""
    return Refused(
        RATE_LIMITED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"rate limit of {limiter.rate_per_s:g} tokens/s exceeded for {name!r} ({what}); "
        "retry later",
        retry_delay_s=limiter.wait_s(name),
    )


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
        method = details.method.rsplit("/", 1)[-1]
        metadata = details.invocation_metadata
        if self.authenticator.subjects and bearer_token(metadata) is None:
            # No key: the certificate may name the caller, but only the call's context holds
            # it, so the handler decides (the details an interceptor gets carry no peer).
            return self._by_certificate(await continuation(details), role, method, metadata)
        try:
            admit(self.authenticator, self.limiter, metadata, role)
        except Refused as refused:
            self._count(refused, method)
            return _deny(streaming, refused)
        return await continuation(details)

    def _count(self, refused: Refused, method: str) -> None:
        self.metrics.auth_denied.labels(refused.reason).inc()
        if refused.reason == RATE_LIMITED:
            self.metrics.rate_limited.labels(method).inc()
        else:
            self.metrics.requests.labels(method, refused.code.name).inc()

    def _by_certificate(
        self, handler: grpc.RpcMethodHandler, role: str, method: str, metadata: Any
    ) -> grpc.RpcMethodHandler:
        """handler, admitting its call by the client certificate's subject first."""

        async def admitted(context: grpc.aio.ServicerContext) -> bool:
            try:
                admit(
                    self.authenticator, self.limiter, metadata, role, subject=common_name(context)
                )
            except Refused as refused:
                self._count(refused, method)
                await abort(context, refused)
                return False
            return True

        if handler.stream_stream is not None:
            inner_stream = handler.stream_stream

            async def stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
                if await admitted(context):
                    return await inner_stream(request_iterator, context)
                return None

            return grpc.stream_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        inner = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if await admitted(context):
                return await inner(request, context)
            return None

        return grpc.unary_unary_rpc_method_handler(
            unary, handler.request_deserializer, handler.response_serializer
        )


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(hash_key(arg))
