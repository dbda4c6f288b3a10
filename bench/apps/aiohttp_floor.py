"""The framework floor: a bare aiohttp app doing the same token check and the echo workflow.

What aioserver could reach with nothing but aiohttp underneath: one handler, no middleware,
no access log. Options measure what aiohttp itself charges for what aioserver must do on
every request (bench/README.md, "The cost of observability"): ``--middlewares N`` adds N
middlewares that do nothing, ``--access-log`` turns on aiohttp's own access log (its default
format, through ``logging`` to standard error). Two more do the least SPEC section 8 asks, in
the cheapest way known, as a lower bound for any server on aiohttp: ``--headers`` gives each
answer a request id (the client's ``X-Request-ID``, else 16 new hex digits) and the security
headers, in the handler; ``--lines`` writes an access line per request (client, method, path,
status, body bytes, seconds, request id), made by one f-string and written in batches every
0.1 s, without ``logging``.

Same check as txtai's: SHA-256 of the bearer token against ``TOKEN`` with
``hmac.compare_digest``. uvloop is used when installed unless ``--loop asyncio``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import logging
import os
import random
import ssl
import sys
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler

TOKEN = web.AppKey("token", str)


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


async def workflow(request: web.Request) -> web.Response:
    """Check the bearer token, then give the echo workflow's elements back."""
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials:
        return _error(401, "missing bearer token", **{"WWW-Authenticate": "Bearer"})
    digest = hashlib.sha256(credentials.encode("utf-8")).hexdigest()
    if not hmac.compare_digest(request.app[TOKEN], digest):
        return _error(401, "invalid token", **{"WWW-Authenticate": 'Bearer error="invalid_token"'})
    try:
        body: Any = json.loads(await request.read())
    except ValueError:
        return _error(400, "body is not valid JSON")
    if not isinstance(body, dict) or not isinstance(body.get("elements"), list):
        return _error(400, 'expected {"name": ..., "elements": [...]}')
    if body.get("name") != "echo":
        return _error(404, "no such workflow")
    answer = web.json_response(body["elements"])
    if request.app[HEADERS]:
        given = request.headers.get("X-Request-ID")
        request_id = given if given and len(given) <= 128 else f"{random.getrandbits(64):016x}"
        answer.headers.update(SECURITY_HEADERS)
        answer.headers["X-Request-ID"] = request_id
        request["request_id"] = request_id
    return answer


HEADERS = web.AppKey("headers", bool)
SECURITY_HEADERS = {
    "Server": "floor",
    "X-Content-Type-Options": "nosniff",
    "Strict-Transport-Security": "max-age=63072000",
}


class Lines(AbstractAccessLogger):
    """An access line per request: one f-string, written in batches every 0.1 s (no ``logging``)."""

    batch: list[str] = []
    timer: asyncio.TimerHandle | None = None

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        body = response.body if isinstance(response, web.Response) else None
        size = len(body) if isinstance(body, bytes) else 0
        Lines.batch.append(
            f'{request.remote} "{request.method} {request.rel_url.raw_path}" {response.status} {size}'
            f" {time:.3f}s {request.get('request_id', '-')}\n"
        )
        if Lines.timer is None:
            Lines.timer = asyncio.get_running_loop().call_later(0.1, Lines.write)

    @staticmethod
    def write() -> None:
        Lines.timer = None
        text, Lines.batch = "".join(Lines.batch), []
        sys.stderr.write(text)
        sys.stderr.flush()


@web.middleware
async def pass_through(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A middleware that does nothing: what aiohttp charges for a middleware layer."""
    return await handler(request)


def create_app(token: str, middlewares: int = 0, headers: bool = False) -> web.Application:
    """The floor app for one token hash, with ``middlewares`` pass-through middlewares, and
    with ``headers``, the request id and security headers on each answer."""
    app = web.Application(middlewares=[pass_through] * middlewares)
    app[TOKEN] = token
    app[HEADERS] = headers
    app.router.add_post("/workflow", workflow)
    return app


async def serve(port: int, ssl_context: ssl.SSLContext | None, args: argparse.Namespace) -> None:
    """Serve until killed."""
    app = create_app(os.environ["TOKEN"], args.middlewares, args.headers)
    if args.access_log:  # aiohttp's access logger, its default format, a record per request
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
        runner = web.AppRunner(app)
    elif args.lines:
        logging.getLogger("aiohttp.access").setLevel(logging.INFO)  # Lines.enabled asks it
        runner = web.AppRunner(app, access_log_class=Lines)
    else:
        runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context).start()
    await asyncio.Event().wait()


def main() -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--certfile")
    parser.add_argument("--keyfile")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    parser.add_argument("--middlewares", type=int, default=0, help="pass-through middlewares [0]")
    parser.add_argument("--access-log", action="store_true", help="aiohttp's own access log, to standard error")
    parser.add_argument("--headers", action="store_true", help="a request id and the security headers on each answer")
    parser.add_argument("--lines", action="store_true", help="the cheapest access line, batched, without logging")
    args = parser.parse_args()
    context = None
    if args.certfile:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(args.certfile, args.keyfile)
    if args.loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if args.loop == "uvloop":
                raise
        else:
            print("aiohttp floor: event loop uvloop", flush=True)
            uvloop.run(serve(args.port, context, args))
            return
    print("aiohttp floor: event loop asyncio", flush=True)
    asyncio.run(serve(args.port, context, args))


if __name__ == "__main__":
    main()
