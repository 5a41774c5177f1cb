"""A CaseDesk gateway running in the test's event loop on an ephemeral port (service.run, as
`casedesk serve` runs it), and the config it is usually given."""

from __future__ import annotations

import asyncio
import socket
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from casedesk.config import Config, parse
from casedesk.lifecycle import run


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

# Where gateway_config's state directories go: removed when the test run's process ends.
_SCRATCH = tempfile.TemporaryDirectory(prefix="casedesk-tests-")


def scratch_state_dir() -> str:
    """A new empty state directory: a test never sees ./state (what `make serve` left in the
    repository, its batches database above all) nor another test's batches or slot files."""
    return tempfile.mkdtemp(prefix="state-", dir=_SCRATCH.name)


def gateway_config(upstreams: list[str], **overrides: Any) -> dict[str, Any]:
    """A config with deployment "dep" serving tag "m" from `upstreams`; overrides per table."""
    # Raw-socket tests say `host: x`: a loopback listener refuses names it does not know.
    server = {
        "listen": "127.0.0.1:0",
        "health_interval": 3600,
        "allowed_hosts": ["x"],
        "state_dir": scratch_state_dir(),
        **overrides.pop("server", {}),
    }
    deployment = {"max_concurrency": 8, "max_queue": 16, **overrides.pop("deployment", {})}
    model = {"upstreams": upstreams, **overrides.pop("model", {})}
    assert not overrides, overrides
    return {"server": server, "deployments": {"dep": {**deployment, "models": {"m": model}}}}


async def start(raw: dict[str, Any] | Config, shutdown_grace: float = 5.0) -> RunningGateway:
    """Run a gateway on a fresh loopback socket until it is ready (or raise what stopped it)."""
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
    return RunningGateway(f"http://127.0.0.1:{port}", port, config, stop, force, reload, task)
