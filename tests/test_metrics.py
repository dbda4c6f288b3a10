"""--metrics: GET /metrics in Prometheus's text format (SPEC section 8), one scrape for every worker."""

from __future__ import annotations

import glob
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from test_workers import alive

from aioserver import create_app, load_config, views
from aioserver.errors import CUT_OFF
from aioserver.metrics import OUTCOMES, Metrics
from aioserver.views import WORKFLOW

from conftest import TOKEN, TOKEN_HASH, ClientFactory, Deployment, PemFiles, Server, aioserver_command

LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
SCRAPER = "scraper-token-3b1f0c9e"  # may call GET /metrics only
SCOPED = "scoped-token-9d27aa41"  # may run "double" only


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


WORKFLOWS = """
workflow:
  double: {tasks: [sample_actions.double]}
  boom: {tasks: [sample_actions.boom]}
  slow: {tasks: [{action: sample_actions.async_sleepy, args: {seconds: 30}}]}
"""
CONFIG = (
    WORKFLOWS
    + f"""
extensions: [sample_metrics.items]
auth:
  tokens:
    - {{name: admin, sha256: {TOKEN_HASH}}}
    - {{name: scraper, sha256: {sha256(SCRAPER)}, workflows: [/metrics]}}
    - {{name: scoped, sha256: {sha256(SCOPED)}, workflows: [double]}}
"""
)
ROUTES = {"/health", "/workflow", "/metrics", "/items/{id}", "unmatched"}
METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "other"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, by name and labels, through prometheus-client's own parser."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for a series not made yet (a request series appears at its first)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def connect(port: int, context: ssl.SSLContext | None = None, source: str = "127.0.0.1") -> http.client.HTTPConnection:
    if context is None:
        return http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    return http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context, source_address=(source, 0))


def call(
    port: int,
    method: str,
    path: str,
    token: str | None = None,
    body: object = None,
    context: ssl.SSLContext | None = None,
    authorization: str | None = None,
    source: str = "127.0.0.1",
) -> tuple[int, bytes, http.client.HTTPResponse]:
    """One request on a connection of its own."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if authorization is not None:
        headers["Authorization"] = authorization
    connection = connect(port, context, source)
    try:
        connection.request(method, path, json.dumps(body) if body is not None else None, headers)
        response = connection.getresponse()
        return response.status, response.read(), response
    finally:
        connection.close()


def run(port: int, name: str, token: str | None = TOKEN, context: ssl.SSLContext | None = None) -> int:
    return call(port, "POST", "/workflow", token, {"name": name, "elements": [1]}, context)[0]


def scrape(
    port: int, token: str | None = None, context: ssl.SSLContext | None = None, source: str = "127.0.0.1"
) -> Samples:
    status, body, response = call(port, "GET", "/metrics", token, context=context, source=source)
    assert status == 200, body
    assert response.getheader("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
    return parse(body.decode())


def wait_for(condition, what: str, timeout: float = 20):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.1)
    return result


# -- black-box: a real server, both loops


@LOOPS
def test_a_scrape_counts_requests_workflows_and_refusals(
    loop: str, pem_files: PemFiles, client_ssl_ctx: ssl.SSLContext
) -> None:
    tls = ("--ssl-certfile", str(pem_files.cert), "--ssl-keyfile", str(pem_files.key))
    args = ("--config", CONFIG, "--metrics", "--loop", loop, "--timeout-workflow", "2", *tls)
    ctx = client_ssl_ctx
    with Server(*args) as server:
        port = server.port
        assert [run(port, "double", context=ctx) for _ in range(3)] == [200] * 3
        assert run(port, "boom", context=ctx) == 500
        assert run(port, "slow", context=ctx) == 504  # past --timeout-workflow
        # A client gone mid-run: its run is cancelled.
        connection = connect(port, ctx)
        body = json.dumps({"name": "slow", "elements": [1]})
        connection.request(
            "POST", "/workflow", body, {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        )
        time.sleep(0.3)
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()

        # Refusals, each for its reason.
        assert call(port, "GET", "/metrics", context=ctx)[0] == 401  # missing
        assert call(port, "GET", "/metrics", context=ctx, authorization="Basic YTpi")[0] == 401  # missing
        assert call(port, "GET", "/metrics", context=ctx, authorization="Bearer a b")[0] == 400  # invalid_request
        assert call(port, "GET", "/metrics", "wrong", context=ctx)[0] == 401  # invalid_token
        assert call(port, "GET", "/metrics", SCOPED, context=ctx)[0] == 403  # insufficient_scope: the route
        assert run(port, "boom", SCOPED, ctx) == 403  # insufficient_scope: the workflow
        assert run(port, "double", SCOPED, ctx) == 200

        # Hostile paths and methods: no label of the client's making.
        hostile = [f"/x{i}/{'%00' * i}" for i in range(50)] + [
            "/workflow/../etc",
            "/{name}",
            "/%E2%80%A8",
            "/" + "a" * 4000,
        ]
        for path in hostile:
            assert call(port, "GET", path, TOKEN, context=ctx)[0] == 404
        assert call(port, "GET", "/workflow/x", context=ctx)[0] == 401  # unmatched, and refused first
        for item in ("1", "2", "a%20b", "x" * 1000, "%E2%80%A8"):
            assert call(port, "GET", f"/items/{item}", TOKEN, context=ctx)[0] == 200  # the route, not the path
        assert call(port, "PROPFIND", "/workflow", TOKEN, context=ctx)[0] == 405
        assert call(port, "DELETE", "/health", TOKEN, context=ctx)[0] == 405

        samples = wait_for(
            lambda: (
                (s := scrape(port, SCRAPER, ctx))
                and value(s, "aioserver_workflow_runs_total", workflow="slow", outcome="cancelled") == 1
                and s
            ),
            "the cancelled run counted",
        )

        def requests(**labels: str) -> float:
            return value(samples, "aioserver_requests_total", **labels)

        assert requests(method="POST", route="/workflow", status="200") == 4
        assert requests(method="POST", route="/workflow", status="500") == 1
        assert requests(method="POST", route="/workflow", status="504") == 1
        assert requests(method="POST", route="/workflow", status="403") == 1
        assert requests(method="GET", route="/metrics", status="401") == 3
        assert requests(method="GET", route="/metrics", status="400") == 1
        assert requests(method="GET", route="/metrics", status="403") == 1
        assert requests(method="GET", route="unmatched", status="404") == len(hostile)
        assert requests(method="GET", route="unmatched", status="401") == 1
        assert requests(method="GET", route="/items/{id}", status="200") == 5
        assert requests(method="other", route="unmatched", status="405") == 1
        assert requests(method="DELETE", route="unmatched", status="405") == 1
        series = {dict(labels)["route"] for name, labels in samples if name == "aioserver_requests_total"}
        assert series <= ROUTES
        assert {dict(labels)["method"] for name, labels in samples if name == "aioserver_requests_total"} <= METHODS
        histogram = value(samples, "aioserver_request_duration_seconds_count", route="/workflow")
        assert histogram == sum(
            value(samples, "aioserver_requests_total", method="POST", route="/workflow", status=s)
            for s in ("200", "500", "504", "403")
        )
        assert value(samples, "aioserver_request_duration_seconds_bucket", route="/workflow", le="+Inf") == histogram

        def runs(workflow: str, outcome: str) -> float:
            return value(samples, "aioserver_workflow_runs_total", workflow=workflow, outcome=outcome)

        assert [runs("double", o) for o in ("ok", "error", "timeout", "cancelled")] == [4, 0, 0, 0]
        assert [runs("boom", o) for o in ("ok", "error", "timeout", "cancelled")] == [0, 1, 0, 0]
        assert [runs("slow", o) for o in ("ok", "error", "timeout", "cancelled")] == [0, 0, 1, 1]
        assert value(samples, "aioserver_workflow_duration_seconds_count", workflow="slow") == 2
        assert value(samples, "aioserver_workflow_duration_seconds_sum", workflow="slow") >= 2  # the timeout's 2 s
        assert value(samples, "aioserver_workflow_duration_seconds_count", workflow="double") == 4
        assert value(samples, "aioserver_workflow_duration_seconds_sum", workflow="double") < 2

        def failures(reason: str) -> float:
            return value(samples, "aioserver_auth_failures_total", reason=reason)

        assert [failures(r) for r in ("missing", "invalid_request", "invalid_token", "insufficient_scope")] == [
            3,
            1,
            1,
            2,
        ]
        assert failures("throttled") == 0
        assert value(samples, "aioserver_connections_open") >= 1  # the scrape's own
        expiry = x509.load_pem_x509_certificate(pem_files.cert.read_bytes()).not_valid_after_utc.timestamp()
        assert value(samples, "aioserver_tls_certificate_expiry_timestamp_seconds") == expiry

        # Throttled: the 10th failure of a client in a minute makes its next request a 429.
        for _ in range(8):
            assert call(port, "GET", "/metrics", "wrong", context=ctx)[0] == 401
        assert call(port, "GET", "/metrics", SCRAPER, context=ctx)[0] == 429
        samples = scrape(port, SCRAPER, ctx, source="127.0.0.2")  # another client
        assert failures("invalid_token") == 9 and failures("throttled") == 1
        assert value(samples, "aioserver_requests_total", method="GET", route="/metrics", status="429") == 1

        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0


@LOOPS
def test_the_certificate_expiry_follows_a_reload(
    loop: str, tmp_path: Path, tls_certificate_authority: trustme.CA, client_ssl_ctx: ssl.SSLContext
) -> None:
    """The served certificate's notAfter, read again when SIGHUP (as the file watcher, ACME's
    renewal and the hourly renewal of session keys) loads the files anew."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"

    def issue(days: int) -> float:
        not_after = datetime.now(UTC).replace(microsecond=0) + timedelta(days=days)
        leaf = tls_certificate_authority.issue_cert("127.0.0.1", not_after=not_after)
        leaf.private_key_pem.write_to_path(key)
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        return not_after.timestamp()

    first = issue(30)
    args = ("--config", WORKFLOWS, "--metrics", "--loop", loop, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    with Server(*args) as server:
        samples = scrape(server.port, context=client_ssl_ctx)
        assert value(samples, "aioserver_tls_certificate_expiry_timestamp_seconds") == first
        second = issue(3)
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded TLS certificate" in "".join(server.log), "the reload")
        samples = scrape(server.port, context=client_ssl_ctx)
        assert value(samples, "aioserver_tls_certificate_expiry_timestamp_seconds") == second
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0


# -- as deployed: the default install has no prometheus-client; with the extra, every worker counts


@pytest.mark.workers
def test_one_scrape_counts_every_request_as_deployed(deployment: Deployment, tmp_path: Path) -> None:
    if deployment.no_extras:  # pip install aioserver: --metrics names the extra, exit 2
        done = subprocess.run(aioserver_command("--metrics", "--port", "0"), capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines() == [
            "aioserver: error: command line: --metrics: needs the metrics extra: pip install 'aioserver[metrics]'"
        ]
        done = subprocess.run(aioserver_command("--check"), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr  # and without it, all is as before
        return
    # A variable of prometheus-client's left in the environment, naming no directory: ignored.
    env = {"TMPDIR": str(tmp_path), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "nowhere")}
    with Server("--config", WORKFLOWS, "--metrics", env=env) as server:
        statuses = [run(server.port, "double", token=None) for _ in range(20)]
        assert statuses == [200] * 20
        samples = scrape(server.port)
        assert value(samples, "aioserver_requests_total", method="POST", route="/workflow", status="200") == 20
        assert value(samples, "aioserver_workflow_runs_total", workflow="double", outcome="ok") == 20
        shared = glob.glob(str(tmp_path / "aioserver-metrics-*"))
        assert len(shared) == (1 if server.workers > 1 else 0)  # the workers' files, only theirs
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
    assert not os.listdir(tmp_path)  # removed by the parent at its exit


# -- --workers 2: each worker's counts in every scrape, through a worker's death


def worker_pids(server: Server, count: int) -> list[int]:
    """The pids of the workers started so far (the parent logs each), in order."""
    found = wait_for(
        lambda: len(pids := re.findall(r"worker \d started, pid (\d+)", "".join(server.log))) >= count and pids,
        f"{count} workers started",
    )
    return [int(pid) for pid in found]


@contextmanager
def only(server: Server, pid: int) -> Iterator[None]:
    """Every new connection to ``pid``: the other workers are stopped (SIGSTOP) meanwhile, and
    cannot accept one."""
    others = [other for other in worker_pids(server, 2) if other != pid and alive(other)]
    for other in others:
        os.kill(other, signal.SIGSTOP)
    try:
        yield
    finally:
        for other in others:
            os.kill(other, signal.SIGCONT)


def served(samples: Samples) -> float:
    return value(samples, "aioserver_requests_total", method="POST", route="/workflow", status="200")


@LOOPS
def test_every_worker_counts_in_each_scrape_and_a_killed_one_keeps_its_counts(loop: str, tmp_path: Path) -> None:
    """What prometheus-client's multiprocess mode keeps: a worker killed -9 loses nothing it
    counted (its files stay), its replacement counts on in them, and its open connections leave the gauge."""
    args = ("--config", WORKFLOWS, "--metrics", "--workers", "2", "--timeout-worker-healthcheck", "60", "--loop", loop)
    with Server(*args, env={"TMPDIR": str(tmp_path)}, listeners=2) as server:
        (shared,) = glob.glob(str(tmp_path / "aioserver-metrics-*"))
        first, second = worker_pids(server, 2)
        try:
            with only(server, first):
                assert [run(server.port, "double", None) for _ in range(5)] == [200] * 5
            with only(server, second):
                assert [run(server.port, "double", None) for _ in range(7)] == [200] * 7
                assert served(scrape(server.port)) == 12  # answered by the second worker
                # Connections held open at the second worker, written to its file within a second.
                held = [connect(server.port) for _ in range(6)]
                for connection in held:
                    connection.request("GET", "/health")
                    connection.getresponse().read()
                wait_for(lambda: value(scrape(server.port), "aioserver_connections_open") >= 7, "the connections")
            with only(server, first):
                samples = scrape(server.port)  # answered by the first worker, the second's from its files
                assert served(samples) == 12
                assert value(samples, "aioserver_connections_open") >= 7
            os.kill(second, signal.SIGKILL)
            wait_for(lambda: "".join(server.log).count("serving on") >= 3, "the replacement serving")
            third = worker_pids(server, 3)[2]
            counters = {os.path.basename(path) for path in glob.glob(os.path.join(shared, "counter_*.db"))}
            assert counters == {
                "counter_worker0.db",
                "counter_worker1.db",
            }  # the replacement counts on in the dead one's
            for connection in held:
                connection.close()
            with only(server, third):
                samples = scrape(server.port)
                assert served(samples) == 12  # nothing lost, nothing twice
                assert value(samples, "aioserver_connections_open") < 6  # the dead worker's are gone
                assert [run(server.port, "double", None) for _ in range(4)] == [200] * 4
                assert served(scrape(server.port)) == 16
            with only(server, first):
                assert served(scrape(server.port)) == 16
        finally:
            for pid in worker_pids(server, 2):
                if alive(pid):
                    os.kill(pid, signal.SIGCONT)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
    assert f"(pid {second}) was killed by SIGKILL" in "".join(server.log)
    assert not os.listdir(tmp_path)  # the parent removed the files at its exit


@LOOPS
def test_workers_that_keep_dying_leave_no_more_files_to_read_at_each_scrape(loop: str, tmp_path: Path) -> None:
    """A worker's replacement counts on in the files of the worker it replaces: however often
    workers die (a crash loop, an action that kills its process, the parent killing a stuck
    one), the directory holds each slot's files once, and a scrape reads no more of them."""
    args = ("--config", WORKFLOWS, "--metrics", "--workers", "2", "--timeout-worker-healthcheck", "60", "--loop", loop)
    with Server(*args, env={"TMPDIR": str(tmp_path)}, listeners=2) as server:
        (shared,) = glob.glob(str(tmp_path / "aioserver-metrics-*"))
        assert [run(server.port, "double", None) for _ in range(3)] == [200] * 3
        for death in range(1, 7):
            pids = worker_pids(server, 2 + death - 1)
            live = [pid for pid in pids if alive(pid)]
            victim = live[death % len(live)]
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda n=2 + death: "".join(server.log).count("serving on") >= n, f"replacement {death} serving")
            assert [run(server.port, "double", None) for _ in range(2)] == [200] * 2
        files = sorted(os.listdir(shared))
        # Counters, histograms and the open connections' gauge, of the two slots.
        assert len(files) <= 3 * 2, files
        samples = scrape(server.port)
        assert served(samples) == 3 + 6 * 2  # nothing lost, nothing twice
        assert value(samples, "aioserver_connections_open") <= 2  # the scrape's, and a worker's stale second
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
    assert "".join(server.log).count("was killed by SIGKILL") == 6


# -- in-process: what is and is not there


async def test_without_metrics_nothing_is_added(make_client: ClientFactory) -> None:
    with_metrics = create_app(load_config(WORKFLOWS + "server: {metrics: true}"))
    app = create_app(load_config(WORKFLOWS))
    assert len(app.middlewares) == len(with_metrics.middlewares) - 1
    assert {r.canonical for r in with_metrics.router.resources()} - {r.canonical for r in app.router.resources()} == {
        "/metrics"
    }
    client = await make_client(WORKFLOWS)
    response = await client.get("/metrics")
    assert response.status == 404


async def test_label_values_stay_few_whatever_clients_send(make_client: ClientFactory) -> None:
    client = await make_client(WORKFLOWS + "server: {metrics: true}")
    for i in range(300):
        method = ("PROPFIND", "MKCOL", "LOCK", "UNLOCK", "REPORT", "SEARCH", "PURGE")[i % 7]
        response = await client.request(method, f"/{i}/{'%2F' * (i % 7)}?q={i}")
        assert response.status == 404
        response = await client.get(f"/workflow/{i}")
        assert response.status == 404
    response = await client.get("/metrics")
    assert response.status == 200
    samples = parse(await response.text())
    requests = {labels for name, labels in samples if name == "aioserver_requests_total"}
    assert {(dict(labels)["method"], dict(labels)["route"], dict(labels)["status"]) for labels in requests} == {
        ("other", "unmatched", "404"),
        ("GET", "unmatched", "404"),
    }
    routes = {dict(labels)["route"] for name, labels in samples if name.startswith("aioserver_request_duration")}
    assert routes == {"unmatched"}


@pytest.mark.parametrize(("cut_off", "outcome"), [(True, "cancelled"), (False, "error")])
async def test_a_503_is_a_cancelled_run_when_the_shutdown_cut_it_off(cut_off: bool, outcome: str) -> None:
    """The shutdown answers a request it cuts off 503 (server.py); a 503 of the workflow's own
    making is an error. Seen in-process: no scrape reaches a process that is stopping."""
    metrics = Metrics(["double"], None)
    app = web.Application()
    app.router.add_post("/workflow", views.run_workflow)
    request = make_mocked_request("POST", "/workflow", app=app)
    request._match_info = await app.router.resolve(request)
    request[WORKFLOW] = "double"
    if cut_off:
        request[CUT_OFF] = True
    metrics.observe(request, 503, 0.5)
    samples = parse((await metrics.store.exposition()).decode())
    assert value(samples, "aioserver_workflow_runs_total", workflow="double", outcome=outcome) == 1
    assert sum(value(samples, "aioserver_workflow_runs_total", workflow="double", outcome=o) for o in OUTCOMES) == 1
    assert value(samples, "aioserver_workflow_duration_seconds_sum", workflow="double") == 0.5
