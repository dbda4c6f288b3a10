"""Server lifecycle: one coroutine owns the runners and their sites from start to clean exit."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
from collections.abc import Coroutine, Sequence
from typing import Any

from aiohttp import web

from . import systemd
from .app import HEADERS, create_app
from .config import Config
from .errors import ConfigError, StartupError, error_middleware, http_error
from .keys import TOKENS
from .limits import LimitedRunner
from .listeners import MAIN, REDIRECT, Listener, describe, open_listeners
from .listeners import close as close_listeners
from .logs import AccessLogger, flush_access_log
from .systemd import Notifier
from .tls import TLSError

logger = logging.getLogger("aioserver")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` to completion on uvloop when installed (the ``speed`` extra), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


async def serve(
    config: Config,
    listeners: Sequence[Listener] | None = None,
    notifier: Notifier | None = None,
    watchdog: float | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting and let requests in flight finish.

    ``listeners`` are sockets made by a parent (workers), else they are opened here (passed
    by systemd, or bound). ``notifier`` speaks sd_notify (default: ``$NOTIFY_SOCKET``), with
    a WATCHDOG=1 ping every ``watchdog`` seconds (default: half ``$WATCHDOG_USEC``).
    SIGHUP reloads token files and the TLS files. Raises StartupError when a listener
    cannot be opened.
    """
    owned = listeners is None
    if notifier is None:
        notifier, watchdog = Notifier.from_env(), systemd.watchdog_interval()
    sockets = list(listeners) if listeners is not None else open_listeners(config)
    app = create_app(config)
    runners = [_runner(app, config)]
    pinging = None
    try:
        await runners[0].setup()
        main = [listener for listener in sockets if listener.role == MAIN]
        for listener in main:
            await _listen(runners[0], listener, "https" if config.tls else "http", config)
        redirects = [listener for listener in sockets if listener.role == REDIRECT]
        if redirects:
            https_port = next((listener.port for listener in main if listener.port), 443)
            runners.append(_runner(create_redirect_app(https_port), config))
            await runners[1].setup()
            for listener in redirects:
                await _listen(runners[1], listener, "http", None)
        if watchdog:
            pinging = asyncio.create_task(systemd.run_watchdog(notifier, watchdog))
        await _handle_signals(app, config, notifier)
        notifier.stopping()
        flush_access_log()  # the lines of the requests so far come before this one
        logger.info(
            "shutting down: no new connections, up to %gs for requests in flight",
            config.settings.timeout_graceful_shutdown,
        )
    finally:
        if pinging:
            pinging.cancel()
        for runner in reversed(runners):
            await runner.cleanup()
        flush_access_log()
        if owned:
            close_listeners(sockets)
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


async def _listen(runner: web.BaseRunner, listener: Listener, scheme: str, config: Config | None) -> None:
    context = config.tls.listener if config and config.tls else None
    site = web.SockSite(runner, listener.sock, ssl_context=context)
    try:
        await site.start()
    except OSError as exc:
        raise StartupError(f"cannot serve on {describe(listener.sock, scheme)}: {exc.strerror or exc}") from None
    logger.info("serving on %s", describe(listener.sock, scheme))


async def _handle_signals(app: web.Application, config: Config, notifier: Notifier) -> None:
    """Until SIGTERM or SIGINT, reload on SIGHUP. The handlers only queue the signal.

    READY=1 goes out once the handlers are in place: a manager may signal us right after it.
    """
    loop = asyncio.get_running_loop()
    received: asyncio.Queue[signal.Signals] = asyncio.Queue()
    handled = (*STOP_SIGNALS, signal.SIGHUP)
    for sig in handled:
        loop.add_signal_handler(sig, received.put_nowait, sig)
    notifier.ready()
    try:
        while await received.get() == signal.SIGHUP:
            notifier.reloading()
            await reload(app, config)
            notifier.ready("serving, reloaded")
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
    # The Host header names the target: a name or an IP literal, and a port. yarl lets more
    # through ("[x" is the host "x"), or refuses it with a ValueError ("x:abc", "x:99999").
    host_header = re.compile(r"(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?", re.ASCII)

    async def redirect(request: web.Request) -> web.StreamResponse:
        if not host_header.fullmatch(request.host):
            raise http_error(web.HTTPBadRequest, "invalid Host header")
        try:
            target = request.url.with_scheme("https").with_port(None if https_port == 443 else https_port)
        except ValueError:
            raise http_error(web.HTTPBadRequest, "invalid Host header") from None
        raise web.HTTPPermanentRedirect(target)

    # The main app's outermost middleware: JSON errors, anything unexpected a 500 with an id,
    # and the headers every answer carries; no HSTS on plain HTTP (RFC 6797 section 7.2).
    app = web.Application(middlewares=[error_middleware(HEADERS)])
    app.router.add_route("*", "/{path:.*}", redirect)
    return app
