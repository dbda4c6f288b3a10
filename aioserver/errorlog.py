"""The log of unexpected errors: one line per error, each distinct traceback once, then counts.

A workflow that fails on every request would otherwise write a traceback of some twenty
lines per request: at a thousand requests a second, the log is the outage. So every error
keeps its line (its id, what was being done, the exception), but a traceback already logged
is not logged again: the line names the error that carried it, and at the end of each
interval in which it came back, one more line counts the repeats::

    ERROR aioserver.error: error 3f2a... while handling POST /workflow
    Traceback (most recent call last): ...
    ERROR aioserver.error: error 9c01... while handling POST /workflow: RuntimeError: ... (traceback as error 3f2a...)
    WARNING aioserver.error: 1712 more like error 3f2a... in the last 60 s

Tracebacks are the same when their exceptions have the same types raised at the same
places, whatever their messages. One that has not come back for a whole interval is
forgotten: its next occurrence is logged in full again.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Sequence
from dataclasses import dataclass

from .logtext import loggable

INTERVAL = 60.0  # seconds
MOST = 256  # distinct tracebacks followed at once; more are logged in full, as they come
LONGEST = 300  # characters of an exception's message on a repeat's line
# Characters of each message in a full traceback: an action that names the client's element in
# its message would otherwise make a line of megabytes, which journald (LineMax=48K) and log
# shippers cut into pieces, a JSON line into pieces that are not JSON.
LONGEST_MESSAGE = 2000

Signature = tuple[object, ...]


@dataclass(slots=True)
class _Seen:
    first: str  # the id of the error whose traceback was logged
    since: float  # when the current interval began (the loop's time)
    timer: asyncio.TimerHandle
    repeats: int = 0


class TracebackLog:
    """Logs unexpected errors (to ``aioserver.error``), each distinct traceback once per run of repeats."""

    def __init__(self, logger: logging.Logger | None = None, interval: float = INTERVAL) -> None:
        self.logger = logger or logging.getLogger("aioserver.error")
        self.interval = interval
        self._seen: dict[Signature, _Seen] = {}

    def error(self, error_id: str, doing: str, exc: BaseException) -> None:
        """Log error ``error_id``, raised while ``doing`` (one line, with the traceback if new).

        The error id is the request's id: the records carry it as ``request_id`` too (a JSON line's field).
        """
        key = signature(exc)
        seen = self._seen.get(key)
        if seen is not None:
            seen.repeats += 1
            self.logger.error(
                "error %s %s: %s (traceback as error %s)",
                error_id,
                doing,
                describe(exc),
                seen.first,
                extra={"request_id": error_id},
            )
            return
        if len(self._seen) < MOST:
            loop = asyncio.get_running_loop()
            self._seen[key] = _Seen(error_id, loop.time(), loop.call_later(self.interval, self._count, key))
        if self.logger.isEnabledFor(logging.ERROR):
            # The record carries the exception as usual, and the text of its traceback made here,
            # with each message escaped: a formatter prints a record's exc_text as it is.
            exc_info = (type(exc), exc, exc.__traceback__)
            record = self.logger.makeRecord(
                self.logger.name,
                logging.ERROR,
                __file__,
                0,
                "error %s %s",
                (error_id, doing),
                exc_info,
                extra={"request_id": error_id},
            )
            record.exc_text = formatted(exc)
            self.logger.handle(record)

    def _count(self, key: Signature) -> None:
        """The end of an interval: log the repeats it had, or forget a traceback that had none."""
        seen = self._seen[key]
        if not seen.repeats:
            del self._seen[key]
            return
        self._log_count(seen)
        seen.timer = asyncio.get_running_loop().call_later(self.interval, self._count, key)

    def _log_count(self, seen: _Seen) -> None:
        now = asyncio.get_running_loop().time()
        self.logger.warning("%d more like error %s in the last %.3g s", seen.repeats, seen.first, now - seen.since)
        seen.repeats = 0
        seen.since = now

    def flush(self) -> None:
        """Log the counts not logged yet (when the server stops), and forget everything."""
        for seen in self._seen.values():
            seen.timer.cancel()
            if seen.repeats:
                self._log_count(seen)
        self._seen.clear()


def signature(exc: BaseException) -> Signature:
    """What makes two tracebacks the same: each exception's type and the places it passed through.

    Along the chain of causes and contexts, as the traceback shows them. An exception that
    was never raised here (a worker process's, carried as text) counts by its text's
    ``File`` lines before its message (see :func:`_carried`).
    """
    parts: list[object] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        kind = type(current)
        parts.append(f"{kind.__module__}.{kind.__qualname__}")
        if current.__traceback__ is not None:
            parts.extend((f.f_code.co_filename, line) for f, line in traceback.walk_tb(current.__traceback__))
        else:
            frames, _ = _carried(_text(current))  # not the message's lines: the client may write them
            parts.extend(line for line in frames if line.lstrip().startswith('File "'))
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return tuple(parts)


HEADER = "Traceback (most recent call last):"
_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


def formatted(exc: BaseException) -> str:
    """The traceback of ``exc`` and its causes, as logging prints one, each message escaped.

    A message is the one part of a traceback that a client may write (``raise
    ValueError(f"bad: {element}")``): left raw, its line feed starts a forged log line. Escaped
    with :func:`loggable`, it stays on its line; the frames keep theirs.
    """
    return _formatted(traceback.TracebackException.from_exception(exc))


def _formatted(top: traceback.TracebackException) -> str:
    chain: list[tuple[str | None, traceback.TracebackException]] = []
    current: traceback.TracebackException | None = top
    while current is not None:  # from_exception has cut any cycle
        if current.__cause__ is not None:
            link, following = _CAUSE, current.__cause__
        elif current.__context__ is not None and not current.__suppress_context__:
            link, following = _CONTEXT, current.__context__
        else:
            link, following = None, None
        chain.append((link, current))
        current = following
    parts: list[str] = []
    for link, entry in reversed(chain):  # the first cause first
        if link is not None:
            parts.append(link)
        parts.extend(_formatted_one(entry))
    return "".join(parts).rstrip("\n")


def _formatted_one(entry: traceback.TracebackException) -> list[str]:
    parts: list[str] = []
    if entry.stack:
        parts.append(HEADER + "\n")
        parts.extend(entry.stack.format())
    # Notes come last, each split into lines by format_exception_only: escaped here whole instead.
    notes, entry.__notes__ = entry.__notes__, None
    only = list(entry.format_exception_only())
    entry.__notes__ = notes
    text = "".join(only)
    kind, _, message = text.partition(": ")
    frames, tail = _carried(message.rstrip("\n"))
    if not entry.stack and frames:  # a worker process's traceback, carried as text (its message)
        parts.append(f"{kind}: {HEADER}\n")
        parts.extend(loggable(line) + "\n" for line in frames)
        parts.append(loggable(_cut(tail)) + "\n")
        return parts
    if len(message) > LONGEST_MESSAGE:  # cut before it is escaped: escaping a megabyte takes a while
        cut = _cut(message.removesuffix("\n"))
        only = [f"{kind}: {cut}"]
    # Each piece is one line of the format (the type and message, a note, a SyntaxError's line).
    parts.extend(loggable(piece.removesuffix("\n")) + "\n" for piece in only)
    if isinstance(notes, Sequence) and not isinstance(notes, str):
        parts.extend(loggable(_cut(_note(note))) + "\n" for note in notes)
    for number, member in enumerate(entry.exceptions or (), 1):  # an ExceptionGroup's, indented
        parts.append(f"+---------------- {number} ----------------\n")
        parts.extend(f"| {line}\n" for line in _formatted(member).split("\n"))
    return parts


def _cut(message: str) -> str:
    """``message`` cut at :data:`LONGEST_MESSAGE` characters, saying how many more it had."""
    if len(message) <= LONGEST_MESSAGE:
        return message
    return f"{message[:LONGEST_MESSAGE]}... ({len(message) - LONGEST_MESSAGE} more characters)"


def _carried(text: str) -> tuple[list[str], str]:
    """A traceback carried as text (a worker process's): its frame lines, and the rest.

    The rest begins at the first unindented line after the header: the exception's message,
    which is the client's to write, frame-like lines and all (the frames of a chained exception
    that follow it, too, cannot be told from it). Not a traceback: no frames, all the rest.
    """
    lines = text.split("\n")
    if not lines or lines[0] != HEADER:
        return [], text
    end = 1
    while end < len(lines) and lines[end][:1].isspace():
        end += 1
    return lines[1:end], "\n".join(lines[end:])


def _note(note: object) -> str:
    try:
        return note if isinstance(note, str) else str(note)
    except Exception:  # as _text: a note that cannot be printed must not fail the log
        return "<note str() failed>"


def describe(exc: BaseException) -> str:
    """``Type: message`` on one line, the message cut at :data:`LONGEST` characters."""
    message = _text(exc)
    if len(message) > LONGEST:
        message = message[:LONGEST] + "..."
    return loggable(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # an exception whose __str__ fails must not fail the error's own log
        return f"<unprintable {type(exc).__name__}>"
