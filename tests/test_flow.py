"""FlowControl: a pause is remembered for a listener set later; reading is paused once."""

from __future__ import annotations

import asyncio

from casedesk.http.flow import FlowControl


class Listener:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")

    def is_closing(self) -> bool:
        return False


def test_a_pause_before_the_listener_is_set_reaches_it() -> None:
    flow = FlowControl()
    flow.pause_writing()  # e.g. between keep-alive requests, or before the upstream's head
    listener = Listener()
    flow.set_listener(listener)
    assert listener.calls == ["pause"]
    flow.resume_writing()
    assert listener.calls == ["pause", "resume"] and not flow.writing_paused


def test_a_listener_set_while_writing_flows_hears_nothing_until_a_pause() -> None:
    flow = FlowControl()
    listener = Listener()
    flow.set_listener(listener)
    assert listener.calls == []
    flow.pause_writing()
    flow.set_listener(None)
    flow.resume_writing()  # nobody listens: remembered, not lost
    assert listener.calls == ["pause"] and not flow.writing_paused


def test_reading_is_paused_and_resumed_once_each() -> None:
    flow = FlowControl()
    transport = Transport()
    flow.attach(transport)
    flow.pause_reading()
    flow.pause_reading()
    flow.resume_reading()
    flow.resume_reading()
    assert transport.calls == ["pause_reading", "resume_reading"]


def test_both_event_loops_turn_nagle_off_for_the_gateways_sockets() -> None:
    """StreamProtocol relies on it (one small write per token must not wait for an ACK)."""
    import socket

    import uvloop

    from casedesk.http.flow import StreamProtocol

    async def nodelay_of_both_ends() -> list[int]:
        loop = asyncio.get_running_loop()
        accepted: list[StreamProtocol] = []

        def server_side() -> StreamProtocol:
            accepted.append(StreamProtocol())
            return accepted[-1]

        server = await loop.create_server(server_side, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await loop.create_connection(StreamProtocol, "127.0.0.1", port)
        while not accepted or accepted[0].transport is None:
            await asyncio.sleep(0.001)
        ends = [transport, accepted[0].transport]
        values = [t.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for t in ends]
        transport.close()
        server.close()
        return values

    assert asyncio.run(nodelay_of_both_ends()) == [1, 1]
    assert uvloop.run(nodelay_of_both_ends()) == [1, 1]
