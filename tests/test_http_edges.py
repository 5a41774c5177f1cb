"""Connection edges over real sockets: answers sent before the body was read, `Expect:
100-continue`, a client that stops reading, percent-encoded path parameters."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import socket
import time
from typing import Any

import anthropic
import orjson
import pytest

from tests.conftest import GatewayFactory, RunningGateway, gateway_config
from tests.fake_llama import FakeLlamaServer, Reply
from tests.support.wire import DEAD_UPSTREAM, MESSAGES, exchange, http_post, parse, read_response

ASK = [{"role": "user", "content": "hi"}]
MiB = 1024 * 1024


def message_body(size: int) -> bytes:
    """A valid Messages request of about `size` bytes."""
    return orjson.dumps({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x" * size}]})


def request_head(path: str, length: int, extra: bytes = b"") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n"
        "anthropic-version: 2023-06-01\r\n".encode()
        + extra
        + b"\r\n"
    )


async def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def send(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)


async def recv_until_close(sock: socket.socket, timeout: float = 10.0) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(timeout):
        while chunk := await loop.sock_recv(sock, 65536):
            data += chunk
    return data


# -- 1. an answer sent before the body was read reaches the client ---------------------------


async def test_early_413_reaches_a_raw_client_that_sends_the_whole_body(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM], server={"max_body_bytes": MiB}))
    body = message_body(8 * MiB)
    sock = await connect(gw.port)
    loop = asyncio.get_running_loop()
    try:
        # The client writes everything before it reads, as most HTTP clients do.
        await asyncio.wait_for(loop.sock_sendall(sock, request_head(MESSAGES, len(body)) + body), 10)
        answer = await recv_until_close(sock)
    finally:
        sock.close()
    status, headers, payload = parse(answer)
    assert status == 413 and headers["connection"] == "close"
    assert orjson.loads(payload)["error"]["type"] == "request_too_large"


async def test_early_413_reaches_the_sdk(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM], server={"max_body_bytes": MiB}))
    client = anthropic.AsyncAnthropic(base_url=gw.base_url(), api_key="k", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as caught:
        await client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x" * 8 * MiB}])
    assert caught.value.status_code == 413
    assert caught.value.body["error"]["type"] == "request_too_large"  # type: ignore[index]


async def test_early_431_reaches_a_client_that_sends_a_body_after_its_head(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM], server={"max_header_count": 10}))
    body = message_body(4 * MiB)
    extra = b"".join(b"x-h%d: v\r\n" % i for i in range(20))
    sock = await connect(gw.port)
    try:
        await asyncio.wait_for(send(sock, request_head(MESSAGES, len(body), extra) + body), 10)
        answer = await recv_until_close(sock)
    finally:
        sock.close()
    assert parse(answer)[0] == 431


async def test_connection_cap_529_reaches_a_client_that_already_sent_a_request(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM], server={"max_connections": 1}))
    held_reader, held = await asyncio.open_connection("127.0.0.1", gw.port)
    # Answered, then busy (its next head under way): an idle connection would be closed for room.
    held.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /healthz HTTP/1.1\r\n")
    assert parse(await read_response(held_reader))[0] == 200
    body = message_body(2 * MiB)
    sock = await connect(gw.port)
    try:
        await asyncio.wait_for(send(sock, request_head(MESSAGES, len(body)) + body), 10)
        answer = await recv_until_close(sock)
    finally:
        sock.close()
        held.close()
    status, _, payload = parse(answer)
    assert status == 529 and orjson.loads(payload)["error"]["type"] == "overloaded_error"


# -- 2. Expect: 100-continue ------------------------------------------------------------------

EXPECT = b"expect: 100-continue\r\n"


async def read_head(sock: socket.socket, timeout: float) -> bytes:
    """Bytes up to and with the first blank line (one response head, interim or final)."""
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(timeout):
        while b"\r\n\r\n" not in data:
            chunk = await loop.sock_recv(sock, 1)
            assert chunk, data
            data += chunk
    return data


async def test_100_continue_is_sent_before_a_body_that_will_be_read(
    fake: FakeLlamaServer, start_gateway: GatewayFactory
) -> None:
    gw = await start_gateway(gateway_config([fake.url]))
    body = message_body(2 * MiB)
    sock = await connect(gw.port)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(sock, request_head(MESSAGES, len(body), EXPECT))
        # A client waits about 1 s for this before it sends the body anyway (curl's default).
        interim = await read_head(sock, timeout=0.9)
        assert interim.startswith(b"HTTP/1.1 100 ")
        await loop.sock_sendall(sock, body)
        reader, writer = await asyncio.open_connection(sock=sock)
        status, _, payload = parse(await asyncio.wait_for(read_response(reader), 10))
        writer.close()
    finally:
        sock.close()
    assert status == 200 and orjson.loads(payload)["content"][0]["text"] == "Hello world!"


@pytest.mark.parametrize(
    ("path", "extra", "status"),
    [
        (MESSAGES, b"", 413),  # content-length over max_body_bytes
        ("/proxy/dep/anthropic/v1/nowhere", b"", 404),
        ("/proxy/nope/anthropic/v1/messages", b"", 401),  # unknown ids look keyed once one is (issue 22)
        (MESSAGES, b"x-api-key: wrong\r\n", 401),
    ],
)
async def test_a_request_that_will_not_be_read_is_answered_at_once_without_100(
    start_gateway: GatewayFactory, path: str, extra: bytes, status: int
) -> None:
    digest = hashlib.sha256(b"right").hexdigest()
    gw = await start_gateway(
        gateway_config([DEAD_UPSTREAM], server={"max_body_bytes": 3 * MiB}, deployment={"api_keys_sha256": [digest]})
    )
    length = 4 * MiB if status == 413 else 2 * MiB
    sock = await connect(gw.port)
    try:
        await asyncio.get_running_loop().sock_sendall(sock, request_head(path, length, EXPECT + extra))
        answer = await recv_until_close(sock, timeout=0.9)  # the answer, then the close: no body sent
    finally:
        sock.close()
    got, headers, payload = parse(answer)
    assert got == status and headers["connection"] == "close"
    assert orjson.loads(payload)["type"] == "error"
    if status == 401 and path == MESSAGES:  # refused by the application's check: counted like any other request
        key = b"x-api-key: right\r\n"  # a keyed deployment's series are shown only with one of its keys
        assert 'casedesk_requests_total{deployment="dep",model="",status="401"} 1' in (await metrics_text(gw, key))[3]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_sends_a_2_mb_body_without_waiting_for_its_expect_timer(
    fake: FakeLlamaServer, start_gateway: GatewayFactory, tmp_path: Any
) -> None:
    gw = await start_gateway(gateway_config([fake.url]))
    payload = tmp_path / "body.json"
    payload.write_bytes(message_body(2 * MiB))
    started = time.monotonic()
    # curl sends `Expect: 100-continue` for a body over 1 MB; a 5 s timer makes a miss plain.
    process = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "--expect100-timeout",
        "5",
        "-H",
        "content-type: application/json",
        "-H",
        "anthropic-version: 2023-06-01",
        "--data-binary",
        f"@{payload}",
        "-w",
        "\n%{http_code}",
        gw.base_url() + "/v1/messages",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 20)
    elapsed = time.monotonic() - started
    answer, _, code = out.rpartition(b"\n")
    assert code == b"200", (out, err)
    assert orjson.loads(answer)["content"][0]["text"] == "Hello world!"
    assert elapsed < 3.0, f"curl took {elapsed:.2f} s: it waited for a 100 Continue that never came"


# -- 3. a client that stops reading -----------------------------------------------------------


async def test_a_client_that_stops_reading_is_cut_and_frees_its_slot(
    fake: FakeLlamaServer, start_gateway: GatewayFactory
) -> None:
    gw = await start_gateway(
        gateway_config(
            [fake.url],
            server={"write_timeout": 0.5, "access_log": ""},
            deployment={"max_concurrency": 1, "max_queue": 4, "queue_timeout": 3},
        )
    )
    # A long stream at a model's pace: far less than any socket buffer fills within the timeout.
    fake.replies.append(Reply(tokens=[f" tok{i}" for i in range(20000)], token_delay=0.002))
    body = orjson.dumps({"model": "m", "max_tokens": 100000, "messages": ASK, "stream": True})
    sock = await connect(gw.port, rcvbuf=4096)  # the client reads nothing from here on
    await asyncio.get_running_loop().sock_sendall(sock, request_head(MESSAGES, len(body)) + body)
    try:
        record = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (record and record.aborted):
            record = fake.chat_requests()[-1] if fake.chat_requests() else None
            await asyncio.sleep(0.05)
        # The upstream was closed long before the 40 s stream could end.
        assert record is not None and record.aborted and not record.finished
        # The deployment's only slot is free again: the next request is served, not 529.
        client = anthropic.AsyncAnthropic(base_url=gw.base_url(), api_key="k", max_retries=0)
        message = await client.messages.create(model="m", max_tokens=5, messages=ASK)
        assert message.content[0].text == "Hello world!"  # type: ignore[union-attr]
    finally:
        sock.close()
    status, _, _, metrics = await metrics_text(gw)
    assert status == 200
    assert "casedesk_write_timeouts_total 1" in metrics


async def test_a_slow_but_steady_reader_is_not_cut(fake: FakeLlamaServer, start_gateway: GatewayFactory) -> None:
    # This client shares the gateway's event loop (and a busy machine): 1 s leaves it room.
    gw = await start_gateway(gateway_config([fake.url], server={"write_timeout": 1, "access_log": ""}))
    # 400 KB of events made at 200 KB/s for 2 s, read at ~130 KB/s: bytes wait for this client
    # all along, longer than write_timeout, but it keeps acknowledging some: never cut.
    fake.replies.append(Reply(tokens=[f"{i:05d}" + "x" * 4000 for i in range(100)], token_delay=0.02))
    body = orjson.dumps({"model": "m", "max_tokens": 100000, "messages": ASK, "stream": True})
    sock = await connect(gw.port, rcvbuf=4096)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, request_head(MESSAGES, len(body)) + body)
    received = b""
    try:
        async with asyncio.timeout(30):
            while not received.endswith(b"0\r\n\r\n"):
                chunk = await loop.sock_recv(sock, 4096)
                assert chunk, "the gateway cut a client that was reading"
                received += chunk
                await asyncio.sleep(0.03)
    finally:
        sock.close()
    assert received.count(b"event: content_block_delta") == 100
    assert b"event: message_stop" in received
    assert "casedesk_write_timeouts_total 0" in (await metrics_text(gw))[3]


async def metrics_text(gw: RunningGateway, extra: bytes = b"") -> tuple[int, dict[str, str], bytes, str]:
    status, headers, body = parse(await exchange(gw.port, b"GET /metrics HTTP/1.1\r\nhost: x\r\n" + extra + b"\r\n"))
    return status, headers, body, body.decode()


# -- 6. percent-encoded path parameters -------------------------------------------------------


async def test_models_retrieve_finds_a_tag_with_slash_and_colon(
    fake: FakeLlamaServer, start_gateway: GatewayFactory
) -> None:
    tag = "hf.co/org/m:Q4"
    raw = gateway_config([fake.url])
    raw["deployments"]["dep"]["models"] = {tag: {"upstreams": [fake.url]}}
    gw = await start_gateway(raw)
    client = anthropic.AsyncAnthropic(base_url=gw.base_url(), api_key="k", max_retries=0)
    assert [m.id async for m in client.models.list()] == [tag]
    model = await client.models.retrieve(tag)
    assert model.id == tag and model.display_name == tag
    with pytest.raises(anthropic.NotFoundError) as caught:
        await client.models.retrieve("hf.co/org/other")
    assert "'hf.co/org/other' not found" in caught.value.message


async def test_the_deployment_parameter_is_percent_decoded(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM]))
    # "%64ep" is "dep" spelled with an escape; "%2F" inside a segment is a slash in the value.
    for path, status, needle in [
        (b"/proxy/%64ep/anthropic/v1/models", 200, '"id":"m"'),
        (b"/proxy/de%2Fp/anthropic/v1/models", 404, "deployment 'de/p' not found"),
    ]:
        got, _, body = parse(await exchange(gw.port, b"GET " + path + b" HTTP/1.1\r\nhost: x\r\n\r\n"))
        assert got == status and needle in body.decode(), body


# -- 7. an upstream event that never ends -----------------------------------------------------


async def test_an_upstream_event_that_never_ends_fails_the_stream_with_a_clear_error(
    start_gateway: GatewayFactory,
) -> None:
    """A broken upstream sends an event with no blank line after it: the buffer stops at 1 MiB."""

    async def broken_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"data: " + b"x" * 65536
        try:
            for _ in range(64):  # 4 MiB of one event, then silence with the socket open
                writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                await writer.drain()
            await asyncio.sleep(3600)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(broken_upstream, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        gw = await start_gateway(gateway_config([f"http://127.0.0.1:{port}"]))
        status, _headers, data = await asyncio.wait_for(
            http_post(
                gw.port,
                "/proxy/dep/anthropic/v1/messages",
                {"model": "m", "max_tokens": 100, "messages": ASK, "stream": True},
            ),
            10,
        )
    finally:
        server.close()
    # Nothing of the answer had gone out, so the failure is still a real HTTP status.
    assert status == 502
    error = orjson.loads(data)["error"]
    assert error["type"] == "api_error"
    assert "larger than 1048576 bytes" in error["message"]
