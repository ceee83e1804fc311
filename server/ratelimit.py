"""Per-key token buckets: each API key may spend rate_per_s tokens a second, in bursts of burst.

A call costs one token; the calls that carry more work pay for it: a feedback stream one token
per event, a Generate one per candidate (ServeConfig.rate_limit_per_candidate). A cost above the
burst is charged as the whole bucket, so a call within the server's limits can always pass.

Buckets live on the event loop (the auth interceptor calls `allow`), so they need no lock.
The number of buckets is bounded by the number of keys in the key file (plus one anonymous
bucket when auth is off), so memory stays bounded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(slots=True)
class TokenBucket:
    rate_per_s: float
    capacity: float
    tokens: float
    updated_at: float

    def take(self, now: float, cost: float = 1.0) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated_at) * self.rate_per_s)
        self.updated_at = now
        cost = min(cost, self.capacity)
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


class RateLimiter:
    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self._buckets: dict[str, TokenBucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def allow(self, key: str, now: float | None = None, cost: float = 1.0) -> bool:
        """Take cost tokens (one by default) from key's bucket; False, taking nothing, when it
        holds fewer."""
        if not self.enabled:
            return True
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate_per_s, self.burst, self.burst, now)
        return bucket.take(now, cost)

    def wait_s(self, key: str, now: float | None = None) -> float:
        """Seconds until key's bucket holds a whole token again (0 when it does now): the
        retry delay a refused caller is told."""
        bucket = self._buckets.get(key)
        if not self.enabled or bucket is None:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens = min(bucket.capacity, bucket.tokens + (now - bucket.updated_at) * self.rate_per_s)
        return max(0.0, (1.0 - tokens) / self.rate_per_s)
