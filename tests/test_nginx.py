"""conf/nginx.conf for real: nginx with a master process (root) and workers (its ``user``), in
front of aioserver started from the shipped units (tests/unitfiles.py) or as a process."""

from __future__ import annotations

import grp
import http.client
import json
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_proxy import nginx_config

from aioserver.options import MiB, Settings

from conftest import TOKEN, TOKEN_HASH, PemFiles, Server, free_port
from unitfiles import CONF, Installed, running, service_unit, socket_unit

NGINX_CONF = CONF / "nginx.conf"
LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


@pytest.fixture
def nginx(pem_files: PemFiles) -> Iterator[Callable[..., int]]:
    """``start(upstream, **changed)`` runs nginx as installed (a root master, workers as its
    ``user``) and returns its HTTPS port; stopped gracefully (SIGQUIT) at the end."""
    installed = Installed()  # traversable by nginx's workers, unlike pytest's tmp_path
    processes: list[subprocess.Popen[bytes]] = []

    def start(upstream: str, **changed: str) -> int:
        prefix = installed.path(f"/nginx{len(processes)}")
        prefix.mkdir(mode=0o755)
        port = free_port()
        config = nginx_config(prefix, port, upstream, pem_files, master=True, **changed)
        process = subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(config), "-e", "stderr"])
        processes.append(process)
        deadline = time.monotonic() + 10
        while True:  # until a worker answers
            assert time.monotonic() < deadline and process.poll() is None, "nginx did not start"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return port
            except OSError:
                time.sleep(0.05)

    yield start
    for process in processes:
        process.send_signal(signal.SIGQUIT)  # nginx's graceful stop
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    installed.remove()


def call(
    port: int, context: ssl.SSLContext, method: str, path: str, body: bytes | None = None, token: str | None = TOKEN
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=30)
    try:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        connection.request(method, path, body, headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def directive(name: str, block: str = "") -> str:
    """The value of a directive in conf/nginx.conf (inside the ``block`` it opens, if named)."""
    text = NGINX_CONF.read_text()
    if block:
        text = text[text.index(block) :]
        text = text[: text.index("}")]
    found = re.findall(rf"^\s*{name}\s+([^;]+);", text, re.M)
    assert len(found) == 1, (name, found)
    return str(found[0])


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m)?", value).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[unit]


# -- nginx reaches aioserver on the units' Unix socket


@LOOPS
def test_nginx_workers_reach_the_units_unix_socket(
    loop: str, nginx: Callable[..., int], pem_files: PemFiles, client_ssl_ctx: ssl.SSLContext
) -> None:
    """The README's deployment behind nginx: the socket unit's drop-in makes the socket
    root:www-data 0660; nginx's workers must run in that group ("user www-data;"), else 502."""
    installed = Installed()
    try:
        installed.install(CONF / "config.yml", "/etc/aioserver/config.yml")
        installed.install(f"{TOKEN_HASH} ops\n", "/etc/aioserver/token", 0o640, group=True)
        sockets = socket_unit("nginx.conf")
        with running(installed, service_unit("nginx.conf"), sockets, extra=("--loop", loop)) as service:
            service.ready()
            path = service.paths["/run/aioserver/aioserver.sock"]
            assert (path.stat().st_mode & 0o777, path.stat().st_gid) == (0o660, _gid("www-data"))
            port = nginx(f"unix:{path}")
            status, headers, body = call(
                port, client_ssl_ctx, "POST", "/workflow", b'{"name": "shout", "elements": ["hi"]}'
            )
            assert (status, body) == (200, b'["HI!"]'), body
            assert headers["strict-transport-security"] == "max-age=63072000"
            assert call(port, client_ssl_ctx, "POST", "/workflow", b"{}", token="wrong")[0] == 401
            assert service.stop() == 0
        assert re.search(  # the request id nginx's $request_id (32 hex digits)
            r'127\.0\.0\.1 https "POST /workflow HTTP/1.1" 200 .* ops [0-9a-f]{32} "shout"$', service.text(), re.M
        )
    finally:
        installed.remove()


def _gid(name: str) -> int:
    return grp.getgrnam(name).gr_gid


def test_the_socket_group_is_nginxs_user() -> None:
    """The drop-in's SocketGroup= is the group of conf/nginx.conf's user (nginx: the user's name
    when no group is given), so that one stays right when the other changes."""
    user = directive("user").split()
    group = user[1] if len(user) > 1 else user[0]
    assert socket_unit("nginx.conf").value("Socket", "SocketGroup") == group
    assert int(socket_unit("nginx.conf").value("Socket", "SocketMode") or "0666", 8) & 0o060 == 0o060


# -- nginx's timeouts leave the answer to aioserver; nginx's own errors are JSON like aioserver's


def test_nginx_timeouts_leave_the_answer_to_aioserver() -> None:
    defaults = Settings()
    # A slow workflow gets aioserver's 504 (JSON, at --timeout-workflow), never nginx's first.
    assert seconds(directive("proxy_read_timeout")) > defaults.timeout_workflow
    # aioserver's 408 for a body that does not arrive comes before nginx gives up sending it.
    assert seconds(directive("proxy_send_timeout")) > defaults.timeout_request_body
    # nginx closes its idle connections to aioserver before aioserver does (--timeout-keep-alive):
    # else a request sent on one that aioserver is closing is a 502 (a POST is not retried).
    assert seconds(directive("keepalive_timeout", "upstream aioserver {")) < defaults.timeout_keep_alive
    # The server's limit is aioserver's; the error location has none (it answers the bodies over it).
    limits = re.findall(r"^\s*client_max_body_size\s+([^;]+);", NGINX_CONF.read_text(), re.M)
    assert limits == [f"{defaults.max_body_size // MiB}m", "0"]
    assert directive("client_max_body_size", "location = /.aioserver-error {") == "0"


def json_error(status: int, headers: dict[str, str], body: bytes) -> str:
    """The message of an error answer shaped as aioserver's: JSON {"error": "..."}, and nothing
    of nginx's name, version or upstream addresses."""
    assert status >= 400 and headers["content-type"] == "application/json; charset=utf-8", (status, headers, body)
    document = json.loads(body)
    assert list(document) == ["error"] and isinstance(document["error"], str), body
    assert b"nginx" not in body and b"127.0.0.1" not in body and b"unix:" not in body, body
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["strict-transport-security"] == "max-age=63072000"
    return str(document["error"])


def declared_only(port: int, context: ssl.SSLContext, length: int) -> tuple[int, dict[str, str], bytes]:
    """A POST that declares a body of ``length`` bytes and sends none: answered on its head."""
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=30)
    try:
        connection.putrequest("POST", "/workflow")
        for name, value in (("Content-Type", "application/json"), ("Content-Length", str(length))):
            connection.putheader(name, value)
        connection.putheader("Authorization", f"Bearer {TOKEN}")
        connection.endheaders()
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


SLOW = """
workflow:
  slow:
    tasks:
      - action: sample_actions.async_sleepy
        args: {seconds: 3}
"""


@LOOPS
def test_nginx_own_errors_are_json(loop: str, nginx: Callable[..., int], client_ssl_ctx: ssl.SSLContext) -> None:
    env = {"TOKEN": TOKEN_HASH}
    with Server("--trusted-proxies", "127.0.0.1", "--loop", loop, "--config", SLOW, env=env) as server:
        port = nginx(f"127.0.0.1:{server.port}")
        # 413 from nginx's client_max_body_size, on the declared length: aioserver never sees it.
        answer = declared_only(port, client_ssl_ctx, Settings().max_body_size + 1)
        assert answer[0] == 413 and "too large" in json_error(*answer)
        # 504 from nginx when aioserver takes longer than proxy_read_timeout (made 1 s here).
        slow_port = nginx(f"127.0.0.1:{server.port}", proxy_read_timeout="1s")
        answer = call(slow_port, client_ssl_ctx, "POST", "/workflow", b'{"name": "slow", "elements": [1]}')
        assert answer[0] == 504 and "in time" in json_error(*answer)
        server.process.terminate()
        assert server.process.wait(timeout=15) == 0
    assert 'POST /workflow HTTP/1.1" 413' not in "".join(server.log)
    # 502 from nginx with aioserver down.
    answer = call(port, client_ssl_ctx, "GET", "/health")
    assert answer[0] == 502 and "not answering" in json_error(*answer)


def test_the_request_id_is_nginxs_not_the_clients(nginx: Callable[..., int], client_ssl_ctx: ssl.SSLContext) -> None:
    """conf/nginx.conf hands aioserver nginx's $request_id: a client cannot choose (or reuse) the
    id its request is logged under, and the answer carries the id of both logs."""
    env = {"TOKEN": TOKEN_HASH}
    with Server("--trusted-proxies", "127.0.0.1", env=env) as server:
        port = nginx(f"127.0.0.1:{server.port}")
        connection = http.client.HTTPSConnection("localhost", port, context=client_ssl_ctx, timeout=30)
        try:
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
            connection.request(
                "POST", "/workflow", b'{"name": "echo", "elements": [1]}', {**headers, "X-Request-ID": "chosen-1"}
            )
            answer = connection.getresponse()
            answer.read()
        finally:
            connection.close()
        assert answer.status == 200
        request_id = answer.getheader("X-Request-ID") or ""
        assert re.fullmatch("[0-9a-f]{32}", request_id), request_id  # nginx's $request_id
        server.process.terminate()
        assert server.process.wait(timeout=15) == 0
    log = "".join(server.log)
    assert f" {request_id} " in log and "chosen-1" not in log


def test_aioservers_own_errors_pass_through_nginx(nginx: Callable[..., int], client_ssl_ctx: ssl.SSLContext) -> None:
    """nginx replaces its own errors only (proxy_intercept_errors stays off): aioserver's 504
    at its --timeout-workflow reaches the client as aioserver wrote it."""
    env = {"TOKEN": TOKEN_HASH}
    with Server("--trusted-proxies", "127.0.0.1", "--timeout-workflow", "1", "--config", SLOW, env=env) as server:
        port = nginx(f"127.0.0.1:{server.port}")
        status, headers, body = call(port, client_ssl_ctx, "POST", "/workflow", b'{"name": "slow", "elements": [1]}')
        assert (status, body) == (504, b'{"error": "the workflow took longer than 1s"}')
        assert headers["x-content-type-options"] == "nosniff"  # aioserver's
        server.process.terminate()
        assert server.process.wait(timeout=15) == 0


def curl(port: int, pem_files: PemFiles, version: str, body: Path, tmp_path: Path) -> tuple[int, dict[str, str], bytes]:
    """POST ``body`` to /workflow with curl over ``version`` (``--http1.1``, ``--http2``), on TLS."""
    head, answer = tmp_path / "head", tmp_path / "answer"
    done = subprocess.run(
        ["curl", "-sS", version, "--cacert", str(pem_files.ca), "-D", str(head), "-o", str(answer)]
        + ["-w", "%{http_version}", "-H", f"Authorization: Bearer {TOKEN}", "-H", "Content-Type: application/json"]
        + ["--data-binary", f"@{body}", f"https://localhost:{port}/workflow"],
        capture_output=True,
        timeout=60,
    )
    # curl may complain that the upload was cut short: nginx answers before reading it all.
    assert done.stdout == {"--http2": b"2", "--http1.1": b"1.1"}[version], (done.stdout, done.stderr)
    lines = head.read_text().splitlines()
    status = int(lines[0].split()[1])
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return status, {k: v.strip() for k, v in headers.items()}, answer.read_bytes()


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_a_body_too_large_is_json_over_http1_and_http2(
    version: str, nginx: Callable[..., int], pem_files: PemFiles, tmp_path: Path
) -> None:
    """The error location gets the body limit too: without its own ``client_max_body_size 0``,
    HTTP/2's internal redirect to it failed the limit again, and the client got nginx's HTML."""
    body = tmp_path / "body"
    with body.open("wb") as file:
        file.truncate(Settings().max_body_size + 1)
    with Server("--trusted-proxies", "127.0.0.1", env={"TOKEN": TOKEN_HASH}) as server:
        port = nginx(f"127.0.0.1:{server.port}")
        answer = curl(port, pem_files, version, body, tmp_path)
        assert answer[0] == 413 and "too large" in json_error(*answer)


def raw(port: int, request: bytes, context: ssl.SSLContext | None) -> tuple[int, dict[str, str], bytes]:
    """``request`` as it is (what http.client would not send), over TLS unless ``context`` is None."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname="localhost")
    with sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def test_nginx_request_errors_are_json(nginx: Callable[..., int], client_ssl_ctx: ssl.SSLContext) -> None:
    """The errors nginx answers on a request's head, before aioserver is asked, are JSON too."""
    with Server("--trusted-proxies", "127.0.0.1", env={"TOKEN": TOKEN_HASH}) as server:
        port = nginx(f"127.0.0.1:{server.port}")
        # 497: plain HTTP to the TLS port (nginx answers it as a 400).
        answer = raw(port, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n", None)
        assert answer[0] == 400 and "HTTPS port" in json_error(*answer)
        # 501: a transfer coding nginx does not know.
        request = b"POST /workflow HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: foo\r\n\r\n"
        answer = raw(port, request, client_ssl_ctx)
        assert answer[0] == 501 and "not implemented" in json_error(*answer)
        # 405: TRACE, which nginx refuses itself.
        answer = call(port, client_ssl_ctx, "TRACE", "/workflow")
        assert answer[0] == 405 and "not allowed" in json_error(*answer)
        # 505: an HTTP version nginx does not speak.
        answer = raw(port, b"GET /health HTTP/2.7\r\nHost: localhost\r\n\r\n", client_ssl_ctx)
        assert answer[0] == 505 and "version" in json_error(*answer)
        # 494: a header over large_client_header_buffers (nginx answers it as a 400).
        request = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"x" * 9000 + b"\r\n\r\n"
        answer = raw(port, request, client_ssl_ctx)
        assert answer[0] == 400 and "headers too large" in json_error(*answer)
