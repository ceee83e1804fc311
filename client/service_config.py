"""The gRPC service config that makes a channel retry feedloop's calls, in any language.

gRPC's own retry support (gRFC A6, https://github.com/grpc/proposal/blob/master/A6-client-retries.md)
reads a `retryPolicy` per method from the channel's service config; the C++, Java, Go, Python,
Node and C# libraries all do, so an app in any of them gets the same retries as this client by
passing the same JSON (docs/client.md shows it for each). The attempts share the call's deadline.

Which codes: UNAVAILABLE (the server was unreachable, draining or without a model) and
RESOURCE_EXHAUSTED (a full queue or a key's rate limit). The server decides each refusal's wait
with A6's `grpc-retry-pushback-ms` trailer: the same delay as its google.rpc.RetryInfo, or -1 (no
retry) for a full disk or a wait past the call's deadline (server/errors.py, pushback_ms).

Which methods: those a repeat cannot harm.
- Feedback.Submit: the event_id, fixed before the first attempt, is stored once.
- Generation.Generate: a refusal (UNAVAILABLE, RESOURCE_EXHAUSTED) comes before any work. When a
  connection drops after the server generated, the retry generates anew; the lost reply's
  candidates stay logged but were never shown, so they can get no feedback (request_id is for
  tracing, not deduplication). Generate is read-only as far as the caller can see.
- ModelAdmin's reads (ListModels, GetStatus, GetOnlineReport) and its setters of a named state
  (SetLive to a version, SetPinned, SetTrainerPaused): a repeat leaves the state as one call would.
- grpc.health.v1.Health/Check.
Not retried: ModelAdmin.Rollback (a repeat after a lost reply would roll back twice), StartTrial
and EndTrial (a repeat would answer an error for a call that succeeded), and Feedback's stream,
whose unacknowledged events the client resends itself (client.py, submit_many).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # options imports this module to build its channel arguments
    from feedloop.client.options import RetryPolicy

RETRIED_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
RETRIED_METHODS: dict[str, tuple[str, ...]] = {
    "feedloop.v1.Generation": ("Generate",),
    "feedloop.v1.Feedback": ("Submit",),
    "feedloop.v1.ModelAdmin": (
        "ListModels",
        "GetStatus",
        "GetOnlineReport",
        "SetLive",
        "SetPinned",
        "SetTrainerPaused",
    ),
    "grpc.health.v1.Health": ("Check",),
}
# A6's cap: a policy may ask for more, the libraries make at most this many attempts.
MAX_ATTEMPTS = 5
# A6's retry throttling: each retried-code failure takes a token, each success gives back
# tokenRatio, and retries stop while fewer than half the tokens are left, so a client cannot
# multiply an outage's load by its attempts.
THROTTLE_MAX_TOKENS = 10
THROTTLE_TOKEN_RATIO = 0.1


def _duration(seconds: float) -> str:
    """A protobuf Duration in its JSON form (seconds with up to 9 decimals and an `s`)."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def service_config(policy: RetryPolicy, load_balancing: str | None = None) -> dict[str, Any]:
    """The service config (as a dict) retrying RETRIED_METHODS on RETRIED_CODES by policy;
    with max_attempts 1, none (A6 requires at least 2 attempts in a retryPolicy). With
    load_balancing, its loadBalancingConfig too: a channel takes one service config, so the
    retries and the balancing policy must travel in the same one."""
    balancing: dict[str, Any] = (
        {"loadBalancingConfig": [{load_balancing: {}}]} if load_balancing is not None else {}
    )
    if policy.max_attempts < 2:
        return balancing
    names = [
        {"service": service, "method": method}
        for service, methods in RETRIED_METHODS.items()
        for method in methods
    ]
    retry = {
        "maxAttempts": min(policy.max_attempts, MAX_ATTEMPTS),
        # A6's delay before retry n is random(0, min(initialBackoff * multiplier^(n-1),
        # maxBackoff)): the full jitter RetryPolicy.backoff_s draws, so both say the same.
        "initialBackoff": _duration(max(policy.initial_backoff_s, 1e-3)),
        "maxBackoff": _duration(max(policy.max_backoff_s, policy.initial_backoff_s, 1e-3)),
        "backoffMultiplier": policy.multiplier,
        "retryableStatusCodes": list(RETRIED_CODES),
    }
    return {
        **balancing,
        "methodConfig": [{"name": names, "retryPolicy": retry}],
        "retryThrottling": {
            "maxTokens": THROTTLE_MAX_TOKENS,
            "tokenRatio": THROTTLE_TOKEN_RATIO,
        },
    }


def service_config_json(policy: RetryPolicy, load_balancing: str | None = None) -> str:
    """service_config(...) as the JSON text a channel option or another language takes."""
    return json.dumps(service_config(policy, load_balancing), indent=2)
