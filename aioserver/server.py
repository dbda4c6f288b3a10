"""Server lifecycle: one coroutine owns the runners and their sites from start to clean exit."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import signal
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from aiohttp import web

from . import systemd
from .app import HEADERS, create_app
from .config import Config
from .connections import Connections, TLSSite, ensure_file_limit
from .errors import ConfigError, StartupError, error_middleware, http_error
from .keys import TOKENS
from .limits import LimitedRunner
from .listeners import MAIN, REDIRECT, Listener, describe, open_listeners
from .listeners import close as close_listeners
from .logs import AccessLogger, flush_access_log
from .systemd import Notifier
from .tls import ReloadableContext, TLSError
from .workflow.schedules import HostSchedules

logger = logging.getLogger("aioserver")
T = TypeVar("T")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP)
# How long TLS sessions can resume at most: the context (its session cache and ticket keys) is
# made anew this often, as on SIGHUP. Resuming issues a new ticket, so without this a chain of
# resumptions would outlive any ticket lifetime.
SESSION_KEYS_LIFETIME = 3600.0


def run(main: Coroutine[Any, Any, None], loop: str = "auto") -> None:
    """Run ``main`` to completion on ``loop``: uvloop, asyncio, or (auto) uvloop when installed."""
    factory = None
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":  # the option's parser checked; only a broken install gets here
                raise StartupError("--loop uvloop: uvloop is not installed") from None
        else:
            factory = uvloop.new_event_loop
    logger.info("event loop: %s", "uvloop" if factory else "asyncio")
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


async def serve(
    config: Config,
    listeners: Sequence[Listener] | None = None,
    notifier: Notifier | None = None,
    watchdog: float | None = None,
    schedules: HostSchedules | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting and let requests in flight finish.

    ``listeners`` are sockets made by a parent (workers), else they are opened here (passed
    by systemd, or bound). ``notifier`` speaks sd_notify (default: ``$NOTIFY_SOCKET``), with
    a WATCHDOG=1 ping every ``watchdog`` seconds (default: half ``$WATCHDOG_USEC``).
    ``schedules`` is this process's part in the host's schedules (default: it runs them).
    SIGHUP reloads token files and the TLS files. Raises StartupError when a listener
    cannot be opened.
    """
    # The handlers go in before anything else: a signal while the app is made or the sockets
    # start serving waits in the queue, and is acted upon once serving, instead of killing the
    # process without a drain.
    received = _queue_signals()
    try:
        await _serve(config, received, listeners, notifier, watchdog, schedules)
    finally:
        _unqueue_signals()


async def _serve(
    config: Config,
    received: asyncio.Queue[signal.Signals],
    listeners: Sequence[Listener] | None,
    notifier: Notifier | None,
    watchdog: float | None,
    schedules: HostSchedules | None,
) -> None:
    owned = listeners is None
    if notifier is None:
        notifier, watchdog = Notifier.from_env(), systemd.watchdog_interval()
    sockets = list(listeners) if listeners is not None else open_listeners(config)
    app = create_app(config, schedules)
    # One count of connections for all the listeners of this process.
    connections = Connections(config.settings.limit_connections, config.settings.timeout_send)
    ensure_file_limit(config.settings.limit_connections)
    runners = [_runner(app, config, connections)]
    background: list[asyncio.Task[None]] = []
    try:
        await runners[0].setup()
        main = [listener for listener in sockets if listener.role == MAIN]
        for listener in main:
            await _listen(runners[0], listener, "https" if config.tls else "http", config)
        redirects = [listener for listener in sockets if listener.role == REDIRECT]
        if redirects:
            https_port = next((listener.port for listener in main if listener.port), 443)
            runners.append(_runner(create_redirect_app(https_port), config, connections))
            await runners[1].setup()
            for listener in redirects:
                await _listen(runners[1], listener, "http", None)
        if watchdog:
            background.append(asyncio.create_task(systemd.run_watchdog(notifier, watchdog)))
        if config.tls:
            background.append(asyncio.create_task(renew_session_keys(config.tls, SESSION_KEYS_LIFETIME)))
        await _handle_signals(received, app, config, notifier)
        notifier.stopping()
        flush_access_log()  # the lines of the requests so far come before this one
        logger.info(
            "shutting down: no new connections, up to %gs for requests in flight",
            config.settings.timeout_graceful_shutdown,
        )
    finally:
        for task in background:
            task.cancel()
        for runner in reversed(runners):
            await runner.cleanup()
        flush_access_log()
        if owned:
            close_listeners(sockets)
    logger.info("stopped")


def _runner(app: web.Application, config: Config, connections: Connections) -> LimitedRunner:
    settings = config.settings
    return LimitedRunner(
        app,
        settings,
        connections,
        handle_signals=False,  # ours only queue the signal; see _handle_signals
        # A client that goes away cancels its request, and so its workflow: its worker-process
        # job is killed, its --limit-concurrency slot freed (aiohttp lets it run on by default).
        handler_cancellation=True,
        access_log_class=AccessLogger,
        # aiohttp's default keeps idle connections for an hour; uvicorn's for 5 s.
        keepalive_timeout=settings.timeout_keep_alive,
        shutdown_timeout=settings.timeout_graceful_shutdown,
    )


async def _listen(runner: LimitedRunner, listener: Listener, scheme: str, config: Config | None) -> None:
    site: web.BaseSite
    if config and config.tls:
        timeout = config.settings.timeout_handshake
        site = TLSSite(runner, listener.sock, config.tls, runner.connections, runner.make_handler, timeout)
    else:
        site = web.SockSite(runner, listener.sock)
    try:
        await site.start()
    except OSError as exc:
        raise StartupError(f"cannot serve on {describe(listener.sock, scheme)}: {exc.strerror or exc}") from None
    logger.info("serving on %s", describe(listener.sock, scheme))


def _queue_signals() -> asyncio.Queue[signal.Signals]:
    """Queue SIGTERM, SIGINT and SIGHUP from now on; the handlers do nothing else."""
    loop = asyncio.get_running_loop()
    received: asyncio.Queue[signal.Signals] = asyncio.Queue()
    for sig in HANDLED_SIGNALS:
        loop.add_signal_handler(sig, received.put_nowait, sig)
    # A worker starts with them blocked (workers.py), so that none comes before this: now they may.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
    return received


def _unqueue_signals() -> None:
    loop = asyncio.get_running_loop()
    for sig in HANDLED_SIGNALS:
        loop.remove_signal_handler(sig)


async def _handle_signals(
    received: asyncio.Queue[signal.Signals], app: web.Application, config: Config, notifier: Notifier
) -> None:
    """Until SIGTERM or SIGINT, reload on SIGHUP.

    READY=1 goes out once serving, the handlers long in place: a manager may signal us right after it.
    """
    notifier.ready()
    while True:
        sig = await received.get()
        # A burst of signals is one reload (a stop among them wins): a storm of SIGHUPs must
        # not queue thousands of reloads that a real one, revoking a token, would wait behind.
        while not received.empty():
            queued = received.get_nowait()
            sig = queued if queued != signal.SIGHUP else sig
        if sig != signal.SIGHUP:
            return
        notifier.reloading()
        await reload(app, config)
        notifier.ready("serving, reloaded")


async def reload(app: web.Application, config: Config) -> None:
    """Read the token files and TLS files again; what fails keeps the old ones and says why."""
    store = app[TOKENS]
    if config.token_sources.files:
        try:
            tokens = await _in_reload_thread(config.token_sources.load)
            store.replace(tokens)
            logger.info("reloaded tokens: %d in force", len(tokens))
        except ConfigError as exc:
            logger.error("token reload failed, keeping the %d tokens in force: %s", len(store.tokens), exc)
    if config.tls:
        try:
            await _in_reload_thread(config.tls.reload)
            logger.info("reloaded TLS certificate, key and CA")
        except TLSError as exc:
            logger.error("TLS reload failed, keeping the current certificate: %s: %s", exc.option, exc)


async def renew_session_keys(tls: ReloadableContext, every: float) -> None:
    """Make the TLS context anew ``every`` seconds: new ticket keys, an empty session cache.

    The files are read again (a context cannot be copied), so a change on disk takes effect
    here too, exactly as on SIGHUP.
    """
    while True:
        await asyncio.sleep(every)
        try:
            await _in_reload_thread(tls.reload)
            logger.info("new TLS session keys (certificate, key and CA read again)")
        except TLSError as exc:
            logger.error(
                "hourly TLS renewal (new session keys) failed, keeping the current certificate and keys: %s: %s",
                exc.option,
                exc,
            )


async def _in_reload_thread(function: Callable[[], T]) -> T:
    """Run blocking reload work in a thread of its own.

    Never in asyncio's default executor, which sync work of workflows (hooks, file writes)
    can fill: a token revoked by SIGHUP must not wait behind a hostile client's requests.
    Reloads are rare enough for a thread each.
    """
    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="aioserver-reload")
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, function)
    finally:
        executor.shutdown(wait=False)  # the thread ends with its work; never wait for it on the loop


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
