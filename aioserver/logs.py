"""Logging: the process's handlers, and an access log that names identities, never secrets."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import ClassVar, TextIO

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .auth import IDENTITY
from .logtext import loggable
from .proxy import REAL_CLIENT

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """One stream handler on stderr; access lines go to the same stream, in batches."""
    logging.basicConfig(level=level.upper(), format=FORMAT)
    AccessLogger.stream = sys.stderr


class AccessLogger(AbstractAccessLogger):
    """``client scheme "METHOD /path HTTP/1.1" status bytes seconds identity``.

    Behind a trusted proxy, client and scheme are those the proxy reported (see proxy.py).

    The path is logged still percent-encoded and without its query: a decoded path could
    forge log lines, and a query is where a careless client puts a secret; what it could still
    hold (aiohttp's pure-Python parser lets a raw U+2028 through) is escaped, as are the client
    and scheme a proxy reported. The identity is the matched token's name, ``-`` when none.

    When :func:`configure_logging` has set the process up, lines are formatted here, as the
    logging module would, and written to stderr in batches (at most 0.1 s late): through
    ``logging``, one line with its record, lock and flush costs more than the request itself.
    """

    stream: ClassVar[TextIO | None] = None

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        token = request.get(IDENTITY)
        forwarded = request.get(REAL_CLIENT)
        if forwarded is None:
            client, scheme = request.remote, request.scheme
        else:  # as a proxy reported them: Forwarded's for= and proto= may be any token
            client, scheme = (loggable(str(value)) for value in forwarded)
        path = loggable(request.rel_url.raw_path)
        version = request.version
        message = (
            f'{client} {scheme} "{request.method} {path} HTTP/{version.major}.{version.minor}"'
            f" {response.status} {response.body_length} {time:.3f}s {token.name if token else '-'}"
        )
        if self.stream is None:
            self.logger.info("%s", message)
        else:
            _batch.add(self.stream, f"{_timestamp()} INFO {self.logger.name}: {message}\n")


class _Batch:
    """Lines waiting to be written together."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.stream: TextIO | None = None
        self.handle: asyncio.TimerHandle | None = None

    def add(self, stream: TextIO, line: str) -> None:
        self.stream = stream
        self.lines.append(line)
        if len(self.lines) >= 256:
            self.flush()
        elif self.handle is None:
            self.handle = asyncio.get_running_loop().call_later(0.1, self.flush)

    def flush(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        if self.lines and self.stream is not None:
            self.stream.write("".join(self.lines))
            self.stream.flush()
        self.lines.clear()


_batch = _Batch()
flush_access_log = _batch.flush

_second = -1
_prefix = ""


def _timestamp() -> str:
    """``2026-11-28 05:30:00,123``, as logging's asctime, the date part made once a second."""
    global _second, _prefix
    now = time.time()
    second = int(now)
    if second != _second:
        _second, _prefix = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
    return f"{_prefix},{int((now - second) * 1000):03d}"
