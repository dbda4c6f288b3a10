"""Limits that keep one process bounded whatever its clients do.

- Request bodies: over ``max_body_size`` is 413 before reading it when the length is declared,
  and as soon as the limit is passed otherwise (aiohttp's ``client_max_size``); a body that
  does not arrive within ``timeout_request_body`` is 408.
- Workflows: beyond ``limit_concurrency`` running at once, 503 with ``Retry-After``; one
  running longer than ``timeout_workflow`` is 504, its async work cancelled, its sync work
  (a thread that cannot be interrupted) abandoned to finish on its own.
- Connections: beyond ``limit_connections`` open in this process, a new one is answered 503
  and closed, and the log says so once per episode. A client that takes longer than
  ``timeout_keep_alive`` to send a request's headers is cut off by aiohttp's keep-alive
  timer, which runs from the connection's start and after each response (slowloris).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from .errors import http_error
from .expectations import ignoring_unknown_expectations
from .options import Settings

logger = logging.getLogger("aioserver.limits")
T = TypeVar("T")

OVERLOADED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b'Connection: close\r\nContent-Length: 35\r\n\r\n{"error": "too many connections"}\r\n'
)


class WorkflowLimits:
    """Counts running workflows and bounds their time.

    One sweeper, run every quarter of the time limit (at most every second) while workflows
    run, cancels those past their deadline: cheaper per request than a timer each, and a
    time limit of seconds needs no finer grain.
    """

    def __init__(self, concurrency: int, timeout: float) -> None:
        self.concurrency = concurrency
        self.timeout = timeout
        self.running = 0
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._interval = min(1.0, timeout / 4)

    async def run(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work()`` within the limits; raise 503 or 504 as HTTP errors."""
        if self.running >= self.concurrency:
            raise http_error(
                web.HTTPServiceUnavailable, "too many workflows running, retry later", **{"Retry-After": "1"}
            )
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        self._deadlines[task] = loop.time() + self.timeout
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._interval, self._sweep)
        self.running += 1
        try:
            return await work()
        except asyncio.CancelledError:
            if task not in self._expired:
                raise
            task.uncancel()
            raise http_error(web.HTTPGatewayTimeout, f"the workflow took longer than {self.timeout:g}s") from None
        finally:
            self.running -= 1
            del self._deadlines[task]
            self._expired.discard(task)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for task, deadline in self._deadlines.items():
            if deadline <= now and task not in self._expired:
                self._expired.add(task)
                task.cancel()
        self._sweeper = loop.call_later(self._interval, self._sweep) if self._deadlines else None


async def read_body(request: web.Request, timeout: float) -> bytes:
    """The request body, within the size limit and ``timeout`` seconds."""
    declared = request.content_length
    if declared is not None and declared > request.client_max_size:
        raise web.HTTPRequestEntityTooLarge(max_size=request.client_max_size, actual_size=declared)
    if request.content.is_eof():  # the whole body came with the head: nothing to wait for
        return await request.read()
    try:
        async with asyncio.timeout(timeout):
            return await request.read()  # raises 413 itself once past client_max_size
    except TimeoutError:
        raise http_error(web.HTTPRequestTimeout, f"body not received within {timeout:g}s") from None


class _Refuse(asyncio.Protocol):
    """A protocol for a connection over the limit: answer 503, close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(OVERLOADED)
        transport.close()


class _RequestHandler(RequestHandler):
    """aiohttp's protocol, answering a request that is not valid HTTP with a JSON 400.

    aiohttp's own answer echoes the offending line, and its log line carries it with a
    traceback: an ``Authorization`` header with one bad byte would put a token in the log.
    Here neither the answer nor the log holds any of the client's bytes.
    """

    __slots__ = ()

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the response has started; cannot send an error instead")
        problem = type(exc).__name__ if exc is not None else "error"
        logger.debug("malformed request from %s: %s", request.remote, problem)
        if status >= 500:
            logger.error("error %s while handling a request from %s", problem, request.remote)
        text = "malformed HTTP request" if status < 500 else "internal error"
        headers = {"Server": "aioserver", "X-Content-Type-Options": "nosniff"}  # as app.HEADERS, on any listener
        response = web.json_response({"error": f"{text} ({problem})"}, status=status, headers=headers)
        response.force_close()
        return response


class _ConnectionLimit:
    """aiohttp's Server, as the listeners' protocol factory, refusing connections beyond a limit.

    Everything but the factory call is the wrapped Server's, so the runner's shutdown and the
    sites work on it unchanged.
    """

    def __init__(self, server: web.Server, max_connections: int) -> None:
        self._server = server
        self._max_connections = max_connections
        self._at_limit = False

    def __call__(self) -> asyncio.Protocol:
        if len(self._server.connections) < self._max_connections:
            self._at_limit = False
            # As Server.__call__ does, with our protocol class (its loop and kwargs are aiohttp's).
            return _RequestHandler(self._server, loop=self._server._loop, **self._server._kwargs)
        if not self._at_limit:  # once per episode, not once per refused connection
            self._at_limit = True
            logger.warning("connection limit reached: %d open, refusing new ones", self._max_connections)
        return _Refuse()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class LimitedRunner(web.AppRunner):
    """An AppRunner applying the connection limit and aiohttp's request-head limits."""

    def __init__(self, app: web.Application, settings: Settings, **kwargs: Any) -> None:
        super().__init__(
            app,
            max_line_size=settings.max_line_size,
            max_field_size=settings.max_field_size,
            max_headers=settings.max_headers,
            **kwargs,
        )
        self._max_connections = settings.limit_connections

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.request_factory = ignoring_unknown_expectations(server.request_factory)
        return cast(web.Server, _ConnectionLimit(server, self._max_connections))
