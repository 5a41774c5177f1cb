"""Talking to a running gateway: raw bytes on a socket, a plain HTTP/1.1 POST read with h11,
a streamed answer's events exactly as they came, and the official SDK."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import h11
import orjson

from tests.support.gateway import RunningGateway

DEAD_UPSTREAM = "http://127.0.0.1:9"  # discard port: nothing listens, connections are refused
MESSAGES = "/proxy/dep/anthropic/v1/messages"
ASK = [{"role": "user", "content": "hi"}]


async def exchange(port: int, raw: bytes, read_until_close: bool = False, timeout: float = 5.0) -> bytes:
    """Send raw bytes, return what comes back (one response, or all until the server closes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    try:
        if read_until_close:
            return await asyncio.wait_for(reader.read(-1), timeout)
        return await asyncio.wait_for(read_response(reader), timeout)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """One response with a content-length body (or none), head included."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


def parse(response: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of one raw response."""
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


async def get(gateway: RunningGateway, path: str, port: int | None = None) -> tuple[int, bytes]:
    """GET `path` on the gateway's listener (or on `port`): (status, body)."""
    raw = f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode()
    status, _, body = parse(await exchange(port or gateway.port, raw))
    return status, body


def post_bytes(conn: h11.Connection, path: str, payload: bytes, headers: dict[str, str] | None = None) -> bytes:
    """A whole JSON POST as `conn` (an h11 client) frames it: head, body and end."""
    head = [("host", "x"), ("anthropic-version", "2023-06-01"), ("content-type", "application/json")]
    head += [("content-length", str(len(payload))), *(headers or {}).items()]
    return (
        conn.send(h11.Request(method="POST", target=path, headers=head))
        + conn.send(h11.Data(data=payload))
        + conn.send(h11.EndOfMessage())
    )


async def http_post(port: int, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP/1.1 POST on a fresh socket, read with h11: (status, headers, body)."""
    payload = orjson.dumps(body)
    conn = h11.Connection(h11.CLIENT)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(post_bytes(conn, path, payload, {"x-api-key": "k"}))
    status, response_headers, data = 0, {}, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await asyncio.wait_for(reader.read(65536), 10))
        elif isinstance(event, h11.Response):
            status = event.status_code
            response_headers = {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            data += event.data
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            break
    writer.close()
    return status, response_headers, data


async def raw_events(gateway: RunningGateway, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """POST a streamed request; the (event, data) pairs exactly as they came."""
    status, headers, data = await http_post(
        gateway.port,
        MESSAGES,
        {"model": "m", "max_tokens": 100, "messages": ASK, "stream": True, **body},
    )
    assert status == 200, data
    assert headers["content-type"] == "text/event-stream"
    events = []
    for block in data.decode().strip().split("\n\n"):
        # SSE comments (": keep-alive" while the answer is slow to begin) carry no event.
        lines = dict(line.split(": ", 1) for line in block.split("\n") if not line.startswith(":"))
        if lines:
            events.append((lines["event"], orjson.loads(lines["data"])))
    return events


def sdk(gateway: RunningGateway) -> anthropic.AsyncAnthropic:
    """The official SDK pointed at deployment "dep", without retries (a test sees every answer)."""
    return anthropic.AsyncAnthropic(base_url=gateway.base_url(), api_key="k", max_retries=0)
