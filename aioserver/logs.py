"""Logging: one handler on stderr for every line, as text or as one JSON object a line.

Every line goes through the ``logging`` module, access lines too (see accesslog.py), so a
handler of the user's (an extension's, journald's) sees every record. Ours writes the access
lines in batches, at most :data:`BATCH_DELAY` seconds late, as the access log did when it
wrote to stderr itself: a write and a flush per line would cost more than a request. Any other
line (or an access line logged outside the event loop's thread), a full batch and the
process's end write the batch out at once, in order. Each write holds whole lines and at most
:data:`PIPE_BUF` bytes when it can: writes that small to a pipe are atomic, so the workers
sharing the parent's stderr never cut into each other's lines.

Times are RFC 3339, local time with its UTC offset: ``2026-11-28T05:30:00.123+01:00``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from typing import Any, TextIO

from . import jsoncodec

BATCH = 256  # lines held at most
BATCH_DELAY = 0.1  # seconds a line may wait to be written
PIPE_BUF = 4096  # POSIX: a write of at most this many bytes to a pipe is not interleaved
ACCESS_LOGGER = "aiohttp.access"  # aiohttp's, which its access loggers are given
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # what TextFormatter writes

# Attributes a record may carry beyond logging's own, shown as fields of a JSON line (in this
# order): every one on an access record (accesslog.py), the request id on an error's.
EXTRA_FIELDS = (
    "client",
    "scheme",
    "method",
    "path",
    "status",
    "bytes",
    "duration",
    "identity",
    "request_id",
    "workflow",
)


_configured: tuple[str, str] | None = None


def configure_logging(level: str, log_format: str = "text") -> None:
    """The root logger at ``level``, its one handler writing to stderr in ``log_format`` (text, json).

    Python's warnings go through it too: with JSON, every line is one object.
    """
    global _configured
    handler = BatchingHandler(sys.stderr, batched=ACCESS_LOGGER)
    handler.setFormatter(JSONFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
    logging.captureWarnings(True)
    _configured = level, log_format


def configured() -> tuple[str, str] | None:
    """The level and format configure_logging() set in this process (for a process it starts), if it ran."""
    return _configured


def flush_logs() -> None:
    """Write out the lines waiting in the root logger's batching handlers."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, BatchingHandler):
            handler.flush()


def sole_handler(logger: logging.Logger, level: int = logging.INFO) -> BatchingHandler | None:
    """The handler that each record of ``logger`` at ``level`` would reach, when it is ours, with
    one of our formatters, and the only one, with no filter on the way; else None.

    Then an access line can be written straight into it (BatchingHandler.add_line): no one else
    would see its record. A handler or a filter of anyone else's, anywhere on the way, and the
    record goes through ``logging`` as any other.
    """
    if logger.filters or logger.disabled:
        return None
    found: BatchingHandler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if (
                found is not None
                or type(handler) is not BatchingHandler
                or handler.filters
                or level < handler.level
                or type(handler.formatter) not in (TextFormatter, JSONFormatter)
            ):
                return None
            found = handler
        current = current.parent if current.propagate else None
    return found


class BatchingHandler(logging.StreamHandler[TextIO]):
    """A stream handler writing the lines of logger ``batched`` below WARNING in batches, any
    other at once after them (see the module's docstring)."""

    def __init__(self, stream: TextIO, batched: str = ACCESS_LOGGER) -> None:
        super().__init__(stream)
        self.batched = batched
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._timer_thread = 0

    def handle(self, record: logging.LogRecord) -> bool:
        # Handler.handle, without its calls that do nothing here: a tenth of an access line's cost.
        if self.filters:
            return bool(super().handle(record))
        with self.lock:  # type: ignore[union-attr]  # StreamHandler made it
            self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.formatter or _DEFAULT).format(record)
        except Exception:
            self.handleError(record)
            return
        self._lines.append(line + self.terminator)
        if record.name != self.batched or record.levelno >= logging.WARNING:
            self.flush()
        else:
            self._batched()

    def add_line(self, line: str) -> None:
        """Write an access line made by this handler's formatter (see sole_handler), in the batch."""
        with self.lock:  # type: ignore[union-attr]  # StreamHandler made it
            self._lines.append(line + self.terminator)
            self._batched()

    def _batched(self) -> None:
        """A line was added to the batch: write it out when full, else within BATCH_DELAY."""
        if len(self._lines) >= BATCH:
            self.flush()
            return
        timer_loop = self._timer_loop
        if (
            self._timer is not None
            and timer_loop is not None
            and self._timer_thread == threading.get_ident()
            and timer_loop.is_running()
        ):
            # A write is due, by the loop running here (one loop a thread): known without
            # get_running_loop(), a getpid() system call each on Python 3.11.
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not the loop's thread (or no loop at all): nothing would write it later
            self.flush()
            return
        if self._timer is None or self._timer_loop is not loop:
            self._timer_loop = loop
            self._timer_thread = threading.get_ident()
            self._timer = loop.call_later(BATCH_DELAY, self._flush_later)

    def _flush_later(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # StreamHandler made it
            self._timer = None
            self.flush()

    def flush(self) -> None:
        """Write the lines waiting, in writes of whole lines (see the module's docstring)."""
        with self.lock:  # type: ignore[union-attr]
            lines, self._lines = self._lines, []
            if not lines:
                return
            stream: TextIO = self.stream
            try:
                for chunk in _chunks(lines, getattr(stream, "encoding", None) or "utf-8"):
                    stream.write(chunk)
                    stream.flush()
            except (OSError, ValueError):  # the stream is gone (closed, a broken pipe): nowhere left to say so
                pass


_DEFAULT = logging.Formatter()


def _chunks(lines: list[str], encoding: str) -> list[str]:
    """``lines`` joined into pieces of at most PIPE_BUF bytes (a longer line is a piece alone)."""
    text = "".join(lines)
    if text.isascii() and text.count("\n") == len(lines):
        # Nearly every batch: ASCII lines (a byte each character) of one line feed each, so the
        # pieces are cut after the last line feed within PIPE_BUF, found in C: a search per
        # piece, not a step per line.
        if len(text) <= PIPE_BUF:
            return [text]
        pieces: list[str] = []
        start, end = 0, len(text)
        while end - start > PIPE_BUF:
            cut = text.rfind("\n", start, start + PIPE_BUF) + 1
            if cut == 0:  # a line longer than PIPE_BUF: a piece alone
                cut = text.index("\n", start) + 1
            pieces.append(text[start:cut])
            start = cut
        if start < end:
            pieces.append(text[start:])
        return pieces
    chunks: list[str] = []
    start = size = 0
    for i, line in enumerate(lines):
        length = len(line) if line.isascii() else len(line.encode(encoding, "backslashreplace"))
        if size + length > PIPE_BUF and i > start:
            chunks.append("".join(lines[start:i]))
            start, size = i, 0
        size += length
    chunks.append("".join(lines[start:]))
    return chunks


_this_second = (-1, "", "")  # the second, its date and time, its offset: replaced whole (threads)
_this_millisecond = (-1, "")  # the millisecond and its time, as the last line had it


def rfc3339(created: float) -> str:
    """``2026-11-28T05:30:00.123+01:00``: local time, milliseconds, the UTC offset.

    The date, time and offset are made once a second, the whole once a millisecond: busy, most
    lines share the last one's.
    """
    global _this_second, _this_millisecond
    millisecond = int(created * 1000)
    known, text = _this_millisecond
    if millisecond == known:
        return text
    second = millisecond // 1000
    known, prefix, offset = _this_second
    if second != known:
        local = time.localtime(second)
        minutes = local.tm_gmtoff // 60
        sign = "-" if minutes < 0 else "+"
        hours, minutes = divmod(abs(minutes), 60)
        prefix, offset = time.strftime("%Y-%m-%dT%H:%M:%S", local), f"{sign}{hours:02d}:{minutes:02d}"
        _this_second = second, prefix, offset
    text = f"{prefix}.{millisecond % 1000:03d}{offset}"
    _this_millisecond = millisecond, text
    return text


class TextFormatter(logging.Formatter):
    """``TIME LEVEL logger: message``, then the traceback if any (TEXT_FORMAT, with RFC 3339 times)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return rfc3339(record.created)

    wants_fields = False  # access_line() needs only the message

    def access_line(self, created: float, name: str, message: str, pid: int, fields: dict[str, Any] | None) -> str:
        """An access line, as format() would write its record."""
        return f"{rfc3339(created)} INFO {name}: {message}"

    def format(self, record: logging.LogRecord) -> str:
        # TEXT_FORMAT, written out: Formatter.format's dict formatting costs as much again.
        line = f"{rfc3339(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


class JSONFormatter(logging.Formatter):
    """One JSON object: ``time``, ``level``, ``logger``, ``message``, ``pid``, the EXTRA_FIELDS a
    record has, and ``traceback`` (``stack``) when it carries one (SPEC section 8).

    Our own on jsoncodec (orjson when installed), not python-json-logger: its formatter looks at
    every attribute of every record for extra ones, and took 2.5 times as long for an access
    line (5.4 us against 2.1, both on orjson; 9.2 against 6.2 on the standard library's json),
    with one more dependency.
    """

    wants_fields = True  # access_line() needs the access record's fields too

    def access_line(self, created: float, name: str, message: str, pid: int, fields: dict[str, Any] | None) -> str:
        """An access line, as format() would write its record (which would carry ``fields``)."""
        line = {"time": rfc3339(created), "level": "INFO", "logger": name, "message": message, "pid": pid}
        if fields:
            line.update(fields)
        return jsoncodec.dumps_text(line)

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,  # which worker
        }
        attributes = record.__dict__
        for name in EXTRA_FIELDS:
            if name in attributes:
                line[name] = attributes[name]
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["traceback"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return jsoncodec.dumps_text(line)
