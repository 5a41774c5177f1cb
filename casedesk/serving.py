"""The state of each deployment and model while CaseDesk serves them: what handlers are given.

A `DeploymentState` is one deployment's context (its config, admission queue, models and the
server settings its handlers need); a `ModelState` one model's (its balancer over the
upstreams, and for a managed model the lease that loads it on demand). app.py builds them
for one version of the config; endpoints/ receives them as arguments.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from casedesk.admission import Admission
from casedesk.anthropic.errors import ApiError, authentication_failed, not_found, overloaded
from casedesk.config import Deployment, ServerSettings
from casedesk.ops.process import LeaseTimeout, LoadFailed, ManagedProcess, State
from casedesk.ops.supervisor import Supervisor
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
    """What CaseDesk learned from a model's llama-server (endpoints/model_facts.py): asked
    once, kept while this config serves, so a managed model that was stopped still tells."""

    context_window: int | None = None  # one slot's n_ctx (/props)
    mid_system_ok: bool | None = None  # its template takes a system turn after the first


@dataclass(slots=True)
class ModelState:
    tag: str
    balancer: Balancer
    managed: ManagedModel | None = None
    facts: ModelFacts = field(default_factory=ModelFacts)

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[None]:
        """Around a request's upstream part: a managed model is loaded if needed and kept
        running until the request ends (Supervisor.lease); nothing to do for other models."""
        managed = self.managed
        if managed is None:
            yield
            return
        process = managed.process
        try:
            ticket = await managed.supervisor.acquire(process, managed.queue_timeout)
        except LoadFailed as exc:
            raise ApiError(503, f"model {self.tag!r} could not be started: {exc.reason}") from None
        except LeaseTimeout:
            loads = process.load_seconds
            retry_after = math.ceil(loads.total / loads.count) if loads.count else 5
            raise overloaded(
                f"model {self.tag!r} is not loaded: waited {managed.queue_timeout:g} s (queue_timeout) "
                "for it to start; retry shortly",
                retry_after=max(1, retry_after),
            ) from None
        try:
            if process.generation != managed.generation:
                managed.generation = process.generation  # a fresh llama-server: healthy again
                self.balancer.succeeded(managed.upstream)
            yield
        finally:
            managed.supervisor.release(process, ticket)


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

    def authorize(self, headers: dict[str, str]) -> None:
        """With `api_keys_sha256` set, a key is required and must hash to one of them."""
        if not self.config.api_keys_sha256:
            return
        key = headers.get("x-api-key", "")
        if not key:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            key = token.strip() if scheme.lower() == "bearer" else ""
        if not key:
            raise authentication_failed("an API key is required: send it as x-api-key or Authorization: Bearer")
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
        # Compare against every hash, always, in constant time per comparison.
        matched = False
        for known in self.config.api_keys_sha256:
            matched |= hmac.compare_digest(digest, known)
        if not matched:
            raise authentication_failed("invalid x-api-key")

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
