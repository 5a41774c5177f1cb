"""The text of a plain text delta, cut out of llama-server's chunk without parsing all of it.

Almost every chunk of a streamed answer is one generated piece of text, and llama-server writes
each the same way but for the text and the envelope's values (docs/llama-server-facts.md §4):

    {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"TEXT"}}],"created":N,
     "id":"chatcmpl-…","model":"…","system_fingerprint":"…","object":"chat.completion.chunk"}

`text_delta` recognises exactly that shape and returns the text, or None for anything else
(the role delta, progress, reasoning, tool calls, the finish and usage chunks, `timings`,
an error, a model name with escapes or non-ASCII in it, any other order or spacing): the
caller then parses the chunk in full. Agreement with the full parse, over recorded chunks and
generated ones, is checked in tests/test_fast_delta.py.

`WireTexts` (one stream's reads; `wire_text_delta` for one chunk) goes one step further down
for the relay's per-token path: it takes such chunks straight off the wire, their HTTP chunk
framing and SSE line included (one chunk holds one event, as llama-server writes them), so
that a read of many tokens is not split three times over (chunks, events, chunk JSON) before
the text is found. Anything but the exact canonical shape is declined, and the caller hands
the bytes to the chunked and SSE decoders as before.

Splicing llama-server's JSON string into our event unparsed (it is byte for byte what
`orjson.dumps(text)` writes when it holds no backslash) was measured too, and is no faster:
checking those bytes costs what decoding and encoding them does (bench/results/issue23-candidates.md).
"""

from __future__ import annotations

import functools
import re

import orjson

from casedesk.http.chunked import CHUNK_SIZES


_PREFIX = b'{"choices":[{"finish_reason":null,"index":0,"delta":{"content":"'
_START = len(_PREFIX) - 1  # the text's opening quote
_END = b'"}}],"created":'
# The envelope after the text: printable ASCII strings without escapes (anything else is left
# to the full parse, which then decides whether it is valid JSON at all).
_STRING = rb'"[\x20\x21\x23-\x5b\x5d-\x7e]*"'
_TAIL = re.compile(
    rb'"}}\],"created":(?:0|[1-9][0-9]*),"id":%b,"model":%b,"system_fingerprint":%b,"object":"chat\.completion\.chunk"}'
    % (_STRING, _STRING, _STRING)
)


@functools.lru_cache(maxsize=256)
def _plain_envelope(tail: bytes) -> bool:
    """One stream's chunks share their envelope (`created` changes once a second at most): the
    check runs once per envelope, a dict lookup after that."""
    return _TAIL.fullmatch(tail) is not None


def text_delta(payload: bytes) -> str | None:
    """The text of a plain text-delta chunk (the `data:` payload), or None: parse it in full."""
    if not payload.startswith(_PREFIX):
        return None
    end = payload.rfind(_END, _START + 1)  # (the envelope's strings hold no quote)
    if end < 0 or not _plain_envelope(payload[end:]):
        return None
    try:
        # Exactly one JSON string, or an error: this also rejects a quote the text's end did not
        # escape, an escaped quote at its end, raw control characters and invalid UTF-8.
        text = orjson.loads(payload[_START : end + 1])
    except orjson.JSONDecodeError:
        return None
    return text if isinstance(text, str) else None


_EVENT = b"data: " + _PREFIX
_EVENT_LEN = len(_EVENT)
_TEXT_AT = _EVENT_LEN - 1  # the text's opening quote, from the start of the chunk's data
_EVENT_END = b"\n\n\r\n"  # the event's blank line, then the chunk's CRLF
_SIZE_LINE_MAX = 10  # "%x\r\n" of any chunk an event fits in
# A chunk's first six bytes, its canonical size line (as in http/chunked.py's CHUNK_SIZES) and
# the start of `data: `, for every chunk size up to 2 KiB, give where in the chunk its event
# starts, where its text's opening quote would be, and where the next chunk starts: one slice
# and one lookup stand for finding the line's end, reading the size and checking its spelling,
# and the sums are made once here, not per token (each int past 256 is an object to make).
_HEADS = {
    (line + _EVENT)[:6]: (len(line), len(line) + _TEXT_AT, len(line) + size + 2)
    for size, line in ((size, b"%x\r\n" % size) for size in range(1, 2049))
}


def wire_events(wire: bytes, pos: int) -> tuple[list[bytes], int] | None:
    """(payloads, where the next chunk starts) when `wire` at `pos` holds one whole chunk
    framed as llama-server frames them whose data is single-line events, `data: PAYLOAD\n\n`
    each (the role delta with the first token, progress, the finish with the usage, [DONE]):
    what the chunked and SSE decoders would hand on, without them (a one-token answer's
    chunks cost ~73 k instructions through them, ~30 k this way). Else None, and the decoders
    take it (a larger chunk, another framing, another field, a comment, CR line ends)."""
    eol = wire.find(b"\r\n", pos, pos + _SIZE_LINE_MAX) + 2
    size = CHUNK_SIZES.get(wire[pos:eol]) if eol > 1 else None
    if size is None:
        return None
    stop = eol + size
    if wire[stop - 2 : stop + 2] != _EVENT_END:
        return None
    payloads = []
    for event in wire[eol : stop - 2].split(b"\n\n"):
        if event[:6] != b"data: " or 10 in event or 13 in event:  # (bytes by value: see http/request_head.py)
            return None
        payloads.append(event[6:])
    return payloads, stop + 2


def wire_text_delta(wire: bytes, pos: int) -> tuple[str, int] | None:
    """(text, where the next chunk starts) when `wire` at `pos` holds one whole chunk that is
    one plain text-delta event, `%x\r\ndata: {…}\n\n\r\n` (lower-case hex, no extension,
    as llama-server frames it); else None (not whole, another shape, or another framing)."""
    texts: list[str] = []
    end = WireTexts().take(wire, pos, texts, 1)
    return (texts[0], end) if texts else None


class WireTexts:
    """Takes runs of plain text-delta chunks off one stream's wire, read after read.

    A stream's chunks share their envelope: once one passed `_plain_envelope`, the next are
    expected to end with it, so the text's end is where the envelope would begin (the chunk's
    size says where) and one comparison checks the envelope, the event's end and the chunk's
    CRLF; a chunk that differs is checked afresh. The envelope is remembered from read to read
    (`created` changes once a second at most): a model's tokens come one a read, and checking
    each read's first chunk afresh cost a search and a cache lookup (timeit: a one-chunk read 1.55 ->
    0.91 µs)."""

    __slots__ = ("_envelope",)

    def __init__(self) -> None:
        self._envelope = b""  # the last chunk's envelope, checked (it begins with _END), then _EVENT_END

    def take(self, wire: bytes, pos: int, texts: list[str], most: int = -1) -> int:
        """Every such chunk from `pos` on, in a row (at most `most`; -1: no bound): their texts
        appended to `texts`; returns where the first chunk not taken starts. One call per read,
        not one per token: the loop is the relay's per-token path.

        Written for the interpreter's sake: slices compared and dict lookups, not
        `find`/`startswith` with bounds, whose argument parsing cost more than the search, and
        the sums made in _HEADS once (callgrind: 14.0 k -> 7.4 k instructions a token at 32
        chunks a read, 14.8 k -> 9.1 k at 5)."""
        loads, heads, append = orjson.loads, _HEADS, texts.append
        envelope = self._envelope
        envelope_size = len(envelope)
        for _ in range(most if most >= 0 else len(wire)):
            head = heads.get(wire[pos : pos + 6])
            if head is None:
                break
            event_at, text_at, after = head
            text_at += pos  # the text's opening quote
            if wire[pos + event_at : text_at + 1] != _EVENT:
                break
            after += pos  # the next chunk
            end = after - envelope_size  # the text's closing quote, if the envelope is the last one's
            if not (envelope_size and end > text_at and wire[end:after] == envelope):
                if wire[after - 4 : after] != _EVENT_END:
                    break
                # The envelope's strings hold no quote: its start is the chunk's last _END.
                end = wire.rfind(_END, text_at + 1, after - 2)
                if end < 0 or not _plain_envelope(wire[end : after - 4]):
                    break
                envelope = self._envelope = wire[end:after]
                envelope_size = len(envelope)
            try:
                text = loads(wire[text_at : end + 1])  # exactly one JSON string (as text_delta)
            except orjson.JSONDecodeError:
                break
            if text.__class__ is not str:
                break
            append(text)
            pos = after
        return pos
