"""Server lifecycle: one coroutine owns the runners and their sites from start to clean exit."""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import signal
from collections.abc import Coroutine, Sequence
from typing import Any

from aiohttp import web
from aiohttp.log import access_logger
from aiohttp.web_protocol import RequestHandler

from . import systemd
from .accesslog import AccessLogger, ProxiedAccessLogger
from .app import HEADERS, create_app
from .autocert import CertificateManager, StateDirectory, add_challenge_route
from .clientcerts import CLIENTS
from .config import Config
from .connections import CONNECTIONS, Connections, TLSSite, ensure_file_limit, peer, reset
from .errors import CUT_OFF, ConfigError, StartupError, error_middleware, http_error
from .fleet import Fleet
from .fleetacme import FleetCertificates
from .keys import TOKENS
from .limits import LimitedRunner
from .listeners import MAIN, REDIRECT, Listener, describe, open_listeners, stop_listening
from .listeners import close as close_listeners
from .logs import flush_logs
from .logtext import logged_path
from .readiness import READINESS
from .systemd import Notifier
from .tls import ReloadableContext, TLSError
from .watch import in_reload_thread, watch_tls_files
from .workflow.schedules import HostSchedules

logger = logging.getLogger("aioserver")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# SIGUSR1 is only logged: its default action would kill the process (a log-rotation script's
# habit); our logs go to stderr, there is nothing to reopen.
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP, signal.SIGUSR1)
# Of a stop's time (--timeout-graceful-shutdown, the bound of the whole stop), what is kept at
# its end to cut off the requests still in flight and close down: this much at most, a fifth
# of a shorter grace period. The requests in flight have the rest.
CUT_OFF_TIME = 1.0
DRAIN_POLL = 0.05  # seconds between looks at the requests in flight while draining
# How long TLS sessions can resume at most: the context (its session cache and ticket keys) is
# made anew this often, as on SIGHUP. Resuming issues a new ticket, so without this a chain of
# resumptions would outlive any ticket lifetime.
SESSION_KEYS_LIFETIME = 3600.0
EXTEND_EVERY = 30.0  # seconds between EXTEND_TIMEOUT_USEC while ACME brings the first certificate


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
        _ignore_signals()


async def _serve(
    config: Config,
    received: asyncio.Queue[signal.Signals],
    listeners: Sequence[Listener] | None,
    notifier: Notifier | None,
    watchdog: float | None,
    schedules: HostSchedules | None,
) -> None:
    owned = listeners is None
    if not owned:
        _quiet_refused_accepts(asyncio.get_running_loop())
    if notifier is None:
        notifier, watchdog = Notifier.from_env(), systemd.watchdog_interval()
    sockets = list(listeners) if listeners is not None else open_listeners(config)
    fleet = _fleet(config)
    app = create_app(config, schedules, fleet)
    # One count of connections for all the listeners of this process.
    connections = Connections(config.settings.limit_connections, config.settings.timeout_send)
    app[CONNECTIONS] = connections
    ensure_file_limit(config.settings.limit_connections)
    runners = [_runner(app, config, connections)]
    sites: list[tuple[web.BaseSite, Listener]] = []
    background: list[asyncio.Task[None]] = []
    grace = config.settings.timeout_graceful_shutdown
    deadline: float | None = None  # of the stop: the grace period from the end of --shutdown-delay on
    # With ACME, this process's part in obtaining the certificate and keeping it fresh.
    certificates = CertificateManager(config.acme, config.tls, notifier, fleet) if config.acme and config.tls else None
    stop: signal.Signals | None = None
    hurried = False  # a second SIGINT during --shutdown-delay: cut the requests off at once
    try:
        await runners[0].setup()
        main = [listener for listener in sockets if listener.role == MAIN]
        redirects = [listener for listener in sockets if listener.role == REDIRECT]
        if redirects:
            https_port = next((listener.port for listener in main if listener.port), 443)
            redirect_app = create_redirect_app(
                https_port, certificates.state if certificates else None, certificates.shared if certificates else None
            )
            runners.append(_runner(redirect_app, config, connections))
            await runners[1].setup()
        if watchdog:
            background.append(asyncio.create_task(systemd.run_watchdog(notifier, watchdog)))
        if fleet:
            background.append(asyncio.create_task(fleet.watch()))
        if certificates:
            # The plain listener first (the CA's challenges, 308 for the rest), HTTPS once
            # there is a certificate to serve.
            background.append(asyncio.create_task(certificates.run()))
            for listener in redirects:
                sites.append((await _listen(runners[1], listener, "http", None), listener))
            stop = await _until_certificate(certificates, received, app, config)
        if stop is None:
            for listener in main:
                sites.append((await _listen(runners[0], listener, "https" if config.tls else "http", config), listener))
            if not certificates:
                for listener in redirects:
                    sites.append((await _listen(runners[1], listener, "http", None), listener))
            if config.tls:
                background.append(asyncio.create_task(renew_session_keys(config.tls, SESSION_KEYS_LIFETIME)))
            if config.tls and not certificates and config.settings.ssl_watch_interval > 0:
                # ACME's files are followed by the certificate manager itself.
                watching = watch_tls_files(config.tls, config.settings.ssl_watch_interval)
                background.append(asyncio.create_task(watching))
            app[READINESS].serving()
            stop = await _handle_signals(received, app, config, notifier)
            app[READINESS].stopping()  # from the signal on: a balancer polling /ready stops sending
            notifier.stopping()
            hurried = await _shutdown_delay(received, stop, config.settings.shutdown_delay)
        else:  # stopped before serving HTTPS (ACME): never ready, no balancer to wait for
            app[READINESS].stopping()
            notifier.stopping()
        # The grace period counts from here, after the delay: it is the time of the requests in
        # flight, as without a delay (as a Kubernetes preStop sleep comes before SIGTERM).
        deadline = asyncio.get_running_loop().time() + grace
        app[READINESS].cut_at = deadline - _reserve(grace)
        await _stop_accepting(runners, sites, owned)
        notifier.notify(systemd.NOT_ACCEPTING)  # for a parent: the sockets may stop listening
        logger.info("shutting down (%s): no new connections, up to %gs for requests in flight", stop.name, grace)
        deadline = await _drain(runners, connections, received, deadline, grace, hurried)
    finally:
        try:
            await _close_down(runners, deadline, grace)
        finally:
            # Heartbeats to the last: a parent kills a worker silent for a while, and closing
            # down (the app's cleanup) may take as long as the grace period allows.
            for task in background:
                task.cancel()
        if fleet:
            # Their ends first, while the fleet's client is open: an ACME order cut short
            # releases the fleet's lock (else no host orders for a minute), a bounded wait.
            if background:
                await asyncio.wait(background, timeout=2 * fleet.timeout + 1)
            await fleet.close()
        flush_logs()
        if owned:
            close_listeners(sockets)
        else:  # a worker's copies of its parent's sockets
            for listener in sockets:
                listener.sock.close()
    logger.info("stopped")


async def _shutdown_delay(received: asyncio.Queue[signal.Signals], stop: signal.Signals, delay: float) -> bool:
    """Go on serving for ``delay`` seconds (--shutdown-delay) while GET /ready answers 503, so
    that a balancer polling it stops sending requests here before the listeners close.

    Returns True when a SIGINT (Ctrl-C again) ended it early: stop now.
    """
    if delay <= 0:
        return False
    logger.info(
        "stopping in %gs (%s, --shutdown-delay): GET /ready answers 503, requests are served until then",
        delay,
        stop.name,
    )
    loop = asyncio.get_running_loop()
    end = loop.time() + delay
    while loop.time() < end:
        try:
            async with asyncio.timeout_at(end):
                sig = await received.get()
        except TimeoutError:
            break
        if sig == signal.SIGINT:
            logger.warning("second SIGINT: stopping now, without the rest of --shutdown-delay")
            return True
        _ignored(sig)
    return False


async def _stop_accepting(
    runners: Sequence[web.BaseRunner], sites: Sequence[tuple[web.BaseSite, Listener]], owned: bool
) -> None:
    """Stop accepting connections: new ones are refused at once, not kept waiting in a backlog.

    Sockets of our own stop listening in the same turn of the loop as their site stops reading
    them, while it was still accepting: only the connections of that very instant are in the
    backlog, to be reset (no socket can keep its backlog and refuse new connections). A
    worker's sockets are shared with the other workers: its parent stops them listening
    (workers.py). Sockets passed by systemd go on listening in systemd's hands, for the next start.
    """
    for site, listener in sites:
        if owned:
            stop_listening([listener])
        await site.stop()  # stops reading it at once, before any await: accept() would fail on it
        if not owned:
            # Our copy: once every worker let go of theirs, a parent killed with -9 holds none.
            listener.sock.close()
    for runner in runners:
        if runner.server is not None:
            runner.server.pre_shutdown()  # idle keep-alive connections close now, the others after their answer
    await asyncio.sleep(0)  # a request whose head came with the last reads starts before the first look


async def _drain(
    runners: Sequence[web.BaseRunner],
    connections: Connections,
    received: asyncio.Queue[signal.Signals],
    deadline: float,
    grace: float,
    hurried: bool = False,
) -> float:
    """Let the requests in flight finish until the stop's deadline nears, then cut them off.

    The apps' on_shutdown hooks run first, as in aiohttp's own drain: what they tell to end
    (a long-lived answer, a scheduled run) has the same time as the requests. A second SIGINT
    (Ctrl-C again; ``hurried``: it came during --shutdown-delay) cuts the requests off at
    once. Returns the deadline for the rest of the stop (sooner after a second SIGINT).
    """
    loop = asyncio.get_running_loop()
    reserve = _reserve(grace)
    cut_at = deadline - reserve
    reason = "grace period over"
    try:
        async with asyncio.timeout_at(cut_at):
            for runner in runners:
                await runner.shutdown()
    except TimeoutError:
        logger.warning("on_shutdown hooks still running at the end of the grace period: cancelled")
    if hurried:
        reason = "second SIGINT: stopping now"
        cut_at = min(cut_at, loop.time())
        deadline = cut_at + reserve
    while connections.in_flight() and loop.time() < cut_at:
        try:
            async with asyncio.timeout(min(DRAIN_POLL, cut_at - loop.time())):
                sig = await received.get()
        except TimeoutError:
            continue
        if sig == signal.SIGINT:
            reason = "second SIGINT: stopping now"
            cut_at = loop.time()
            deadline = cut_at + reserve
            break
        _ignored(sig)
    busy = connections.in_flight()
    if not busy:
        return deadline
    logger.warning(
        "%s: cutting off %d requests in flight (answered 503 when nothing was sent yet, else reset)",
        reason,
        len(busy),
    )
    for handler in busy:
        _cut_off(handler)
    answered_by = cut_at + reserve / 2
    while connections.in_flight() and loop.time() < answered_by:
        await asyncio.sleep(min(DRAIN_POLL, answered_by - loop.time()))
    return deadline


def _reserve(grace: float) -> float:
    """The end of the grace period kept for cutting off what still runs, and its answers."""
    return min(CUT_OFF_TIME, grace / 5)


def _cut_off(handler: RequestHandler) -> None:
    """End a request in flight: answered 503 if nothing of its answer was sent, else reset.

    The first kind is cancelled with a mark that error_middleware turns into a 503, so its
    access line says so; an answer under way cannot be replaced, so its connection is reset,
    with a line of its own.
    """
    request = handler._current_request
    if request is not None and not request.writer.output_size:
        request[CUT_OFF] = True
        request.task.cancel()
        return
    transport = handler.transport
    if transport is None:
        return
    what = f"{request.method} {logged_path(request.rel_url.raw_path)}" if request is not None else "an answer"
    logger.warning("cut off %s to %s mid-answer: connection reset", what, peer(transport))
    reset(transport)


async def _close_down(runners: Sequence[web.BaseRunner], deadline: float | None, grace: float) -> None:
    """aiohttp's cleanup (on_shutdown, connections, on_cleanup), bounded by the stop's deadline
    (after a failed start, by the grace period)."""
    now = asyncio.get_running_loop().time()
    try:
        async with asyncio.timeout_at(now + grace if deadline is None else max(deadline, now + 0.05)):
            for runner in reversed(runners):
                await runner.cleanup()
    except TimeoutError:
        logger.warning("closing down outlasted the grace period: exiting without waiting for the rest")


def _quiet_refused_accepts(loop: asyncio.AbstractEventLoop) -> None:
    """In a worker: once its parent stops the shared sockets listening (at SIGTERM), accept()
    fails with EINVAL until this worker stops reading them, a turn of the loop or two later.

    asyncio logs each failure with a traceback (uvloop says nothing); there is nothing wrong.
    """

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if (
            isinstance(error, OSError)
            and error.errno == errno.EINVAL
            and "_accept_connection" in repr(context.get("handle"))
        ):
            logger.debug("accept() on a socket that no longer listens: the stop has begun")
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def _fleet(config: Config) -> Fleet | None:
    """With --redis, this process's link to the fleet's Redis (an extra: imported only then)."""
    return Fleet(config.settings.redis) if config.settings.redis else None


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
        access_log_class=ProxiedAccessLogger if config.proxied else AccessLogger,
        # None: aiohttp makes no access logger, and does no access-log work per request.
        access_log=access_logger if settings.access_log else None,
        # aiohttp's default keeps idle connections for an hour; uvicorn's for 5 s.
        keepalive_timeout=settings.timeout_keep_alive,
        # The drain is ours (_drain): by aiohttp's cleanup, what is left has been cut off. Its
        # own drain would wait this long, cancel, then wait as long again.
        shutdown_timeout=_reserve(settings.timeout_graceful_shutdown) / 4,
    )


async def _listen(runner: LimitedRunner, listener: Listener, scheme: str, config: Config | None) -> web.BaseSite:
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
    return site


def _queue_signals() -> asyncio.Queue[signal.Signals]:
    """Queue SIGTERM, SIGINT, SIGHUP and SIGUSR1 from now on; the handlers do nothing else."""
    loop = asyncio.get_running_loop()
    received: asyncio.Queue[signal.Signals] = asyncio.Queue()
    for sig in HANDLED_SIGNALS:
        loop.add_signal_handler(sig, received.put_nowait, sig)
    # A worker starts with them blocked (workers.py), so that none comes before this: now they may.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
    return received


def _ignore_signals() -> None:
    """From the end of serve() the process only exits: a late signal must neither kill it (a
    worker's parent would see a crash) nor raise KeyboardInterrupt (a traceback)."""
    loop = asyncio.get_running_loop()
    for sig in HANDLED_SIGNALS:
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)


def _ignored(sig: signal.Signals) -> None:
    if sig == signal.SIGUSR1:
        logger.info("SIGUSR1 ignored (logs go to stderr: nothing to reopen)")
    else:
        logger.info("%s ignored: shutting down already", sig.name)


async def _handle_signals(
    received: asyncio.Queue[signal.Signals], app: web.Application, config: Config, notifier: Notifier
) -> signal.Signals:
    """Until SIGTERM or SIGINT (which is returned), reload on SIGHUP.

    READY=1 goes out once serving, the handlers long in place: a manager may signal us right after it.
    """
    notifier.ready()
    while True:
        sig = await received.get()
        if sig == signal.SIGUSR1:
            _ignored(sig)
            continue
        # A burst of signals is one reload (a stop among them wins): a storm of SIGHUPs must
        # not queue thousands of reloads that a real one, revoking a token, would wait behind.
        # What follows a stop stays queued for the drain (a second SIGINT).
        while sig == signal.SIGHUP and not received.empty():
            queued = received.get_nowait()
            if queued == signal.SIGUSR1:
                _ignored(queued)
            else:
                sig = queued
        if sig != signal.SIGHUP:
            return sig
        notifier.reloading()
        await reload(app, config)
        notifier.ready("serving, reloaded")


async def _until_certificate(
    certificates: CertificateManager, received: asyncio.Queue[signal.Signals], app: web.Application, config: Config
) -> signal.Signals | None:
    """Wait until ACME gives a certificate to serve; a stop signal meanwhile is returned.

    A SIGHUP meanwhile reloads the tokens. While it takes, systemd is told to wait on
    (EXTEND_TIMEOUT_USEC): READY=1 is for a server that serves HTTPS.
    """
    ready = asyncio.ensure_future(certificates.ready.wait())
    # At once, then every EXTEND_EVERY seconds: systemd heeds an extension only if the first one
    # comes before TimeoutStartSec= is over (sd_notify(3)), which may be shorter than EXTEND_EVERY.
    certificates.extend_start_timeout(2 * EXTEND_EVERY)
    try:
        while not ready.done():
            signalled = asyncio.ensure_future(received.get())
            done, _ = await asyncio.wait({ready, signalled}, timeout=EXTEND_EVERY, return_when=asyncio.FIRST_COMPLETED)
            if signalled not in done:
                signalled.cancel()
                if not ready.done():  # READY=1 comes next
                    certificates.extend_start_timeout(2 * EXTEND_EVERY)
                continue
            sig = signalled.result()
            if sig in STOP_SIGNALS:
                return sig
            if sig == signal.SIGHUP:
                await reload(app, config)
            else:
                _ignored(sig)
    finally:
        ready.cancel()
    return None


async def reload(app: web.Application, config: Config) -> None:
    """Read the token files, auth.tokens, auth.clients, the JWT keys and TLS files again.

    What fails keeps what was in force, saying why.
    """
    store = app[TOKENS]
    clients = app.get(CLIENTS)
    if clients is not None and config.client_sources is not None and config.client_sources.path:
        try:
            entries = await in_reload_thread(config.client_sources.load)
            clients.replace(entries)
            logger.info("reloaded auth.clients: %d in force", len(entries))
        except ConfigError as exc:
            logger.error("auth.clients reload failed, keeping the %d in force: %s", len(clients.clients), exc)
    if config.token_sources.reloadable:
        try:
            tokens = await in_reload_thread(config.token_sources.load)
            store.replace(tokens)
            logger.info("reloaded tokens: %d in force", len(tokens))
        except ConfigError as exc:
            logger.error("token reload failed, keeping the %d tokens in force: %s", len(store.tokens), exc)
    if config.jwt:
        await config.jwt.reload()
    if config.tls and config.tls.current is not None:  # an ACME certificate may be on its way still
        try:
            await in_reload_thread(config.tls.reload)
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
            await in_reload_thread(tls.reload)
            logger.info("new TLS session keys (certificate, key and CA read again)")
        except TLSError as exc:
            logger.error(
                "hourly TLS renewal (new session keys) failed, keeping the current certificate and keys: %s: %s",
                exc.option,
                exc,
            )


def create_redirect_app(
    https_port: int, acme: StateDirectory | None = None, shared: FleetCertificates | None = None
) -> web.Application:
    """A plain-HTTP app answering every request with 308 to the same URL over HTTPS, but the
    ACME CA's http-01 challenges (from ``acme``'s state directory, and the fleet's Redis: ``shared``)."""
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
    if acme is not None:
        add_challenge_route(app, acme, shared)
    app.router.add_route("*", "/{path:.*}", redirect)
    return app
