"""The upstream pool: its one deciding function (`_assign`) on a fake clock, then over real
sockets: cancellation at every point of `acquire`, the retry on a socket the server had
closed, `Exchange` closing exactly once, one socket across its request cycles, and the hand framing."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from casedesk.upstream.client import MAX_ERROR_BODY, call_json, open_exchange
from casedesk.upstream.connection import ConnectionState, UpstreamConnection, UpstreamError, _keep_alive
from casedesk.upstream.pool import ConnectionWaiter, UpstreamPool
from tests.fake_llama import FakeLlamaServer, Reply
from tests.support.wait import until


# -- _assign, the pool's one decision, on a fake clock (no sockets) -----------------------------

State = ConnectionState


def connection(pool: UpstreamPool, state: ConnectionState, idle_since: float = 0.0) -> UpstreamConnection:
    conn = UpstreamConnection(asyncio.get_running_loop(), pool._lost)
    conn.state, conn.idle_since = state, idle_since
    pool._connections.append(conn)
    return conn


def waiting(pool: UpstreamPool, fresh: bool = False) -> ConnectionWaiter:
    waiter = ConnectionWaiter(asyncio.get_running_loop().create_future(), fresh)
    pool._queue.append(waiter)
    return waiter


async def test_assign_hands_the_newest_idle_connection_and_opens_below_the_cap() -> None:
    pool = UpstreamPool("127.0.0.1", 1, max_connections=3)
    old, new = connection(pool, State.IDLE, 1.0), connection(pool, State.IDLE, 2.0)
    first, second, third, fourth = waiting(pool), waiting(pool), waiting(pool), waiting(pool)
    todo = pool._assign(now=2.5)
    assert todo.close == []
    handed = dict((id(w), c) for w, c in todo.hand)
    assert handed[id(first)] is new and handed[id(second)] is old
    assert handed[id(third)].state is State.CONNECTING and id(fourth) not in handed  # the cap
    assert [c.state for c in pool._connections] == [State.HELD, State.HELD, State.CONNECTING]
    assert list(pool._queue) == [fourth] and pool.in_flight == 3


async def test_assign_closes_spent_and_expired_connections_and_forgets_closed_ones() -> None:
    pool = UpstreamPool("127.0.0.1", 1, max_connections=4)
    spent = connection(pool, State.SPENT)
    closed = connection(pool, State.CLOSED)
    expired = connection(pool, State.IDLE, idle_since=0.0)  # keep-alive 5 s, retired 1 s early
    fresh = connection(pool, State.IDLE, idle_since=0.5)
    todo = pool._assign(now=4.0)
    assert todo.close == [spent, expired] and todo.hand == []
    assert pool._connections == [fresh] and closed not in pool._connections


async def test_assign_makes_room_for_a_fresh_connection_by_closing_the_oldest_idle_one() -> None:
    pool = UpstreamPool("127.0.0.1", 1, max_connections=2)
    oldest, newest = connection(pool, State.IDLE, 1.0), connection(pool, State.IDLE, 2.0)
    retry = waiting(pool, fresh=True)
    todo = pool._assign(now=2.0)
    assert todo.close == [oldest] and oldest.state is State.SPENT
    [(waiter, conn)] = todo.hand
    assert waiter is retry and conn.state is State.CONNECTING and conn is not newest
    assert pool._connections == [newest, conn]


async def test_assign_hands_a_spare_whose_socket_opened_before_its_opener_resumed() -> None:
    """A spare's socket is open (HELD) a loop turn or more before its opener makes it IDLE. A
    request that comes then takes it, open ones before those still connecting; it opens no
    socket of its own (that request's first token would wait for the connect)."""
    pool = UpstreamPool("127.0.0.1", 1, max_connections=4, spares=2)
    connecting = connection(pool, State.CONNECTING)
    opened = connection(pool, State.HELD)
    connecting.spare = opened.spare = True
    first, second = waiting(pool), waiting(pool)
    todo = pool._assign(now=1.0)
    assert todo.hand == [(first, opened), (second, connecting)]
    assert pool._connections == [connecting, opened]  # none opened besides
    assert not opened.spare and not connecting.spare  # the requests' now
    assert pool.in_flight == 2


async def test_assign_lets_requests_wait_while_every_connection_is_held() -> None:
    pool = UpstreamPool("127.0.0.1", 1, max_connections=1)
    connection(pool, State.AWAITING_HEAD)
    plain, retry = waiting(pool), waiting(pool, fresh=True)
    assert pool._assign(now=0.0).hand == []
    assert list(pool._queue) == [plain, retry]
    plain.future.cancel()  # cancelled while waiting: dropped, the next one still waits
    assert pool._assign(now=0.0).hand == [] and list(pool._queue) == [retry]


# -- over real sockets ----------------------------------------------------------------------------


async def served(pool: UpstreamPool) -> None:
    """One more request goes through the pool and gets its answer."""
    assert await call_json(pool, "GET", "/health", None, 5.0) == (200, {"status": "ok"})


async def test_acquire_cancelled_while_queued(fake: FakeLlamaServer) -> None:
    pool = UpstreamPool("127.0.0.1", fake.port, max_connections=1)
    held = await pool.acquire()
    queued = asyncio.ensure_future(pool.acquire())
    await until(lambda: pool.queued == 1)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert (pool.queued, pool.in_flight, pool.open_connections) == (0, 1, 1)
    pool.release(held)
    await served(pool)
    assert (pool.in_flight, pool.open_connections, pool.connections_opened) == (0, 1, 1)
    assert fake.open_connections == 1
    pool.close()


async def test_acquire_cancelled_after_being_handed_a_socket(fake: FakeLlamaServer) -> None:
    pool = UpstreamPool("127.0.0.1", fake.port, max_connections=1)
    held = await pool.acquire()
    queued = asyncio.ensure_future(pool.acquire())
    await until(lambda: pool.queued == 1)
    pool.release(held)  # handed to the queued request at once...
    queued.cancel()  # ...which is cancelled before it runs: the socket comes back
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert (pool.queued, pool.in_flight, pool.open_connections) == (0, 0, 1)
    await served(pool)
    assert pool.connections_opened == 1 and fake.connections_accepted == 1
    pool.close()


async def test_acquire_cancelled_after_being_handed_a_slot(fake: FakeLlamaServer) -> None:
    pool = UpstreamPool("127.0.0.1", fake.port, max_connections=1)
    held = await pool.acquire()
    queued = asyncio.ensure_future(pool.acquire())
    await until(lambda: pool.queued == 1)
    pool.release(held, reusable=False)  # the socket is closed: its slot goes to the queued request
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert (pool.queued, pool.in_flight, pool.open_connections) == (0, 0, 0)
    await served(pool)
    assert pool.connections_opened == 2
    await until(lambda: fake.open_connections == 1)  # the first socket was closed, not leaked
    pool.close()


async def test_acquire_cancelled_while_connecting(fake: FakeLlamaServer, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    connect = loop.create_connection
    gate = asyncio.Event()
    connecting = asyncio.Event()

    async def slow_connect(*args: Any, **kwargs: Any) -> Any:
        connecting.set()
        await gate.wait()
        return await connect(*args, **kwargs)

    monkeypatch.setattr(loop, "create_connection", slow_connect)
    pool = UpstreamPool("127.0.0.1", fake.port, max_connections=1)
    opening = asyncio.ensure_future(pool.acquire())
    await asyncio.wait_for(connecting.wait(), 2)
    assert pool.in_flight == 1
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    assert (pool.queued, pool.in_flight, pool.open_connections, pool.connections_opened) == (0, 0, 0, 0)
    gate.set()
    await served(pool)
    assert pool.connections_opened == 1 and fake.connections_accepted == 1
    pool.close()


async def test_a_reused_socket_the_server_closed_unannounced_is_retried_on_a_fresh_one() -> None:
    """The server drops the kept-alive socket just as the next request arrives (a keep-alive
    timeout crossing it): nothing came back, so the request is sent once more."""
    accepted = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=5, max=100\r\n\r\n{}")
        await writer.drain()
        if accepted == 1:
            await reader.read(1)  # the second request on this socket: no answer, just close
        else:
            await reader.read()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = UpstreamPool("127.0.0.1", port, max_connections=4)
    assert await call_json(pool, "GET", "/health", None, 5.0) == (200, {})
    assert await call_json(pool, "GET", "/health", None, 5.0) == (200, {})
    assert accepted == 2 and pool.connections_opened == 2
    assert (pool.in_flight, pool.open_connections) == (0, 1)
    pool.close()
    server.close()
    await server.wait_closed()


async def streamed(pool: UpstreamPool) -> bytes:
    """One streamed chat answer through the pool (llama-server closes its socket after it)."""
    body = b'{"messages":[{"role":"user","content":"hi"}],"stream":true}'
    exchange = await open_exchange(pool, "POST", "/v1/chat/completions", body, 5.0)
    pieces: list[bytes] = []
    try:
        await exchange.relay(pieces.append, None)
    finally:
        exchange.close()
    return b"".join(pieces)


async def test_a_spare_opened_after_a_stream_carries_the_next_one_without_a_connect(fake: FakeLlamaServer) -> None:
    """The next stream's first token does not wait for a connect: the socket the last stream
    spent was replaced by a spare while nobody waited. A spare is nobody's load."""
    pool = UpstreamPool("127.0.0.1", fake.port, spares=1)
    assert b"[DONE]" in await streamed(pool)
    await until(lambda: fake.connections_accepted == 2)  # the spare, opened after the stream
    await until(lambda: [c.state for c in pool._connections] == [ConnectionState.IDLE])
    assert pool.in_flight == 0  # the balancer and /metrics see no load
    assert b"[DONE]" in await streamed(pool)
    assert [r.connection for r in fake.chat_requests()] == [1, 2]  # the second came on the spare
    await until(lambda: fake.connections_accepted == 3)  # and the next spare
    assert pool.connections_opened == 3 and pool.open_connections == 1
    pool.close()
    await until(lambda: fake.open_connections == 0)


async def test_a_quiet_pool_keeps_no_spare_and_a_whole_answer_opens_none(fake: FakeLlamaServer) -> None:
    """The server closes a spare nobody used (its keep-alive timeout); none is opened in its
    place until a request comes. An answer that keeps its socket needs no spare at all."""
    fake.keepalive_timeout = 0.2
    pool = UpstreamPool("127.0.0.1", fake.port, spares=1)
    await streamed(pool)
    await until(lambda: fake.connections_accepted == 2)
    await until(lambda: pool.open_connections == 0 and fake.open_connections == 0)
    await asyncio.sleep(0.3)
    assert fake.connections_accepted == 2
    await served(pool)
    await served(pool)  # the socket it kept
    assert fake.connections_accepted == 3 and pool.open_connections == 1
    pool.close()


async def test_a_spare_the_server_closed_as_the_request_came_is_retried_on_a_fresh_one() -> None:
    """A spare that sat open may meet the server's close (its keep-alive timeout, a restart)
    just as a request is sent on it: as on a reused socket, the request is sent once more."""
    accepted = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        serial = accepted
        try:
            await reader.readuntil(b"\r\n\r\n")
            if serial != 2:  # the spare reads the request and closes without a word
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    pool = UpstreamPool("127.0.0.1", server.sockets[0].getsockname()[1], spares=1)
    assert await call_json(pool, "GET", "/health", None, 5.0) == (200, {})
    await until(lambda: accepted == 2 and pool._connections[0].state is ConnectionState.IDLE)
    assert await call_json(pool, "GET", "/health", None, 5.0) == (200, {})
    assert accepted >= 3
    pool.close()
    server.close()
    await server.wait_closed()


async def test_a_spare_that_cannot_connect_is_dropped_quietly_and_the_next_request_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failed spare is nobody's failure: no error, no load; the next request connects
    itself and reports what it meets."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens on it once the probe is closed
    pool = UpstreamPool("127.0.0.1", port, spares=1)
    pool._top_up(asyncio.get_running_loop())  # what a release does when no socket is left
    assert pool.open_connections == 1 and pool.in_flight == 0
    await until(lambda: not pool._opening)
    assert pool.open_connections == 0 and pool.connections_opened == 0
    with pytest.raises(UpstreamError, match="cannot connect"):
        await call_json(pool, "GET", "/health", None, 5.0)
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    pool.close()


async def test_a_request_that_comes_while_a_spare_opens_takes_it(fake: FakeLlamaServer) -> None:
    """A stream that comes right after another (an agent's next turn) meets its spare still
    opening: it waits for that one rather than open a second socket."""
    pool = UpstreamPool("127.0.0.1", fake.port, spares=1)
    pool._top_up(asyncio.get_running_loop())  # what the last stream's release did
    conn = await pool.acquire()
    assert conn.opened_ahead and conn.state is ConnectionState.HELD and pool.in_flight == 1
    await until(lambda: fake.connections_accepted == 1)
    pool.release(conn)
    await served(pool)
    assert pool.connections_opened == 1 and fake.connections_accepted == 1
    pool.close()


async def test_a_request_that_gives_up_on_an_opening_spare_leaves_it_to_the_pool(fake: FakeLlamaServer) -> None:
    pool = UpstreamPool("127.0.0.1", fake.port, spares=1)
    pool._top_up(asyncio.get_running_loop())
    waiting_one = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0)
    waiting_one.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting_one
    await until(lambda: [c.state for c in pool._connections] == [ConnectionState.IDLE])
    assert pool.in_flight == 0
    await served(pool)  # on that spare
    assert fake.connections_accepted == 1
    pool.close()


async def test_a_request_whose_opening_spare_fails_connects_itself_and_says_why() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pool = UpstreamPool("127.0.0.1", port, spares=1)
    pool._top_up(asyncio.get_running_loop())
    with pytest.raises(UpstreamError, match="cannot connect"):
        await pool.acquire()
    assert (pool.open_connections, pool.in_flight) == (0, 0)
    pool.close()


async def test_an_exchange_closes_once_and_can_be_aborted(fake: FakeLlamaServer) -> None:
    pool = UpstreamPool("127.0.0.1", fake.port, max_connections=2)
    exchange = await open_exchange(pool, "GET", "/health", None, 5.0)
    assert await exchange.read_json() == {"status": "ok"}
    exchange.close()
    exchange.close()
    assert (pool.in_flight, pool.open_connections) == (0, 1)
    exchange = await open_exchange(pool, "GET", "/health", None, 5.0)  # the same socket
    exchange.abort()  # before its body was read: the socket is closed, never pooled
    exchange.close()
    assert (pool.in_flight, pool.open_connections, pool.connections_opened) == (0, 0, 1)
    await until(lambda: fake.open_connections == 0)
    await served(pool)
    pool.close()


async def test_one_socket_carries_its_request_cycles(fake: FakeLlamaServer) -> None:
    pool = UpstreamPool("127.0.0.1", fake.port, max_connections=1)
    for _ in range(3):
        await served(pool)
    [conn] = pool._connections
    assert conn.state is ConnectionState.IDLE and conn.requests_sent == 3 and fake.connections_accepted == 1
    pool.close()
    await until(lambda: fake.open_connections == 0)


async def test_an_answer_that_says_close_spends_its_socket(fake: FakeLlamaServer) -> None:
    pool = UpstreamPool("127.0.0.1", fake.port, max_connections=2)
    exchange = await open_exchange(pool, "GET", "/no-such-path", None, 5.0)  # 404: `Connection: close`
    assert exchange.head.status == 404
    await exchange.read_body(MAX_ERROR_BODY)
    assert exchange.conn.state is ConnectionState.SPENT
    exchange.close()
    assert (pool.in_flight, pool.open_connections) == (0, 0)
    await served(pool)
    assert pool.connections_opened == 2
    pool.close()


async def test_an_error_body_larger_than_its_bound_fails_and_closes_the_socket() -> None:
    """A 500 whose body never ends is not buffered (issue 22 item 5): past the bound it fails."""
    sent = 0
    closed = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: %d\r\n\r\n" % (64 << 20))
        try:
            for _ in range(64):
                writer.write(b"x" * (1 << 20))
                await writer.drain()
                sent += 1 << 20
        except ConnectionError:
            pass
        closed.set()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    pool = UpstreamPool("127.0.0.1", server.sockets[0].getsockname()[1])
    exchange = await open_exchange(pool, "GET", "/", None, 5.0)
    with pytest.raises(UpstreamError, match="larger than 65536 bytes"):
        await exchange.read_body(MAX_ERROR_BODY)
    exchange.close()
    await asyncio.wait_for(closed.wait(), 5)
    assert sent < 32 << 20  # cut at the bound: what is left in socket buffers at most
    pool.close()
    server.close()
    await server.wait_closed()


# -- the hand framing over real sockets (upstream/framing.py; compared with h11 in test_framing) --

OK_KEEP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=5, max=100\r\n\r\n{}"


class ScriptedUpstream:
    """Answers each request with the next scripted bytes; a None after an answer closes the
    socket right after it."""

    def __init__(self, answers: list[bytes | None]) -> None:
        self.answers = answers
        self.accepted = 0
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while self.answers:
                await reader.readuntil(b"\r\n\r\n")
                answer = self.answers.pop(0)
                assert answer is not None
                writer.write(answer)
                await writer.drain()
                if self.answers and self.answers[0] is None:
                    self.answers.pop(0)
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def __aenter__(self) -> UpstreamPool:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return UpstreamPool("127.0.0.1", self.server.sockets[0].getsockname()[1], max_connections=1)

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def answer(pool: UpstreamPool) -> tuple[int, bytes, ConnectionState]:
    """(status, body, the socket's state once the body is read) of one GET."""
    exchange = await open_exchange(pool, "GET", "/x", None, 5.0)
    try:
        body = await exchange.read_body(MAX_ERROR_BODY)
        return exchange.head.status, body, exchange.conn.state
    finally:
        exchange.close()


async def test_interim_heads_are_skipped_and_a_clean_answer_keeps_its_socket() -> None:
    continue_first = b"HTTP/1.1 100 Continue\r\n\r\n" + OK_KEEP
    async with ScriptedUpstream([continue_first, OK_KEEP]) as pool:
        assert await answer(pool) == (200, b"{}", State.HELD)
        assert await answer(pool) == (200, b"{}", State.HELD)
        assert pool.connections_opened == 1 and pool.open_connections == 1
        pool.close()


async def test_bodies_that_end_with_the_connection_or_overrun_spend_the_socket() -> None:
    async with ScriptedUpstream([b"HTTP/1.1 200 OK\r\n\r\nuntil the close", None]) as pool:
        assert await answer(pool) == (200, b"until the close", State.SPENT)
    async with ScriptedUpstream([OK_KEEP + b"HTTP/1.1 200 OK\r\n", OK_KEEP]) as pool:
        assert await answer(pool) == (200, b"{}", State.SPENT)  # the extra bytes are no answer
        assert await answer(pool) == (200, b"{}", State.HELD)
        assert pool.connections_opened == 2
        pool.close()
    async with ScriptedUpstream([b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}", OK_KEEP]) as pool:
        assert await answer(pool) == (200, b"{}", State.SPENT)
        pool.close()


async def test_a_whole_chunked_answer_is_read_and_its_socket_spent() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + b"Keep-Alive: timeout=5, max=100\r\n\r\n"
    async with ScriptedUpstream([chunked + b"1\r\n{\r\n1\r\n}\r\n0\r\n\r\n", OK_KEEP]) as pool:
        assert await answer(pool) == (200, b"{}", State.SPENT)  # llama-server closes after chunked
        pool.close()


async def test_a_relayed_content_length_body_arrives_in_pieces_and_keeps_its_socket() -> None:
    body = b"x" * 300_000
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nKeep-Alive: timeout=5, max=100\r\n\r\n" % len(body)
    async with ScriptedUpstream([head + body, OK_KEEP]) as pool:
        exchange = await open_exchange(pool, "GET", "/x", None, 5.0)
        pieces: list[bytes] = []
        await exchange.relay(pieces.append)
        assert b"".join(pieces) == body and exchange.conn.state is State.HELD
        exchange.close()
        assert await answer(pool) == (200, b"{}", State.HELD)
        assert pool.connections_opened == 1
        pool.close()


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\n{}", "malformed HTTP: bad header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", "malformed HTTP: conflicting"),
        (b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n", "malformed HTTP: obsolete line folding"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", "closed the connection mid-response"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "closed the connection inside the response head"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n", "closed the connection mid-response"),
    ],
)
async def test_broken_answers_fail_clearly_and_close_the_socket(wire: bytes, message: str) -> None:
    async with ScriptedUpstream([wire, None]) as pool:
        with pytest.raises(UpstreamError, match=message):
            await answer(pool)
        assert pool.in_flight == 0
        await until(lambda: pool.open_connections == 0)


@pytest.mark.parametrize(
    "wire",
    [
        b'HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\nContent-Length: 13\r\n\r\n{"error":"x"}',
        b'HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\n\r\n{"error":"x"}',  # until the close
    ],
)
async def test_an_answer_whose_socket_closed_before_its_body_was_asked_for_is_read_whole(wire: bytes) -> None:
    """llama-server closes after an error answer: the close may be seen before the caller, which
    was handed the head, asks for the body. The body is still there, and the socket is not reused."""
    async with ScriptedUpstream([wire, None]) as pool:
        exchange = await open_exchange(pool, "GET", "/x", None, 5.0)
        try:
            transport = exchange.conn.transport
            assert transport is not None
            await until(transport.is_closing)  # the server's close has been seen
            assert exchange.head.status == 500
            assert await exchange.read_body(MAX_ERROR_BODY) == b'{"error":"x"}'
            assert exchange.conn.state is State.CLOSED
        finally:
            exchange.close()
        assert pool.in_flight == 0 and pool.open_connections == 0


async def test_sent_runs_once_the_request_is_written_while_the_head_is_awaited() -> None:
    """open_exchange's `sent` (the streamed answer's head rendered meanwhile) runs after the
    request left and before the upstream's head: work done while llama-server reads the prompt."""
    events: list[str] = []
    body = b'{"messages":[{"role":"user","content":"hi"}],"stream":true}'
    async with FakeLlamaServer(Reply(tokens=["a"], head_delay=0.2)) as fake:
        pool = UpstreamPool("127.0.0.1", fake.port, max_connections=1)

        def sent() -> None:
            events.append(f"sent, {len(fake.chat_requests())} requests seen")

        started = asyncio.get_running_loop().time()
        exchange = await open_exchange(pool, "POST", "/v1/chat/completions", body, 5.0, sent)
        events.append(f"head {exchange.head.status}")
        assert asyncio.get_running_loop().time() - started >= 0.2  # the head was withheld meanwhile
        exchange.abort()
        exchange.close()
        pool.close()
    assert events == ["sent, 0 requests seen", "head 200"]


def test_the_keep_alive_header_sets_the_sockets_idle_bound_and_request_count() -> None:
    """llama-server's `Keep-Alive: timeout=5, max=100` (read once per value, then looked up):
    each number on its own, the last one counting, anything else ignored."""
    assert _keep_alive("timeout=5, max=100") == (5.0, 100)
    assert _keep_alive("max=3") == (None, 3) and _keep_alive("timeout = 2") == (2.0, None)
    assert _keep_alive("timeout=1, timeout=9") == (9.0, None)
    assert _keep_alive("") == (None, None) and _keep_alive("close") == (None, None)
