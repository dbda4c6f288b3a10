"""Every answer of every listener is aioserver's, aiohttp's own answers included.

``Server: aioserver`` (never aiohttp's name and version) and ``X-Content-Type-Options:
nosniff`` on each, ``Strict-Transport-Security`` on HTTPS answers only, JSON bodies for errors,
and none of the client's bytes in a body. Raw sockets, against the real ``python -m aioserver``
with ``--redirect-http`` (in each conftest deployment) and against the same apps served in-process
(asyncio's loop).
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
from aiohttp import web

from aioserver import create_app, load_config
from aioserver.limits import LimitedRunner
from aioserver.server import create_redirect_app

from conftest import DEPLOYMENTS, PemFiles, Server

CANARY = "canary-5e1f"  # client bytes that must never come back in a body
BODY = b'{"name": "shout", "elements": [" hi "]}'


@dataclass
class Answer:
    interim: list[int]  # 1xx statuses before the answer
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> object:
        assert self.headers["content-type"].startswith("application/json"), self.headers
        return json.loads(self.body)


def request(method: str, path: str, host: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + body


def exchange(port: int, data: bytes, context: ssl.SSLContext | None = None) -> Answer:
    """Send ``data`` on a new connection and read until the server closes it."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") if context else raw as sock:
            sock.sendall(data)
            while chunk := sock.recv(65536):
                received += chunk
    interim = []
    while True:
        head, _, received = received.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ")[1])
        if status >= 200:
            break
        interim.append(status)
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"{name} twice"
        headers[name.lower()] = value.strip()
    return Answer(interim, status, headers, received)


def assert_ours(answer: Answer, https: bool) -> None:
    assert answer.headers["server"] == "aioserver"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert ("strict-transport-security" in answer.headers) == https
    assert CANARY.encode() not in answer.body
    if answer.status >= 400:
        assert isinstance(answer.json(), dict)


@dataclass
class Listeners:
    main: int
    redirect: int
    context: ssl.SSLContext | None  # the main listener's client context, None for plain HTTP


# -- the real server: HTTPS with --redirect-http, one per deployment for the whole module


@pytest.fixture(scope="module", params=DEPLOYMENTS, ids=str)
def real(request: pytest.FixtureRequest, pem_files: PemFiles, client_ssl_ctx: ssl.SSLContext) -> Iterator[Listeners]:
    args = ("--ssl-certfile", str(pem_files.cert), "--ssl-keyfile", str(pem_files.key), "--redirect-http", "0")
    with Server(*args, listeners=2, deployment=request.param) as server:
        yield Listeners(server.ports[0], server.ports[1], client_ssl_ctx)


def test_redirect_listener_answers_308_as_aioserver(real: Listeners) -> None:
    answer = exchange(real.redirect, request("GET", "/workflow?x=1", f"localhost:{real.redirect}"))
    assert answer.status == 308
    assert answer.headers["location"] == f"https://localhost:{real.main}/workflow?x=1"
    assert_ours(answer, https=False)


@pytest.mark.parametrize("host", [f"{CANARY}:abc", f"{CANARY}:99999", f"[{CANARY}"])
def test_redirect_listener_refuses_a_host_it_cannot_redirect_to(real: Listeners, host: str) -> None:
    answer = exchange(real.redirect, request("GET", "/", host))
    assert (answer.status, answer.json()) == (400, {"error": "invalid Host header"})
    assert_ours(answer, https=False)


def test_redirect_listener_ignores_an_unknown_expectation(real: Listeners) -> None:
    answer = exchange(real.redirect, request("GET", "/", f"localhost:{real.redirect}", {"Expect": CANARY}))
    assert (answer.interim, answer.status) == ([], 308)
    assert_ours(answer, https=False)


def test_redirect_listener_continues_then_redirects(real: Listeners) -> None:
    data = request("POST", "/workflow", f"localhost:{real.redirect}", {"Expect": "100-continue"}, BODY)
    answer = exchange(real.redirect, data)
    assert (answer.interim, answer.status) == ([100], 308)
    assert_ours(answer, https=False)


def test_malformed_requests_on_both_listeners(real: Listeners) -> None:
    for port, context in ((real.redirect, None), (real.main, real.context)):
        answer = exchange(port, f"GET /{CANARY}\x01 HTTP/1.1\r\nHost: localhost\r\n\r\n".encode(), context)
        assert answer.status == 400 and answer.headers["server"] == "aioserver"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert CANARY.encode() not in answer.body and isinstance(answer.json(), dict)


# What aiohttp's router answers before any middleware: the expectation (417, echoing it, with
# aiohttp's Server header) whatever the route, unknown paths and methods included.
EXPECTATIONS = [
    ("GET", "/health", {"Expect": CANARY}, b"", [], 200),
    ("GET", "/nowhere", {"Expect": CANARY}, b"", [], 404),
    ("DELETE", "/health", {"Expect": CANARY}, b"", [], 405),
    ("POST", "/workflow", {"Expect": f"100-continue, {CANARY}"}, BODY, [100], 200),
    ("POST", "/workflow", {"Expect": "100-Continue"}, BODY, [100], 200),
    ("POST", "/nowhere", {"Expect": "100-continue"}, BODY, [100], 404),
    ("GET", "/health", {}, b"", [], 200),
]


@pytest.mark.parametrize(("method", "path", "headers", "body", "interim", "status"), EXPECTATIONS)
def test_expectations_on_https(
    real: Listeners,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    interim: list[int],
    status: int,
) -> None:
    answer = exchange(real.main, request(method, path, f"localhost:{real.main}", headers, body), real.context)
    assert (answer.interim, answer.status) == (interim, status)
    assert_ours(answer, https=True)
    if status == 200 and path == "/workflow":
        assert json.loads(answer.body) == ["HI!"]


# -- the same apps in-process, on asyncio's loop (plain HTTP: no HSTS anywhere)


@pytest.fixture
async def in_process() -> AsyncIterator[Listeners]:
    config = load_config(None, env={})
    runners = [
        LimitedRunner(create_app(config), config.settings),
        LimitedRunner(create_redirect_app(8443), config.settings),
    ]
    ports = []
    for runner in runners:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ports.append(runner.addresses[0][1])
    yield Listeners(ports[0], ports[1], None)
    for runner in runners:
        await runner.cleanup()


@pytest.mark.parametrize(("method", "path", "headers", "body", "interim", "status"), EXPECTATIONS)
async def test_expectations_in_process(
    in_process: Listeners,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    interim: list[int],
    status: int,
) -> None:
    data = request(method, path, f"localhost:{in_process.main}", headers, body)
    answer = await asyncio.to_thread(exchange, in_process.main, data)
    assert (answer.interim, answer.status) == (interim, status)
    assert_ours(answer, https=False)


@pytest.mark.parametrize(
    ("host", "headers", "status"),
    [(f"{CANARY}:abc", {}, 400), ("localhost", {"Expect": CANARY}, 308), ("localhost", {}, 308)],
)
async def test_redirect_app_in_process(in_process: Listeners, host: str, headers: dict[str, str], status: int) -> None:
    answer = await asyncio.to_thread(exchange, in_process.redirect, request("GET", "/x", host, headers))
    assert answer.status == status
    assert_ours(answer, https=False)
    if status == 308:
        assert answer.headers["location"] == "https://localhost:8443/x"
