"""A streamed request is never silent: bytes at least every few seconds from the moment CaseDesk
accepts it, whatever it waits for, and every client still gets the same answer.

The 30-second case (a fake llama-server that withholds its response head, as the real one does
while every slot is busy: docs/llama-server-facts.md §4) runs the raw-socket client and both
official SDKs at once, so it costs 30 s of wall time once.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import anthropic
import h11
import orjson
import pytest

from tests.conftest import GatewayFactory, RunningGateway, gateway_config
from tests.fake_llama import FakeLlamaServer, Reply
from tests.support.wire import post_bytes

ASK = [{"role": "user", "content": "hi"}]
TS_DIR = Path(__file__).resolve().parent / "ts"
MESSAGES = "/proxy/dep/anthropic/v1/messages"


class RawStream:
    """A streamed POST on a raw socket: when each piece of bytes came, and the parsed stream."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.arrivals: list[float] = []
        self.sent_at = 0.0

    async def run(self, port: int, body: dict[str, Any], limit: float = 120) -> RawStream:
        payload = orjson.dumps({"model": "m", "max_tokens": 50, "messages": ASK, "stream": True, **body})
        conn = h11.Connection(h11.CLIENT)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post_bytes(conn, MESSAGES, payload, {"x-api-key": "k"}))
        self.sent_at = time.monotonic()
        deadline = self.sent_at + limit
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
                    self.arrivals.append(time.monotonic())
                    conn.receive_data(data)
                elif isinstance(event, h11.Response):
                    self.status = event.status_code
                    self.headers = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    self.body += event.data
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return self
        finally:
            writer.close()

    @property
    def largest_gap(self) -> float:
        stamps = [self.sent_at, *self.arrivals]
        return max(b - a for a, b in pairwise(stamps))

    @property
    def comments(self) -> int:
        return sum(1 for block in self.body.split(b"\n\n") if block.startswith(b":"))

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """The events, comments skipped as an SSE parser skips them."""
        events = []
        for block in self.body.decode().split("\n\n"):
            lines = [line for line in block.split("\n") if line and not line.startswith(":")]
            if lines:
                fields = dict(line.split(": ", 1) for line in lines)
                events.append((fields["event"], orjson.loads(fields["data"])))
        return events


def answer_of(events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """What a client keeps of a stream: the text, the stop reason, the final usage."""
    usage = next(d for n, d in events if n == "message_delta")["usage"]
    return {
        "text": "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta"),
        "stop_reason": next(d for n, d in events if n == "message_delta")["delta"]["stop_reason"],
        "usage": usage,
    }


async def typescript_sdk(gateway: RunningGateway) -> dict[str, Any]:
    node = shutil.which("node")
    assert node, "Node.js is needed for the TypeScript SDK"
    process = await asyncio.create_subprocess_exec(
        node,
        "stream.mjs",
        cwd=TS_DIR,
        env={"CASEDESK_BASE_URL": gateway.base_url(), "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


async def python_stream(gateway: RunningGateway) -> anthropic.types.Message:
    client = anthropic.AsyncAnthropic(base_url=gateway.base_url(), api_key="k", max_retries=0)
    async with client.messages.stream(model="m", max_tokens=50, messages=ASK) as stream:
        return await stream.get_final_message()


async def python_create(gateway: RunningGateway) -> list[Any]:
    client = anthropic.AsyncAnthropic(base_url=gateway.base_url(), api_key="k", max_retries=0)
    return [event async for event in await client.messages.create(model="m", max_tokens=50, messages=ASK, stream=True)]


@pytest.mark.slow
async def test_a_head_withheld_for_30_s_keeps_every_client_fed(start_gateway: GatewayFactory) -> None:
    reply = {"tokens": ["Slots", " were", " busy", "."], "prompt_tokens": 40, "cached_tokens": 15}
    async with FakeLlamaServer(Reply(**reply, head_delay=30)) as fake:
        gateway = await start_gateway(gateway_config([fake.url]))  # the default keep-alive interval
        fake.replies.append(Reply(**reply))  # the same answer at once: what every client must get
        reference = answer_of((await RawStream().run(gateway.port, {})).events())

        raw, final, created, typescript = await asyncio.gather(
            RawStream().run(gateway.port, {}), python_stream(gateway), python_create(gateway), typescript_sdk(gateway)
        )
    assert len(fake.chat_requests()) == 6  # reference, raw, two Python, two TypeScript
    assert raw.status == 200 and raw.arrivals[-1] - raw.sent_at >= 30
    assert raw.headers["content-type"] == "text/event-stream" and raw.headers["x-accel-buffering"] == "no"
    assert raw.largest_gap <= 5.0 and raw.comments >= 10
    assert raw.events()[0][0] == "message_start" and answer_of(raw.events()) == reference

    assert final.content[0].type == "text" and final.content[0].text == reference["text"]
    assert final.stop_reason == reference["stop_reason"]
    assert final.usage.model_dump(exclude_none=True) == reference["usage"]
    assert created[0].type == "message_start" and created[-1].type == "message_stop"
    created_events = [(e.type, e.model_dump(exclude_none=True)) for e in created]
    assert answer_of(created_events)["text"] == reference["text"]
    assert answer_of(created_events)["usage"] == reference["usage"]

    assert typescript["stream"] == {k: reference[k] for k in ("text", "stop_reason", "usage")}
    assert typescript["create"]["types"][0] == "message_start" and typescript["create"]["types"][-1] == "message_stop"
    assert typescript["create"]["text"] == reference["text"] and typescript["create"]["usage"] == reference["usage"]


async def test_a_queued_stream_gets_bytes_while_it_waits(start_gateway: GatewayFactory) -> None:
    async with FakeLlamaServer(Reply(tokens=["q"])) as fake:
        gateway = await start_gateway(
            gateway_config(
                [fake.url], server={"stream_keepalive": 0.2}, deployment={"max_concurrency": 1, "max_queue": 4}
            )
        )
        fake.replies.append(Reply(tokens=[f"t{i}" for i in range(60)], token_delay=0.025))  # ~1.5 s
        first = asyncio.ensure_future(RawStream().run(gateway.port, {"max_tokens": 100}))
        while not fake.chat_requests():  # the first stream holds the only slot
            await asyncio.sleep(0.01)
        queued = await RawStream().run(gateway.port, {})
        first_done = await first
    assert len(fake.chat_requests()) == 2
    # The queued request got its head and comments long before the first stream ended.
    assert queued.arrivals[0] < first_done.arrivals[-1] - 0.5
    assert queued.largest_gap < 1.0 and queued.comments >= 3
    assert answer_of(queued.events())["text"] == "q"
    assert answer_of(first_done.events())["text"] == "".join(f"t{i}" for i in range(60))


async def test_an_error_after_the_head_is_an_event_with_the_same_type_and_message(
    start_gateway: GatewayFactory,
) -> None:
    too_long = Reply(
        status=400,
        error_type="exceed_context_size_error",
        error_message="too big",
        error_extra={"n_prompt_tokens": 9024, "n_ctx": 2048},
        head_delay=1.0,
    )
    async with FakeLlamaServer(too_long) as fake:
        gateway = await start_gateway(gateway_config([fake.url], server={"stream_keepalive": 0.2}))
        raw = await RawStream().run(gateway.port, {})
        assert raw.status == 200 and raw.comments >= 2 and raw.headers["x-accel-buffering"] == "no"
        assert raw.events() == [
            (
                "error",
                {
                    "type": "error",
                    "error": {
                        "type": "invalid_request_error",
                        "message": "prompt is too long: 9024 tokens > 2048 maximum",
                    },
                },
            )
        ]
        client = anthropic.AsyncAnthropic(base_url=gateway.base_url(), api_key="k", max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as caught:
            async with client.messages.stream(model="m", max_tokens=5, messages=ASK) as stream:
                await stream.get_final_message()
        assert "prompt is too long: 9024 tokens > 2048 maximum" in str(caught.value)
        # Not streamed: no keep-alive, the status stays real however long the wait.
        with pytest.raises(anthropic.BadRequestError):
            await client.messages.create(model="m", max_tokens=5, messages=ASK)


async def test_a_fast_answer_has_no_keep_alive_bytes(start_gateway: GatewayFactory) -> None:
    async with FakeLlamaServer() as fake:
        gateway = await start_gateway(gateway_config([fake.url]))
        raw = await RawStream().run(gateway.port, {})
    assert raw.comments == 0 and answer_of(raw.events())["text"] == "Hello world!"
    assert raw.headers["x-accel-buffering"] == "no"  # nginx passes events on at once
