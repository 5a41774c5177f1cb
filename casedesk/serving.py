"""The state of each deployment and model while CaseDesk serves them: what handlers are given.

A `DeploymentState` is one deployment's context (its config, admission queue, models and the
server settings its handlers need); a `ModelState` one model's (its balancer over the
upstreams, and for a managed model the lease that loads it on demand). app.py builds them
for one version of the config; endpoints/ receives them as arguments.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field

from casedesk.admission import Admission
from casedesk.anthropic.errors import ApiError, not_found, overloaded
from casedesk.config import Deployment, ServerSettings
from casedesk.ops.process import LeaseTimeout, LoadFailed, ManagedProcess, State
from casedesk.ops.supervisor import Supervisor
from casedesk.ops.slotcache import RunSlots
from casedesk.tenancy.directory import Directory
from casedesk.tenancy.limiter import Limiter
from casedesk.upstream.affinity import RouteKey
from casedesk.upstream.balancer import Balancer, UpstreamState


@dataclass(slots=True)
class ManagedModel:
    """A model whose llama-server CaseDesk runs (casedesk/ops/supervisor.py)."""

    supervisor: Supervisor
    process: ManagedProcess
    upstream: UpstreamState  # that llama-server in the model's balancer
    queue_timeout: float  # the deployment's: the longest a request waits for a load
    generation: int = 0  # the process's load this model last saw

    def on_demand(self) -> bool:
        """Its upstream is down on purpose now (not loaded): health checks leave it alone."""
        return self.process.state is not State.READY


@dataclass(slots=True)
class ModelFacts:
    """What CaseDesk learned from a model's llama-server (answering/model_facts.py): asked
    once, kept while this config serves, so a managed model that was stopped still tells."""

    context_window: int | None = None  # one slot's n_ctx (/props)
    mid_system_ok: bool | None = None  # its template takes a system turn after the first


@dataclass(slots=True)
class ModelState:
    tag: str
    balancer: Balancer
    managed: ManagedModel | None = None
    facts: ModelFacts = field(default_factory=ModelFacts)

    def lease(self) -> AbstractAsyncContextManager[Lease]:
        """Around a request's upstream part: a managed model is loaded if needed and kept
        running until the request ends (Supervisor.acquire … release); nothing to do for other
        models (a plain object then, not a generator: this is on every request's path). The
        lease pins the request to a llama-server slot (`Lease.pin`) when the model keeps its
        prompt caches (ops/slotcache.py: a saved one may be restored into it first)."""
        managed = self.managed
        if managed is None:
            return _NoHold()
        return self._managed_lease(managed)

    @asynccontextmanager
    async def _managed_lease(self, managed: ManagedModel) -> AsyncIterator[Lease]:
        process = managed.process
        try:
            ticket = await managed.supervisor.acquire(process, managed.queue_timeout)
        except LoadFailed as exc:
            raise ApiError(503, f"model {self.tag!r} could not be started: {exc.reason}") from None
        except LeaseTimeout:
            loads = managed.supervisor.stats[process].load_seconds
            retry_after = math.ceil(loads.total / loads.count) if loads.count else 5
            raise overloaded(
                f"model {self.tag!r} is not loaded: waited {managed.queue_timeout:g} s (queue_timeout) "
                "for it to start; retry shortly",
                retry_after=max(1, retry_after),
            ) from None
        lease = Lease(managed.supervisor.slots(process))
        try:
            if process.generation != managed.generation:
                managed.generation = process.generation  # a fresh llama-server: healthy again
                self.balancer.succeeded(managed.upstream)
            yield lease
        finally:
            lease.unpin()
            managed.supervisor.release(process, ticket)


class _NoHold:
    """The lease of a model CaseDesk does not run: nothing to hold, no slot to pin."""

    __slots__ = ()

    async def __aenter__(self) -> Lease:
        return Lease(None)

    async def __aexit__(self, *_exc: object) -> None:
        return None


class Lease:
    """A request's hold on its model: and, for a model that keeps its prompt caches, the slot
    it is pinned to (the one holding most of its prompt, or given a saved copy of it)."""

    __slots__ = ("_run", "_slot", "_prompt")

    def __init__(self, run: RunSlots | None) -> None:
        self._run = run
        self._slot: int | None = None
        self._prompt: tuple[str, ...] = ()

    async def pin(self, key: RouteKey | None) -> int | None:
        """The slot to send the request to (`id_slot`), or None: llama-server chooses."""
        if self._run is None or key is None:
            return None
        self._prompt = tuple(block.hex() for block in key.blocks)
        self._slot = await self._run.pin(self._prompt)
        return self._slot

    def unpin(self) -> None:
        if self._run is not None and self._slot is not None:
            self._run.release(self._slot, self._prompt, time.monotonic())
            self._slot = None


@dataclass(slots=True)
class DeploymentState:
    """One deployment while it serves: what its handlers are given, and all they are given."""

    config: Deployment
    admission: Admission
    settings: ServerSettings  # the [server] table: upstream timeouts, stream keep-alive
    started_at: str  # RFC 3339: the `created_at` of its models in /v1/models
    models: dict[str, ModelState] = field(default_factory=dict)
    # Large request bodies parsed at once, shared by the gateway's deployments
    # (endpoints/request_body.py; issue 22, item 3).
    large_bodies: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))
    directory: Directory = field(default_factory=lambda: Directory({}, ServerSettings()))  # issue 17
    limiter: Limiter = field(default_factory=Limiter)  # the tenants' rate limits (the process's)

    def authorize(self, headers: dict[str, str], client: str = "") -> str:
        """The request's tenant ("" for the anonymous one), or a 401/403 (issue 17): a key
        looked up by its SHA-256, or the identity a trusted proxy set. With neither `tenants`
        nor `api_keys_sha256` the deployment is open to any key."""
        return self.directory.identify(self.config, headers, client)

    def model(self, name: str) -> ModelState:
        """The model a requested name means: its tag, or the tag of its first matching alias."""
        tag = self.config.resolve(name)
        if tag is None:
            aliases = ", ".join(f'"{pattern}" -> {target}' for pattern, target in self.config.aliases)
            raise not_found(
                f"model {name!r} not found in deployment {self.config.id!r}; it serves: {', '.join(self.models)}"
                + (f"; aliases (first match wins): {aliases}" if aliases else "")
            )
        return self.models[tag]
