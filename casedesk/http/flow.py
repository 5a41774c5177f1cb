"""Flow control for one socket, and the base protocol the client and upstream sockets share.

asyncio tells a protocol when its transport's write buffer crosses the high-water mark
(`pause_writing`) and when it drains again (`resume_writing`), once each. A relay wants to
hear that as "stop / start reading the upstream", but the two ends meet only while a
request is in flight: a pause that arrives between keep-alive requests, or before the
upstream's head, has no listener yet. So `FlowControl` remembers the state and tells a
listener set later that writing is already paused (uvicorn's `flow_control.py`, aiohttp's
`base_protocol.py`). It also owns `pause_reading`/`resume_reading`, so that a protocol
never asks a transport twice nor forgets that it asked.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol, cast


class FlowListener(Protocol):
    """What a relay does when the socket it writes to fills up and drains again."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class FlowControl:
    """Paused-or-not, for both directions of one transport.

    `writing_paused`: the transport's buffer is over its high-water mark (the peer reads
    slower than we write). `reading_paused`: we asked the transport to stop reading.
    """

    __slots__ = ("_transport", "_listener", "writing_paused", "reading_paused")

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._listener: FlowListener | None = None
        self.writing_paused = False
        self.reading_paused = False

    def attach(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    # -- writing: the transport's calls, and whoever listens to them --------------------------

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self._listener is not None:
            self._listener.pause()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self._listener is not None:
            self._listener.resume()

    def set_listener(self, listener: FlowListener | None) -> None:
        """Tell `listener` of pauses and resumes from now on; a pause already in force at once."""
        self._listener = listener
        if listener is not None and self.writing_paused:
            listener.pause()

    # -- reading ------------------------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self.reading_paused and self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()
            self.reading_paused = True

    def resume_reading(self) -> None:
        if self.reading_paused and self._transport is not None:
            self.reading_paused = False
            if not self._transport.is_closing():
                self._transport.resume_reading()


class StreamProtocol(asyncio.Protocol):
    """The part every CaseDesk socket protocol shares: the transport and flow control.

    A subclass that overrides `connection_made` calls `super().connection_made(transport)`
    first. Tokens leave one small write at a time, so Nagle's algorithm must be off: both
    event loops CaseDesk runs on (asyncio's and uvloop's) set TCP_NODELAY on every TCP
    transport themselves (tests/test_flow.py checks it), so no protocol asks again.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.flow = FlowControl()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: a cast, not a check.
        self.transport = cast(asyncio.Transport, transport)
        self.flow.attach(self.transport)

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()


def peer_name(peer: object) -> str:
    """`host:port` of a transport's `peername` (or whatever it says, for a Unix socket)."""
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")


def tcp_fd(transport: asyncio.BaseTransport) -> int:
    """The descriptor of a TCP transport's socket (for ioctls such as SIOCOUTQ); -1 for any
    other socket. Asked only when needed: uvloop builds a socket object for each call."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        return int(sock.fileno())
    return -1
