"""What serve() adds to aiohttp, on the real ``python -m aioserver`` in each conftest deployment.

The in-process tests drive the app through aiohttp's test client or a runner of their own, which
skip serve()'s wiring: the runner it makes (the keep-alive timeout, the malformed-HTTP answer on
every listener), its access logger and its file limit. Here the real server shows each.
"""

from __future__ import annotations

import http.client
import re
import resource
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest

from conftest import TOKEN, TOKEN_HASH, PemFiles, Server

HEALTH = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
# RFC 3339 times, with the UTC offset (SPEC section 8).
RECORD = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: .*\n"
)


def tls_args(pem: PemFiles) -> tuple[str, ...]:
    return ("--ssl-certfile", str(pem.cert), "--ssl-keyfile", str(pem.key))


def connect(port: int, context: ssl.SSLContext | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(sock, server_hostname="localhost") if context else sock


def health(port: int, context: ssl.SSLContext | None = None) -> int:
    with connect(port, context) as sock:
        sock.sendall(HEALTH.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        return int(sock.recv(4096).split(b" ")[1])


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """How long until the server closes ``sock`` (its answers read and dropped), if within ``seconds``."""
    started = time.monotonic()
    sock.settimeout(0.1)
    while time.monotonic() - started < seconds:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except ConnectionError:
            return time.monotonic() - started
    return None


def wait_for_log(server: Server, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in "".join(server.log):
        assert time.monotonic() < deadline, f"no {text!r} in:\n" + "".join(server.log)
        time.sleep(0.05)


# -- --timeout-keep-alive, as serve()'s runner applies it: slow heads and idle connections end


def test_a_client_slow_to_send_its_head_is_cut_off_while_others_are_served() -> None:
    with Server("--timeout-keep-alive", "1") as server, connect(server.port) as slow:
        started = time.monotonic()
        pieces = [b"GET /health HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", *(b"X-Slow-%d: 1\r\n" % i for i in range(40))]
        for piece in pieces:  # a header every quarter of a second: the head never ends
            try:
                slow.sendall(piece)
            except ConnectionError:
                break
            assert health(server.port) == 200  # a well-behaved client meanwhile
            if closed_within(slow, 0.25) is not None:
                break
        assert time.monotonic() - started < 4  # cut off after about 1 s, not when it ran out of headers


def test_an_idle_keep_alive_connection_is_closed() -> None:
    with Server("--timeout-keep-alive", "1") as server, connect(server.port) as sock:
        sock.sendall(HEALTH)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        idle = closed_within(sock, 10)
        assert idle is not None and 0.5 < idle < 4


# -- a request that is not HTTP: a JSON 400 on every listener, none of its bytes answered or logged

MALFORMED = [
    (b"POST /workflow HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\x01x\r\n\r\n", "BadHttpMessage"),
    (
        b"POST /workflow HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s" + b"A" * 300 + b"\r\n\r\n",
        "LineTooLong",
    ),
    (b"GET /a b/%s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "BadStatusLine"),
]


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_malformed_http_is_json_and_never_echoed_or_logged(
    pem_files: PemFiles, client_ssl_ctx: ssl.SSLContext, tls: bool
) -> None:
    args = ("--max-field-size", "200", "--log-level", "debug", *(tls_args(pem_files) if tls else ()))
    with Server(*args, env={"TOKEN": TOKEN_HASH}) as server:
        for request, kind in MALFORMED:
            with connect(server.port, client_ssl_ctx if tls else None) as sock:
                sock.sendall(request % TOKEN.encode())
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert re.match(rb"HTTP/1\.[01] 400 ", head), answer  # 1.0: aiohttp's answer to what it could not parse
            assert body == b'{"error": "malformed HTTP request (%s)"}' % kind.encode()
            assert b"\r\nServer: aioserver\r\n" in head and b"\r\nX-Content-Type-Options: nosniff\r\n" in head
            assert TOKEN.encode() not in answer
            wait_for_log(server, f"malformed request from 127.0.0.1: {kind}")  # who and what, for the operator
    log = "".join(server.log)
    assert "DEBUG" in log and TOKEN not in log and "Traceback" not in log


# -- the access log: one line per request, whole lines, all written out by a clean stop


@pytest.mark.workers
def test_every_request_gets_one_whole_access_line() -> None:
    # More lines than a batch (256) per process, from clients at once (with workers, several
    # processes write to the same stream), and one request that ends while the server stops.
    clients, each = 8, 150
    failures: list[BaseException] = []
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

    def client(port: int, body: str, count: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for i in range(count):
                connection.request("POST", f"/workflow?n={i}", body, headers)
                response = connection.getresponse()
                assert response.status == 200 and response.read()
        except BaseException as exc:
            failures.append(exc)
        finally:
            connection.close()

    config = "workflow:\n  echo: {tasks: [echo]}\n  nap: {tasks: [{action: sample_actions.async_sleepy, args: [1]}]}\n"
    with Server("--config", config, env={"TOKEN": TOKEN_HASH}) as server:
        echo = '{"name": "echo", "elements": [1]}'
        threads = [threading.Thread(target=client, args=(server.port, echo, each)) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        last = threading.Thread(target=client, args=(server.port, '{"name": "nap", "elements": [1]}', 1))
        last.start()
        time.sleep(0.5)  # the nap is under way: it ends during the drain, just before the exit
        server.process.send_signal(signal.SIGTERM)
        last.join()
        assert server.process.wait(timeout=20) == 0
    assert not failures, failures
    log = "".join(server.log)
    broken = [line for line in log.splitlines(keepends=True) if not RECORD.fullmatch(line)]
    assert not broken, broken[:5]
    access = [line for line in server.log if " INFO aiohttp.access: " in line]
    echo = r'"POST /workflow HTTP/1\.1" 200 3 \d+\.\d{3}s token \w{16} "(echo|nap)"'
    line = re.compile(rf".* INFO aiohttp\.access: 127\.0\.0\.1 http {echo}\n")
    assert len(access) == clients * each + 1 and all(line.fullmatch(entry) for entry in access), access[:3]
    assert re.search(r'" 200 \d+ (0\.9|1)\.\d{3}s token \w{16} "nap"\n', log)  # the nap's, written before the exit


# -- the file limit: raised as far as --limit-connections needs, or a warning when it cannot be


@pytest.fixture
def soft_file_limit() -> Iterator[int]:
    """A soft RLIMIT_NOFILE of 1024 (systemd's default) for the servers this test starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_file_limit_is_raised_for_limit_connections(soft_file_limit: int) -> None:
    hard = soft_file_limit
    needed = 2000 + 64 + 256  # connections, refusals being answered, the rest (connections.py)
    assert hard == resource.RLIM_INFINITY or hard >= needed, "this machine's hard limit is too low for the test"
    with Server("--limit-connections", "2000") as server:
        assert resource.prlimit(server.process.pid, resource.RLIMIT_NOFILE) == (needed, hard)
    assert "file descriptors" not in "".join(server.log)
    if hard != resource.RLIM_INFINITY:
        with Server("--limit-connections", str(hard)) as server:  # more than the hard limit allows
            assert resource.prlimit(server.process.pid, resource.RLIMIT_NOFILE) == (hard, hard)
        assert f"--limit-connections {hard} needs about {hard + 320} file descriptors" in "".join(server.log)


# -- out of descriptors: the TLS listeners' acceptor pauses, says so, and serves again


def test_out_of_descriptors_the_tls_listener_pauses_and_recovers(
    pem_files: PemFiles, client_ssl_ctx: ssl.SSLContext
) -> None:
    with Server("--limit-connections", "5000", *tls_args(pem_files)) as server:
        _, hard = resource.prlimit(server.process.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(server.process.pid, resource.RLIMIT_NOFILE, (100, hard))
        held = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(150)]
        try:
            wait_for_log(server, "cannot accept connections: Too many open files; trying again in 1s")
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 15
        while True:  # the handshakes of the closed ones fail, and free their descriptors
            try:
                if health(server.port, client_ssl_ctx) == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "".join(server.log)
            time.sleep(0.2)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=20) == 0
    log = "".join(server.log)
    assert "Traceback" not in log and log.count("cannot accept connections") < 30  # once per pause (1 s)
