"""The client-facing HTTP layer over real sockets: routing, limits, keep-alive, hostile bytes."""

from __future__ import annotations

import asyncio
import hashlib
import time

import orjson
import pytest

from tests.conftest import GatewayFactory, gateway_config
from tests.support.wire import DEAD_UPSTREAM, MESSAGES, exchange, parse, read_response

VERSION = b"anthropic-version: 2023-06-01\r\n"


def post(path: str, body: bytes, extra: bytes = VERSION) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )


VALID = orjson.dumps({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})


async def test_healthz_answers_ok(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM]))
    status, headers, body = parse(await exchange(gw.port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"))
    assert status == 200 and orjson.loads(body) == {"status": "ok"}
    assert headers["request-id"].startswith("req_")
    assert not [h for h in headers if h.startswith("access-control")]


@pytest.mark.parametrize(
    ("request_line", "status", "error_type"),
    [
        (b"GET /nowhere HTTP/1.1", 404, "not_found_error"),
        (b"GET /proxy/dep/anthropic/v1/messages HTTP/1.1", 405, "invalid_request_error"),
        (b"GET /proxy/dep/extra/anthropic/v1/messages HTTP/1.1", 404, "not_found_error"),
        (b"GET /proxy//anthropic/v1/models HTTP/1.1", 404, "not_found_error"),
        (b"GET /proxy/nope/anthropic/v1/models HTTP/1.1", 404, "not_found_error"),
    ],
)
async def test_unknown_paths_and_methods_get_anthropic_errors(
    start_gateway: GatewayFactory, request_line: bytes, status: int, error_type: str
) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM]))
    got, headers, body = parse(await exchange(gw.port, request_line + b"\r\nhost: x\r\n\r\n"))
    assert got == status
    assert orjson.loads(body)["type"] == "error"
    assert orjson.loads(body)["error"]["type"] == error_type
    if status == 405:
        assert headers["allow"] == "POST"


async def test_head_probe_of_the_base_url_is_200_without_body(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM]))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"HEAD /proxy/dep/anthropic HTTP/1.1\r\nhost: x\r\n\r\nGET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    # No body followed the HEAD answer: the next bytes are the next response.
    assert parse(await read_response(reader))[0] == 200
    writer.close()


async def test_query_string_is_ignored(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM]))
    status, _, body = parse(
        await exchange(gw.port, b"GET /proxy/dep/anthropic/v1/models?beta=true HTTP/1.1\r\nhost: x\r\n\r\n")
    )
    assert status == 200 and orjson.loads(body)["data"][0]["id"] == "m"


async def test_keep_alive_serves_several_requests_on_one_connection(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM]))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    for _ in range(3):
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert parse(await read_response(reader))[0] == 200
    writer.close()


async def test_missing_version_header_is_a_400(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM]))
    status, _, body = parse(await exchange(gw.port, post(MESSAGES, VALID, extra=b"")))
    assert status == 400
    assert "anthropic-version" in orjson.loads(body)["error"]["message"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'"text"', "JSON object"),
        (b"", "empty"),
        (orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]}), "max_tokens"),
        (orjson.dumps({"model": "m", "max_tokens": 5, "messages": []}), "messages"),
        (
            orjson.dumps(
                {"model": "m", "max_tokens": 5, "temperature": 2, "messages": [{"role": "user", "content": "x"}]}
            ),
            "temperature",
        ),
    ],
)
async def test_malformed_bodies_are_400_naming_the_problem(
    start_gateway: GatewayFactory, body: bytes, needle: str
) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM]))
    status, _, answer = parse(await exchange(gw.port, post(MESSAGES, body)))
    assert status == 400
    error = orjson.loads(answer)["error"]
    assert error["type"] == "invalid_request_error" and needle in error["message"]


async def test_unknown_model_tag_is_a_404_listing_the_tags(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM]))
    body = orjson.dumps({"model": "llama3.1:8b", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
    status, _, answer = parse(await exchange(gw.port, post(MESSAGES, body)))
    assert status == 404
    message = orjson.loads(answer)["error"]["message"]
    assert message == "model 'llama3.1:8b' not found in deployment 'dep'; it serves: m"


async def test_unreachable_upstream_is_a_fast_5xx(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM]))
    started = time.monotonic()
    status, _, answer = parse(await exchange(gw.port, post(MESSAGES, VALID)))
    assert status == 502
    assert orjson.loads(answer)["error"]["type"] == "api_error"
    assert time.monotonic() - started < 2.0


async def test_body_over_the_limit_is_413_without_reading_it(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM], server={"max_body_bytes": 1000}))
    head = f"POST {MESSAGES} HTTP/1.1\r\nhost: x\r\ncontent-length: 50000000\r\n".encode() + VERSION + b"\r\n"
    status, headers, body = parse(await exchange(gw.port, head + b"x" * 100))
    assert status == 413
    assert orjson.loads(body)["error"]["type"] == "request_too_large"
    assert headers["connection"] == "close"


async def test_chunked_body_over_the_limit_is_413(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM], server={"max_body_bytes": 1000}))
    head = f"POST {MESSAGES} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n".encode() + VERSION + b"\r\n"
    chunk = b"800\r\n" + b"x" * 0x800 + b"\r\n"
    status, _, _ = parse(await exchange(gw.port, head + chunk))
    assert status == 413


async def test_oversized_headers_are_refused(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM], server={"max_header_bytes": 4096}))
    raw = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 10000 + b"\r\n\r\n"
    status, _, body = parse(await exchange(gw.port, raw))
    assert status == 431 and orjson.loads(body)["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(40)) + b"\r\n\r\n",  # a TLS ClientHello
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: x\r\nno colon in this header line\r\n\r\n",
    ],
)
async def test_garbage_on_the_port_gets_a_400_or_a_close_and_the_server_lives(
    start_gateway: GatewayFactory, garbage: bytes
) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM]))
    status, headers, body = parse(await exchange(gw.port, garbage, read_until_close=True))
    assert status == 400 and headers["connection"] == "close"
    assert orjson.loads(body)["error"]["type"] == "invalid_request_error"
    assert parse(await exchange(gw.port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"))[0] == 200


async def test_a_client_that_never_finishes_its_head_is_dropped(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM], server={"header_timeout": 0.3}))
    started = time.monotonic()
    answer = await exchange(gw.port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n", read_until_close=True)
    assert answer == b""
    assert time.monotonic() - started < 3


async def test_a_client_that_never_finishes_its_body_gets_408(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM], server={"body_timeout": 0.3}))
    head = f"POST {MESSAGES} HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n".encode() + VERSION + b"\r\n"
    answer = await exchange(gw.port, head + b"{", read_until_close=True)
    assert answer.startswith(b"HTTP/1.1 408")


async def test_idle_keep_alive_connections_are_closed(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM], server={"keepalive_timeout": 0.3}))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    await read_response(reader)
    assert await asyncio.wait_for(reader.read(1), 3) == b""  # closed by the server
    writer.close()


async def test_connection_cap_refuses_extra_connections(start_gateway: GatewayFactory) -> None:
    limits = {"max_connections": 2, "max_connections_per_ip": 2}
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM], server=limits))
    held = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(2)]
    for reader, writer in held:  # an answer on each: both are accepted and counted (no sleep)
        # ...and busy once answered (the next head under way): not idle, so not closed for room
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /healthz HTTP/1.1\r\n")
        assert parse(await read_response(reader))[0] == 200
    answer = await exchange(gw.port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n", read_until_close=True)
    assert answer.startswith(b"HTTP/1.1 529")
    for _, writer in held:
        writer.close()


async def test_keys_are_required_when_configured(start_gateway: GatewayFactory) -> None:
    digest = hashlib.sha256(b"s3cret").hexdigest()
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM], deployment={"api_keys_sha256": [digest]}))
    models = "/proxy/dep/anthropic/v1/models"
    for headers, expected in [
        (b"", 401),
        (b"x-api-key: wrong\r\n", 401),
        (b"authorization: Bearer wrong\r\n", 401),
        (b"x-api-key: s3cret\r\n", 200),
        (b"authorization: Bearer s3cret\r\n", 200),
    ]:
        raw = f"GET {models} HTTP/1.1\r\nhost: x\r\n".encode() + headers + b"\r\n"
        status, _, body = parse(await exchange(gw.port, raw))
        assert status == expected, headers
        if expected == 401:
            assert orjson.loads(body)["error"]["type"] == "authentication_error"


async def test_too_many_header_fields_are_refused(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM], server={"max_header_count": 10}))
    raw = b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(20)) + b"\r\n"
    status, _, _ = parse(await exchange(gw.port, raw))
    assert status == 431
