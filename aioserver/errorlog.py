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
from dataclasses import dataclass

from .logtext import loggable

INTERVAL = 60.0  # seconds
MOST = 256  # distinct tracebacks followed at once; more are logged in full, as they come
LONGEST = 300  # characters of an exception's message on a repeat's line

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
        """Log error ``error_id``, raised while ``doing`` (one line, with the traceback if new)."""
        key = signature(exc)
        seen = self._seen.get(key)
        if seen is not None:
            seen.repeats += 1
            self.logger.error("error %s %s: %s (traceback as error %s)", error_id, doing, describe(exc), seen.first)
            return
        if len(self._seen) < MOST:
            loop = asyncio.get_running_loop()
            self._seen[key] = _Seen(error_id, loop.time(), loop.call_later(self.interval, self._count, key))
        self.logger.error("error %s %s", error_id, doing, exc_info=exc)

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
    ``File`` lines.
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
            parts.extend(line for line in _text(current).splitlines() if line.lstrip().startswith('File "'))
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return tuple(parts)


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
