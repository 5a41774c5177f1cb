"""Pick an upstream for a request: healthy ones first, then the fewest requests in flight.

An upstream that fails to connect or answers 5xx is taken out for a backoff that doubles
with each consecutive failure (1 s up to 60 s); it is tried again after that, and a success
brings it back. When every upstream is out, they are still tried (best first): a box with a
single llama-server should not refuse requests for a minute after one restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from casedesk.upstream.client import call_json
from casedesk.upstream.pool import UpstreamError, UpstreamPool

log = logging.getLogger("casedesk.balancer")

_BASE_BACKOFF = 1.0
_MAX_BACKOFF = 60.0


@dataclass(slots=True)
class UpstreamState:
    pool: UpstreamPool
    failures: int = 0
    down_until: float = 0.0
    errors: int = 0
    # A one-socket pool of its own, so that health checks never queue behind busy streams.
    probe: UpstreamPool | None = field(default=None, repr=False)
    # True while a managed on-demand llama-server is stopped on purpose: not health-checked
    # (it would be taken out, and the first request after its load refused).
    standby: Callable[[], bool] | None = field(default=None, repr=False)

    @property
    def healthy(self) -> bool:
        return self.down_until <= time.monotonic()


class Balancer:
    def __init__(self, pools: list[UpstreamPool]) -> None:
        self.states = [UpstreamState(pool) for pool in pools]

    def candidates(self) -> list[UpstreamState]:
        """Upstreams in the order to try them."""
        now = time.monotonic()
        if len(self.states) == 1:
            return self.states
        return sorted(self.states, key=lambda s: (s.down_until > now, s.pool.in_flight))

    def failed(self, state: UpstreamState) -> None:
        state.failures += 1
        state.errors += 1
        backoff = min(_MAX_BACKOFF, _BASE_BACKOFF * 2 ** (state.failures - 1))
        state.down_until = time.monotonic() + backoff

    def succeeded(self, state: UpstreamState) -> None:
        if state.failures:
            state.failures = 0
            state.down_until = 0.0

    def close(self) -> None:
        for state in self.states:
            state.pool.close()
            if state.probe is not None:
                state.probe.close()

    async def check_health(self, timeout: float = 5.0) -> None:
        """GET /health on every upstream: 200 brings one back, anything else takes it out."""
        for state in self.states:
            if state.standby is not None and state.standby():
                continue
            if state.probe is None:
                pool = state.pool
                state.probe = UpstreamPool(pool.host, pool.port, max_connections=1, connect_timeout=timeout)
            try:
                status, _ = await call_json(state.probe, "GET", "/health", None, timeout)
            except UpstreamError as exc:
                status, reason = 0, str(exc)
            else:
                reason = f"/health answered {status}"
            if status == 200:
                if state.failures:
                    log.info("upstream %s is healthy again", state.pool.authority)
                self.succeeded(state)
            elif state.healthy:
                log.warning("upstream %s taken out: %s", state.pool.authority, reason)
                self.failed(state)
            else:
                self.failed(state)

    async def watch(self, interval: float) -> None:
        """Check health every `interval` seconds, until cancelled."""
        while True:
            await self.check_health()
            await asyncio.sleep(interval)

