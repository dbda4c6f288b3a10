"""Server lifecycle: one coroutine owns the runners and their sites from start to clean exit."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from .app import create_app
from .config import Config
from .errors import ConfigError, StartupError
from .keys import TOKENS
from .limits import LimitedRunner
from .logs import AccessLogger
from .tls import TLSError

logger = logging.getLogger("aioserver")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def serve(config: Config) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting and let requests in flight finish.

    SIGHUP reloads token files and the TLS files. Raises StartupError when a listener
    cannot be opened.
    """
    settings = config.settings
    app = create_app(config)
    runners = [_runner(app, config)]
    try:
        await runners[0].setup()
        await _listen(runners[0], settings.host, settings.port, "https" if config.tls else "http", config)
        if config.tls and settings.redirect_http is not None:
            https_port = runners[0].addresses[0][1]  # the bound one, when --port is 0
            runners.append(_runner(create_redirect_app(https_port), config))
            await runners[1].setup()
            await _listen(runners[1], settings.host, settings.redirect_http, "http", None)
        await _handle_signals(app, config)
        logger.info(
            "shutting down: no new connections, up to %gs for requests in flight",
            settings.timeout_graceful_shutdown,
        )
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
    logger.info("stopped")


def _runner(app: web.Application, config: Config) -> LimitedRunner:
    settings = config.settings
    return LimitedRunner(
        app,
        settings,
        handle_signals=False,  # ours only queue the signal; see _handle_signals
        access_log_class=AccessLogger,
        # aiohttp's default keeps idle connections for an hour; uvicorn's for 5 s.
        keepalive_timeout=settings.timeout_keep_alive,
        shutdown_timeout=settings.timeout_graceful_shutdown,
    )


async def _listen(runner: web.BaseRunner, host: str, port: int | None, scheme: str, config: Config | None) -> None:
    context = config.tls.listener if config and config.tls else None
    site = web.TCPSite(runner, host, port, ssl_context=context, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    for address in runner.addresses:
        logger.info("serving on %s://%s", scheme, _format_address(address))


async def _handle_signals(app: web.Application, config: Config) -> None:
    """Until SIGTERM or SIGINT, reload on SIGHUP. The handlers only queue the signal."""
    loop = asyncio.get_running_loop()
    received: asyncio.Queue[signal.Signals] = asyncio.Queue()
    handled = (*STOP_SIGNALS, signal.SIGHUP)
    for sig in handled:
        loop.add_signal_handler(sig, received.put_nowait, sig)
    try:
        while await received.get() == signal.SIGHUP:
            await reload(app, config)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


async def reload(app: web.Application, config: Config) -> None:
    """Read the token files and TLS files again; what fails keeps the old ones and says why."""
    store = app[TOKENS]
    if config.token_sources.files:
        try:
            tokens = await asyncio.to_thread(config.token_sources.load)
            store.replace(tokens)
            logger.info("reloaded tokens: %d in force", len(tokens))
        except ConfigError as exc:
            logger.error("token reload failed, keeping the %d tokens in force: %s", len(store.tokens), exc)
    if config.tls:
        try:
            await asyncio.to_thread(config.tls.reload)
            logger.info("reloaded TLS certificate, key and CA")
        except TLSError as exc:
            logger.error("TLS reload failed, keeping the current certificate: %s: %s", exc.option, exc)


def create_redirect_app(https_port: int) -> web.Application:
    """A plain-HTTP app answering every request with 308 to the same URL over HTTPS."""

    async def redirect(request: web.Request) -> web.StreamResponse:
        target = request.url.with_scheme("https").with_port(None if https_port == 443 else https_port)
        raise web.HTTPPermanentRedirect(target)

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", redirect)
    return app


def _format_address(address: object) -> str:
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address)
