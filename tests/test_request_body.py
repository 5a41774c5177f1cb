"""The client side's chunked-body reader against h11 on the same bytes, split at every point;
and the pure decisions of the connection layer (the caps, the open-file budget)."""

from __future__ import annotations

from typing import cast

import h11
import pytest

from casedesk.http.request_body import BodyError, ChunkedBodyReader, Progress
from casedesk.http.server import ConnectionTracker, HttpProtocol, ServerLimits, connection_cap, frame_chunk

PIECES = [b'{"a":1}', b"x", b"\r\n\r\n0\r\n", bytes(range(256)), "é🐉".encode() * 50]
WIRE = (
    frame_chunk(PIECES[0])
    + b"1;name=value\r\nx\r\n"  # an extension
    + b"".join(frame_chunk(p) for p in PIECES[2:])
    + b"0\r\nx-trailer: 1\r\n\r\n"
)
NEXT = b"GET /next HTTP/1.1\r\nhost: x\r\n\r\n"  # a pipelined request after the body


def h11_body(wire: bytes) -> bytes:
    server = h11.Connection(h11.SERVER)
    server.receive_data(b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n" + wire)
    body = b""
    while True:
        event = server.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return body
        else:
            assert isinstance(event, h11.Request), event


def read(parts: list[bytes], budget: int = 1000, limit: int = 1 << 20) -> tuple[bytes, bytes]:
    """(body, the bytes after it)."""
    reader = ChunkedBodyReader(limit)
    waiting = list(reversed(parts))
    progress = Progress.NEED_DATA
    while progress is not Progress.DONE:
        reader.feed(waiting.pop())
        while (progress := reader.step(budget)) is Progress.BUDGET_SPENT:
            pass
    return bytes(reader.body), reader.leftover() + b"".join(reversed(waiting))


def test_every_split_point_reads_what_h11_reads() -> None:
    expected = h11_body(WIRE)
    assert expected == b"".join(PIECES)
    for cut in range(len(WIRE) + len(NEXT) + 1):
        whole = WIRE + NEXT
        assert read([whole[:cut], whole[cut:]]) == (expected, NEXT), cut


def test_byte_by_byte_with_the_smallest_budget_reads_what_h11_reads() -> None:
    assert read([bytes([b]) for b in WIRE + NEXT], budget=1) == (h11_body(WIRE), NEXT)


@pytest.mark.parametrize(
    "wire", [b"0x1\r\nx\r\n0\r\n\r\n", b"+1\r\nx\r\n0\r\n\r\n", b"1_0\r\n", b"\r\n", b"g\r\n", b"1\r\nxy\r\n"]
)
def test_malformed_framing_is_a_400(wire: bytes) -> None:
    reader = ChunkedBodyReader(1 << 20)
    reader.feed(wire)
    with pytest.raises(BodyError) as refused:
        reader.step(100)
    assert refused.value.status == 400


def test_a_chunk_line_without_end_is_bounded() -> None:
    reader = ChunkedBodyReader(1 << 20)
    reader.feed(b"1" + b" " * 5000)
    with pytest.raises(BodyError) as refused:
        reader.step(100)
    assert refused.value.status == 400


def test_a_chunk_over_the_limit_is_a_413_before_its_data() -> None:
    reader = ChunkedBodyReader(1000)
    reader.feed(b"3e8\r\n" + b"x" * 1000 + b"\r\n1\r\n")  # 1000 bytes fit; one more does not
    with pytest.raises(BodyError) as refused:
        reader.step(100)
    assert refused.value.status == 413 and len(reader.body) == 1000


def test_the_budget_bounds_the_lines_parsed_per_step() -> None:
    reader = ChunkedBodyReader(1 << 20)
    reader.feed(b"1\r\nx\r\n" * 100 + b"0\r\n\r\n")
    steps = 1
    while reader.step(10) is Progress.BUDGET_SPENT:
        steps += 1
    assert steps == 11 and reader.body == b"x" * 100  # 101 size lines and 1 trailer line, 10 a step


# -- the caps ------------------------------------------------------------------------------------


class Connection:
    """What make_room looks at: an address."""

    def __init__(self, ip: str) -> None:
        self.ip = ip


def tracker_with(open_: list[Connection], idle: list[Connection]) -> ConnectionTracker:
    tracker = ConnectionTracker()
    for connection in open_:
        tracker.add(cast(HttpProtocol, connection))
    for connection in idle:
        tracker.idle[cast(HttpProtocol, connection)] = None
    return tracker


async def test_at_the_cap_the_longest_idle_connection_makes_room() -> None:
    a, b, c = Connection("10.0.0.1"), Connection("10.0.0.2"), Connection("10.0.0.3")
    limits = ServerLimits(max_connections=3, max_connections_per_ip=3)
    assert tracker_with([a, b, c], [c, b]).make_room("10.0.0.9", limits) == (c, None)
    assert tracker_with([a, b], [b]).make_room("10.0.0.9", limits) == (None, None)  # room left
    victim, refusal = tracker_with([a, b, c], []).make_room("10.0.0.9", limits)
    assert victim is None and refusal is not None and "gateway" in refusal


async def test_an_address_at_its_cap_makes_room_among_its_own_connections() -> None:
    mine, mine_idle, other_idle = Connection("10.0.0.1"), Connection("10.0.0.1"), Connection("10.0.0.2")
    limits = ServerLimits(max_connections=10, max_connections_per_ip=2)
    tracker = tracker_with([mine, mine_idle, other_idle], [other_idle, mine_idle])
    assert tracker.make_room("10.0.0.1", limits) == (mine_idle, None)
    victim, refusal = tracker_with([mine, mine_idle], []).make_room("10.0.0.1", limits)
    assert victim is None and refusal is not None and "your address" in refusal


def test_the_per_address_cap_defaults_to_half_the_cap() -> None:
    assert ServerLimits(max_connections=1024).per_ip_cap() == 512
    assert ServerLimits(max_connections=1).per_ip_cap() == 1
    assert ServerLimits(max_connections=1024, max_connections_per_ip=10).per_ip_cap() == 10


def test_the_open_file_limit_bounds_the_connection_cap() -> None:
    assert connection_cap(1024, 1024) == 480  # a shell's soft limit: two descriptors a client, 64 kept
    assert connection_cap(1024, 1 << 20) == 1024
    assert connection_cap(1024, 10) == 1


def test_tracker_forgets_a_connection_once() -> None:
    a = cast(HttpProtocol, Connection("10.0.0.1"))
    tracker = tracker_with([cast(Connection, a)], [cast(Connection, a)])
    tracker.remove(a)
    tracker.remove(a)  # evicted, then lost
    assert not tracker.open and not tracker.idle and not tracker.per_ip
