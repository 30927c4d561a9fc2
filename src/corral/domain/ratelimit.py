"""Token buckets keyed by caller (API key or client address). Pure: time comes from the caller."""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

_EPSILON = 1e-9


@dataclass(frozen=True)
class Limit:
    rate: float  # tokens added per second
    burst: int  # bucket size

    @classmethod
    def per_minute(cls, count: int, burst: int | None = None) -> Limit:
        return cls(rate=count / 60.0, burst=burst if burst is not None else max(1, count))


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """``take(key, now)`` returns 0 when allowed, else the whole seconds to wait (for ``Retry-After``).

    Holds at most ``max_keys`` buckets (least recently used dropped: a dropped bucket is a full one, which
    errs on the caller's side, never locks anyone out).
    """

    def __init__(self, limit: Limit, max_keys: int = 100_000) -> None:
        if limit.rate <= 0 or limit.burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.limit = limit
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str, now: float) -> int:
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = _Bucket(tokens=float(self.limit.burst), stamp=now)
                self._buckets[key] = bucket
                if len(self._buckets) > self._max_keys:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
                if now > bucket.stamp:  # callers may arrive out of order: never refill the same time twice
                    refill = (now - bucket.stamp) * self.limit.rate
                    bucket.tokens = min(float(self.limit.burst), bucket.tokens + refill)
                    bucket.stamp = now
            if bucket.tokens >= 1.0 - _EPSILON:  # float refills: waiting Retry-After must always be enough
                bucket.tokens = max(0.0, bucket.tokens - 1.0)
                return 0
            return max(1, math.ceil((1.0 - bucket.tokens) / self.limit.rate))
