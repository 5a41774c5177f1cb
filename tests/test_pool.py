"""The upstream pool over real sockets: cancellation at every point of `acquire`, the
retry on a socket the server had closed, and `Exchange` closing exactly once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from casedesk.upstream.client import call_json, open_exchange
from casedesk.upstream.pool import UpstreamPool
from tests.fake_llama import FakeLlamaServer
from tests.support.wait import until


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
