"""Prometheus metrics: ``GET /metrics`` with ``--metrics``, on prometheus-client (the metrics extra).

What is counted, and where (SPEC section 8):

- ``aioserver_requests_total{method,route,status}`` and ``aioserver_request_duration_seconds{route}``:
  by the outermost middleware, so that each answer counts with the status it leaves with. The
  route is the matched resource's canonical path (``/items/{id}``), ``unmatched`` when none
  matched, and the method one of HTTP's own or ``other``: no client can make a label value up.
  A request whose client went away before its answer is not counted (nor logged).
- ``aioserver_workflow_runs_total{workflow,outcome}`` and ``aioserver_workflow_duration_seconds{workflow}``:
  the runs of ``POST /workflow``, timed where the time limit is applied (limits.py). Outcomes:
  ``ok``; ``error`` (it raised: 400, 500, 502); ``timeout`` (past --timeout-workflow: 504);
  ``cancelled`` (its client went away, or the shutdown cut it off). A request refused before
  its run starts (busy, unknown name, a token without it) is counted as a request only.
- ``aioserver_auth_failures_total{reason}``: the reason auth.py notes on a refused request.
- ``aioserver_connections_open`` and ``aioserver_tls_certificate_expiry_timestamp_seconds`` (the
  notAfter of the certificate served, as loaded, reloaded or renewed): read at each scrape.

Every label value is one the service chose, and the series of the known ones (every
configured workflow and outcome, every reason) exist from the start, at 0.

Under ``--workers``, each worker writes its values to memory-mapped files, in a directory its
parent makes before forking (:class:`WorkerFiles`), and a scrape, whichever worker answers it,
reads them all: prometheus-client's multiprocess mode. A worker that dies leaves its files: its
counts stay in the sums (a counter never goes back), and its replacement writes files of its
own. Its gauges are dropped when the parent collects it; the others' are written every second.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from .auth import AUTH_FAILURE, AUTH_FAILURES
from .connections import CONNECTIONS, Connections
from .limits import WorkflowLimits
from .tls import ReloadableContext

T = TypeVar("T")

PATH = "/metrics"
UNMATCHED = "unmatched"  # the route of a request that matched none (404, 405)
OTHER = "other"  # the method of a request whose method is none of these
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"})
OUTCOMES = ("ok", "error", "timeout", "cancelled")
# prometheus-client's default buckets for requests (5 ms to 10 s); workflows may run up to
# --timeout-workflow (300 s by default).
WORKFLOW_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, float("inf"))
REFRESH = 1.0  # seconds between writes of a worker's gauges, under --workers
SHARED_DIRECTORY = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's name, read where a value is made


class Metrics:
    """The metrics of one process, and the answer to a scrape.

    ``shared``: the directory the workers share (under ``--workers``), whose files a scrape reads.
    """

    def __init__(self, workflows: Iterable[str], tls: ReloadableContext | None, shared: str | None = None) -> None:
        _keep_values(bool(shared))
        # No ``_created`` series (prometheus-client's switch is for the whole process): the
        # workers' files have none, and they would double the lines of a scrape.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.tls = tls
        self.connections: Connections | None = None  # the server's, once started (not under a test client)
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "aioserver_requests",
            "HTTP requests answered, by method, route and status",
            ("method", "route", "status"),
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "aioserver_request_duration_seconds",
            "Time to answer a request, by route",
            ("route",),
            registry=self.registry,
        )
        self.workflow_runs = Counter(
            "aioserver_workflow_runs",
            "Workflow runs of POST /workflow, by workflow and outcome (ok, error, timeout, cancelled)",
            ("workflow", "outcome"),
            registry=self.registry,
        )
        self.workflow_duration = Histogram(
            "aioserver_workflow_duration_seconds",
            "Time a workflow of POST /workflow ran, by workflow",
            ("workflow",),
            buckets=WORKFLOW_BUCKETS,
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "aioserver_auth_failures",
            "Requests refused by the authorization, by reason",
            ("reason",),
            registry=self.registry,
        )
        # Under --workers: the sum over the live workers, the soonest expiry among them.
        self.connections_open = Gauge(
            "aioserver_connections_open",
            "Connections open, TLS handshakes included",
            multiprocess_mode="livesum",
            registry=self.registry,
        )
        self.certificate_expiry = (
            Gauge(
                "aioserver_tls_certificate_expiry_timestamp_seconds",
                "When the certificate served expires (its notAfter), in seconds since the epoch; 0 while unknown",
                multiprocess_mode="livemin",
                registry=self.registry,
            )
            if tls is not None
            else None
        )
        # The series each request adds to, by (method, route, status): made once each.
        self._series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._durations: dict[str, Histogram] = {}
        self._runs = {
            (name, outcome): self.workflow_runs.labels(name, outcome) for name in workflows for outcome in OUTCOMES
        }
        self._run_durations = {name: self.workflow_duration.labels(name) for name in workflows}
        self._failures = {reason: self.auth_failures.labels(reason) for reason in AUTH_FAILURES}
        self._scraped: CollectorRegistry = self.registry
        if shared:
            self._scraped = CollectorRegistry()
            MultiProcessCollector(self._scraped, shared)  # type: ignore[no-untyped-call]
        self._shared = bool(shared)
        self._timer: asyncio.TimerHandle | None = None

    def setup(self, app: web.Application) -> None:
        """Serve ``GET /metrics`` on ``app``, and follow its server's connections."""
        app.router.add_get(PATH, self.scrape)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)

    def middleware(self) -> Middleware:
        """The middleware counting and timing every request (to be the outermost)."""
        observe = self.observe_request

        @web.middleware
        async def measure(request: web.Request, handler: Handler) -> web.StreamResponse:
            started = time.perf_counter()
            response = await handler(request)
            observe(request, response.status, time.perf_counter() - started)
            return response

        return measure

    def observe_request(self, request: web.Request, status: int, duration: float) -> None:
        method = request.method
        if method not in METHODS:
            method = OTHER
        resource = request.match_info.route.resource
        key = (method, resource.canonical if resource is not None else UNMATCHED, status)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = self._new_series(*key)
        series[0].inc()
        series[1].observe(duration)
        reason = request.get(AUTH_FAILURE)
        if reason is not None:
            self._failures[reason].inc()

    def _new_series(self, method: str, route: str, status: int) -> tuple[Counter, Histogram]:
        duration = self._durations.get(route)
        if duration is None:
            duration = self._durations[route] = self.request_duration.labels(route)
        return self.requests.labels(method, route, str(status)), duration

    def observe_run(self, workflow: str, outcome: str, duration: float) -> None:
        runs = self._runs.get((workflow, outcome))
        if runs is not None:  # a configured workflow: the only ones run
            runs.inc()
            self._run_durations[workflow].observe(duration)

    def limits(self, concurrency: int, timeout: float) -> WorkflowLimits:
        """Workflow limits (limits.py) that count each run."""
        return _CountedLimits(concurrency, timeout, self)

    def refresh(self) -> None:
        """Set the gauges of this process to what they are now."""
        self.connections_open.set(len(self.connections) if self.connections is not None else 0)
        if self.certificate_expiry is not None and self.tls is not None:
            not_after = self.tls.not_after
            self.certificate_expiry.set(not_after.timestamp() if not_after is not None else 0)

    async def scrape(self, request: web.Request) -> web.Response:
        """``GET /metrics``: every metric, in Prometheus's text format (every worker's, under --workers)."""
        self.refresh()
        if self._shared:  # files to read, one per worker and kind: off the event loop
            body = await asyncio.to_thread(generate_latest, self._scraped)
        else:
            body = generate_latest(self._scraped)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    async def _start(self, app: web.Application) -> None:
        self.connections = app.get(CONNECTIONS)
        self.refresh()
        if self._shared:  # the other workers' scrapes read our gauges from our files
            self._timer = asyncio.get_running_loop().call_later(REFRESH, self._tick)

    def _tick(self) -> None:
        self.refresh()
        self._timer = asyncio.get_running_loop().call_later(REFRESH, self._tick)

    async def _stop(self, app: web.Application) -> None:
        if self._timer is not None:
            self._timer.cancel()


class _CountedLimits(WorkflowLimits):
    """The workflow limits, counting each run by workflow and outcome, with its duration."""

    def __init__(self, concurrency: int, timeout: float, metrics: Metrics) -> None:
        super().__init__(concurrency, timeout)
        self.metrics = metrics

    async def run(self, work: Callable[[], Awaitable[T]], workflow: str = "") -> T:
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await super().run(work, workflow)
            outcome = "ok"
            return result
        except web.HTTPGatewayTimeout:  # past the time limit
            outcome = "timeout"
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self.metrics.observe_run(workflow, outcome, time.perf_counter() - started)


def _keep_values(shared: bool) -> None:
    """Have this process's values kept in the shared files (under --workers), else in memory.

    prometheus-client chooses when first imported, from the environment: a worker's parent
    imports it before it makes the directory (WorkerFiles, below), a user's extension may import
    it sooner still, and a single process may find ``PROMETHEUS_MULTIPROC_DIR`` left in its
    environment, naming a directory that is not ours, or none.
    """
    if shared != getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue() if shared else values.MutexValue  # type: ignore[no-untyped-call]


class WorkerFiles:
    """The directory where the workers keep their metrics, made by the parent before it forks.

    The path is passed on in the environment, where prometheus-client looks for it. ``forget``
    drops the gauges of a worker that died; ``remove`` the directory, when the parent exits.
    """

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="aioserver-metrics-")
        os.environ[SHARED_DIRECTORY] = self.path

    def forget(self, pid: int) -> None:
        mark_process_dead(pid, self.path)  # type: ignore[no-untyped-call]

    def remove(self) -> None:
        os.environ.pop(SHARED_DIRECTORY, None)
        shutil.rmtree(self.path, ignore_errors=True)
