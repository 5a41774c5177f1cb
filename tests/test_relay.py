"""CaseDesk between the official SDK and the fake llama-server: translation over real sockets,
streamed and not, and what happens when the upstream misbehaves."""

from __future__ import annotations

import asyncio
import gc
import inspect
import time
from collections.abc import Callable
from typing import Any

import anthropic
import orjson
import pytest

from casedesk.http.server import HttpProtocol
from casedesk.upstream import relay as relay_module
from tests.conftest import GatewayFactory, RunningGateway, gateway_config
from tests.fake_llama import FakeLlamaServer, Reply
from tests.support.wait import until
from tests.support.wire import ASK, MESSAGES, get, http_post, raw_events, sdk


@pytest.fixture
async def gateway(fake: FakeLlamaServer, start_gateway: GatewayFactory) -> RunningGateway:
    return await start_gateway(gateway_config([fake.url]))


async def test_non_streamed_message_with_usage_and_model_tag(fake: FakeLlamaServer, gateway: RunningGateway) -> None:
    fake.replies.append(Reply(tokens=["Hello", " there"], prompt_tokens=20, cached_tokens=6))
    message = await sdk(gateway).messages.create(model="m", max_tokens=50, messages=ASK)
    assert message.content[0].type == "text" and message.content[0].text == "Hello there"
    assert message.model == "m" and message.id.startswith("msg_")
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 14 and message.usage.cache_read_input_tokens == 6
    assert message.usage.output_tokens == 2


async def test_stream_event_sequence_and_usage_from_the_first_event(
    fake: FakeLlamaServer, gateway: RunningGateway
) -> None:
    fake.replies.append(Reply(tokens=["a", "b", "c"], prompt_tokens=30, cached_tokens=10, progress_steps=3))
    events = await raw_events(gateway, {})
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["usage"]["input_tokens"] == 20 and start["usage"]["cache_read_input_tokens"] == 10
    assert start["content"] == [] and start["stop_reason"] is None and start["model"] == "m"
    assert [d["delta"]["text"] for n, d in events if n == "content_block_delta"] == ["a", "b", "c"]
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 3


async def test_a_streams_closing_events_leave_with_the_end_of_the_body_in_one_write(
    fake: FakeLlamaServer, gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[bytes] = []
    real_write = HttpProtocol.write

    def recorded(self: HttpProtocol, data: bytes) -> None:
        writes.append(data)
        real_write(self, data)

    monkeypatch.setattr(HttpProtocol, "write", recorded)
    fake.replies.append(Reply(tokens=["a", "b"], token_delay=0.05))  # one upstream read per token
    assert [name for name, _ in await raw_events(gateway, {})][-1] == "message_stop"
    last = writes[-1]
    assert b"message_delta" in last and b"message_stop" in last and last.endswith(b"\r\n0\r\n\r\n")
    assert b"0\r\n\r\n" not in writes  # the end never costs a write (a syscall) of its own


async def test_the_cpu_is_offered_once_a_stream_right_after_its_first_token_and_never_for_a_whole_answer(
    fake: FakeLlamaServer, gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """upstream/relay.py hand_over_cpu: the reader just woken for the first token may take this
    CPU before the rest is relayed; once a stream, only after that token is written."""
    writes: list[bytes] = []
    offered: list[bytes] = []  # what had been written when the CPU was offered
    real_write = HttpProtocol.write

    def recorded(self: HttpProtocol, data: bytes) -> None:
        writes.append(data)
        real_write(self, data)

    monkeypatch.setattr(HttpProtocol, "write", recorded)
    monkeypatch.setattr(relay_module, "_sched_yield", lambda: offered.append(b"".join(writes)))
    fake.replies.append(Reply(tokens=["a", "b", "c"], token_delay=0.02))
    assert [name for name, _ in await raw_events(gateway, {})][-1] == "message_stop"
    assert len(offered) == 1
    assert b'"text":"a"' in offered[0] and b'"text":"b"' not in offered[0]  # after the first token
    fake.replies.append(Reply(tokens=["d", "e"]))
    message = await sdk(gateway).messages.create(model="m", max_tokens=50, messages=ASK)
    assert message.content[0].type == "text" and message.content[0].text == "de"
    assert len(offered) == 1  # a whole answer has no reader waiting for its first token
    # A stream that begins while another is in flight offers nothing: the other would wait.
    fake.replies.extend([Reply(tokens=["f", "g"], token_delay=0.5), Reply(tokens=["h"])])
    slow = asyncio.ensure_future(raw_events(gateway, {}))
    await until(lambda: len(offered) == 2)  # the slow one's first token: it was alone
    assert [name for name, _ in await raw_events(gateway, {})][-1] == "message_stop"
    assert not slow.done() and len(offered) == 2
    assert [name for name, _ in await slow][-1] == "message_stop"


async def test_a_streams_spare_opens_while_it_runs_and_carries_the_next_request(
    fake: FakeLlamaServer, gateway: RunningGateway
) -> None:
    """The socket a stream spends is replaced as its first token goes out (upstream/pool.py
    `answer_begun`), not as it ends: the next request, an agent's next turn right after, finds
    the spare open and is sent on it, its first token waiting for no connect."""
    fake.replies.extend([Reply(tokens=["a", "b", "c"], token_delay=0.2), Reply(tokens=["d"])])
    before = fake.connections_accepted
    first = asyncio.ensure_future(raw_events(gateway, {}))
    await until(lambda: fake.connections_accepted == before + 2)  # its own socket, and the spare
    assert not first.done()  # while it runs
    spare = fake.connections_accepted  # the spare's serial
    assert [name for name, _ in await first][-1] == "message_stop"
    assert [name for name, _ in await raw_events(gateway, {})][-1] == "message_stop"
    assert fake.chat_requests()[-1].connection == spare


async def test_upstream_request_asks_for_stream_usage_and_progress(
    fake: FakeLlamaServer, gateway: RunningGateway
) -> None:
    await sdk(gateway).messages.create(
        model="m",
        max_tokens=7,
        messages=ASK,
        system="be kind",
        extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 5},
    )
    body = fake.chat_requests()[-1].body
    assert body is not None
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["return_progress"] is True
    assert body["messages"][0] == {"role": "system", "content": "be kind"}
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["top_k"]) == (7, 0.5, 0.9, 5)


async def test_thinking_blocks_come_first_with_a_signature_when_asked(
    fake: FakeLlamaServer, gateway: RunningGateway
) -> None:
    fake.replies.append(Reply(reasoning=["Let me ", "think."], tokens=["42"]))
    async with sdk(gateway).messages.stream(
        model="m", max_tokens=2000, messages=ASK, thinking={"type": "enabled", "budget_tokens": 1024}
    ) as stream:
        message = await stream.get_final_message()
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "Let me think." and message.content[0].signature
    assert message.content[1].text == "42"
    body = fake.chat_requests()[-1].body or {}
    assert body["reasoning_budget_tokens"] == 1024
    assert body["chat_template_kwargs"] == {"enable_thinking": True}


async def test_reasoning_nobody_asked_for_is_left_out(fake: FakeLlamaServer, gateway: RunningGateway) -> None:
    fake.replies.append(Reply(reasoning=["hidden"], tokens=["shown"]))
    events = await raw_events(gateway, {})
    assert "thinking" not in orjson.dumps(events).decode() and "hidden" not in orjson.dumps(events).decode()
    assert [d["delta"]["text"] for n, d in events if n == "content_block_delta"] == ["shown"]
    fake.replies.append(Reply(reasoning=["hidden"], tokens=["shown"]))
    message = await sdk(gateway).messages.create(model="m", max_tokens=50, messages=ASK)
    assert [b.type for b in message.content] == ["text"]


async def test_thinking_disabled_asks_llama_server_not_to_reason(
    fake: FakeLlamaServer, gateway: RunningGateway
) -> None:
    await sdk(gateway).messages.create(model="m", max_tokens=5, messages=ASK, thinking={"type": "disabled"})
    assert (fake.chat_requests()[-1].body or {})["chat_template_kwargs"] == {"enable_thinking": False}


@pytest.mark.parametrize("stream", [False, True])
async def test_several_tool_calls_become_tool_use_blocks(
    fake: FakeLlamaServer, gateway: RunningGateway, stream: bool
) -> None:
    fake.replies.append(
        Reply(
            tokens=["Checking."],
            tool_calls=[
                ("get_weather", ['{"city":', ' "Paris"}']),
                ("get_time", ['{"zone": "CET"}']),
            ],
        )
    )
    tool = {"name": "get_weather", "input_schema": {"type": "object"}}
    kwargs: dict[str, Any] = {
        "model": "m",
        "max_tokens": 50,
        "messages": ASK,
        "tools": [tool, {**tool, "name": "get_time"}],
    }
    if stream:
        async with sdk(gateway).messages.stream(**kwargs) as s:
            message = await s.get_final_message()
    else:
        message = await sdk(gateway).messages.create(**kwargs)
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
    assert message.content[1].name == "get_weather" and message.content[1].input == {"city": "Paris"}
    assert message.content[1].id == "call_0_fake"
    assert message.content[2].name == "get_time" and message.content[2].input == {"zone": "CET"}
    assert message.stop_reason == "tool_use"


async def test_streamed_tool_blocks_are_indexed_and_closed_in_order(
    fake: FakeLlamaServer, gateway: RunningGateway
) -> None:
    fake.replies.append(Reply(tokens=["x"], tool_calls=[("a", ['{"n": 1}']), ("b", ['{"n":', " 2}"])]))
    events = await raw_events(
        gateway, {"tools": [{"name": "a", "input_schema": {}}, {"name": "b", "input_schema": {}}]}
    )
    blocks = [
        (n, d.get("index"), (d.get("content_block") or d.get("delta") or {}).get("type"))
        for n, d in events
        if "content_block" in n
    ]
    assert blocks == [
        ("content_block_start", 0, "text"),
        ("content_block_delta", 0, "text_delta"),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, "tool_use"),
        ("content_block_delta", 1, "input_json_delta"),
        ("content_block_stop", 1, None),
        ("content_block_start", 2, "tool_use"),
        ("content_block_delta", 2, "input_json_delta"),
        ("content_block_delta", 2, "input_json_delta"),
        ("content_block_stop", 2, None),
    ]
    start = next(d for n, d in events if n == "content_block_start" and d["index"] == 1)
    assert start["content_block"] == {"type": "tool_use", "id": "call_0_fake", "name": "a", "input": {}}


@pytest.mark.parametrize("stream", [False, True])
async def test_disable_parallel_tool_use_keeps_one_call_and_stops_the_upstream(
    fake: FakeLlamaServer, gateway: RunningGateway, stream: bool
) -> None:
    fake.replies.append(Reply(tokens=[], tool_calls=[("a", ['{"n": 1}']), ("a", ['{"n": 2}'])], token_delay=0.02))
    kwargs: dict[str, Any] = {
        "model": "m",
        "max_tokens": 50,
        "messages": ASK,
        "tools": [{"name": "a", "input_schema": {}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    }
    if stream:
        async with sdk(gateway).messages.stream(**kwargs) as s:
            message = await s.get_final_message()
    else:
        message = await sdk(gateway).messages.create(**kwargs)
    assert [(b.type, b.input) for b in message.content] == [("tool_use", {"n": 1})]
    assert message.stop_reason == "tool_use"
    body = fake.chat_requests()[-1].body or {}
    assert body["tool_choice"] == "required" and body["parallel_tool_calls"] is False


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_sequence_is_reported_with_the_matched_string(
    fake: FakeLlamaServer, gateway: RunningGateway, stream: bool
) -> None:
    fake.replies.append(Reply(tokens=["one", " two", " three", " four"]))
    kwargs: dict[str, Any] = {"model": "m", "max_tokens": 50, "messages": ASK, "stop_sequences": ["zzz", " three"]}
    if stream:
        async with sdk(gateway).messages.stream(**kwargs) as s:
            message = await s.get_final_message()
    else:
        message = await sdk(gateway).messages.create(**kwargs)
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == " three"
    assert message.content[0].text == "one two"
    assert (fake.chat_requests()[-1].body or {})["verbose"] is True


async def test_end_of_generation_with_stop_sequences_is_still_end_turn(
    fake: FakeLlamaServer, gateway: RunningGateway
) -> None:
    message = await sdk(gateway).messages.create(model="m", max_tokens=50, messages=ASK, stop_sequences=["never"])
    assert message.stop_reason == "end_turn" and message.stop_sequence is None


async def test_max_tokens_stop_reason(fake: FakeLlamaServer, gateway: RunningGateway) -> None:
    fake.replies.append(Reply(tokens=["a", "b", "c", "d"]))
    message = await sdk(gateway).messages.create(model="m", max_tokens=2, messages=ASK)
    assert message.stop_reason == "max_tokens" and message.content[0].text == "ab"


async def test_count_tokens_uses_the_upstream_template_and_tokenizer(
    fake: FakeLlamaServer, gateway: RunningGateway
) -> None:
    counted = await sdk(gateway).messages.count_tokens(
        model="m", system="one two", messages=[{"role": "user", "content": "three four five"}]
    )
    # The fake's template: "<system> one two <user> three four five <assistant>", one token a word, plus BOS.
    assert counted.input_tokens == 9


async def test_count_tokens_says_which_upstream_call_failed_when_it_dies_mid_answer(
    fake: FakeLlamaServer, gateway: RunningGateway
) -> None:
    fake.die_mid_answer = {"/tokenize"}
    with pytest.raises(anthropic.APIStatusError) as failed:
        await sdk(gateway).messages.count_tokens(model="m", messages=ASK)
    assert failed.value.status_code == 502  # the upstream's failure, not the gateway's 500
    assert "/tokenize" in failed.value.message


async def test_models_list_and_retrieve(gateway: RunningGateway) -> None:
    client = sdk(gateway)
    assert [m.id async for m in client.models.list()] == ["m"]
    assert (await client.models.retrieve("m")).display_name == "m"
    with pytest.raises(anthropic.NotFoundError):
        await client.models.retrieve("other")


async def test_context_overflow_is_a_400_prompt_too_long(fake: FakeLlamaServer, gateway: RunningGateway) -> None:
    fake.replies.append(
        Reply(
            status=400,
            error_type="exceed_context_size_error",
            error_message="too big",
            error_extra={"n_prompt_tokens": 9024, "n_ctx": 2048},
        )
    )
    with pytest.raises(anthropic.BadRequestError) as caught:
        await sdk(gateway).messages.create(model="m", max_tokens=5, messages=ASK)
    assert "prompt is too long: 9024 tokens > 2048 maximum" in str(caught.value)


async def test_a_loading_model_is_529_overloaded(fake: FakeLlamaServer, gateway: RunningGateway) -> None:
    fake.replies.append(Reply(status=503, error_type="unavailable_error", error_message="Loading model"))
    with pytest.raises(anthropic.APIStatusError) as caught:
        await sdk(gateway).messages.create(model="m", max_tokens=5, messages=ASK)
    assert caught.value.status_code == 529
    assert caught.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


async def test_failover_to_the_next_upstream_before_the_first_byte(start_gateway: GatewayFactory) -> None:
    async with FakeLlamaServer(Reply(status=500)) as broken, FakeLlamaServer(Reply(tokens=["ok"])) as good:
        # least_in_flight: the upstreams are tried in config order (prefix would use rendezvous order).
        upstreams = ["http://127.0.0.1:9", broken.url, good.url]
        gw = await start_gateway(gateway_config(upstreams, model={"balance": "least_in_flight"}))
        for _ in range(3):
            message = await sdk(gw).messages.create(model="m", max_tokens=5, messages=ASK)
            assert message.content[0].text == "ok"
        assert len(good.chat_requests()) == 3
        assert len(broken.chat_requests()) == 1  # taken out after its failure


async def test_upstream_death_mid_stream_is_an_error_event_and_a_clean_end(
    fake: FakeLlamaServer, gateway: RunningGateway
) -> None:
    fake.replies.append(Reply(tokens=["a", "b", "c", "d"], die_after=2))
    events = await raw_events(gateway, {})
    assert [d["delta"]["text"] for n, d in events if n == "content_block_delta"] == ["a", "b"]
    assert events[-1][0] == "error"
    assert events[-1][1]["error"]["type"] == "api_error"  # not overloaded: retrying would not help


async def test_upstream_stall_mid_stream_times_out_with_an_error_event(
    fake: FakeLlamaServer, start_gateway: GatewayFactory
) -> None:
    gw = await start_gateway(gateway_config([fake.url], server={"upstream_read_timeout": 0.4}))
    fake.replies.append(Reply(tokens=["a", "b", "c"], stall_after=1))
    started = time.monotonic()
    events = await raw_events(gw, {})
    assert events[-1][0] == "error" and "stalled" in events[-1][1]["error"]["message"]
    assert time.monotonic() - started < 3


async def test_client_disconnect_cancels_the_upstream_at_once(fake: FakeLlamaServer, gateway: RunningGateway) -> None:
    fake.replies.append(Reply(tokens=[f"t{i}" for i in range(1000)], token_delay=0.01))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    body = orjson.dumps({"model": "m", "max_tokens": 5000, "messages": ASK, "stream": True})
    writer.write(
        b"POST /proxy/dep/anthropic/v1/messages HTTP/1.1\r\nhost: x\r\nanthropic-version: 2023-06-01\r\n"
        b"content-length: %d\r\n\r\n%b" % (len(body), body)
    )
    seen = b""
    while seen.count(b"content_block_delta") < 3:
        seen += await reader.read(4096)
    writer.close()
    record = fake.chat_requests()[-1]
    await until(lambda: record.aborted, timeout=2, what="llama-server to see the client leave")
    assert record.aborted and not record.finished
    # The cut socket was not reused: the next request comes on another connection.
    await sdk(gateway).messages.create(model="m", max_tokens=5, messages=ASK)
    assert fake.chat_requests()[-1].connection != record.connection


async def queued_requests(gateway: RunningGateway, count: int) -> bool:
    """The gateway's admission queue holds `count` requests (its /metrics say so)."""
    return f'casedesk_queued_requests{{deployment="dep"}} {count}' in (await get(gateway, "/metrics"))[1].decode()


def upstream_paused(fake: FakeLlamaServer) -> bool:
    """The fake's writes wait for the gateway to read: back-pressure reached llama-server."""
    return any(not connection.writable.is_set() for connection in fake._connections)


async def count_twice(client: anthropic.AsyncAnthropic) -> None:
    """Two count_tokens calls: four whole (non-streamed) upstream answers, /apply-template and /tokenize."""
    for _ in range(2):
        assert (await client.messages.count_tokens(model="m", messages=ASK)).input_tokens > 0


async def test_keep_alive_connections_are_reused_for_whole_answers(
    fake: FakeLlamaServer, gateway: RunningGateway
) -> None:
    await count_twice(sdk(gateway))
    answered = [r for r in fake.requests if r.path != "/health"]  # the health probe has its own
    assert [r.status for r in answered] == [200] * 4
    assert len({r.connection for r in answered}) == 1


async def test_a_socket_that_carried_a_stream_is_never_offered_again(start_gateway: GatewayFactory) -> None:
    # llama-server closes after every stream (docs/llama-server-facts.md §4). Even an upstream
    # that kept it open would not get a second request on it: each chat request, streamed to
    # the client or not (upstream it is always a stream), has a connection of its own.
    async with FakeLlamaServer(close_after_stream=False) as fake:
        gw = await start_gateway(gateway_config([fake.url]))
        client = sdk(gw)
        for _ in range(3):
            assert (await client.messages.create(model="m", max_tokens=5, messages=ASK)).content
            async with client.messages.stream(model="m", max_tokens=5, messages=ASK) as stream:
                await stream.get_final_message()
        connections = [r.connection for r in fake.chat_requests()]
        assert len(connections) == 6 and len(set(connections)) == 6


async def test_a_connection_closed_by_the_keep_alive_limit_is_replaced_invisibly(
    start_gateway: GatewayFactory,
) -> None:
    # The 2nd answer on a connection says `Connection: close` and the socket is closed.
    async with FakeLlamaServer(keepalive_max=2) as fake:
        gw = await start_gateway(gateway_config([fake.url]))
        client = sdk(gw)
        for _ in range(3):
            await count_twice(client)
        answered = [r for r in fake.requests if r.path != "/health"]  # the health probe has its own
        assert [r.status for r in answered] == [200] * 12
        assert len({r.connection for r in answered}) == 6


async def test_idle_connections_closed_by_the_upstream_do_not_fail_requests(start_gateway: GatewayFactory) -> None:
    # The fake closes idle sockets after 0.2 s while its header says timeout=5, like a server
    # whose real limit is not the advertised one: the pool meets sockets closed under it.
    async with FakeLlamaServer(keepalive_timeout=0.2) as fake:
        gw = await start_gateway(gateway_config([fake.url]))
        client = sdk(gw)
        for _ in range(3):
            await count_twice(client)
            await until(lambda: fake.open_connections == 0, what="the fake to close its idle sockets")
        assert [r.status for r in fake.requests if r.path != "/health"] == [200] * 12


async def test_admission_queue_full_is_529_at_once(fake: FakeLlamaServer, start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([fake.url], deployment={"max_concurrency": 1, "max_queue": 1}))
    for _ in range(3):
        fake.replies.append(Reply(tokens=["slow"] * 20, token_delay=0.02))
    client = sdk(gw)
    first = asyncio.ensure_future(client.messages.create(model="m", max_tokens=50, messages=ASK))
    second = asyncio.ensure_future(client.messages.create(model="m", max_tokens=50, messages=ASK))
    await until(lambda: queued_requests(gw, 1), what="one request in flight and one queued")
    started = time.monotonic()
    with pytest.raises(anthropic.APIStatusError) as caught:
        await client.messages.create(model="m", max_tokens=50, messages=ASK)
    assert caught.value.status_code == 529 and time.monotonic() - started < 0.5
    assert (await first).content[0].text == "slow" * 20
    assert (await second).content[0].text == "slow" * 20  # the queued one was served after


async def test_a_slow_reader_pauses_the_upstream_and_loses_nothing(
    fake: FakeLlamaServer, gateway: RunningGateway
) -> None:
    tokens = [f"{i:05d}" + "x" * 1000 for i in range(20000)]  # ~25 MB of events: more than any socket buffers
    fake.replies.append(Reply(tokens=tokens))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port, limit=1 << 16)
    body = orjson.dumps({"model": "m", "max_tokens": 100000, "messages": ASK, "stream": True})
    writer.write(
        b"POST /proxy/dep/anthropic/v1/messages HTTP/1.1\r\nhost: x\r\nanthropic-version: 2023-06-01\r\n"
        b"content-length: %d\r\n\r\n%b" % (len(body), body)
    )
    writer.transport.pause_reading()  # the client stops reading
    await until(lambda: fake.chat_requests() and upstream_paused(fake), what="the fake to wait for us")
    record = fake.chat_requests()[-1]
    assert not record.finished  # back-pressure reached llama-server: it is waiting for us
    writer.transport.resume_reading()
    received = 0
    deltas = 0
    tail = b""
    marks = {b"00000", b"09999", b"19999"}
    while True:
        chunk = await asyncio.wait_for(reader.read(1 << 20), 10)
        assert chunk
        window = tail + chunk
        deltas += window.count(b"event: content_block_delta") - tail.count(b"event: content_block_delta")
        marks = {m for m in marks if m not in window}
        received += len(chunk)
        tail = window[-64:]
        if window.endswith(b"0\r\n\r\n"):
            break
    assert deltas == 20000 and not marks and record.finished
    writer.close()


async def stop_during_a_stream(
    fake: FakeLlamaServer, start_gateway: GatewayFactory, grace: float, tokens: int
) -> tuple[RunningGateway, list[tuple[str, dict[str, Any]]]]:
    """Start a 20 ms-per-token stream, ask the gateway to stop mid-way; the stream's events."""
    gw = await start_gateway(gateway_config([fake.url]), shutdown_grace=grace)
    fake.replies.append(Reply(tokens=[f"t{i}" for i in range(tokens)], token_delay=0.02))
    stream = asyncio.ensure_future(raw_events(gw, {}))
    await until(lambda: fake.chat_requests() and fake.chat_requests()[-1].status == 200, what="the stream to begin")
    gw.stop.set()
    return gw, await stream


async def test_graceful_shutdown_lets_a_stream_finish(fake: FakeLlamaServer, start_gateway: GatewayFactory) -> None:
    gw, events = await stop_during_a_stream(fake, start_gateway, grace=5, tokens=30)
    assert events[-1][0] == "message_stop"
    await asyncio.wait_for(gw.task, 5)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", gw.port)


async def test_shutdown_grace_end_cuts_streams_with_an_error_event(
    fake: FakeLlamaServer, start_gateway: GatewayFactory
) -> None:
    _, events = await stop_during_a_stream(fake, start_gateway, grace=0.3, tokens=500)
    assert events[-1][0] == "error" and "shutting down" in events[-1][1]["error"]["message"]


async def test_concurrent_requests_over_connections_the_upstream_keeps_closing(start_gateway: GatewayFactory) -> None:
    async with FakeLlamaServer(keepalive_max=1) as fake:
        gw = await start_gateway(gateway_config([fake.url], model={"max_connections": 4}, deployment={"max_queue": 64}))
        client = sdk(gw)

        async def ask() -> str:
            message = await client.messages.create(model="m", max_tokens=5, messages=ASK)
            return message.content[0].text  # type: ignore[union-attr]

        answers = await asyncio.wait_for(asyncio.gather(*(ask() for _ in range(60))), 20)
        assert answers == ["Hello world!"] * 60


class RacingUpstream(asyncio.Protocol):
    """Answers a chat request's head in the very callback that closes the gateway's client:
    the client's cancellation lands as the upstream head arrives (issue 22 item 9)."""

    def __init__(self, leave: Callable[[], None], hops: int) -> None:
        self.leave = leave
        self.hops = hops  # loop turns between the client's close and the head (where the race is)
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.answered = False
        self.closed = asyncio.Event()
        self.tokens_sent = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.answered or b"\r\n\r\n" not in self.buffer:
            return
        head, _, body = self.buffer.partition(b"\r\n\r\n")
        if head.startswith(b"GET /health "):
            assert self.transport is not None
            self.transport.write(b'HTTP/1.1 200 OK\r\nContent-Length: 15\r\nConnection: close\r\n\r\n{"status":"ok"}')
            self.transport.close()
            return
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        if len(body) < length:
            return
        self.answered = True
        self.leave()  # the client goes...
        self.answer(self.hops)

    def answer(self, hops: int) -> None:
        if hops:
            asyncio.get_running_loop().call_soon(self.answer, hops - 1)
            return
        assert self.transport is not None  # ...as the head and the first token leave
        token = b'data: {"choices":[{"index":0,"delta":{"content":"t"}}]}\n\n'
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%b\r\n" % (len(token), token)
        )
        asyncio.get_running_loop().create_task(self.more(token))

    async def more(self, token: bytes) -> None:
        while not self.closed.is_set() and self.tokens_sent < 300:
            await asyncio.sleep(0.01)
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(b"%x\r\n%b\r\n" % (len(token), token))
                self.tokens_sent += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()


async def test_a_client_that_leaves_as_the_upstream_head_arrives_frees_the_upstream(
    start_gateway: GatewayFactory,
) -> None:
    """Issue 22 item 9: on Python 3.11 `asyncio.wait_for` swallowed the cancellation that
    landed with the head, and the whole answer was generated for nobody (a slot held)."""
    for trial in range(12):
        chat = await leave_as_the_head_arrives(start_gateway, hops=trial % 4)
        await asyncio.wait_for(chat.closed.wait(), 2.5)  # closed within the watchdog's second
        assert chat.tokens_sent < 150, f"trial {trial}: the answer ran on for a client that was gone"


async def leave_as_the_head_arrives(start_gateway: GatewayFactory, hops: int) -> RacingUpstream:
    """One streamed request whose client leaves as the upstream head arrives; its upstream."""
    client: list[asyncio.StreamWriter] = []
    upstreams: list[RacingUpstream] = []

    def racing() -> RacingUpstream:
        upstreams.append(RacingUpstream(lambda: client[0].transport.abort(), hops))
        return upstreams[-1]

    server = await asyncio.get_running_loop().create_server(racing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gw = await start_gateway(gateway_config([f"http://127.0.0.1:{port}"]))
    _reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    client.append(writer)
    body = orjson.dumps({"model": "m", "max_tokens": 500, "messages": ASK, "stream": True})
    writer.write(
        b"POST /proxy/dep/anthropic/v1/messages HTTP/1.1\r\nhost: x\r\nanthropic-version: 2023-06-01\r\n"
        b"content-length: %d\r\n\r\n%b" % (len(body), body)
    )
    chat: RacingUpstream = await wait_for_value(lambda: next((u for u in upstreams if u.answered), None))
    server.close()
    return chat


async def wait_for_value(get: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while (value := get()) is None:
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)
    return value


async def test_a_stream_whose_client_leaves_is_logged_499_with_the_tokens_it_was_sent(
    fake: FakeLlamaServer, start_gateway: GatewayFactory, tmp_path: Any
) -> None:
    """Issue 22 item 11: it was `status 200, output_tokens 0`."""
    log_path = tmp_path / "access.log"
    gw = await start_gateway(gateway_config([fake.url], server={"access_log": str(log_path)}))
    fake.replies.append(Reply(tokens=[f"t{i}" for i in range(1000)], token_delay=0.005, prompt_tokens=7))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    body = orjson.dumps({"model": "m", "max_tokens": 5000, "messages": ASK, "stream": True})
    writer.write(
        b"POST /proxy/dep/anthropic/v1/messages HTTP/1.1\r\nhost: x\r\nanthropic-version: 2023-06-01\r\n"
        b"content-length: %d\r\n\r\n%b" % (len(body), body)
    )
    seen = b""
    while seen.count(b"event: content_block_delta") < 10:
        seen += await reader.read(4096)
    writer.close()
    record = fake.chat_requests()[-1]
    assert await fake.wait_until(lambda: record.aborted)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [orjson.loads(line) for line in log_path.read_bytes().splitlines()] if log_path.exists() else []
        chats = [line for line in lines if line["path"].endswith("/messages")]
        if chats:
            break
        await asyncio.sleep(0.01)
    [line] = chats
    record_tokens = line["output_tokens"]
    sent = seen.count(b"event: content_block_delta")
    assert line["status"] == 499 and line["input_tokens"] == 7
    assert sent <= record_tokens < 1000  # what it was sent, at least; not what it never got
    _, _, metrics = await http_get(gw.port, "/metrics")
    text = metrics.decode()
    assert 'casedesk_requests_total{deployment="dep",model="m",status="499"} 1' in text
    assert f'casedesk_output_tokens_total{{deployment="dep",model="m"}} {record_tokens}' in text


async def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET %b HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n" % path.encode())
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, body


async def test_an_answered_request_leaves_nothing_for_the_garbage_collector(
    fake: FakeLlamaServer, gateway: RunningGateway
) -> None:
    """A request's objects (its connections, writer, translator, relay) are freed by reference
    counting the moment it ends: none of CaseDesk's is held in a reference cycle, which would
    keep the whole request in memory until a collection and make every collection walk it."""
    fake.default = Reply(tokens=["Hello", " there"])
    for _ in range(2):  # (the pool's spare is opened by the first)
        assert len(await raw_events(gateway, {})) >= 6
        status, _, _ = await http_post(gateway.port, MESSAGES, {"model": "m", "max_tokens": 50, "messages": ASK})
        assert status == 200
    await asyncio.sleep(0.05)  # (the handlers' last steps after the response's last byte)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds now stays in gc.garbage to look at
    try:
        assert len(await raw_events(gateway, {})) >= 6
        status, _, _ = await http_post(gateway.port, MESSAGES, {"model": "m", "max_tokens": 50, "messages": ASK})
        assert status == 200
        await asyncio.sleep(0.05)
        gc.collect()
        ours = sorted(
            {type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("casedesk.")}
            | {o.__qualname__ for o in gc.garbage if inspect.isfunction(o) and o.__module__.startswith("casedesk.")}
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert ours == []
