"""systemd integration without libsystemd: the notify protocol and socket activation.

sd_notify is one datagram to $NOTIFY_SOCKET ("@" means the abstract namespace): READY=1
once listening, RELOADING=1 and READY=1 around a reload, STOPPING=1, STATUS= lines, and
WATCHDOG=1 at half of $WATCHDOG_USEC. Socket activation passes listening sockets as file
descriptors from 3 on, announced by $LISTEN_FDS for the process $LISTEN_PID.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("casedesk.systemd")

SD_LISTEN_FDS_START = 3


class Notifier:
    """Sends sd_notify messages; does nothing when not run by systemd (no NOTIFY_SOCKET)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog_interval = self._watchdog_interval(env)
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def _watchdog_interval(env: Mapping[str, str]) -> float | None:
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if not usec.isdigit() or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 1e6 / 2

    def notify(self, *lines: str) -> None:
        if not self.address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto("\n".join(lines).encode(), self.address)
            except OSError as exc:
                log.warning("sd_notify to %r failed: %s", self.address, exc)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def keep_extending_start(self, status: str, step: float = 30.0) -> asyncio.Task[None]:
        """Until the task is cancelled, push systemd's start timeout `step` seconds ahead every
        `step / 3` seconds (EXTEND_TIMEOUT_USEC, systemd >= 236)."""

        async def extend() -> None:
            while True:
                self.notify(f"EXTEND_TIMEOUT_USEC={int(step * 1e6)}", f"STATUS={status}")
                await asyncio.sleep(step / 3)

        return asyncio.create_task(extend(), name="extend start timeout")

    def reloading(self) -> None:
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping: finishing in-flight requests")

    def start_watchdog(self) -> None:
        if self.address and self.watchdog_interval and self._task is None:
            self._task = asyncio.create_task(self._ping(self.watchdog_interval), name="watchdog")

    async def _ping(self, interval: float) -> None:
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def stop_watchdog(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


def listen_fds(environ: Mapping[str, str] | None = None) -> list[socket.socket]:
    """Sockets passed by systemd socket activation (empty when there are none for us)."""
    env = os.environ if environ is None else environ
    count = env.get("LISTEN_FDS", "")
    if not count.isdigit() or env.get("LISTEN_PID") != str(os.getpid()):
        return []
    sockets = [socket.socket(fileno=SD_LISTEN_FDS_START + i) for i in range(int(count))]
    for sock in sockets:
        sock.setblocking(False)
    return sockets
