"""Token buckets: pure rate-limit arithmetic, with the clock passed in (no I/O, no asyncio).

A bucket holds up to ``burst`` tokens and gains ``rate`` tokens per second; an action spends one. Checking
and spending are separate so that a caller can check several buckets and spend from all of them only when
every one allows the action (a refused request then spends nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K")


@dataclass
class TokenBucket:
    """``burst`` tokens at most, refilled at ``rate`` per second; ``rate <= 0`` means unlimited."""

    rate: float
    burst: float
    tokens: float
    stamp: float  # the clock reading ``tokens`` was computed at

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        """A bucket that starts with every token."""
        return cls(rate, burst, burst, now)

    @property
    def unlimited(self) -> bool:
        """No limit configured."""
        return self.rate <= 0

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        # A clock that went backwards (not monotonic) neither adds nor removes tokens.
        self.stamp = max(self.stamp, now)

    def wait(self, now: float) -> float:
        """Seconds until one token is available (0: available now)."""
        if self.unlimited:
            return 0.0
        self._refill(now)
        if self.tokens >= 1.0:
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def take(self, now: float) -> None:
        """Spend one token (call after :meth:`wait` returned 0)."""
        if self.unlimited:
            return
        self._refill(now)
        self.tokens = max(0.0, self.tokens - 1.0)

    def is_full(self, now: float) -> bool:
        """True when the bucket is back at ``burst``: forgetting it changes nothing."""
        if self.unlimited:
            return True
        self._refill(now)
        return self.tokens >= self.burst


def retry_after_seconds(wait: float) -> int:
    """A Retry-After value (whole seconds, at least 1) for a wait of ``wait`` seconds."""
    return max(1, math.ceil(wait))


class BucketMap(Generic[K]):
    """Buckets by key (e.g. client address) with at most ``max_keys`` entries, all with the same limits.

    Memory stays bounded whatever the number of distinct keys: at the bound, buckets that are full again
    (equivalent to absent) are dropped first, then the least recently used. Dropping a partly spent bucket
    forgives its key; that needs ``max_keys`` other keys in between, and other limits still apply.
    """

    def __init__(self, rate: float, burst: float, max_keys: int) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[K, TokenBucket] = {}  # insertion order = least recently used first

    def __len__(self) -> int:
        return len(self._buckets)

    def configure(self, rate: float, burst: float) -> None:
        """Change the limits (buckets keep their tokens, capped at the new burst)."""
        if (rate, burst) == (self.rate, self.burst):
            return
        self.rate, self.burst = rate, burst
        for bucket in self._buckets.values():
            bucket.rate, bucket.burst = rate, burst
            bucket.tokens = min(bucket.tokens, burst)

    def wait(self, k: K, now: float) -> float:
        """Seconds until ``k`` may act (0: now). Does not add ``k``."""
        if self.rate <= 0:
            return 0.0
        bucket = self._buckets.get(k)
        return bucket.wait(now) if bucket is not None else 0.0

    def take(self, k: K, now: float) -> None:
        """Spend one token of ``k``'s bucket (created full on first use)."""
        if self.rate <= 0:
            return
        bucket = self._buckets.pop(k, None)
        if bucket is None:
            bucket = TokenBucket.full(self.rate, self.burst, now)
            self._make_room(now)
        bucket.take(now)
        self._buckets[k] = bucket  # most recently used last

    def _make_room(self, now: float) -> None:
        if len(self._buckets) < self.max_keys:
            return
        for k in [k for k, b in self._buckets.items() if b.is_full(now)]:
            del self._buckets[k]
        # Leave a tenth free whatever the sweep found: when it frees only a bucket or two (keys refilling one by
        # one), every new key would otherwise pay a full O(max_keys) sweep (measured: 3.5-7 ms each at 10k keys,
        # on the event loop). The least recently used go first.
        room = self.max_keys - max(1, self.max_keys // 10)
        excess = len(self._buckets) - room
        if excess > 0:
            for k in list(self._buckets)[:excess]:
                del self._buckets[k]
