"""Retry-friendly failures: before the answer's first event a failed upstream is replaced
unseen, each upstream at most once; after it the stream ends with an api_error event; only
the gateway's own overload is 529, and every 529 and 429 says when to retry; an error the
request caused leaves the upstream's health alone."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anthropic
import orjson
import pytest

from tests.conftest import GatewayFactory, RunningGateway, gateway_config
from tests.fake_llama import FakeLlamaServer, Reply
from tests.support.wire import ASK, http_post, raw_events, sdk

MESSAGES = "/proxy/dep/anthropic/v1/messages"
GOOD = Reply(tokens=["from", " the", " good", " one"], prompt_tokens=9)

# Upstreams tried in config order (least in flight, all idle): the first listed is tried first.
IN_ORDER = {"balance": "least_in_flight"}


async def ask(gateway: RunningGateway, stream: bool) -> tuple[str, str]:
    """(text, stop_reason) through the official SDK."""
    kwargs: dict[str, Any] = {"model": "m", "max_tokens": 50, "messages": ASK}
    if stream:
        async with sdk(gateway).messages.stream(**kwargs) as s:
            message = await s.get_final_message()
    else:
        message = await sdk(gateway).messages.create(**kwargs)
    assert message.content[0].type == "text"
    return message.content[0].text, str(message.stop_reason)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(Reply(die_after=0), id="head-then-death-before-the-first-token"),
        pytest.param(Reply(status=500, error_message="slot crashed"), id="a-5xx-the-request-did-not-cause"),
        pytest.param(Reply(stall_after=0), id="head-then-silence-before-the-first-token"),
    ],
)
async def test_a_failure_before_the_first_event_is_retried_unseen(
    start_gateway: GatewayFactory, failure: Reply, stream: bool
) -> None:
    async with FakeLlamaServer(failure) as bad, FakeLlamaServer(GOOD) as good:
        config = gateway_config([bad.url, good.url], server={"upstream_read_timeout": 1}, model=IN_ORDER)
        gw = await start_gateway(config)
        assert await ask(gw, stream) == ("from the good one", "end_turn")
        assert len(bad.chat_requests()) == 1 and len(good.chat_requests()) == 1
        assert await ask(gw, stream) == ("from the good one", "end_turn")
        assert len(bad.chat_requests()) == 1  # the failed one was taken out


@pytest.mark.parametrize("stream", [False, True])
async def test_each_upstream_is_tried_at_most_once(start_gateway: GatewayFactory, stream: bool) -> None:
    async with FakeLlamaServer(Reply(die_after=0)) as first, FakeLlamaServer(Reply(die_after=0)) as second:
        gw = await start_gateway(gateway_config([first.url, second.url], model=IN_ORDER))
        status, headers, body = await http_post(
            gw.port, MESSAGES, {"model": "m", "max_tokens": 5, "messages": ASK, "stream": stream}
        )
        assert status == 502 and headers["content-type"] == "application/json"
        assert orjson.loads(body)["error"]["type"] == "api_error"
        assert len(first.chat_requests()) == len(second.chat_requests()) == 1


async def test_after_the_first_event_a_failure_ends_the_stream_with_api_error(start_gateway: GatewayFactory) -> None:
    async with FakeLlamaServer(Reply(tokens=["a", "b", "c"], die_after=1)) as bad, FakeLlamaServer(GOOD) as good:
        gw = await start_gateway(gateway_config([bad.url, good.url], model=IN_ORDER))
        events = await raw_events(gw, {})
        assert [n for n, _ in events][:3] == ["message_start", "content_block_start", "content_block_delta"]
        assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "api_error"
        assert not good.chat_requests()  # the answer had begun: no second attempt


@pytest.mark.parametrize("upstreams", [1, 2])
async def test_an_error_the_request_caused_leaves_the_upstream_healthy(
    start_gateway: GatewayFactory, upstreams: int
) -> None:
    no_vision = Reply(status=500, error_message="image input is not supported - hint: you may need to provide mmproj")
    async with FakeLlamaServer(no_vision) as first, FakeLlamaServer(no_vision) as second:
        gw = await start_gateway(gateway_config([first.url, second.url][:upstreams], model=IN_ORDER))
        for _ in range(3):
            with pytest.raises(anthropic.BadRequestError) as caught:
                await sdk(gw).messages.create(model="m", max_tokens=5, messages=ASK)
            assert "cannot take images" in str(caught.value)
        # One upstream asked each time (no failover to the next), and none taken out.
        assert len(first.chat_requests()) + len(second.chat_requests()) == 3
        assert await readyz(gw) == 200


async def readyz(gateway: RunningGateway) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return int(answer.split(b" ", 2)[1])


def retry_after(headers: dict[str, str]) -> int:
    return int(headers["retry-after"])


async def test_queue_full_and_queue_timeout_529s_say_when_to_retry(start_gateway: GatewayFactory) -> None:
    async with FakeLlamaServer(Reply(tokens=["slow"] * 40, token_delay=0.025)) as fake:
        full = await start_gateway(gateway_config([fake.url], deployment={"max_concurrency": 1, "max_queue": 0}))
        timed = await start_gateway(
            gateway_config([fake.url], deployment={"max_concurrency": 1, "max_queue": 4, "queue_timeout": 0.2})
        )
        for gw in (full, timed):
            busy = asyncio.ensure_future(ask(gw, stream=False))
            while len(fake.chat_requests()) < (1 if gw is full else 2):
                await asyncio.sleep(0.01)
            status, headers, body = await http_post(gw.port, MESSAGES, {"model": "m", "max_tokens": 5, "messages": ASK})
            assert status == 529 and orjson.loads(body)["error"]["type"] == "overloaded_error"
            assert retry_after(headers) >= 1
            await busy


async def test_a_loading_model_529_says_when_to_retry(start_gateway: GatewayFactory) -> None:
    loading = Reply(status=503, error_type="unavailable_error", error_message="Loading model")
    async with FakeLlamaServer(loading) as fake:
        gw = await start_gateway(gateway_config([fake.url]))
        status, headers, body = await http_post(gw.port, MESSAGES, {"model": "m", "max_tokens": 5, "messages": ASK})
        assert status == 529 and orjson.loads(body)["error"]["type"] == "overloaded_error"
        assert retry_after(headers) >= 1


async def test_the_connection_cap_529_says_when_to_retry(start_gateway: GatewayFactory) -> None:
    async with FakeLlamaServer() as fake:
        gw = await start_gateway(gateway_config([fake.url], server={"max_connections": 1}))
        _held = await asyncio.open_connection("127.0.0.1", gw.port)
        # Busy (answered, its next head under way): an idle connection would be closed to make room.
        _held[1].write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /healthz HTTP/1.1\r\n")
        assert (await _held[0].readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        _held[1].close()
        head = answer.split(b"\r\n\r\n")[0].decode().lower()
        assert head.startswith("http/1.1 529") and "\r\nretry-after: 1" in head


async def test_the_shutdown_529_says_when_to_retry(start_gateway: GatewayFactory) -> None:
    async with FakeLlamaServer(Reply(tokens=["slow"] * 500, token_delay=0.02)) as fake:
        gw = await start_gateway(gateway_config([fake.url], deployment={"max_concurrency": 1}), shutdown_grace=0.3)
        busy = asyncio.ensure_future(raw_events(gw, {}))
        while not fake.chat_requests():
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(http_post(gw.port, MESSAGES, {"model": "m", "max_tokens": 5, "messages": ASK}))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        gw.stop.set()
        status, headers, body = await queued
        assert status == 529 and "shutting down" in orjson.loads(body)["error"]["message"]
        assert retry_after(headers) >= 1 and time.monotonic() - started < 5
        assert (await busy)[-1][0] == "error"


async def test_an_error_reported_in_the_stream_is_an_answer_not_a_fault(start_gateway: GatewayFactory) -> None:
    """llama-server reports some errors after its 200 head as `data: {"error": …}` (then ends
    the stream without [DONE]: docs/llama-server-facts.md §4): not retried elsewhere, no
    health change, a 502 with its message when nothing had been sent yet."""
    asked: list[int] = []

    async def reporting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET /health "):
            writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 15\r\nConnection: close\r\n\r\n{"status":"ok"}')
            writer.close()
            return
        asked.append(1)
        event = b'data: {"error":{"code":500,"message":"failed to decode the batch","type":"server_error"}}\n\n'
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"%x\r\n%b\r\n0\r\n\r\n" % (len(event), event)
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(reporting, "127.0.0.1", 0)
    async with server, FakeLlamaServer(GOOD) as good:
        port = server.sockets[0].getsockname()[1]
        gw = await start_gateway(gateway_config([f"http://127.0.0.1:{port}", good.url], model=IN_ORDER))
        status, _, body = await http_post(gw.port, MESSAGES, {"model": "m", "max_tokens": 5, "messages": ASK})
        assert status == 502 and "failed to decode the batch" in orjson.loads(body)["error"]["message"]
        assert len(asked) == 1 and not good.chat_requests()
        assert await readyz(gw) == 200
