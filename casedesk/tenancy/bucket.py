"""A token bucket that refills continuously, stored as (tokens, last) and advanced to `now` on
every call, with no background ticking (the shape of Go's x/time/rate).

Anthropic's rate limits are per minute but refill continuously: capacity is the per-minute
limit and the rate limit/60 per second. A request passes while the bucket is positive (the
requests bucket: while it holds a whole request), and what it uses is taken when it is
known, so a bucket may go below zero by what the last requests used.
Pure: the caller passes `now` (time.monotonic() in the server, a fake clock in tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class TokenBucket:
    capacity: float  # the per-minute limit
    tokens: float
    last: float  # the `now` the tokens were last advanced to

    @classmethod
    def full(cls, capacity: float, now: float) -> TokenBucket:
        return cls(capacity, float(capacity), now)

    @property
    def rate(self) -> float:
        """Tokens per second."""
        return self.capacity / 60.0

    def level(self, now: float) -> float:
        """The tokens at `now` (may be negative), advancing the stored state."""
        if now > self.last:
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
            self.last = now
        return self.tokens

    def take(self, amount: float, now: float) -> None:
        self.level(now)
        self.tokens -= amount

    def passes(self, now: float, whole: bool = False) -> bool:
        """Whether a request may pass: the bucket is positive (a token bucket), or holds a whole
        one (`whole`: the requests bucket, so RPM 3 means 3 and then one every 20 s)."""
        tokens = self.level(now)
        return tokens >= 1 if whole else tokens > 0

    def seconds_until_passes(self, now: float, whole: bool = False) -> float:
        """How long until `passes` (0 if it does now)."""
        tokens = self.level(now)
        if self.passes(now, whole):
            return 0.0
        return ((1.0 if whole else 0.0) - tokens) / self.rate

    def retry_after(self, now: float, whole: bool = False) -> int:
        """Whole seconds after which `passes` holds (retry-after's value; 0: now)."""
        if self.passes(now, whole):
            return 0
        wait = self.seconds_until_passes(now, whole)
        return math.ceil(wait) if whole else math.floor(wait) + 1

    def seconds_until_full(self, now: float) -> float:
        return (self.capacity - self.level(now)) / self.rate

    def reconfigure(self, capacity: float, now: float) -> None:
        """A reload's new limit: what was used stays used, the level capped by the new capacity."""
        self.level(now)
        self.capacity = capacity
        self.tokens = min(self.tokens, capacity)
