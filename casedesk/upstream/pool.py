"""Keep-alive connections to one llama-server (upstream/connection.py), pooled.

A connection goes back to the pool only after its response ended cleanly; anything cut short
is closed, never reused. A socket that carried a stream is never pooled (llama-server closes
it), idle ones are retired a little before the server's keep-alive timeout, and a request that
still meets a closed socket is sent once more on a fresh one (client.open_exchange). Since
every stream spends its socket, a spare is opened as one begins, so that the next stream need
not wait for a connect (`spares`). The pool keeps the connection objects (a new one is handed out
while it opens) and decides in one function, `_assign`, which returns what to do.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Final

from casedesk.upstream.connection import ConnectionState, UpstreamConnection, UpstreamError

# The states by module globals: Python 3.11's EnumType makes each `ConnectionState.X` in code a
# metaclass call (~850 instructions; http/server.py says more).
_CONNECTING: Final = ConnectionState.CONNECTING
_IDLE: Final = ConnectionState.IDLE
_HELD: Final = ConnectionState.HELD
_SPENT: Final = ConnectionState.SPENT
_CLOSED: Final = ConnectionState.CLOSED

# Out of descriptors or buffers in this process: the gateway's failure, never the upstream's.
_LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(slots=True)
class ConnectionWaiter:
    """A request for a connection: handed an idle one, or a new one to open."""

    future: asyncio.Future[UpstreamConnection]
    fresh: bool  # no idle socket: the retry after meeting one the server had closed


@dataclass(slots=True)
class Assignment:
    """What `_assign` decided: connections to close, and who gets which connection."""

    close: list[UpstreamConnection] = field(default_factory=list)
    hand: list[tuple[ConnectionWaiter, UpstreamConnection]] = field(default_factory=list)


class UpstreamPool:
    """At most `max_connections` sockets to one upstream; idle ones reused newest-first.

    Every event (a request arrives, a socket is given back, a connect fails, a socket closes,
    a waiting request is cancelled) calls `_assign`, the one place that decides who gets what,
    as httpcore's `_assign_requests_to_connections` does; like it, `_assign` does no I/O and
    returns what to do, which `_run` does.
    """

    def __init__(
        self, host: str, port: int, max_connections: int = 32, connect_timeout: float = 5.0, spares: int = 0
    ) -> None:
        self.host = host
        self.port = port
        self.authority = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        # Idle connections kept ready while requests come (Envoy's preconnect): llama-server
        # closes every connection that carried a stream, so without one each stream's first
        # token waits for a connect. A spare is opened as an answer begins (`answer_begun`) or
        # a release leaves none, never for its own sake: it is retired like any idle socket,
        # before the server's keep-alive timeout, and a quiet pool ends with none (docs/design.md,
        # "Upstream pool").
        self.spares = spares
        self._connections: list[UpstreamConnection] = []  # every live one, oldest first
        self._queue: deque[ConnectionWaiter] = deque()
        self._opening: dict[UpstreamConnection, asyncio.Task[None]] = {}  # spares being opened
        self.connections_opened = 0
        self._event_loop: asyncio.AbstractEventLoop | None = None

    def _loop(self) -> asyncio.AbstractEventLoop:
        """The loop this pool serves on, asked once: `asyncio.get_running_loop()` makes a getpid
        syscall each time on Python 3.11 (it was five a request here)."""
        loop = self._event_loop
        if loop is None:
            loop = self._event_loop = asyncio.get_running_loop()
        return loop

    @property
    def in_flight(self) -> int:
        """Connections held by callers (a request in flight, or its socket being opened);
        a spare being opened is nobody's request."""
        return sum(1 for c in self._connections if c.state is not _IDLE and not c.spare)

    def carries_one(self) -> bool:
        """Exactly one request holds a connection (in_flight == 1, counted no further than 2)."""
        held = (c for c in self._connections if c.state is not _IDLE and not c.spare)
        return sum(1 for _ in itertools.islice(held, 2)) == 1

    def answer_begun(self) -> None:
        """An answer's first token is out on one of these sockets, which it will spend
        (llama-server closes a socket that carried a stream): its spare is opened now, while
        the answer runs, so that the next request finds it open. Opened as the answer ended,
        it was still opening when that request came (the client's next turn, right after), its
        connect done in the same loop turns as that request's work: +0.50 against +0.43 ms of
        added first token in the pinned make bench (README, Performance). An answer longer than
        the server's keep-alive (5 s) outlives its spare; the release then opens another."""
        if self.spares:
            self._top_up(self._loop())

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def acquire(self, fresh: bool = False) -> UpstreamConnection:
        """A connection to send one request on; release() it after. Cancellation-safe."""
        loop = self._loop()
        waiter = ConnectionWaiter(loop.create_future(), fresh)
        self._queue.append(waiter)
        self._run(self._assign(loop.time()))
        try:
            conn = await waiter.future  # already done when a socket or a slot was free
        except asyncio.CancelledError:
            if waiter.future.cancelled():
                if waiter in self._queue:
                    self._queue.remove(waiter)
                self._run(self._assign(loop.time()))
            else:  # handed a connection as the cancellation landed: give it back
                self.release(waiter.future.result())
            raise
        if conn.state is _CONNECTING:
            opening = self._opening.get(conn)
            if opening is None:
                await self._connect(conn)
            elif not await self._spare_opened(conn, opening):
                return await self.acquire(fresh=True)  # it failed: connect afresh (and say why)
        return conn

    async def _spare_opened(self, conn: UpstreamConnection, opening: asyncio.Task[None]) -> bool:
        """Wait for the spare this request was handed while it opened: sooner than a connect
        of its own. Cancelled, the request leaves it to the pool."""
        try:
            await asyncio.shield(opening)
        except asyncio.CancelledError:
            if opening.done():
                self.release(conn)
            else:
                conn.spare = True  # idle in the pool once open
            raise
        return conn.state is _HELD

    def _top_up(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open spares (in the background) until `spares` are idle or opening, within the cap."""
        live = self._connections
        ready = sum(1 for c in live if c.spare or c.state is _IDLE)
        for _ in range(min(self.spares - ready, self.max_connections - len(live))):
            conn = self._new_connection()
            conn.opened_ahead = conn.spare = True
            live.append(conn)
            # (kept, also because a task nobody references may be collected mid-way)
            self._opening[conn] = task = loop.create_task(self._open_spare(conn))
            task.add_done_callback(functools.partial(self._opened, conn))

    def _opened(self, conn: UpstreamConnection, _task: asyncio.Task[None]) -> None:
        self._opening.pop(conn, None)

    async def _open_spare(self, conn: UpstreamConnection) -> None:
        """Open a spare; once open it waits in the pool as an idle connection. A failure is
        nobody's: the spare is dropped, and the next request connects (and reports) itself."""
        try:
            await self._connect(conn)
        except UpstreamError:
            return  # (closed, and the pool told)
        if conn.spare and conn.state is _HELD:  # (nobody took it, nor closed it)
            conn.state = _IDLE
            conn.idle_since = self._loop().time()
        elif conn.state is _CLOSED and conn.transport is not None:
            conn.transport.abort()  # given up on while it opened
        self._run(self._assign(self._loop().time()))

    async def _connect(self, conn: UpstreamConnection) -> None:
        """Open the socket of a new connection; on failure it leaves the pool."""
        loop = self._loop()
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation that lands as the connection completes.
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(lambda: conn, self.host, self.port)
        except BaseException as exc:
            conn.state = _CLOSED
            if conn.transport is not None:
                conn.transport.abort()
            self._run(self._assign(loop.time()))
            if isinstance(exc, TimeoutError):
                raise UpstreamError(
                    f"connecting to {self.authority} timed out after {self.connect_timeout:g} s"
                ) from None
            if isinstance(exc, OSError):
                local = exc.errno in _LOCAL_ERRNOS
                where = "this gateway " if local else ""
                raise UpstreamError(
                    f"{where}cannot connect to {self.authority}: {exc.strerror or exc}", local=local
                ) from None
            raise
        self.connections_opened += 1

    def release(self, conn: UpstreamConnection, reusable: bool = True) -> None:
        """Give a connection back: kept for reuse only if its last response ended cleanly."""
        loop = self._loop()
        now = loop.time()
        if conn.state is _CONNECTING:
            if conn in self._opening:
                conn.spare = True  # a spare still opening: the pool's again
            else:
                conn.state = _CLOSED  # handed out but never opened
        elif not reusable:
            conn.abort()  # cut short: llama-server learns at once that nobody reads it
        elif conn.state is _HELD:
            conn.state = _IDLE
            conn.idle_since = now
        else:
            conn.close()
        self._run(self._assign(now))
        if self.spares:
            self._top_up(loop)

    def _lost(self, conn: UpstreamConnection) -> None:
        if conn in self._connections:
            self._run(self._assign(self._loop().time()))

    def _assign(self, now: float) -> Assignment:
        """Drop closed connections and close spent and expired idle ones; then serve waiting
        requests in order: an idle connection (the newest), else a spare just opened or still
        opening, else a new one while below the cap, else (a fresh one wanted and the pool full)
        close the oldest idle one to make room for a new one; else they keep waiting. No I/O:
        returns what to do."""
        todo = Assignment()
        live: list[UpstreamConnection] = []
        for conn in self._connections:
            state = conn.state
            if state is _CLOSED:
                continue
            if state is _SPENT or (state is _IDLE and conn.expired(now)):
                todo.close.append(conn)
                continue
            live.append(conn)
        self._connections = live
        queue = self._queue
        while queue:
            waiter = queue[0]
            if waiter.future.done():  # cancelled while waiting
                queue.popleft()
                continue
            idle = [c for c in live if c.state is _IDLE]
            # A spare on its way, the open ones first: a spare's socket is open (HELD) a loop
            # turn or more before its opener resumes to make it IDLE, and a request that comes
            # then (the client's next turn, on a core it shares with this process) would open
            # a socket of its own, its first token waiting for the connect.
            opening = [c for c in live if c.spare and c.state is _HELD]
            opening += [c for c in live if c.spare and c.state is _CONNECTING]
            if idle and not waiter.fresh:
                conn = idle[-1]
            elif opening and not waiter.fresh:
                conn = opening[0]  # it opens (or opened) before a new one would
                conn.spare = False
            elif len(live) < self.max_connections:
                conn = self._new_connection()
                live.append(conn)
            elif idle:
                oldest = idle[0]
                oldest.state = _SPENT
                live.remove(oldest)
                todo.close.append(oldest)
                conn = self._new_connection()
                live.append(conn)
            else:
                break
            queue.popleft()
            if conn.state is _IDLE:
                conn.state = _HELD
                conn.spare = False  # a request's now
            todo.hand.append((waiter, conn))
        return todo

    def _new_connection(self) -> UpstreamConnection:
        return UpstreamConnection(self._loop(), self._lost)

    @staticmethod
    def _run(todo: Assignment) -> None:
        for conn in todo.close:
            conn.close()
        for waiter, conn in todo.hand:
            waiter.future.set_result(conn)

    def close(self) -> None:
        for task in self._opening.values():
            task.cancel()
        for conn in self._connections:
            if conn.state is _IDLE:
                conn.close()
        self._connections = [c for c in self._connections if c.state is not _SPENT]
