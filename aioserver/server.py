"""Server lifecycle: one coroutine owns the runner and its sites from start to clean exit."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from .app import create_app
from .config import Config
from .errors import StartupError

logger = logging.getLogger("aioserver")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def serve(config: Config) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting and let requests in flight finish.

    Raises StartupError when a listener cannot be opened.
    """
    settings = config.settings
    runner = web.AppRunner(
        create_app(config),
        handle_signals=False,  # ours only set an event; see _stop_requested
        # aiohttp's default keeps idle connections for an hour; uvicorn's for 5 s.
        keepalive_timeout=settings.timeout_keep_alive,
        shutdown_timeout=settings.timeout_graceful_shutdown,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from None
        for address in runner.addresses:
            logger.info("serving on http://%s", _format_address(address))
        await _stop_requested()
        logger.info(
            "shutting down: no new connections, up to %gs for requests in flight",
            settings.timeout_graceful_shutdown,
        )
    finally:
        await runner.cleanup()
    logger.info("stopped")


async def _stop_requested() -> None:
    """Wait for SIGTERM or SIGINT; the handlers only set an event."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


def _format_address(address: object) -> str:
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address)
