"""`serve --workers N`: N worker processes share one port (SO_REUSEPORT; the kernel spreads
connections across them), for boxes with cores to spare: one process serves one core.

The parent starts the managed llama-servers once and tells each worker their URLs, so N
workers do not start N copies of a model. It restarts a worker that dies and, on SIGTERM
or SIGINT, passes the signal on, waits for the workers' graceful shutdown, then stops the
managed servers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import orjson

from casedesk.config import Config, Upstream
from casedesk.ops.supervisor import Supervisor

log = logging.getLogger("casedesk.workers")

UPSTREAMS_ENV = "CASEDESK_WORKER_UPSTREAMS"


def encode_upstreams(upstreams: dict[tuple[str, str], list[Upstream]]) -> str:
    return orjson.dumps({f"{dep}\n{tag}": [u.url for u in urls] for (dep, tag), urls in upstreams.items()}).decode()


def decode_upstreams(text: str) -> dict[tuple[str, str], list[Upstream]]:
    """The managed servers' URLs a worker was given by its parent."""
    out: dict[tuple[str, str], list[Upstream]] = {}
    for key, urls in orjson.loads(text).items():
        dep, _, tag = key.partition("\n")
        out[(dep, tag)] = []
        for url in urls:
            host, _, port = url.removeprefix("http://").rpartition(":")
            out[(dep, tag)].append(Upstream(url=url, host=host.strip("[]"), port=int(port)))
    return out


async def run_workers(config: Config, count: int, config_path: str, log_level: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    workers: list[asyncio.subprocess.Process] = []

    def forward_reload() -> None:
        # Each worker re-reads the file; managed llama-servers keep the settings they
        # started with until a restart (the parent owns them).
        for worker in workers:
            if worker.returncode is None:
                worker.send_signal(signal.SIGHUP)

    loop.add_signal_handler(signal.SIGHUP, forward_reload)
    supervisor = Supervisor(config)
    try:
        upstreams = await supervisor.start()
        env = {**os.environ, UPSTREAMS_ENV: encode_upstreams(upstreams)}
        listen = f"{config.server.listen_host}:{config.server.listen_port}"
        command = [
            sys.executable,
            "-m",
            "casedesk",
            "serve",
            "--config",
            config_path,
            "--listen",
            listen,
            "--log-level",
            log_level,
            "--worker",
        ]
        workers.extend([await _spawn(command, env) for _ in range(count)])
        log.info("%d workers serving %s (pids %s)", count, listen, ", ".join(str(w.pid) for w in workers))
        while not stop.is_set():
            waits = {asyncio.ensure_future(w.wait()): i for i, w in enumerate(workers)}
            stopping = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait([*waits, stopping], return_when=asyncio.FIRST_COMPLETED)
            for future in waits:
                if not future.done():
                    future.cancel()
            if stopping in done:
                break
            stopping.cancel()
            for future, index in waits.items():
                if future in done:
                    log.error("worker %d exited with %s; starting a new one", workers[index].pid, future.result())
                    await asyncio.sleep(0.5)
                    workers[index] = await _spawn(command, env)
        for worker in workers:
            if worker.returncode is None:
                worker.send_signal(signal.SIGTERM)
        await asyncio.gather(*(w.wait() for w in workers))
    finally:
        await supervisor.stop()


async def _spawn(command: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(*command, env=env, stdin=asyncio.subprocess.DEVNULL)
