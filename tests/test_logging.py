"""The logs can neither stall the gateway nor be forged through it: a stdout nobody reads
costs lines (counted), never the loop; what clients and upstreams send is cut and escaped."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import orjson

from casedesk.ops.accesslog import WallClock
from casedesk.ops.logsink import LineSink, printable
from tests.conftest import GatewayFactory, gateway_config
from tests.fake_llama import FakeLlamaServer, Reply
from tests.support.wait import until
from tests.support.wire import DEAD_UPSTREAM, MESSAGES, exchange, http_post, parse, read_response

ROOT = Path(__file__).resolve().parents[1]
EVIL = "boom\n2026-12-02 00:00:00,000 ERROR casedesk: forged line\x1b[2J\x1b]0;owned\x07\u202etxt.exe\x9b"


def test_printable_escapes_every_control_character_and_cuts() -> None:
    assert printable("claude-opus-5-5") == "claude-opus-5-5"  # the usual value is untouched
    shown = printable(EVIL, limit=1000)
    assert shown.isprintable() and "\n" not in shown and "\x1b" not in shown and "\x9b" not in shown
    assert "\\n2026-12-02" in shown and "\\x1b[2J" in shown and "\\u202e" in shown and "\\x9b" in shown
    cut = printable("x" * 10_000_000, limit=256)
    assert cut.startswith("x" * 256) and len(cut) < 300 and "+9999744" in cut


def test_a_line_sink_on_a_full_pipe_drops_and_counts_instead_of_blocking() -> None:
    read_end, write_end = os.pipe()
    sink = LineSink(write_end, "test", max_bytes=64 * 1024)
    try:
        started = time.monotonic()
        results = [sink.write(b"x" * 511 + b"\n") for _ in range(2000)]  # 1 MB into a 64 KB pipe
        assert time.monotonic() - started < 1.0  # never waited for the reader
        assert not all(results) and sink.dropped == results.count(False) > 0
        # The reader comes back: what was kept arrives whole, in order, line by line.
        os.set_blocking(read_end, False)
        data = b""
        deadline = time.monotonic() + 5
        while data.count(b"\n") < results.count(True) and time.monotonic() < deadline:
            try:
                data += os.read(read_end, 1 << 16)
            except BlockingIOError:
                time.sleep(0.01)
        assert data.count(b"\n") == results.count(True) and set(data.split(b"\n")[:-1]) == {b"x" * 511}
    finally:
        sink.close(timeout=1)
        os.close(write_end)
        os.close(read_end)


def test_a_line_sink_writes_the_lines_of_one_moment_in_one_write() -> None:
    # A seqpacket socket keeps each write a message of its own: the messages count the writes.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sink = LineSink(ours.fileno(), "test", coalesce=0.2)
    try:
        lines = [b"request %d\n" % i for i in range(50)]
        for line in lines:  # one request's line every 2 ms, as a busy gateway writes them
            assert sink.write(line)
            time.sleep(0.002)
        theirs.settimeout(5)
        messages = []
        while sum(m.count(b"\n") for m in messages) < len(lines):
            messages.append(theirs.recv(1 << 16))
        assert b"".join(messages) == b"".join(lines)  # whole, in order
        assert len(messages) <= 2  # not one wake-up (and write) per line
    finally:
        sink.close(timeout=1)
        ours.close()
        theirs.close()


@contextmanager
def serving(config: Path, stdout: int | None, stderr: int | None) -> Iterator[int]:
    """`casedesk serve` in a child process on a socket it is handed (LISTEN_FDS); its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    fd = listener.fileno()
    child = subprocess.Popen(
        ["sh", "-c", f'LISTEN_PID=$$ LISTEN_FDS=1 exec "{sys.executable}" -m casedesk serve --config "{config}"'],
        pass_fds=[3],
        preexec_fn=lambda: os.dup2(fd, 3),  # noqa: PLW1509
        cwd=ROOT,
        stdout=stdout,
        stderr=stderr,
    )
    try:
        yield listener.getsockname()[1]
    finally:
        child.kill()
        child.wait(10)
        listener.close()


async def healthy(port: int) -> bool:
    try:
        return parse(await exchange(port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n", timeout=1))[0] == 200
    except OSError:
        return False


async def test_a_stdout_nobody_reads_never_stalls_the_gateway(tmp_path: Path) -> None:
    """The access log on a pipe whose reader stalls: before, the gateway froze after ~64 KB of
    log (161 requests); now every request is answered and the lost lines are counted."""
    config = tmp_path / "casedesk.toml"
    config.write_text(f'[server]\naccess_log = "-"\n[deployments.d.models.m]\nupstreams = ["{DEAD_UPSTREAM}"]\n')
    read_end, write_end = os.pipe()  # nobody reads read_end
    try:
        with serving(config, stdout=write_end, stderr=subprocess.DEVNULL) as port:
            await until(lambda: healthy(port), timeout=20, what="casedesk serve to listen")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = time.monotonic()
            request = b"GET /" + b"x" * 1000 + b" HTTP/1.1\r\nhost: x\r\n\r\n"  # a 404 and a ~1.4 KB log line
            for _ in range(6):  # 1,200 lines, ~1.7 MB of access log: more than the pipe and the buffer hold
                writer.write(request * 200)
                for _ in range(200):
                    status, _, _ = parse(await asyncio.wait_for(read_response(reader), 5))
                    assert status == 404
            elapsed = time.monotonic() - started
            writer.close()
            status, body = parse(await exchange(port, b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n"))[::2]
            dropped = [
                line for line in body.decode().splitlines() if line.startswith("casedesk_log_lines_dropped_total")
            ]
            assert status == 200 and dropped and int(dropped[0].split()[1]) > 0, dropped
            assert elapsed < 30, elapsed
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_upstream_text_in_the_operators_log_is_escaped(fake: FakeLlamaServer, tmp_path: Path) -> None:
    """An upstream's error message with a newline, a forged log line and terminal escapes
    reaches casedesk's own log as one escaped line."""
    config = tmp_path / "casedesk.toml"
    config.write_text(f'[server]\naccess_log = ""\n[deployments.dep.models.m]\nupstreams = ["{fake.url}"]\n')
    log = tmp_path / "casedesk.log"
    fake.replies.append(Reply(tokens=["a", "b"], error_after=1, error_message=EVIL))
    with open(log, "wb") as stderr, serving(config, stdout=subprocess.DEVNULL, stderr=stderr.fileno()) as port:
        await until(lambda: healthy(port), timeout=20, what="casedesk serve to listen")
        status, _, body = await http_post(
            port,
            MESSAGES,
            {"model": "m", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert status == 200 and b"event: error" in body
        await until(lambda: b"failed" in log.read_bytes(), timeout=5, what="the failure in the log")
    text = log.read_bytes().decode()
    assert "forged line" in text  # the message is there…
    assert "\x1b" not in text and "\x9b" not in text and "\u202e" not in text  # …its escapes are not
    assert not [line for line in text.splitlines() if line.startswith("2026-12-02 00:00:00")]  # no forged line


async def test_a_huge_model_name_makes_neither_a_huge_answer_nor_a_huge_log_line(
    fake: FakeLlamaServer, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    gw = await start_gateway(gateway_config([fake.url], server={"access_log": str(log)}))
    model = "m" * 8_000_000  # before: an 8 MB 404 body and an 8 MB access-log line
    status, _, body = await http_post(
        gw.port, MESSAGES, {"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert status == 404 and len(body) < 5000
    error = orjson.loads(body)["error"]
    assert error["type"] == "not_found_error" and "cut" in error["message"]
    await until(lambda: log.exists() and log.read_bytes().endswith(b"\n"), what="the access-log line")
    line = log.read_bytes().splitlines()[-1]
    assert len(line) < 2000 and orjson.loads(line)["status"] == 404


async def test_the_access_logs_clock_writes_utc_to_the_millisecond_across_seconds() -> None:
    """The wall time of each line (formatted once a second, then only its milliseconds):
    RFC 3339 in UTC, between the times read just before and after, a second boundary crossed."""
    clock = WallClock()
    for _ in range(6):  # 1.2 s: at least one new second
        before = time.time()
        text = clock.now()
        after = time.time()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", text), text
        logged = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
        assert int(before * 1000) / 1000 - 1e-6 <= logged <= after + 1e-6
        await asyncio.sleep(0.2)
