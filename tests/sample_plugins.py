"""Dependencies and extensions for the tests, referenced by dotted path."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import time
from typing import Any

from aiohttp import web

from aioserver.auth import IDENTITY
from aioserver.tls import client_subject

SEEN: list[str] = []


def add_whoami(app: web.Application) -> None:
    """An extension: a route that reports who is calling."""

    async def whoami(request: web.Request) -> web.Response:
        token = request.get(IDENTITY)
        return web.json_response({"name": token.name if token else None, "client_subject": client_subject(request)})

    app.router.add_get("/whoami", whoami)


class AddRoutes:
    """A class extension: instantiated once, then called with the app."""

    def __call__(self, app: web.Application) -> None:
        async def hello(request: web.Request) -> web.Response:
            return web.json_response("hello")

        app.router.add_get("/hello", hello)


def record_path(request: web.Request) -> None:
    """A sync dependency."""
    SEEN.append(request.path)


async def deny_header(request: web.Request) -> None:
    """An async dependency denying requests that carry X-Deny."""
    if "X-Deny" in request.headers:
        raise web.HTTPForbidden(reason="denied by policy")


class RequireAgent:
    """A class dependency, instantiated once without arguments."""

    def __call__(self, request: web.Request) -> None:
        if request.headers.get("User-Agent", "").startswith("evil"):
            raise web.HTTPForbidden()


def crash(request: web.Request) -> None:
    raise RuntimeError("dependency bug: secret-in-dependency")


def add_client(app: web.Application) -> None:
    """An extension: a route that reports the client address and scheme the handlers see."""

    async def client(request: web.Request) -> web.Response:
        return web.json_response({"remote": request.remote, "scheme": request.scheme, "host": request.host})

    app.router.add_get("/client", client)


def add_items(app: web.Application) -> None:
    """An extension: a resource with a variable part, for every method, and a fixed one."""

    async def item(request: web.Request) -> web.Response:
        return web.json_response({"id": request.match_info["id"], "method": request.method})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"requests": 1})

    app.router.add_route("*", r"/items/{id:\d+}", item)
    app.router.add_get("/stats", stats)


def slow_start(app: web.Application) -> None:
    """An extension whose start-up takes a second, announced on stderr: a window for signals."""

    async def starting(app: web.Application) -> None:
        print("slow start begins", file=sys.stderr, flush=True)
        await asyncio.sleep(1)

    app.on_startup.append(starting)


def slow_extension(app: web.Application) -> None:
    """An extension that takes a second to add its routes, announced on stderr."""
    print("extending slowly", file=sys.stderr, flush=True)
    time.sleep(1)


def add_unsent(app: web.Application) -> None:
    """An extension: an answer left partly in the server's transport once its handler has returned.

    Any answer a little bigger than what the kernel takes of it ends so; here the socket's send
    buffer is made tiny first, so that the kernel takes a few KiB and the rest (under the
    transport's 64 KiB high-water mark: the handler does not wait for it) stays in the transport.
    """

    async def unsent(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return web.json_response(["x" * 40_000])

    app.router.add_get("/unsent", unsent)


def add_stream(app: web.Application) -> None:
    """An extension: an answer streamed in two parts a minute apart."""

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first part\n")
        await asyncio.sleep(60)
        await response.write(b"second part\n")
        return response

    app.router.add_get("/stream", stream)


def slow_cleanup(app: web.Application) -> None:
    """An extension whose cleanup takes 4 s (closing a client, flushing a queue...)."""

    async def cleanup(app: web.Application) -> None:
        await asyncio.sleep(4)
        print("slow cleanup done", file=sys.stderr, flush=True)

    app.on_cleanup.append(cleanup)


def add_feed(app: web.Application) -> None:
    """An extension: a long-lived answer (a feed) that its on_shutdown hook tells to end."""
    ending = asyncio.Event()

    async def feed(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"open\n")
        await ending.wait()
        await response.write(b"closed\n")
        return response

    async def end_feeds(app: web.Application) -> None:
        ending.set()

    app.router.add_get("/feed", feed)
    app.on_shutdown.append(end_feeds)


def add_chunks(app: web.Application) -> None:
    """An extension: an answer streamed in chunks (chunked transfer coding, no Content-Length)."""

    async def chunks(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b"a" * 10, b"b" * 300):
            await response.write(part)
        await response.write_eof()
        return response

    app.router.add_get("/chunks", chunks)


def add_broken_stream(app: web.Application) -> None:
    """An extension: an answer that fails once it has begun (GET /broken/{framing}/{error}).

    ``framing``: ``length`` (Content-Length: 100) or ``chunked``; ``error``: ``raise`` (a bug:
    RuntimeError) or ``forbidden`` (web.HTTPForbidden), raised after the first 9 bytes.
    """

    async def broken(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        if request.match_info["framing"] == "chunked":
            response.enable_chunked_encoding()
        else:
            response.content_length = 100
        await response.prepare(request)
        await response.write(b"part one\n")
        if request.match_info["error"] == "forbidden":
            raise web.HTTPForbidden()
        raise RuntimeError("the stream broke")

    app.router.add_get("/broken/{framing}/{error}", broken)


# What a user's logging handler sees of each record (RECORDS_FILE, one JSON object a line).
RECORD_FIELDS = (
    "name", "levelname", "client", "scheme", "method", "path", "status", "bytes", "duration", "identity",
    "request_id", "workflow",
)  # fmt: skip


class RecordsToFile(logging.Handler):
    """A user's handler: every record it is given, as JSON, to the file named by RECORDS_FILE."""

    def emit(self, record: logging.LogRecord) -> None:
        seen: dict[str, Any] = {name: getattr(record, name, None) for name in RECORD_FIELDS}
        seen["message"] = record.getMessage()
        with open(os.environ["RECORDS_FILE"], "a") as file:
            file.write(json.dumps(seen) + "\n")


def log_records(app: web.Application) -> None:
    """An extension adding a logging handler of its own, on the root logger (as journald's would be).

    It says so on stderr itself, whatever the log level: a test can wait for that line.
    """
    logging.getLogger().addHandler(RecordsToFile())
    sys.stderr.write("sample_plugins: logging records to a file\n")  # one write: workers print at once
    sys.stderr.flush()


def replace_log_handlers(app: web.Application) -> None:
    """An extension replacing the root logger's handlers with its own (as the README's journald
    example: under systemd, stderr goes to the journal already). It says so on stderr itself."""
    logging.getLogger().handlers[:] = [RecordsToFile()]
    sys.stderr.write("sample_plugins: logging records to a file only\n")
    sys.stderr.flush()


def count_access_log(app: web.Application) -> None:
    """An extension: GET /access-log-calls, how many times aioserver's access logger was asked to log."""
    from aioserver import accesslog

    calls = [0]
    log = accesslog.AccessLogger.log

    def counted(self: accesslog.AccessLogger, *args: Any) -> None:
        calls[0] += 1
        log(self, *args)

    accesslog.AccessLogger.log = counted  # type: ignore[method-assign]

    async def count(request: web.Request) -> web.Response:
        return web.json_response(calls[0])

    app.router.add_get("/access-log-calls", count)
