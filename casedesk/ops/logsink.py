"""Writing log lines without ever blocking the event loop, and logged values made harmless.

A pipe or a socket nobody reads (a stuck `casedesk serve | …`, a journald that is behind)
fills after ~64 KB; a plain blocking write would then freeze every client. So a `LineSink`
hands lines to a writer thread through a bounded buffer: the loop only appends, and when the
buffer is full a line is dropped and counted (casedesk_log_lines_dropped_total). The thread,
once woken, waits `COALESCE_SECONDS` before it writes, so that one write carries every line of
that moment: waking a thread for each request's line cost ~70 µs of CPU a request (thread
switches and the GIL handed back and forth; measured with `make bench`). A regular file has no
reader to wait for and is written at once, so its lines are there in order, as soon as a
request ends.

What a client or an upstream sent (a model name, a path, an upstream's error text) goes
through `printable` before it reaches a log: cut to a bound, and every control character,
newline and ANSI escape written as an escape, so it can neither forge a line nor drive the
operator's terminal.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections import deque

MAX_BUFFERED_BYTES = 1 << 20  # what waits for a slow reader; past it, lines are dropped
COALESCE_SECONDS = 0.02  # how long a woken writer gathers lines before one write
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(value: str, limit: int = 256) -> str:
    """`value` cut to `limit` characters (the cut said, with its size), and every character
    that is not printable (control characters, ESC, DEL, C1, line separators, bidi controls)
    written as a Python-style escape."""
    if len(value) <= limit and value.isprintable():
        return value  # the common case, checked at C speed
    cut = f"…(+{len(value) - limit} chars)" if len(value) > limit else ""
    shown = value[:limit]
    return "".join(c if c.isprintable() else _escape(c) for c in shown) + cut


def _escape(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class LineSink:
    """Whole lines to one file descriptor: at once for a regular file, else through a bounded
    buffer that a thread writes out (see the module's docstring). Closing does not close `fd`."""

    def __init__(
        self, fd: int, name: str, max_bytes: int = MAX_BUFFERED_BYTES, coalesce: float = COALESCE_SECONDS
    ) -> None:
        self._fd = fd
        self.max_bytes = max_bytes
        self.dropped = 0  # lines lost: the buffer was full, or the write failed
        self._direct = stat.S_ISREG(os.fstat(fd).st_mode)
        self._lines: deque[bytes] = deque()
        self._held = 0  # bytes buffered or being written
        self._closed = False
        self._asleep = False  # the writer waits for a first line (set and read under _wake)
        self.coalesce = coalesce
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        if not self._direct:
            self._thread = threading.Thread(target=self._run, name=f"casedesk {name} writer", daemon=True)
            self._thread.start()

    def write(self, line: bytes) -> bool:
        """Queue (or write) one line; False when it was dropped. Never blocks on the reader."""
        if self._direct:
            try:
                _write_all(self._fd, line)
            except OSError:
                self.dropped += 1
                return False
            return True
        with self._wake:
            if self._closed or self._held + len(line) > self.max_bytes:
                self.dropped += 1
                return False
            self._lines.append(line)
            self._held += len(line)
            if self._asleep:  # only the first line of a batch wakes the writer
                self._asleep = False
                self._wake.notify()
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Write out what is buffered, for at most `timeout` seconds (a stalled reader may
        keep it: the thread is a daemon and does not hold up the exit)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._lines and not self._closed:
                    self._asleep = True
                    self._wake.wait()
                self._asleep = False
                if not self._lines:
                    return  # closed, and everything is written
                if not self._closed:
                    # Gather what else comes in this moment (the lock is released meanwhile).
                    self._wake.wait(self.coalesce)
                batch = list(self._lines)
                self._lines.clear()
            data = b"".join(batch)
            try:
                _write_all(self._fd, data)  # may block for as long as the reader stalls: off the loop
            except OSError:
                with self._wake:
                    self.dropped += len(batch)
            with self._wake:
                self._held -= len(data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class OperatorLogHandler(logging.Handler):
    """The operator's log (stderr under systemd: the journal) through a LineSink, every
    argument of a record made `printable` (the format strings are CaseDesk's own)."""

    def __init__(self, fd: int, limit: int = 4096) -> None:
        super().__init__()
        self.sink = LineSink(fd, "log")
        self.limit = limit

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if isinstance(record.args, dict):
                record.args = {key: _shown(value, self.limit) for key, value in record.args.items()}
            elif record.args:
                record.args = tuple(_shown(value, self.limit) for value in record.args)
            line = self.format(record)
            self.sink.write(line.encode("utf-8", "backslashreplace") + b"\n")
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.sink.close()
        super().close()


def _shown(value: object, limit: int) -> object:
    """Numbers stay numbers (for %d and %g); anything else is logged as its printable text."""
    if isinstance(value, (int, float)):
        return value
    return printable(value if isinstance(value, str) else str(value), limit)


def operator_lines_dropped() -> int:
    """Lines the operator's log lost, when it is written by an OperatorLogHandler (cli.py)."""
    handlers = logging.getLogger().handlers
    return sum(h.sink.dropped for h in handlers if isinstance(h, OperatorLogHandler))
