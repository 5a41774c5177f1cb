"""The benchmark's processes: ports, start and stop, and what one of them costs (CPU, memory).

Every server under test runs in its own process, so that the CPU read from /proc is its own.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of `pid`, in nanosecond resolution where the kernel has it.

    /proc/PID/stat counts clock ticks (10 ms): over a short scenario that is a step of about
    1 µs per token, as large as the differences looked for. Each thread's schedstat counts
    nanoseconds; the ticks are the fallback where it is missing.
    """
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                continue  # a thread that just ended
        return total / 1e9
    except OSError:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20


def two_cpus() -> tuple[frozenset[int], frozenset[int]] | None:
    """Two CPUs this process may run on: (the upstream's, everyone else's); None with one.

    Left to the scheduler, three busy processes on two cores (load generator, server under
    test, fake upstream) land in one of two layouts from run to run, and the one-stream figures
    follow the layout, not the code (bench/fake.py says how far). Two CPUs, not all of them,
    so that a bigger machine measures what the 2-core CI box does."""
    cpus = sorted(os.sched_getaffinity(0))
    return (frozenset(cpus[:1]), frozenset(cpus[1:2])) if len(cpus) >= 2 else None


def pin(pid: int, cpus: frozenset[int] | None) -> None:
    """Every thread of `pid` on `cpus` (threads it starts later inherit it); None: left alone."""
    if cpus is None:
        return
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except ProcessLookupError:
            continue  # a thread that just ended


def wait_http(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up")
        time.sleep(0.1)


def wait_port(port: int, timeout: float = 30) -> None:
    """For servers that answer no HTTP of their own (the floor relay)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on port {port}") from None
            time.sleep(0.05)


class Processes:
    """The processes one benchmark started; `stop()` ends them all (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, command: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
        self.running.append(process)
        return process

    def stop(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.running:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def python_module(module: str, *args: str) -> list[str]:
    """The command that runs `module` of this checkout with this interpreter."""
    return [sys.executable, "-m", module, *args]


def start_fake_llama(procs: Processes, tokens: int, token_delay: float, cpus: frozenset[int] | None = None) -> int:
    """tests/fake_llama.py in its own process (the real server's bytes), on `cpus`; its port."""
    port = free_port()
    command = python_module("tests.fake_llama", "--port", str(port), "--tokens", str(tokens))
    process = procs.start([*command, "--token-delay", str(token_delay)], cwd=ROOT)
    wait_http(f"http://127.0.0.1:{port}/health", 30)
    pin(process.pid, cpus)
    return port


def start_casedesk(
    procs: Processes, upstream: str, config_dir: Path, checkout: Path = ROOT, cpus: frozenset[int] | None = None
) -> tuple[int, subprocess.Popen[bytes]]:
    """A CaseDesk (that of `checkout`) with one deployment `bench`, model `m`, on `upstream`,
    on `cpus`."""
    port = free_port()
    config = config_dir / f"casedesk-{port}.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\nmax_connections = 4096\nhealth_interval = 3600\n'
        f"[deployments.bench]\nmax_concurrency = 1024\nmax_queue = 4096\n"
        f'[deployments.bench.models.m]\nupstreams = ["{upstream}"]\nmax_connections = 1024\n'
    )
    command = python_module("casedesk", "serve", "--config", str(config), "--log-level", "warning")
    process = procs.start(command, cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)})
    wait_http(f"http://127.0.0.1:{port}/healthz", 60)
    pin(process.pid, cpus)
    return port, process
