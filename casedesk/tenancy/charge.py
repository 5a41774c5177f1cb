"""One request's account with its tenant's rate limits: admitted (or a 429 naming the limit),
its uncached input tokens charged when message_start gives them, its output tokens at the end.
The anthropic-ratelimit-* headers are computed once, at admission. The buckets are the
process's (Limiter) or, with `[server] shared_limits`, Redis's (SharedBuckets).

For other callers (batch items, charged to their batch's tenant): `Charge(limiter, tenant)`,
then `await admit()` (429 when spent) or `await admit_waiting()` (waits for the budget), and
`end(uncached_input, output)` once the item is done; around the upstream part,
`Admission.slot(tenant)` for the deployment's turn.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from casedesk.anthropic.errors import ApiError, overloaded
from casedesk.tenancy.limiter import Limiter, Refusal, headers_of, refusal_of

RateLimitedHook = Callable[[str, str], None]  # (tenant, bucket name) on every 429


class Charge:
    __slots__ = ("_limiter", "tenant", "headers", "_input", "_clock")

    def __init__(self, limiter: Limiter, tenant: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._limiter = limiter
        self.tenant = tenant
        self.headers: tuple[tuple[str, str], ...] = ()
        self._input = 0  # uncached input tokens charged so far
        self._clock = clock

    async def admit(self, on_refused: RateLimitedHook | None = None) -> None:
        """Take one request from the tenant's buckets, or raise its 429."""
        limiter = self._limiter
        if not limiter.limited(self.tenant):
            return
        refused: Refusal | None
        shared = limiter.shared
        if shared is None:
            now = self._clock()
            refused = limiter.admit(self.tenant, now)
            headers = limiter.headers(self.tenant, now, time.time())
        else:
            result = await shared.call(self.tenant, limiter.limits_of(self.tenant), "admit", {"requests": 1})
            if result is None:  # Redis unreachable: served (fail open) unless told to fail closed
                if limiter.fail_closed:
                    raise overloaded("the shared rate limits (Redis) are unreachable; retry shortly", retry_after=1)
                return
            passed, buckets, now = result
            refused = None if passed else refusal_of(self.tenant, buckets, now)
            headers = headers_of(buckets, now, time.time())
        if refused is not None:
            if on_refused is not None:
                on_refused(self.tenant, refused.bucket)
            raise ApiError(429, refused.message(), headers=(("retry-after", str(refused.retry_after)), *headers))
        self.headers = headers

    async def admit_waiting(self, deadline: float | None = None) -> None:
        """Wait until the tenant's limits let the request pass, then take it (batch items wait
        for their tenant's budget instead of a 429). `deadline` (self's clock): the 429 then."""
        while True:
            try:
                await self.admit()
                return
            except ApiError as error:
                if error.status != 429:
                    raise
                retry = next((float(value) for name, value in error.headers if name == "retry-after"), 1.0)
                wait = self._limiter.seconds_until_admitted(self.tenant, self._clock()) or retry
                if deadline is not None and self._clock() + wait > deadline:
                    raise
                await asyncio.sleep(max(wait, 0.01))

    def input_known(self, uncached: int) -> None:
        """message_start: the prompt tokens llama-server had to compute (cached ones are free)."""
        if uncached > self._input:
            self._take(input_tokens=uncached - self._input)
        self._input = max(self._input, uncached)

    def end(self, uncached: int, output: int) -> None:
        """The request ended having used this much (charged once; input not charged yet is)."""
        due = max(0, uncached - self._input)
        self._input = max(self._input, uncached)
        self._take(input_tokens=due, output_tokens=output)

    def _take(self, input_tokens: int = 0, output_tokens: int = 0) -> None:
        limiter = self._limiter
        if not (input_tokens or output_tokens) or not limiter.limited(self.tenant):
            return
        if limiter.shared is not None:
            amounts = {"input_tokens": input_tokens, "output_tokens": output_tokens}
            limiter.shared.charge_soon(self.tenant, limiter.limits_of(self.tenant), amounts)
        else:
            limiter.charge(self.tenant, input_tokens=input_tokens, output_tokens=output_tokens, now=self._clock())
