"""The floor: a bare asyncio byte relay, the least a Python gateway in front of llama-server can do.

It parses no HTTP and no JSON; it pays only what CaseDesk cannot avoid paying: a client
connection accepted, one upstream connection opened per client connection (llama-server closes
every connection that carried a stream, docs/llama-server-facts.md §4), opened once the
request's first bytes arrive (a gateway must read the request to know where it goes), bytes
copied both ways, back-pressure, TCP_NODELAY, the same event loop as CaseDesk. CaseDesk's CPU
per token and added time to first token are reported against it (bench/fake.py).

    python -m bench.floor --port 9000 --upstream-port 8080
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from typing import cast

from bench.loop import run


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Upstream(asyncio.Protocol):
    """The upstream side of one relayed connection: its bytes go to the client as they come."""

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close; connection_lost closes the client side

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client.transport.resume_reading()


class _Client(asyncio.Protocol):
    """One client connection: the first bytes open its upstream connection; until it is open
    they are held, then everything is copied as it comes."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.transport: asyncio.Transport = cast(asyncio.Transport, None)
        self.upstream: _Upstream | None = None
        self.held: list[bytes] | None = None  # bytes read before the upstream connection is open
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.write(data)
        elif self.held is not None:
            self.held.append(data)
        else:
            self.held = [data]
            asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _transport, upstream = await loop.create_connection(
                lambda: _Upstream(self), "127.0.0.1", self.upstream_port
            )
        except OSError:
            self.transport.abort()
            return
        assert upstream.transport is not None and self.held is not None
        if self.closed:
            upstream.transport.abort()
            return
        self.upstream = upstream
        upstream.transport.write(b"".join(self.held))
        self.held = None

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.abort()

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()


async def serve(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(upstream_port), "127.0.0.1", port, backlog=2048)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="a bare asyncio byte relay: the floor CaseDesk is measured against")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    run(serve(args.port, args.upstream_port))


if __name__ == "__main__":
    main()
