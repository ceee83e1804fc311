"""Per-key token buckets: each API key may make rate_per_s requests a second, in bursts of burst.

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

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated_at) * self.rate_per_s)
        self.updated_at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
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

    def allow(self, key: str, now: float | None = None) -> bool:
        """Take one token from key's bucket; False when it is empty."""
        if not self.enabled:
            return True
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate_per_s, self.burst, self.burst, now)
        return bucket.take(now)

    def wait_s(self, key: str, now: float | None = None) -> float:
        """Seconds until key's bucket holds a whole token again (0 when it does now): the
        retry delay a refused caller is told."""
        bucket = self._buckets.get(key)
        if not self.enabled or bucket is None:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens = min(bucket.capacity, bucket.tokens + (now - bucket.updated_at) * self.rate_per_s)
        return max(0.0, (1.0 - tokens) / self.rate_per_s)
