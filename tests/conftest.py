"""Shared fixtures: a CaseDesk gateway running in the test's event loop on an ephemeral port,
in front of whatever upstreams a test gives it (usually tests/fake_llama.py)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from casedesk.service import run
from casedesk.config import Config, parse


@dataclass
class RunningGateway:
    url: str
    port: int
    config: Config
    stop: asyncio.Event
    force: asyncio.Event
    reload: asyncio.Event
    task: asyncio.Task[None]

    def base_url(self, deployment: str = "dep") -> str:
        return f"{self.url}/proxy/{deployment}/anthropic"

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 30)


GatewayFactory = Callable[..., Awaitable[RunningGateway]]


def gateway_config(upstreams: list[str], **overrides: Any) -> dict[str, Any]:
    """A config with deployment "dep" serving tag "m" from `upstreams`; overrides per table."""
    server = {"listen": "127.0.0.1:0", "health_interval": 3600, **overrides.pop("server", {})}
    deployment = {"max_concurrency": 8, "max_queue": 16, **overrides.pop("deployment", {})}
    model = {"upstreams": upstreams, **overrides.pop("model", {})}
    assert not overrides, overrides
    return {"server": server, "deployments": {"dep": {**deployment, "models": {"m": model}}}}


@pytest.fixture
async def start_gateway() -> AsyncIterator[GatewayFactory]:
    """`await start_gateway(raw_config_dict, shutdown_grace=...)` → a RunningGateway."""
    running: list[RunningGateway] = []

    async def start(raw: dict[str, Any] | Config, shutdown_grace: float = 5.0) -> RunningGateway:
        config = raw if isinstance(raw, Config) else parse(raw)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        sock.setblocking(False)
        port = sock.getsockname()[1]
        ready, stop, force, reload = asyncio.Event(), asyncio.Event(), asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(
            run(
                config,
                sock=sock,
                ready=ready,
                stop=stop,
                force=force,
                reload=reload,
                shutdown_grace=shutdown_grace,
                handle_signals=False,
            )
        )
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            waiter.cancel()
            task.result()  # raises what stopped it
        gateway = RunningGateway(f"http://127.0.0.1:{port}", port, config, stop, force, reload, task)
        running.append(gateway)
        return gateway

    yield start
    for gateway in running:
        if not gateway.task.done():
            gateway.force.set()
            await gateway.shutdown()
