"""The tenants' buckets in Redis, so that several CaseDesk instances enforce one limit
(`[server] shared_limits = "redis://HOST:PORT/DB"`).

Every admission and every charge is one Lua script, run atomically by Redis: the buckets are
read, advanced to Redis's own clock (TIME: one clock for every instance), checked and taken in
one step, so two instances never race on a read-modify-write. The script's arithmetic is the
one of casedesk/tenancy/bucket.py. Redis unreachable: the caller decides (fail open by
default, or 529 with `shared_limits_failure = "closed"`); `errors` counts it and the log says
so at most once a minute. Needs the `redis` package (the `shared` extra), imported only then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from casedesk.tenancy.bucket import TokenBucket
from casedesk.tenancy.limits import LIMITS, Limits

log = logging.getLogger("casedesk.tenants")

# KEYS: one hash per bucket. ARGV[1]: "admit" or "charge"; then per bucket: capacity, whole
# (1: a requests bucket, which passes while it holds a whole request), amount to take.
# Returns {passed (1/0), now, level of each bucket after the call}, numbers as strings.
SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local levels = {}
local passed = 1
for i, key in ipairs(KEYS) do
  local capacity = tonumber(ARGV[3 * i - 1])
  local state = redis.call('HMGET', key, 'tokens', 'last')
  local tokens = tonumber(state[1]) or capacity
  local last = tonumber(state[2]) or now
  if now > last then
    tokens = math.min(capacity, tokens + (now - last) * capacity / 60)
    last = now
  end
  levels[i] = {tokens, last, capacity}
  if ARGV[1] == 'admit' then
    local whole = ARGV[3 * i] == '1'
    if (whole and tokens < 1) or ((not whole) and tokens <= 0) then passed = 0 end
  end
end
local out = {tostring(passed), tostring(now)}
for i, key in ipairs(KEYS) do
  local tokens, last, capacity = levels[i][1], levels[i][2], levels[i][3]
  if passed == 1 then tokens = tokens - tonumber(ARGV[3 * i + 1]) end
  redis.call('HSET', key, 'tokens', tostring(tokens), 'last', tostring(last))
  redis.call('EXPIRE', key, math.ceil(120 + (capacity - tokens) * 60 / capacity))
  out[i + 2] = tostring(tokens)
end
return out
"""


class SharedBuckets:
    """One Redis for the buckets of every instance that names it."""

    def __init__(self, url: str) -> None:
        import redis.asyncio  # the `shared` extra: only needed when shared_limits is set

        self.url = url
        self._client: Any = redis.asyncio.Redis.from_url(
            url, socket_connect_timeout=0.5, socket_timeout=0.5, retry_on_timeout=False
        )
        self._script: Any = self._client.register_script(SCRIPT)
        self.errors = 0  # calls that failed: casedesk_shared_limits_errors_total
        self._logged = -1e9
        self._pending: set[asyncio.Future[Any]] = set()

    async def call(
        self, tenant: str, limits: Limits, mode: str, amounts: dict[str, int]
    ) -> tuple[bool, dict[str, TokenBucket], float] | None:
        """Run the script over `tenant`'s limited buckets: (passed, the buckets after it, Redis's
        now); None when Redis failed (counted, logged at most once a minute)."""
        names = [(name, getattr(limits, key)) for name, key in LIMITS if getattr(limits, key)]
        keys = [f"casedesk:bucket:{tenant}:{name}" for name, _ in names]
        argv: list[str | int] = [mode]
        for name, capacity in names:
            argv += [capacity, 1 if name == "requests" else 0, amounts.get(name, 0)]
        try:
            reply = await self._script(keys=keys, args=argv)
        except Exception as exc:  # any failure of the shared store: the caller fails open or closed
            self.errors += 1
            now = time.monotonic()
            if now - self._logged >= 60:
                self._logged = now
                log.warning("shared_limits: Redis at %s failed (%s); %d failures so far", self.url, exc, self.errors)
            return None
        passed, redis_now = reply[0] == b"1", float(reply[1])
        buckets = {
            name: TokenBucket(capacity, float(level), redis_now)
            for (name, capacity), level in zip(names, reply[2:], strict=True)
        }
        return passed, buckets, redis_now

    def charge_soon(self, tenant: str, limits: Limits, amounts: dict[str, int]) -> None:
        """A charge from a synchronous callback (message_start, the end): sent without waiting."""
        task = asyncio.ensure_future(self.call(tenant, limits, "charge", amounts))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def close_soon(self) -> None:
        """Close the connections once the charges under way are sent (a reload dropped it)."""

        async def close() -> None:
            if self._pending:
                await asyncio.wait(set(self._pending))
            await self._client.aclose()

        task = asyncio.ensure_future(close())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
