"""Error values that travel up to the edge, and the middleware that renders HTTP errors."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from multidict import CIMultiDict

from .errorlog import TracebackLog
from .logtext import loggable, logged_path
from .requestids import HEADER_KEY as REQUEST_ID_HEADER
from .requestids import assign as assign_request_id

logger = logging.getLogger("aioserver.error")

# Set on a request that shutdown cuts off at the end of the grace period (server.py), before
# cancelling it: error_middleware answers it 503 instead of letting the cancellation through.
CUT_OFF = web.RequestKey("cut_off", bool)
CUT_OFF_MESSAGE = "server shutting down: the request was cut off"


class ConfigError(Exception):
    """A usage or configuration problem: exit status 2, one line naming source, key and problem."""

    def __init__(self, source: str, key: str | None, problem: str) -> None:
        super().__init__(source, key, problem)
        self.source = source
        self.key = key
        self.problem = problem

    def __str__(self) -> str:
        where = f"{self.source}: {self.key}" if self.key else self.source
        return f"{where}: {self.problem}"


class StartupError(Exception):
    """A runtime failure while starting (a port in use, ...): exit status 1."""


class InvalidElement(ValueError):
    """Raised by an action when an element is unfit for it: the client gets 400, not 500."""


class UpstreamError(Exception):
    """A remote service a task depends on failed or answered non-2xx: the client gets 502."""


def http_error(cls: type[web.HTTPException], message: str, **headers: str) -> web.HTTPException:
    """An aiohttp HTTP exception whose JSON body is ``{"error": message}``."""
    return cls(text=json.dumps({"error": message}), content_type="application/json", headers=headers)


# Headers of an HTTP exception that describe its plain-text body, which we replace.
_BODY_HEADERS = frozenset({"Content-Type", "Content-Length"})


# A check a request must pass before its handler (the token's, the Host's, ...): it raises an
# HTTP error to refuse, or returns None; or, when it must wait for something (a JWT's keys, a
# user's async dependency), an awaitable that does the rest. See error_middleware.
Check = Callable[[web.Request], Awaitable[None] | None]
# Around the checks and the handler: what a trusted proxy reported, handed on as a clone of the
# request (see proxy.py), given the request and what is to handle it.
Forward = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def error_middleware(
    headers: Mapping[str, str],
    tracebacks: TracebackLog | None = None,
    checks: Sequence[Check] = (),
    forward: Forward | None = None,
) -> Middleware:
    """The outermost middleware: every answer leaves through it, with ``headers`` added and its
    request id in ``X-Request-ID`` (see requestids.py).

    It renders every error as JSON and turns anything unexpected into a 500 whose error id is
    the request id; the traceback goes to the log only, under the same id, so that an operator
    can find what a client reports without the client ever seeing internals or secrets. ``tracebacks``
    writes that log: each 500 a line, each distinct traceback once, then counts (see
    errorlog.py). (Adding the headers here, not in an on_response_prepare signal, saves a
    tenth of a request's time.)

    ``checks`` run in order inside it, before the handler, each a plain function of its own
    concern's module (the app's composition says which, app.py): one middleware for all of them,
    since aiohttp's cost is per middleware, a coroutine and its frames each. With ``forward``
    (trusted proxies), the checks and the handler get the request as ``forward`` hands it on.
    """
    tracebacks = tracebacks or TracebackLog(logger)
    checks = tuple(checks)
    headers = CIMultiDict(headers)  # their names' case folded once, not on each answer

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = assign_request_id(request)
        try:
            if forward is not None:
                response = await forward(request, functools.partial(_checked, checks, handler))
            else:
                for check in checks:
                    pending = check(request)
                    if pending is not None:
                        await pending
                response = await handler(request)
        except asyncio.CancelledError:
            # A client gone (aiohttp's handler cancellation) is cancelled for good; a request
            # cut off by the shutdown is answered, and so logged by its access line, instead
            # of a reset the client could not tell from a crash.
            task = asyncio.current_task()
            if not request.get(CUT_OFF) or task is None:
                raise
            task.uncancel()
            response = web.json_response({"error": CUT_OFF_MESSAGE}, status=503)
            response.force_close()
        except Exception as exc:
            response = _answer(request, request_id, exc, tracebacks)
            if request.writer.output_size > _INTERIM:
                _cut_short(request, request_id)
        # A streamed answer has sent its headers already: it sets them itself, if it will.
        if not response.prepared:
            response.headers.update(headers)
            response.headers[REQUEST_ID_HEADER] = request_id
        return response

    return middleware


async def _checked(checks: Sequence[Check], handler: Handler, request: web.Request) -> web.StreamResponse:
    """The checks, then the handler: what error_middleware does itself without a proxy to forward."""
    for check in checks:
        pending = check(request)
        if pending is not None:
            await pending
    return await handler(request)


def _answer(request: web.Request, request_id: str, exc: Exception, tracebacks: TracebackLog) -> web.Response:
    """The answer to an error raised while handling ``request``: its JSON, logged as it deserves."""
    if isinstance(exc, web.HTTPException):
        return _render(exc)
    if isinstance(exc, InvalidElement):
        return web.json_response({"error": str(exc)}, status=400)
    if isinstance(exc, UpstreamError):
        logger.warning(
            "bad gateway while handling %s %s (request %s): %s",
            request.method,
            _logged_path(request),
            request_id,
            loggable(str(exc)),
            extra={"request_id": request_id},
        )
        return web.json_response({"error": str(exc)}, status=502)
    tracebacks.error(request_id, f"while handling {request.method} {_logged_path(request)}", exc)
    body: dict[str, Any] = {"error": f"internal error, id {request_id}", "id": request_id}
    return web.json_response(body, status=500)


# What a request's connection may carry before its answer: aiohttp's interim answer to
# ``Expect: 100-continue``, sent before the middlewares run. Any more is the answer itself.
_INTERIM = len(b"HTTP/1.1 100 Continue\r\n\r\n")


def _cut_short(request: web.Request, request_id: str) -> None:
    """An error came once the handler's own answer had begun (a stream): no other can be sent.

    Written after it, an error's answer would be taken for the rest of its body, or (past a
    Content-Length) for the answer to the next request on the connection, which may be another
    client's on a proxy's keep-alive connection. The connection is reset instead: the client
    sees an answer cut short. The answer to the error is still what the access line and the
    metrics count (0 bytes: aiohttp cannot write it on the closing connection).
    """
    logger.warning(
        "error %s came once the answer to %s %s had begun: connection reset",
        request_id,
        request.method,
        _logged_path(request),
        extra={"request_id": request_id},
    )
    if request.transport is not None:
        request.transport.abort()


def _logged_path(request: web.Request) -> str:
    """The path as the client sent it, still percent-encoded (as the access log shows it): a
    decoded ``%0A`` would forge a line. Without the query, which may carry something private."""
    return logged_path(request.rel_url.raw_path)


def _render(exc: web.HTTPException) -> web.Response:
    """An HTTP exception as a response: a JSON body for errors, redirects as they are."""
    headers = {k: v for k, v in exc.headers.items() if k not in _BODY_HEADERS}
    if exc.status < 400 or exc.content_type == "application/json":
        return web.Response(status=exc.status, text=exc.text, content_type=exc.content_type, headers=headers)
    # aiohttp's own text when it says more than its default "404: Not Found".
    message = exc.reason if exc.text in (None, f"{exc.status}: {exc.reason}") else exc.text
    return web.json_response({"error": message}, status=exc.status, headers=headers)
