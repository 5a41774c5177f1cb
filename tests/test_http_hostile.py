"""Hostile and odd clients over real sockets (issue 22): what one client sends may not stall,
bloat or starve the process, and odd but legal input gets a correct answer."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import GatewayFactory, RunningGateway, gateway_config
from tests.test_http_server import DEAD_UPSTREAM, MESSAGES, VERSION, exchange, parse, read_response

MiB = 1024 * 1024
HEALTHZ = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"


def rss() -> int:
    """This process's resident memory now, in bytes (the gateway runs in it)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def metric(gw: RunningGateway, name: str) -> float:
    _, _, body = parse(await exchange(gw.port, b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n"))
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def raw_connect(port: int, source: str = "127.0.0.1", rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def recv_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(timeout):
        while chunk := await loop.sock_recv(sock, 65536):
            data += chunk
    return data


class LoopWatch:
    """While it runs: the longest the event loop went without running a 5 ms ticker (what
    every other client of this process waited, at worst), and the highest RSS seen."""

    def __init__(self) -> None:
        self.worst_stall = 0.0
        self.peak_rss = rss()
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            self.worst_stall = max(self.worst_stall, now - last - 0.005)
            self.peak_rss = max(self.peak_rss, rss())
            last = now

    def __enter__(self) -> LoopWatch:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


# -- 1. pipelined requests whose answers are never read -----------------------------------------


async def test_pipelined_requests_whose_answers_are_never_read_cost_bounded_memory_and_are_cut(
    start_gateway: GatewayFactory,
) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM], server={"write_timeout": 1.0}))
    request = b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n"
    answer_size = len(await exchange(gw.port, request))
    count = 40_000  # answered in full, that is answer_size × count bytes held for a client that reads none
    before = rss()
    sock = await raw_connect(gw.port, rcvbuf=4096)
    sending = asyncio.ensure_future(asyncio.get_running_loop().sock_sendall(sock, request * count))
    peak = before
    try:
        deadline = time.monotonic() + 20
        while await metric(gw, "casedesk_write_timeouts_total") < 1:
            peak = max(peak, rss())
            assert time.monotonic() < deadline, "a client that reads nothing was never cut"
            await asyncio.sleep(0.1)
    finally:
        sending.cancel()
        sock.close()
    grown = peak - before
    print(f"{count} pipelined answers of {answer_size} B unread: RSS +{grown / MiB:.1f} MiB")
    assert grown < 40 * MiB, f"RSS grew {grown / MiB:.0f} MiB (answers held: {answer_size * count / MiB:.0f} MiB)"


# -- 2. a chunked body of 1-byte chunks -------------------------------------------------------------


def one_byte_chunks(body: bytes) -> bytes:
    return b"".join(b"1\r\n%c\r\n" % byte for byte in body) + b"0\r\n\r\n"


async def test_a_body_of_one_byte_chunks_costs_no_memory_per_chunk_and_no_stall(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM], server={"max_body_bytes": 4 * MiB}))
    body = orjson.dumps({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 500_000}]})
    wire = one_byte_chunks(body)  # 0.5 MB of body, 3 MB on the wire
    head = f"POST {MESSAGES} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n".encode() + VERSION + b"\r\n"
    before = rss()
    started = time.monotonic()
    with LoopWatch() as watch:
        answer = await exchange(gw.port, head + wire, timeout=60)
    elapsed = time.monotonic() - started
    grown, stall = watch.peak_rss - before, watch.worst_stall * 1000
    print(f"500 k one-byte chunks: {elapsed:.2f} s, peak RSS +{grown / MiB:.1f} MiB, worst loop stall {stall:.0f} ms")
    assert parse(answer)[0] >= 500  # read in full and handled: the upstream is dead
    assert grown < 12 * MiB  # the body itself is 0.5 MB; h11's one object per chunk cost ~25 MB
    assert stall < 250


async def test_a_keyed_deployment_refuses_a_chunked_body_without_a_key_before_reading_it(
    start_gateway: GatewayFactory,
) -> None:
    keys = {"api_keys_sha256": [hashlib.sha256(b"s3cret").hexdigest()]}
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM], deployment=keys))
    head = f"POST {MESSAGES} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n".encode() + VERSION + b"\r\n"
    # The head alone: the answer may not wait for a body the client has not sent.
    status, headers, body = parse(await exchange(gw.port, head + b"1\r\n{\r\n", timeout=3))
    assert status == 401 and headers["connection"] == "close"
    assert orjson.loads(body)["error"]["type"] == "authentication_error"


# -- 7. idle connections holding the cap ------------------------------------------------------------


async def test_idle_keep_alive_connections_make_room_longest_idle_first(start_gateway: GatewayFactory) -> None:
    limits = {"max_connections": 4, "max_connections_per_ip": 4}
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM], server=limits))
    idle = []
    for _ in range(4):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(HEALTHZ)
        assert parse(await read_response(reader))[0] == 200
        idle.append((reader, writer))
    # The cap is reached by idle connections: a fifth client is served, the oldest one closed.
    assert parse(await exchange(gw.port, HEALTHZ))[0] == 200
    assert await asyncio.wait_for(idle[0][0].read(1), 3) == b""
    for reader, writer in idle[1:]:  # the others are still served
        writer.write(HEALTHZ)
        assert parse(await read_response(reader))[0] == 200
    for _, writer in idle:
        writer.close()


async def test_connections_per_address_are_bounded(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM], server={"max_connections": 8}))  # 4 per address
    busy = []
    for _ in range(4):  # each answered, then busy with a head under way: nothing idle to close
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(HEALTHZ + b"GET /healthz HTTP/1.1\r\n")
        assert parse(await read_response(reader))[0] == 200
        busy.append(writer)
    refused = await exchange(gw.port, HEALTHZ, read_until_close=True)
    status, _, body = parse(refused)
    assert status == 529 and "your address" in orjson.loads(body)["error"]["message"]
    other = await raw_connect(gw.port, source="127.0.0.2")  # another client still gets in
    try:
        await asyncio.get_running_loop().sock_sendall(
            other, HEALTHZ.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n")
        )
        assert parse(await recv_all(other))[0] == 200
    finally:
        other.close()
    for writer in busy:
        writer.close()


# -- 8. file descriptors ----------------------------------------------------------------------------

FD_SERVER = textwrap.dedent(
    """
    import asyncio, logging, resource, sys
    from casedesk.http.server import ConnectionTracker, ErrorResponse, ServerLimits, start_server

    resource.setrlimit(resource.RLIMIT_NOFILE, (200, 400))  # a shell's soft limit, and a hard one
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    async def handler(request, writer):
        writer.send(200, b"{}")

    async def main():
        render = lambda status, message: ErrorResponse(status, message.encode())
        server = await start_server(handler, ServerLimits(), ConnectionTracker(), render, host="127.0.0.1", port=0)
        print(server.sockets[0].getsockname()[1], resource.getrlimit(resource.RLIMIT_NOFILE)[0], flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_the_open_file_limit_is_raised_and_bounds_the_connection_cap(tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"  # a file, not a pipe: nobody reads the log while it runs
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            FD_SERVER,
            stdout=subprocess.PIPE,
            stderr=log_file,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
    assert process.stdout is not None
    clients: list[socket.socket] = []
    try:
        port_text, soft = (await asyncio.wait_for(process.stdout.readline(), 30)).split()
        assert int(soft) == 400  # raised from 200 to the hard limit
        port = int(port_text)
        answers: dict[int, int] = {}
        for _ in range(450):  # more than the limit allows, each kept open after its answer
            sock = await raw_connect(port)
            clients.append(sock)
            await asyncio.get_running_loop().sock_sendall(sock, b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
            head = b""
            async with asyncio.timeout(5):  # an answer, not a hang in the accept queue
                while b"\r\n\r\n" not in head:
                    chunk = await asyncio.get_running_loop().sock_recv(sock, 4096)
                    assert chunk, "closed without an answer"
                    head += chunk
            status = parse(head)[0]
            answers[status] = answers.get(status, 0) + 1
        fds = len(os.listdir(f"/proc/{process.pid}/fd"))
        print(f"450 connections: answers {answers}, the server holds {fds} descriptors of 400")
        assert set(answers) <= {200, 529} and fds < 400
    finally:
        for sock in clients:
            sock.close()
        process.kill()
        await process.wait()
    log = log_path.read_text()
    assert "max_connections lowered from 1024" in log, log[-2000:]


# -- 12. DNS rebinding --------------------------------------------------------------------------------


@pytest.fixture
async def plain_gateway(start_gateway: GatewayFactory) -> AsyncIterator[RunningGateway]:
    yield await start_gateway(gateway_config([DEAD_UPSTREAM], server={"allowed_hosts": ["gpu-box.lan"]}))


@pytest.mark.parametrize(
    "host",
    ["localhost", "localhost:8787", "127.0.0.1:8787", "[::1]:8787", "app.localhost", "gpubox", "GPU-box.lan:8787"],
)
async def test_a_loopback_listener_answers_loopback_and_allowed_names(plain_gateway: RunningGateway, host: str) -> None:
    raw = f"GET /healthz HTTP/1.1\r\nhost: {host}\r\n\r\n".encode()
    assert parse(await exchange(plain_gateway.port, raw))[0] == 200


@pytest.mark.parametrize(
    "host", ["attacker.example", "attacker.example:8787", "10.0.0.1", "localhost.attacker.example"]
)
async def test_a_loopback_listener_refuses_other_names(plain_gateway: RunningGateway, host: str) -> None:
    raw = f"GET /v1/models HTTP/1.1\r\nhost: {host}\r\n\r\n".encode()
    status, _, body = parse(await exchange(plain_gateway.port, raw, read_until_close=True))
    error = orjson.loads(body)["error"]
    assert status == 403 and error["type"] == "permission_error" and "allowed_hosts" in error["message"]


async def test_a_request_from_a_web_page_is_refused(plain_gateway: RunningGateway) -> None:
    raw = b"GET /healthz HTTP/1.1\r\nhost: localhost\r\norigin: http://localhost:3000\r\n\r\n"
    status, _, body = parse(await exchange(plain_gateway.port, raw, read_until_close=True))
    assert status == 403 and "browser" in orjson.loads(body)["error"]["message"]


async def test_a_head_request_refused_before_its_handler_gets_the_head_of_the_error(
    plain_gateway: RunningGateway,
) -> None:
    # A HEAD is answered as a GET would be, without the body (h11 refused to send a body
    # here, and the connection used to close with no answer at all).
    raw = b"HEAD /healthz HTTP/1.1\r\nhost: localhost\r\norigin: http://localhost:3000\r\n\r\n"
    status, headers, body = parse(await exchange(plain_gateway.port, raw, read_until_close=True))
    assert status == 403 and headers["connection"] == "close" and body == b""
    assert int(headers["content-length"]) > 0  # the length of the error body a GET gets


# -- 16. Content-Length and Transfer-Encoding together ----------------------------------------------


async def test_content_length_with_transfer_encoding_is_a_400_and_nothing_is_smuggled(
    start_gateway: GatewayFactory,
) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM]))
    smuggled = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
    raw = (
        b"POST /healthz HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
        + smuggled
    )
    answer = await exchange(gw.port, raw, read_until_close=True)
    assert parse(answer)[0] == 400 and answer.count(b"HTTP/1.1 ") == 1


# -- 17. odd but legal input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /healthz HTTP/1.0\r\n\r\n\r\n",  # an old client's CRLF after the request
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n\r\n",
    ],
)
async def test_a_closing_request_followed_by_an_empty_line_is_answered(
    start_gateway: GatewayFactory, request_head: bytes
) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM]))
    answer = await exchange(gw.port, request_head, read_until_close=True)
    assert parse(answer)[0] == 200 and answer.count(b"HTTP/1.") == 1


async def test_stray_empty_lines_between_kept_alive_requests_are_ignored(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM]))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(HEALTHZ + b"\r\n")
        assert parse(await read_response(reader))[0] == 200
        writer.write(b"\r\n" + HEALTHZ)
        assert parse(await read_response(reader))[0] == 200
        writer.write(b"\r\n")
        with pytest.raises(TimeoutError):  # no unsolicited 400
            await asyncio.wait_for(reader.read(1), 0.5)
    finally:
        writer.close()


async def test_an_absolute_form_target_is_accepted(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM]))
    raw = f"GET http://127.0.0.1:{gw.port}/healthz?x=1 HTTP/1.1\r\nhost: x\r\n\r\n".encode()
    assert parse(await exchange(gw.port, raw))[0] == 200


async def test_http_2_0_gets_505(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM]))
    answer = await exchange(gw.port, b"GET /healthz HTTP/2.0\r\nhost: x\r\n\r\n", read_until_close=True)
    assert parse(answer)[0] == 505


async def test_answers_during_the_shutdown_drain_say_connection_close(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM]), shutdown_grace=10)
    body = orjson.dumps({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    head = f"POST {MESSAGES} HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n".encode() + VERSION + b"\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(head + body[:10])  # a request under way: the drain waits for it
        await writer.drain()
        await exchange(gw.port, HEALTHZ)  # the half request has surely been read by now
        gw.stop.set()

        async def refused() -> bool:
            try:
                _, probe = await asyncio.open_connection("127.0.0.1", gw.port)
            except OSError:
                return True
            probe.close()
            return False

        deadline = time.monotonic() + 5
        while not await refused():  # the listener is closed: the drain has begun
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        writer.write(body[10:])
        _, headers, _ = parse(await asyncio.wait_for(read_response(reader), 10))
        assert headers["connection"] == "close"
    finally:
        writer.close()


async def test_a_header_trickle_on_a_kept_alive_connection_is_cut_at_header_timeout(
    start_gateway: GatewayFactory,
) -> None:
    limits = {"header_timeout": 0.5, "keepalive_timeout": 30}
    gw = await start_gateway(gateway_config([DEAD_UPSTREAM], server=limits))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(HEALTHZ)
        assert parse(await read_response(reader))[0] == 200
        started = time.monotonic()
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        for _ in range(100):  # one byte of a header now and then: never the end of the head
            writer.write(b"x")
            if reader.at_eof() or writer.is_closing():
                break
            try:
                if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                    break
            except TimeoutError:
                continue
        assert time.monotonic() - started < 3
    finally:
        writer.close()
