"""The application factory."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from . import views
from .auth import FailureThrottle, TokenStore, authorizer
from .browser import ANY_HOST, HostGuard, check_json_body
from .clientcerts import CLIENTS, ClientStore
from .config import Config
from .errorlog import TracebackLog
from .errors import Check, error_middleware
from .fleetthrottle import FleetThrottle
from .keys import CONFIG, FLEET, LIMITS, TOKENS, WORKFLOWS
from .limits import WorkflowLimits
from .openapi import setup_openapi
from .pipelineviews import setup_pipeline_routes
from .plugins import dependencies_check
from .proxy import TrustedProxies, UntrustedForwarding
from .readiness import READINESS, Readiness, ready
from .workflow.runtime import setup_workflow_runtime
from .workflow.schedules import HostSchedules

if TYPE_CHECKING:
    from .fleet import Fleet
    from .metrics import Metrics

# On every answer: our name, not aiohttp's (which gives its version away), and no sniffing.
HEADERS = {"Server": "aioserver", "X-Content-Type-Options": "nosniff"}
# RFC 6797: two years, as Mozilla's guidelines; sent on HTTPS answers only.
HSTS = "max-age=63072000"


def create_app(config: Config, schedules: HostSchedules | None = None, fleet: Fleet | None = None) -> web.Application:
    """Build the aiohttp application for a resolved config; reads no argv, environment or file.

    ``schedules``: this process's part in the host's schedules (by default, it runs them).
    ``fleet``: with --redis, the link to the state the fleet shares (the caller opens and closes it).
    """
    tokens = TokenStore(config.tokens)
    # auth.clients: only with HTTPS (config.py checked), whose context tells what is verified.
    clients = ClientStore(config.clients, config.tls) if config.client_sources and config.tls else None
    metrics = _metrics(config, fleet)
    # The middlewares: with --metrics, the one counting requests, outermost of all (it counts
    # each answer with the status it leaves with, an error's as rendered); then error_middleware,
    # which renders every error raised inside it as JSON and adds the headers every answer
    # carries, and runs the checks each request must pass before its handler, in this order:
    # 1. behind trusted proxies, the client and scheme they report are swapped in first (its
    #    ``forward``), so that the auth throttle, the handlers and the access log see the real
    #    client; without trusted proxies, a check that warns once that forwarded headers came
    #    (a proxy left out);
    # 2. the Host check (DNS rebinding), only while the service is open on loopback with no
    #    proxy in front (never together with a proxy), before anything else looks at the request;
    # 3. the authorization decides before any routing outcome is revealed (an unknown path
    #    without a token is 401, not 404), scopes included;
    # 4. the JSON Content-Type check (415) after it, so that an unauthorized request is 401
    #    whatever its body, and before the user's code;
    # 5. the user's dependencies run only for authorized requests.
    # One middleware for them all: aiohttp's cost is per middleware (a coroutine each).
    headers = {**HEADERS, "Strict-Transport-Security": HSTS} if config.tls else HEADERS
    tracebacks = TracebackLog()
    checks: list[Check] = []
    forward = None
    if config.proxied:
        forward = TrustedProxies(config.settings.trusted_proxies).forward
    else:
        checks.append(UntrustedForwarding())
    # Tokens cannot appear on reload when none was configured at start (a token file must
    # hold one), nor auth.jwt, and auth.clients stays on once given (emptied, it lets nobody
    # in), so "open" is known here once.
    # The names of an ACME certificate are names this server is meant to be reached by.
    allowed_hosts = config.settings.allowed_hosts + (config.acme.domains if config.acme else ())
    open_service = not config.tokens and clients is None and config.jwt is None
    if open_service and not config.proxied and config.loopback_only and ANY_HOST not in allowed_hosts:
        checks.append(HostGuard(allowed_hosts).check)
    # With --redis, the failures are counted fleet-wide (fleetthrottle.py); else by this process.
    throttle = FleetThrottle(fleet) if fleet is not None else FailureThrottle()
    checks.append(authorizer(tokens, throttle, clients, config.jwt))
    checks.append(check_json_body)
    if config.dependencies:
        checks.append(dependencies_check(config.dependencies))
    middlewares = [metrics.middleware()] if metrics else []
    middlewares.append(error_middleware(headers, tracebacks, checks, forward))
    app = web.Application(middlewares=middlewares, client_max_size=config.settings.max_body_size)
    app[CONFIG] = config
    app[WORKFLOWS] = config.workflows
    app[TOKENS] = tokens
    if fleet is not None:
        app[FLEET] = fleet
    if isinstance(throttle, FleetThrottle):
        app.cleanup_ctx.append(throttle.listening)  # the fleet's news of clients at the limit
    if clients is not None:
        app[CLIENTS] = clients
    app[LIMITS] = WorkflowLimits(config.settings.limit_concurrency, config.settings.timeout_workflow)
    app[READINESS] = Readiness()  # starting: serve() says when every listener serves, and when the stop begins
    setup_workflow_runtime(app, schedules)
    if config.jwt:
        config.jwt.setup(app)  # its keys kept fresh while the app runs

    async def count_repeated_errors(app: web.Application) -> None:
        tracebacks.flush()  # the repeats since the last count, before the process ends

    app.on_cleanup.append(count_repeated_errors)
    app.router.add_get("/health", views.health)  # HEAD too: 200, no body
    app.router.add_get("/ready", ready)  # 503 while starting or stopping
    app.router.add_post("/workflow", views.run_workflow)
    setup_pipeline_routes(app, config.pipelines)  # /segment and the others, for the sections configured
    if metrics:
        metrics.setup(app)  # GET /metrics
    for extension in config.extensions:
        extension(app)
    setup_openapi(app, config)  # last: it documents every route, the extensions' included
    return app


def _metrics(config: Config, fleet: Fleet | None) -> Metrics | None:
    """The metrics of the app, with --metrics; None without (and no cost)."""
    if not config.settings.metrics:
        return None
    # An extra (pip install 'aioserver[metrics]'), which the default install lacks: imported
    # only when asked for (config.py has checked it is installed).
    from .metrics import Metrics

    return Metrics(config.workflows, config.tls, config.metrics_dir, fleet)
