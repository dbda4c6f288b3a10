"""Prometheus metrics: ``GET /metrics`` with ``--metrics``, on prometheus-client (the metrics extra).

What is counted (SPEC section 8), all by the outermost middleware, once a request is answered:

- ``aioserver_requests_total{method,route,status}`` and ``aioserver_request_duration_seconds{route}``.
  The route is the matched resource's canonical path (``/items/{id}``), ``unmatched`` when none
  matched (404, 405), and the method one of HTTP's own or ``other``: no client can make a label
  value up. A request whose client went away before its answer is not counted (nor logged).
- ``aioserver_workflow_runs_total{workflow,outcome}`` and ``aioserver_workflow_duration_seconds{workflow}``:
  ``POST /workflow`` once it named a configured workflow (views.py notes the name), by what its
  answer says: ``ok`` (200), ``timeout`` (504, past --timeout-workflow), ``cancelled`` (its client
  went away, or the shutdown cut it off: 503), ``error`` (400, 500, 502: the workflow raised, or
  returned what is not JSON). A request refused before (busy, unknown name, a token without it)
  is a request only. The duration is the request's.
- ``aioserver_auth_failures_total{reason}``: the reason auth.py notes on a refused request.
- ``aioserver_connections_open`` and ``aioserver_tls_certificate_expiry_timestamp_seconds`` (the
  notAfter of the certificate served, as loaded, reloaded or renewed): read when scraped.
- ``aioserver_redis_up``, with ``--redis``: 1 while the fleet's Redis answers, 0 while it is away
  (fleet.py tells of each change); under ``--workers`` the lowest of the workers'.

Every label value is one the service chose; the series of the known ones (each configured
workflow and outcome, each reason) are there from the start, at 0.

One process keeps its series in memory (:class:`_Memory`: a few additions per request; the
scrape turns them into prometheus-client's metric families). Under ``--workers`` (:class:`_Files`),
each worker has prometheus-client write its series to memory-mapped files, as they change, in a
directory the parent makes before forking (:class:`WorkerFiles`); a scrape, whichever worker
answers it, reads them all (prometheus-client's multiprocess mode). The files are named by the
worker's slot, not its pid: a worker that dies leaves its counts in them (a counter never goes
back), and its replacement counts on from there, so that workers dying again and again (a
crash loop) leave no more files for each scrape to read. Its gauges are dropped when the parent
collects it; the live workers write theirs every second and at each scrape they answer.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.utils import floatToGoString

from .auth import AUTH_FAILURE, AUTH_FAILURES
from .connections import CONNECTIONS, Connections
from .errors import CUT_OFF
from .fleet import Fleet
from .tls import ReloadableContext
from .views import WORKFLOW

PATH = "/metrics"
WORKFLOW_ROUTE = "/workflow"
UNMATCHED = "unmatched"  # the route of a request that matched none (404, 405)
OTHER = "other"  # the method of a request whose method is none of these
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"})
REFUSALS = frozenset({400, 401, 403, 429})  # the statuses of auth.py's refusals
OUTCOMES = ("ok", "error", "timeout", "cancelled")
# What the answer to POST /workflow says of a run, once a workflow was named; "error" for the
# rest. 503 then is the shutdown's cut-off (a busy server's comes before a name is read); 403
# is a token that may not run it: not a run.
_OUTCOME_BY_STATUS: dict[int, str | None] = {200: "ok", 504: "timeout", 503: "cancelled", 403: None}
INF = float("inf")
# prometheus-client's default buckets for requests (5 ms to 10 s); workflows may run up to
# --timeout-workflow (300 s by default).
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, INF)
WORKFLOW_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, INF)
REFRESH = 1.0  # seconds between writes of a worker's gauges, under --workers
SHARED_DIRECTORY = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's name, read where a value is made


@dataclass(frozen=True)
class Family:
    """A metric: a counter, or a histogram with these bucket bounds (+Inf last)."""

    name: str
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] | None = None


REQUESTS = Family(
    "aioserver_requests", "HTTP requests answered, by method, route and status", ("method", "route", "status")
)
REQUEST_DURATION = Family(
    "aioserver_request_duration_seconds", "Time to answer a request, by route", ("route",), REQUEST_BUCKETS
)
WORKFLOW_RUNS = Family(
    "aioserver_workflow_runs",
    "Workflow runs of POST /workflow, by workflow and outcome (ok, error, timeout, cancelled)",
    ("workflow", "outcome"),
)
WORKFLOW_DURATION = Family(
    "aioserver_workflow_duration_seconds", "Time to answer POST /workflow, by workflow", ("workflow",), WORKFLOW_BUCKETS
)
AUTH_FAILURES_FAMILY = Family(
    "aioserver_auth_failures", "Requests refused by the authorization, by reason", ("reason",)
)


@dataclass(frozen=True)
class Reading:
    """A gauge, read from the process when scraped; under --workers, combined as ``mode`` says."""

    name: str
    help: str
    read: Callable[[], float]
    mode: Literal["livesum", "livemin"]  # prometheus-client's multiprocess mode


class Counting(Protocol):
    """A counter's series: ours in memory, or prometheus-client's."""

    def inc(self) -> None: ...


class Timing(Protocol):
    """A histogram's series: ours in memory, or prometheus-client's."""

    def observe(self, seconds: float, /) -> None: ...


class Metrics:
    """The metrics of one process, and the answer to a scrape.

    ``shared``: the directory the workers share (under ``--workers``), whose files a scrape reads.
    """

    def __init__(
        self,
        workflows: Iterable[str],
        tls: ReloadableContext | None,
        shared: str | None = None,
        fleet: Fleet | None = None,
    ) -> None:
        self.tls = tls
        self.connections: Connections | None = None  # the server's, once started (none under a test client)
        readings = [
            Reading("aioserver_connections_open", "Connections open, TLS handshakes included", self._open, "livesum")
        ]
        if tls is not None:
            # Under --workers the soonest among them: a worker left on an old certificate shows.
            readings.append(
                Reading(
                    "aioserver_tls_certificate_expiry_timestamp_seconds",
                    "When the certificate served expires (its notAfter), in seconds since the epoch; 0 while unknown",
                    self._expiry,
                    "livemin",
                )
            )
        self._redis_up = 1.0 if fleet is None or fleet.up else 0.0
        if fleet is not None:
            # Under --workers the lowest among them: 0 as soon as one worker cannot reach Redis
            # (it counts alone), whatever the others see; a dead worker's value is dropped.
            readings.append(
                Reading(
                    "aioserver_redis_up",
                    "Whether the fleet's Redis (--redis) answers: 1, or 0 while it is away",
                    lambda: self._redis_up,
                    "livemin",
                )
            )
            fleet.changed.append(self._redis_changed)
        self.store: _Memory | _Files = _Files(shared, readings) if shared else _Memory(readings)
        self.workflows = frozenset(workflows)
        # The series each request adds to, by (method, route, status): made once each.
        self._series: dict[tuple[str, str, int], tuple[Counting, Timing]] = {}
        self._durations: dict[str, Timing] = {}
        store = self.store
        self._runs = {
            (name, outcome): store.counter(WORKFLOW_RUNS, name, outcome)
            for name in self.workflows
            for outcome in OUTCOMES
        }
        self._run_durations = {name: store.histogram(WORKFLOW_DURATION, name) for name in self.workflows}
        self._failures = {reason: store.counter(AUTH_FAILURES_FAMILY, reason) for reason in AUTH_FAILURES}

    def setup(self, app: web.Application) -> None:
        """Serve ``GET /metrics`` on ``app``, and follow its server's connections."""
        app.router.add_get(PATH, self.scrape)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)

    def middleware(self) -> Middleware:
        """The middleware counting and timing every request (to be the outermost)."""
        observe = self.observe

        @web.middleware
        async def measure(request: web.Request, handler: Handler) -> web.StreamResponse:
            started = time.perf_counter()
            try:
                response = await handler(request)
            except asyncio.CancelledError:  # its client went away: no answer to count, a run cut short
                self._ran(request, "cancelled", time.perf_counter() - started)
                raise
            observe(request, response.status, time.perf_counter() - started)
            return response

        return measure

    def observe(self, request: web.Request, status: int, seconds: float) -> None:
        """Count an answered request (on the served path: a few dictionary look-ups and additions)."""
        method = request.method
        if method not in METHODS:
            method = OTHER
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else UNMATCHED
        key = (method, route, status)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = self._new_series(method, route, status)
        series[0].inc()
        series[1].observe(seconds)
        if status in REFUSALS:
            reason = request.get(AUTH_FAILURE)
            if reason is not None:
                self._failures[reason].inc()
        if route == WORKFLOW_ROUTE:
            outcome = _OUTCOME_BY_STATUS.get(status, "error")
            if outcome == "cancelled" and not request.get(CUT_OFF):
                outcome = "error"  # a 503 of the workflow's own making
            if outcome is not None:
                self._ran(request, outcome, seconds)

    def _new_series(self, method: str, route: str, status: int) -> tuple[Counting, Timing]:
        duration = self._durations.get(route)
        if duration is None:
            duration = self._durations[route] = self.store.histogram(REQUEST_DURATION, route)
        return self.store.counter(REQUESTS, method, route, str(status)), duration

    def _ran(self, request: web.Request, outcome: str, seconds: float) -> None:
        name = request.get(WORKFLOW)
        if name is None or name not in self.workflows:  # refused before it named one, or not one of ours
            return
        self._runs[(name, outcome)].inc()
        self._run_durations[name].observe(seconds)

    async def scrape(self, request: web.Request) -> web.Response:
        """``GET /metrics``: every metric, in Prometheus's text format (every worker's, under --workers)."""
        return web.Response(body=await self.store.exposition(), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    def _redis_changed(self, up: bool) -> None:
        """Fleet.changed's callback: the gauge follows at once (under --workers, written to the files now)."""
        self._redis_up = 1.0 if up else 0.0
        if isinstance(self.store, _Files):
            self.store.refresh()

    def _open(self) -> float:
        return len(self.connections) if self.connections is not None else 0

    def _expiry(self) -> float:
        not_after = self.tls.not_after if self.tls is not None else None
        return not_after.timestamp() if not_after is not None else 0

    async def _start(self, app: web.Application) -> None:
        self.connections = app.get(CONNECTIONS)
        self.store.start()

    async def _stop(self, app: web.Application) -> None:
        self.store.stop()


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1


class _Timings:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1  # the first bucket whose bound is >= seconds
        self.total += seconds


class _Memory:
    """The series of one process, in its memory, turned into metric families when scraped."""

    def __init__(self, readings: list[Reading]) -> None:
        self.readings = readings
        self.series: dict[Family, dict[tuple[str, ...], _Count | _Timings]] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def counter(self, family: Family, *labels: str) -> Counting:
        series = self.series.setdefault(family, {}).setdefault(labels, _Count())
        assert isinstance(series, _Count)
        return series

    def histogram(self, family: Family, *labels: str) -> Timing:
        assert family.buckets is not None
        series = self.series.setdefault(family, {}).setdefault(labels, _Timings(family.buckets))
        assert isinstance(series, _Timings)
        return series

    def collect(self) -> Iterator[Metric]:
        """The metric families, for prometheus-client's exposition (a Collector)."""
        for family, series in self.series.items():
            if family.buckets is None:
                counter = CounterMetricFamily(family.name, family.help, labels=family.labels)
                for labels, value in series.items():
                    assert isinstance(value, _Count)
                    counter.add_metric(labels, value.value)
                yield counter
                continue
            histogram = HistogramMetricFamily(family.name, family.help, labels=family.labels)
            for labels, timings in series.items():
                assert isinstance(timings, _Timings)
                cumulative, buckets = 0, []
                for bound, count in zip(timings.bounds, timings.counts):
                    cumulative += count
                    buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
                histogram.add_metric(labels, buckets, timings.total)
            yield histogram
        for reading in self.readings:
            yield GaugeMetricFamily(reading.name, reading.help, value=reading.read())

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    async def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Files:
    """Series written by prometheus-client to the workers' shared files as they change; a
    scrape reads every worker's, off the event loop."""

    def __init__(self, directory: str, readings: list[Reading]) -> None:
        _keep_values_in_files()
        self.metrics: dict[Family, Counter | Histogram] = {}
        self.gauges = [
            (reading, Gauge(reading.name, reading.help, multiprocess_mode=reading.mode, registry=None))
            for reading in readings
        ]
        self.registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(self.registry, directory)  # type: ignore[no-untyped-call]
        self._timer: asyncio.TimerHandle | None = None
        # A gauge's file holds 0 from its making: written now, a worker still starting does not
        # pull the other workers' lowest (livemin) down to 0 (Redis away, a certificate expired).
        self.refresh()

    def _metric(self, family: Family) -> Counter | Histogram:
        metric = self.metrics.get(family)
        if metric is None:
            if family.buckets is None:
                metric = Counter(family.name, family.help, family.labels, registry=None)
            else:
                metric = Histogram(family.name, family.help, family.labels, buckets=family.buckets, registry=None)
            self.metrics[family] = metric
        return metric

    def counter(self, family: Family, *labels: str) -> Counting:
        metric = self._metric(family)
        assert isinstance(metric, Counter)
        return metric.labels(*labels)

    def histogram(self, family: Family, *labels: str) -> Timing:
        metric = self._metric(family)
        assert isinstance(metric, Histogram)
        return metric.labels(*labels)

    def refresh(self) -> None:
        """Write this process's gauges: the other workers' scrapes read them from its files."""
        for reading, gauge in self.gauges:
            gauge.set(reading.read())

    def start(self) -> None:
        self.refresh()
        self._timer = asyncio.get_running_loop().call_later(REFRESH, self._tick)

    def _tick(self) -> None:
        self.refresh()
        self._timer = asyncio.get_running_loop().call_later(REFRESH, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    async def exposition(self) -> bytes:
        self.refresh()
        return await asyncio.to_thread(generate_latest, self.registry)  # a file per worker and kind


def _keep_values_in_files() -> None:
    """Have prometheus-client write this process's values to the shared files.

    It chooses when first imported, from the environment: a worker's parent imports it before
    it makes the directory (WorkerFiles, below), and a user's extension may import it sooner still.
    """
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


class WorkerFiles:
    """The directory where the workers keep their metrics, made by the parent before it forks.

    The path is passed on in the environment, where prometheus-client looks for it. A worker's
    files are named by its slot (``serve_as``, in the worker); ``forget`` drops the gauges of a
    worker that died; ``remove`` the directory, when the parent exits.
    """

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="aioserver-metrics-")
        os.environ[SHARED_DIRECTORY] = self.path

    @staticmethod
    def serve_as(slot: int) -> None:
        """In a worker just forked: write this process's values to the files of its ``slot``.

        prometheus-client names them by pid by default: each replacement of a dead worker would
        add files of its own, read at every scrape. A worker is only started once the one it
        replaces is dead, so the two never write at once; a process forked from a worker
        (an extension's) writes to files of its own pid, as prometheus-client would have it.
        """
        name, worker = _slot_name(slot), os.getpid()

        def identifier() -> str:
            pid = os.getpid()
            return name if pid == worker else str(pid)

        values.ValueClass = values.MultiProcessValue(identifier)  # type: ignore[no-untyped-call]

    def forget(self, slot: int) -> None:
        """Drop the gauges of the worker of ``slot``, which died (its counters stay)."""
        mark_process_dead(_slot_name(slot), self.path)  # type: ignore[no-untyped-call]

    def remove(self) -> None:
        os.environ.pop(SHARED_DIRECTORY, None)
        shutil.rmtree(self.path, ignore_errors=True)


def _slot_name(slot: int) -> str:
    return f"worker{slot}"
