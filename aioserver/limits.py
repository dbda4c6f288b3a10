"""Limits that keep one process bounded whatever its clients do.

- Request bodies: over ``max_body_size`` is 413 before reading it when the length is declared,
  and as soon as the limit is passed otherwise (aiohttp's ``client_max_size``); a body that
  does not arrive within ``timeout_request_body`` is 408.
- Workflows: beyond ``limit_concurrency`` requests at once, 503 with ``Retry-After``, before
  the body is read (so slow uploads hold no more bodies than the limit); one running longer
  than ``timeout_workflow`` is 504, its async work cancelled, its sync work (a thread that
  cannot be interrupted) abandoned to finish on its own.
- Connections: at most ``limit_connections`` open in this process, counted from accept; at
  the limit an idle or handshaking one makes room, else one whose client has taken nothing of
  its answer for a while, else the new one gets 503; one whose answer makes no progress for
  ``timeout_send`` is reset (see :mod:`aioserver.connections`). A TLS handshake has
  ``timeout_handshake``; a client that takes longer than ``timeout_keep_alive`` to send a
  request's headers is cut off by aiohttp's keep-alive timer, which runs from the connection's
  start and after each response (slowloris).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from .connections import Connections
from .errors import http_error
from .expectations import ignoring_unknown_expectations
from .options import Settings
from .requestids import HEADER as REQUEST_ID_HEADER
from .requestids import REQUEST_ID
from .requestids import assign as assign_request_id

logger = logging.getLogger("aioserver.limits")
T = TypeVar("T")


class WorkflowLimits:
    """Counts workflow requests in progress and bounds their workflows' time.

    A request takes its slot with ``with limits:`` as soon as it is authorized, before its body
    is read, and keeps it until its answer is made: the limit bounds the bodies held in memory
    as well as the workflows running.

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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._interval = min(1.0, timeout / 4)

    def __enter__(self) -> None:
        """Take a slot, or raise 503 when every one is taken."""
        if self.running >= self.concurrency:
            raise http_error(
                web.HTTPServiceUnavailable, "too many workflows running, retry later", **{"Retry-After": "1"}
            )
        self.running += 1

    def __exit__(self, *exc_info: object) -> None:
        self.running -= 1

    async def run(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work()`` within the time limit; raise 504 as an HTTP error."""
        # The loop of the last run, when it is still the one running this task: Python 3.11's
        # get_running_loop() and current_task() without a loop make a getpid() system call
        # each. current_task(loop) of a loop not running here is None: then it is looked up.
        loop = self._loop
        task = asyncio.current_task(loop) if loop is not None else None
        if loop is None or task is None:
            running = asyncio.get_running_loop()
            if running is not loop:
                self._sweeper = None  # one of a loop that ended would never run
            loop = self._loop = running
            task = asyncio.current_task(loop)
            assert task is not None
        self._deadlines[task] = loop.time() + self.timeout
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._interval, self._sweep)
        try:
            return await work()
        except asyncio.CancelledError:
            if task not in self._expired:
                raise
            task.uncancel()
            raise http_error(web.HTTPGatewayTimeout, f"the workflow took longer than {self.timeout:g}s") from None
        finally:
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


def check_length(request: web.Request) -> None:
    """413 when the declared body length is over the size limit, without waiting for the body."""
    declared = request.content_length
    if declared is not None and declared > request.client_max_size:
        raise web.HTTPRequestEntityTooLarge(max_size=request.client_max_size, actual_size=declared)


async def read_body(request: web.Request, timeout: float) -> bytes:
    """The request body, within ``timeout`` seconds; after :func:`check_length`."""
    if request.content.is_eof():  # the whole body came with the head: nothing to wait for
        return await request.read()
    try:
        async with asyncio.timeout(timeout):
            return await request.read()  # raises 413 itself once past client_max_size
    except TimeoutError:
        raise http_error(web.HTTPRequestTimeout, f"body not received within {timeout:g}s") from None


class _RequestHandler(RequestHandler):
    """aiohttp's protocol, answering a request that is not valid HTTP with a JSON 400.

    aiohttp's own answer echoes the offending line, and its log line carries it with a
    traceback: an ``Authorization`` header with one bad byte would put a token in the log.
    Here neither the answer nor the log holds any of the client's bytes.
    """

    __slots__ = ("_connections",)

    def __init__(self, connections: Connections, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._connections = connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # Ours to watch until connection_lost; aiohttp's handler forgets it once it closes it.
        self._connections.made(self, cast(asyncio.Transport, transport))

    def connection_lost(self, exc: BaseException | None) -> None:
        self._connections.discard(self)
        super().connection_lost(exc)

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the response has started; cannot send an error instead")
        problem = type(exc).__name__ if exc is not None else "error"
        # Its id, for the answer and the access line: the one it had if the middleware saw it.
        request_id = request.get(REQUEST_ID) or assign_request_id(request)
        logger.debug("malformed request from %s: %s", request.remote, problem)
        if status >= 500:
            logger.error(
                "error %s while handling a request from %s (request %s)",
                problem,
                request.remote,
                request_id,
                extra={"request_id": request_id},
            )
        text = "malformed HTTP request" if status < 500 else "internal error"
        # As app.HEADERS, on any listener.
        headers = {"Server": "aioserver", "X-Content-Type-Options": "nosniff", REQUEST_ID_HEADER: request_id}
        response = web.json_response({"error": f"{text} ({problem})"}, status=status, headers=headers)
        response.force_close()
        return response


class _ConnectionLimit:
    """aiohttp's Server, as the listeners' protocol factory, admitting connections (see connections.py).

    Everything but the factory call is the wrapped Server's, so the runner's shutdown and the
    sites work on it unchanged.
    """

    def __init__(self, server: web.Server, connections: Connections) -> None:
        self._server = server
        self._connections = connections

    def __call__(self) -> asyncio.BaseProtocol:
        return self._connections.accept(self.make_handler)

    def make_handler(self) -> RequestHandler:
        """A new request handler; as Server.__call__ does, with our class (its loop and kwargs are aiohttp's)."""
        return _RequestHandler(self._connections, self._server, loop=self._server._loop, **self._server._kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class LimitedRunner(web.AppRunner):
    """An AppRunner applying the connection limit and aiohttp's request-head limits.

    ``connections`` is shared by every runner of a process (one limit for all its listeners).
    """

    def __init__(
        self, app: web.Application, settings: Settings, connections: Connections | None = None, **kwargs: Any
    ) -> None:
        super().__init__(
            app,
            max_line_size=settings.max_line_size,
            max_field_size=settings.max_field_size,
            max_headers=settings.max_headers,
            **kwargs,
        )
        # Not "connections or ...": an empty Connections is falsy (it has a length).
        self.connections = (
            connections if connections is not None else Connections(settings.limit_connections, settings.timeout_send)
        )
        self._shut_down = False

    async def shutdown(self) -> None:
        """The app's on_shutdown hooks, once: serve() runs them as its drain begins (aiohttp's
        own order: before waiting for the requests), and aiohttp's cleanup would run them again."""
        if not self._shut_down:
            self._shut_down = True
            await super().shutdown()

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.request_factory = ignoring_unknown_expectations(server.request_factory)
        return cast(web.Server, _ConnectionLimit(server, self.connections))

    def make_handler(self) -> RequestHandler:
        """A request handler for a connection accepted outside aiohttp's server (TLS listeners)."""
        assert isinstance(self.server, _ConnectionLimit)
        return self.server.make_handler()
