"""Pick an upstream for a request: healthy ones first, then, per the model's `balance`, the one
most likely to hold the prompt's cache ("prefix", upstream/affinity.py) or the fewest requests
in flight ("least_in_flight").

An upstream that fails to connect or answers 5xx is taken out for a backoff that doubles
with each consecutive failure (1 s up to 60 s); it is tried again after that, and a success
brings it back. When every upstream is out, they are still tried (best first): a box with a
single llama-server should not refuse requests for a minute after one restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from casedesk.upstream.affinity import (
    PrefixTable,
    RouteKey,
    Solitude,
    Thresholds,
    Candidate,
    order,
    rendezvous,
    route_key,
)
from casedesk.upstream.client import call_json
from casedesk.upstream.connection import UpstreamError
from casedesk.upstream.pool import UpstreamPool

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
    def __init__(
        self, pools: list[UpstreamPool], balance: str = "prefix", thresholds: Thresholds | None = None
    ) -> None:
        self.states = [UpstreamState(pool) for pool in pools]
        self.balance = balance
        self.thresholds = thresholds or Thresholds()
        self.prefixes = PrefixTable(len(pools))
        self.solitude = Solitude()
        # Per conversation (lead) with requests in flight, how many at each upstream: its
        # parallel branches spread (upstream/affinity.py). Bounded by the requests in flight.
        self._branches: dict[bytes, Counter[int]] = {}

    def route_key(self, chat: dict[str, Any]) -> RouteKey | None:
        """The key that routes this chat request; None when the choice does not use one."""
        if self.balance != "prefix" or len(self.states) == 1:
            return None
        return route_key(chat)

    def candidates(self, key: RouteKey | None = None) -> list[UpstreamState]:
        """Upstreams in the order to try them."""
        if len(self.states) == 1:
            return self.states
        now = time.monotonic()
        if key is not None:
            branches = self._branches.get(key.lead, Counter())
            seen = [
                Candidate(s.pool.authority, s.down_until <= now, s.pool.in_flight, branches[i])
                for i, s in enumerate(self.states)
            ]
            self.solitude.saw(key)
            ranked = order(key, seen, self.prefixes, self.thresholds, self.solitude.alone)
            return [self.states[i] for i in ranked]
        return sorted(self.states, key=lambda s: (s.down_until > now, s.pool.in_flight))

    @contextmanager
    def serving(self, key: RouteKey | None, state: UpstreamState) -> Iterator[None]:
        """While `state` works on this request: counted among its conversation's branches."""
        if key is None:
            yield
            return
        index = self.states.index(state)
        branches = self._branches.setdefault(key.lead, Counter())
        branches[index] += 1
        try:
            yield
        finally:
            branches[index] -= 1
            if not +branches:
                del self._branches[key.lead]

    def served(self, key: RouteKey | None, state: UpstreamState) -> None:
        """`state` answered this request with a 200 head: its cache now holds the prompt.

        Not remembered when `state` only stood in for a home that is down: when the home is
        back, the conversation returns to it (and every instance agrees on that again)."""
        if key is None:
            return
        home = self.states[rendezvous(key.lead, [s.pool.authority for s in self.states])[0]]
        if state is home or home.healthy:
            self.prefixes.record(self.states.index(state), key)

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
                if exc.local:  # this process is out of descriptors: says nothing of the upstream
                    log.warning("health check of %s skipped: %s", state.pool.authority, exc)
                    continue
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
