"""One request's account with its tenant's rate limits: admitted (or a 429 naming the limit),
its uncached input tokens charged when message_start gives them, its output tokens at the end.
The anthropic-ratelimit-* headers are computed once, at admission.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from casedesk.anthropic.errors import ApiError
from casedesk.tenancy.limiter import Limiter

RateLimitedHook = Callable[[str, str], None]  # (tenant, bucket name) on every 429


class Charge:
    __slots__ = ("_limiter", "tenant", "headers", "_input", "_clock")

    def __init__(self, limiter: Limiter, tenant: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._limiter = limiter
        self.tenant = tenant
        self.headers: tuple[tuple[str, str], ...] = ()
        self._input = 0  # uncached input tokens charged so far
        self._clock = clock

    def admit(self, on_refused: RateLimitedHook | None = None) -> None:
        """Take one request from the tenant's buckets, or raise its 429."""
        limiter = self._limiter
        if not limiter.limited(self.tenant):
            return
        now = self._clock()
        refused = limiter.admit(self.tenant, now)
        headers = limiter.headers(self.tenant, now, time.time())
        if refused is not None:
            if on_refused is not None:
                on_refused(self.tenant, refused.bucket)
            raise ApiError(429, refused.message(), headers=(("retry-after", str(refused.retry_after)), *headers))
        self.headers = headers

    def input_known(self, uncached: int) -> None:
        """message_start: the prompt tokens llama-server had to compute (cached ones are free)."""
        if uncached > self._input and self._limiter.limited(self.tenant):
            self._limiter.charge(self.tenant, input_tokens=uncached - self._input, now=self._clock())
        self._input = max(self._input, uncached)

    def end(self, uncached: int, output: int) -> None:
        """The request ended having used this much (charged once; input not charged yet is)."""
        if not self._limiter.limited(self.tenant):
            return
        due = max(0, uncached - self._input)
        self._input = max(self._input, uncached)
        self._limiter.charge(self.tenant, input_tokens=due, output_tokens=output, now=self._clock())
