"""The framework floor: a bare aiohttp app doing the same token check and the echo workflow.

What aioserver could reach with nothing but aiohttp underneath: one handler, no middleware,
no access log. Same check as txtai's: SHA-256 of the bearer token against ``TOKEN`` with
``hmac.compare_digest``. uvloop is used when installed unless ``--loop asyncio``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import ssl
from typing import Any

from aiohttp import web

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
    return web.json_response(body["elements"])


def create_app(token: str) -> web.Application:
    """The floor app for one token hash."""
    app = web.Application()
    app[TOKEN] = token
    app.router.add_post("/workflow", workflow)
    return app


async def serve(port: int, ssl_context: ssl.SSLContext | None) -> None:
    """Serve until killed."""
    runner = web.AppRunner(create_app(os.environ["TOKEN"]), access_log=None)
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
            uvloop.run(serve(args.port, context))
            return
    print("aiohttp floor: event loop asyncio", flush=True)
    asyncio.run(serve(args.port, context))


if __name__ == "__main__":
    main()
