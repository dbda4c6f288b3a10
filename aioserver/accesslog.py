"""The access log: one record per request, naming identities, never secrets.

``client scheme "METHOD /path HTTP/1.1" status bytes seconds identity request-id workflow``::

    127.0.0.1 https "POST /workflow HTTP/1.1" 200 9 0.001s ci 3f2a9c01e5b7d420 "echo"

Behind a trusted proxy, client and scheme are those the proxy reported (see proxy.py). The
path is logged still percent-encoded and without its query: a decoded path could forge log
lines, and a query is where a careless client puts a secret; what it could still hold is made
fit by logtext.logged_path (its '"' and '\\' percent-encoded, what aiohttp's pure-Python parser
lets through escaped, cut at 1024 characters); the client and scheme a proxy reported and the
workflow name a client sent are escaped too. What a client sends cannot make a line longer than
one write to a pipe keeps whole (logs.PIPE_BUF): the lines of --workers never cut into each other.
The identity is the matched token's name, ``-`` when none; bytes are those of the answer's body (a
HEAD's: 0; one cut off: 0); the workflow is ``-`` but for ``POST /workflow``.

Each record also carries these as attributes (``record.status``, ``record.request_id``, ...),
which the JSON format writes as fields and a user's handler may read. Records go through
``logging`` like any other, to the ``aiohttp.access`` logger, at INFO: hidden below that level,
and not made at all with ``--no-access-log`` (server.py gives aiohttp no access logger).

While aioserver's own handler is the only one a record would reach (no handler or filter of
anyone else's: logs.sole_handler, looked up again every 0.1 s), the line is written straight
into it, made by its formatter as it would make it of the record, without the record: making a
LogRecord and passing it through logging's calls took a sixth of an access line's cost (1 us
of 6). Any handler added (an extension's, journald's) gets the records within 0.1 s.
"""

from __future__ import annotations

import logging
import os
import time
from logging import LogRecord
from typing import Any

from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.abc import AbstractAccessLogger

from .auth import IDENTITY
from .logs import EXTRA_FIELDS, BatchingHandler, JSONFormatter, TextFormatter, sole_handler
from .logtext import loggable, logged_path
from .proxy import REAL_CLIENT
from .requestids import REQUEST_ID
from .views import WORKFLOW

RECHECK = 0.1  # seconds an access logger's route (sole_handler) is trusted before it is looked up again
LONGEST_NAME = 128  # characters of a workflow name logged: a client may send a megabyte of one
# Characters of a method logged: aiohttp's C parser takes only the methods it knows, its
# pure-Python one any token as long as the request line (see logtext.LONGEST_PATH).
LONGEST_METHOD = 32
_NO_BODY = frozenset({204, 304})


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access logger for our lines (see the module's docstring)."""

    proxied = False  # whether a trusted proxy may have reported the client (ProxiedAccessLogger)

    @property
    def enabled(self) -> bool:
        # Asked by aiohttp once per connection: when False, it does no access-log work at all.
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):  # the level went up since the connection began
            return
        # What a request may lack is looked up with try: free when it is there, as it is for
        # nearly every request (request.get is Mapping.get, in Python, raising inside).
        client, scheme = request.remote, request.scheme
        if self.proxied:
            try:  # as a proxy reported them: Forwarded's for= and proto= may be any token
                client, scheme = (loggable(str(value)) for value in request[REAL_CLIENT])
            except KeyError:
                pass
        raw_path = request.rel_url.raw_path
        path = raw_path if raw_path in _fit_paths else _path(raw_path)
        method = request.method
        if len(method) > LONGEST_METHOD:
            method = method[:LONGEST_METHOD] + "..."
        version = request.version
        protocol = _PROTOCOLS.get(version) or f"HTTP/{version.major}.{version.minor}"
        status = response.status
        size = _body_bytes(method, status, response)
        try:
            name = request[IDENTITY].name
            identity: str | None = name if name in _fit_names else _fitting(name)
        except KeyError:
            identity = None
        try:
            request_id: str | None = request[REQUEST_ID]
        except KeyError:
            request_id = None
        try:
            workflow_name = request[WORKFLOW]
            workflow, shown = _names.get(workflow_name) or _workflow(workflow_name)
        except KeyError:
            workflow, shown = None, "-"
        message = (
            f'{client} {scheme} "{method} {path} {protocol}" {status} {size}'
            f" {time:.3f}s {identity or '-'} {request_id or '-'} {shown}"
        )
        now = _clock()
        handler, until = _routes.get(logger, _UNKNOWN)
        if now >= until:  # looked up again at most every RECHECK seconds (see the module's docstring)
            handler = sole_handler(logger)
            _routes[logger] = handler, now + RECHECK
        if handler is not None:
            # Ours is the only handler the record would reach: the line its formatter would
            # make of it, without the record (see the module's docstring).
            formatter: TextFormatter | JSONFormatter = handler.formatter  # type: ignore[assignment]
            fields = None
            if formatter.wants_fields:
                fields = {
                    "client": client,
                    "scheme": scheme,
                    "method": method,
                    "path": path,
                    "status": status,
                    "bytes": size,
                    "duration": _microseconds(time),
                    "identity": identity,
                    "request_id": request_id,
                    "workflow": workflow,
                }
            handler.add_line(formatter.access_line(now, logger.name, message, _pid[0], fields))
            return
        # A copy of the template (already holding every key below: no resizing), then ours.
        attributes = (_templates.get(logger.name) or _template(logger.name)).copy()
        attributes["created"] = now
        attributes["msecs"] = int((now - int(now)) * 1000) + 0.0  # as LogRecord (gh-89047)
        attributes["relativeCreated"] = (now - _started) * 1000
        attributes["msg"] = message
        attributes["client"] = client
        attributes["scheme"] = scheme
        attributes["method"] = method
        attributes["path"] = path
        attributes["status"] = status
        attributes["bytes"] = size
        attributes["duration"] = _microseconds(time)
        attributes["identity"] = identity
        attributes["request_id"] = request_id
        attributes["workflow"] = workflow
        record = _new_record(LogRecord)
        record.__dict__ = attributes
        logger.handle(record)


def _microseconds(seconds: float) -> float:
    """A duration for the fields (JSON), to the microsecond, at half the cost of round(); the text line has its own."""
    return int(seconds * 1_000_000) / 1_000_000


class ProxiedAccessLogger(AccessLogger):
    """The access logger behind trusted proxies: the client and scheme they reported, when they did."""

    proxied = True


def _body_bytes(method: str, status: int, response: web.StreamResponse) -> int:
    """The bytes of the answer's body handed to the connection, as nginx's ``$body_bytes_sent``.

    None until the answer ended (aiohttp counts what was written once it ends: an answer cut
    off while it was written counts 0); then a body sent whole, as its Content-Length says; a
    streamed one, what was written after the headers (its chunks' framing included).
    """
    written = response.body_length  # headers included
    if not written or method == "HEAD" or status in _NO_BODY or status < 200:
        return 0
    if type(response) is web.Response:  # nearly every answer: its body is all there (nothing compresses it)
        body = response.body
        if isinstance(body, bytes):
            return len(body)
    length = response.content_length
    if length is not None:
        return length
    return max(written - _head_length(response), 0)


def _head_length(response: web.StreamResponse) -> int:
    """The length of the status line and headers that aiohttp wrote (ASCII, CRLF-terminated)."""
    size = len(f"HTTP/1.1 {response.status} {response.reason}\r\n\r\n")
    for name, value in response.headers.items():
        size += len(name) + len(value) + 4  # ": " and CRLF
    return size


# Per logger: the handler its lines go straight into (None: through logging), and until when
# that holds. Walking the loggers' handlers for each line cost a tenth of the line.
_routes: dict[logging.Logger, tuple[BatchingHandler | None, float]] = {}
_UNKNOWN: tuple[BatchingHandler | None, float] = (None, 0.0)


def _fitting(name: str) -> str:
    """An identity's name as one field of a line: a JWT's ``sub`` is the identity provider's to
    choose, and a name may hold spaces; cut at LONGEST_NAME, spaces as ``%20``, escaped."""
    if len(name) <= LONGEST_NAME and " " not in name and name.isprintable():  # a token's name, nearly always
        _remember(_fit_names, name)
        return name
    cut = name[:LONGEST_NAME] + ("..." if len(name) > LONGEST_NAME else "")
    return loggable(cut.replace(" ", "%20"))


_names: dict[str, tuple[str, str]] = {}
# Paths and identity names that a line shows as they are, as the last look found them: one set
# look-up instead of the checks of logged_path or _fitting. Bounded: clients choose paths (and
# a JWT's issuer its names); emptied when full.
_fit_paths: set[str] = set()
_fit_names: set[str] = set()
_REMEMBERED = 1024
_REMEMBERED_PATH = 256  # characters: what clients make up is held in 256 KiB at most
_PROTOCOLS = {HttpVersion10: "HTTP/1.0", HttpVersion11: "HTTP/1.1"}


def _path(raw_path: str) -> str:
    """logged_path(), remembering a path (of a route's length) that it leaves as it is."""
    path = logged_path(raw_path)
    if path == raw_path and len(path) <= _REMEMBERED_PATH:
        _remember(_fit_paths, path)
    return path


def _remember(known: set[str], value: str) -> None:
    if len(known) >= _REMEMBERED:
        known.clear()
    known.add(value)


def _workflow(name: str) -> tuple[str, str]:
    """A workflow name fit for a log line, cut at LONGEST_NAME and escaped: as a field, and quoted
    for the text line (its backslashes and quotes escaped too, so that it stays one field).

    The configured names are made once; names clients made up are forgotten rather than kept
    growing, and a longer one is never kept (the key would be all of it: a megabyte each).
    """
    shown = _names.get(name)
    if shown is None:
        cut = name[:LONGEST_NAME] + ("..." if len(name) > LONGEST_NAME else "")
        quoted = cut.replace("\\", "\\\\").replace('"', '\\"')
        shown = loggable(cut), f'"{loggable(quoted)}"'
        if len(name) <= LONGEST_NAME:
            if len(_names) >= 1024:
                _names.clear()
            _names[name] = shown
    return shown


# Access records are made from a template, made once per process and logger: LogRecord()
# asks for the pid, the thread, the process name and the caller's file each time, which here
# never change; a copy of them costs a fraction as much, and every attribute a formatter may
# ask for is there, as on any record.
_templates: dict[str, dict[str, Any]] = {}
_new_record = object.__new__
_clock = time.time
_first = LogRecord("", 0, "", 0, "", (), None)
_started = _first.created - _first.relativeCreated / 1000  # logging's start: relativeCreated counts from it


def _template(name: str) -> dict[str, Any]:
    template = LogRecord(name, logging.INFO, __file__, 0, "", (), None, "log").__dict__
    template.update(dict.fromkeys(EXTRA_FIELDS))  # an access record's own attributes
    _templates[name] = template
    return template


_pid = [os.getpid()]


def _forked() -> None:
    _templates.clear()  # a worker's pid is not its parent's
    _pid[0] = os.getpid()


os.register_at_fork(after_in_child=_forked)
