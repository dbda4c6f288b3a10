"""Connections from accept to close, on the real server (in each conftest deployment: both loops).

Idle and handshaking connections make room for new ones; only busy ones mean a 503, which is
answered in full (never a reset); TLS handshakes count from accept and are bounded in time; an
answer its client does not read is cut off after --timeout-send without progress, and sooner
when its connection is needed.
"""

from __future__ import annotations

import http.client
import json
import logging
import resource
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import PemFiles, Server

CONFIG = """
workflow:
  echo: {tasks: [echo]}
  busy: {tasks: [{action: sample_actions.async_sleepy, args: [4]}]}
"""
LIMIT_LINE = "connection limit reached"
HEALTH = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "config.yml"
    path.write_text(CONFIG)
    return str(path)


def tls_args(pem: PemFiles) -> tuple[str, ...]:
    return ("--ssl-certfile", str(pem.cert), "--ssl-keyfile", str(pem.key))


def connect(port: int, context: ssl.SSLContext | None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(sock, server_hostname="localhost") if context else sock


def read_answer(sock: socket.socket) -> bytes:
    """One response (head and its Content-Length body); a reset fails the test, as it should."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
    head = data.split(b"\r\n\r\n")[0].lower()
    length = int(head.split(b"content-length:")[1].split(b"\r\n")[0]) if b"content-length:" in head else 0
    while len(data) < len(head) + 4 + length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def health(port: int, context: ssl.SSLContext | None, timeout: float = 10) -> int:
    if context:
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            "localhost", port, context=context, timeout=timeout
        )
    else:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status
    finally:
        connection.close()


def wait_for(condition, timeout: float = 10) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def many_files() -> Iterator[None]:
    """Room in this test process for a thousand client sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_idle_connections_make_room(
    config: str, pem_files: PemFiles, client_ssl_ctx: ssl.SSLContext, tls: bool
) -> None:
    context = client_ssl_ctx if tls else None
    args = ("--config", config, "--limit-connections", "4", *(tls_args(pem_files) if tls else ()))
    with Server(*args) as server:
        held = [connect(server.port, context) for _ in range(4)]
        held[2].sendall(HEALTH)  # a keep-alive connection, idle once answered
        assert read_answer(held[2]).startswith(b"HTTP/1.1 200 ")
        time.sleep(1.2)  # idle long enough to be closed (connections.RECLAIM_IDLE)
        newcomers = []
        for _ in range(3):  # each new one (kept open) takes the place of the oldest idle one
            sock = connect(server.port, context)
            sock.sendall(HEALTH)
            assert read_answer(sock).startswith(b"HTTP/1.1 200 ")
            newcomers.append(sock)
        for sock in held[:3]:
            sock.settimeout(5)
            assert sock.recv(1) == b""  # closed to make room, oldest first
        held[3].sendall(HEALTH)  # the youngest of them is still served
        assert read_answer(held[3]).startswith(b"HTTP/1.1 200 ")
        for sock in held + newcomers:
            sock.close()
    assert "".join(server.log).count(LIMIT_LINE) == 1


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_busy_connections_mean_503_in_full(
    config: str, pem_files: PemFiles, client_ssl_ctx: ssl.SSLContext, tls: bool
) -> None:
    context = client_ssl_ctx if tls else None
    args = ("--config", config, "--limit-connections", "2", *(tls_args(pem_files) if tls else ()))
    body = b'{"name": "busy", "elements": [1]}'
    post = (
        b"POST /workflow HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    with Server(*args) as server:
        busy = [connect(server.port, context) for _ in range(2)]
        for sock in busy:
            sock.sendall(post)
        time.sleep(0.5)  # both requests in progress: nothing to reclaim
        for request in (HEALTH, post):  # a body too: read, so that closing sends no reset
            with connect(server.port, context) as sock:
                sock.sendall(request)
                answer = read_answer(sock)
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b"Retry-After: 1\r\n" in answer and answer.endswith(b'{"error": "too many connections"}\r\n')
            # Ours like every answer: our name, no sniffing.
            assert b"Server: aioserver\r\n" in answer and b"X-Content-Type-Options: nosniff\r\n" in answer
        for sock in busy:  # the busy ones were not disturbed
            assert read_answer(sock).startswith(b"HTTP/1.1 200 ")
            sock.close()
        assert wait_for(lambda: health(server.port, context) == 200)
    log = "".join(server.log)
    assert log.count(LIMIT_LINE) == 1 and "Traceback" not in log


@pytest.mark.workers
def test_over_the_limit_each_process_answers_503_in_full(config: str) -> None:
    # The limit is per process, and the kernel hands each connection to any worker: with
    # several, a worker at its limit refuses while another has room. Refused is a 503 in full
    # all the same, and each worker at its limit says so once (over TLS: see above).
    args = ("--config", config, "--limit-connections", "2")
    body = b'{"name": "busy", "elements": [1]}'
    post = (
        b"POST /workflow HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    with Server(*args) as server:
        clients = [connect(server.port, None) for _ in range(10)]
        for sock in clients:
            sock.sendall(post)
        answers = [read_answer(sock) for sock in clients]  # the 503s at once, the busy ones after 4 s
        for sock in clients:
            sock.close()
    served = sum(answer.startswith(b"HTTP/1.1 200 ") for answer in answers)
    refused = [answer for answer in answers if answer.startswith(b"HTTP/1.1 503 ")]
    assert served + len(refused) == 10 and 2 <= served <= 2 * server.workers, answers
    assert all(answer.endswith(b'{"error": "too many connections"}\r\n') for answer in refused)
    log = "".join(server.log)
    assert 1 <= log.count(LIMIT_LINE) <= server.workers and "Traceback" not in log


def test_handshakes_count_and_cannot_lock_others_out(
    config: str, pem_files: PemFiles, client_ssl_ctx: ssl.SSLContext, many_files: None
) -> None:
    with Server("--config", config, "--limit-connections", "50", *tls_args(pem_files)) as server:
        # The soft limit systemd gives a service by default (and that the review found it under).
        _, hard = resource.prlimit(server.process.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(server.process.pid, resource.RLIMIT_NOFILE, (1024, hard))
        idle = []
        for _ in range(11):  # 1,100 TCP connects that never start their handshake
            for _ in range(100):
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", server.port))
                idle.append(sock)
            time.sleep(0.05)  # within the listen queue's room: each one connects
        try:
            time.sleep(1)
            started = time.monotonic()
            assert health(server.port, client_ssl_ctx) == 200
            assert time.monotonic() - started < 5  # not stalled behind the idle ones
        finally:
            for sock in idle:
                sock.close()
    assert "".join(server.log).count(LIMIT_LINE) == 1


def test_handshake_time_is_bounded(config: str, pem_files: PemFiles) -> None:
    with Server("--config", config, "--timeout-handshake", "1", *tls_args(pem_files)) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            started = time.monotonic()
            assert sock.recv(1) == b""  # cut off by the server, not by our timeout
            assert 0.5 < time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("limits", "raised_to", "warned"),
    [
        ((1024, 524288), 1000 + 64 + 256, False),  # systemd's default: the soft limit is raised
        ((1024, 1024), None, True),  # cannot be raised: say so
        ((65536, 65536), None, False),  # LimitNOFILE=65536, as conf/aioserver.service
    ],
)
def test_file_limit_is_raised_or_warned_about(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    limits: tuple[int, int],
    raised_to: int | None,
    warned: bool,
) -> None:
    from aioserver import connections

    raised: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: limits)
    monkeypatch.setattr(resource, "setrlimit", lambda _, value: raised.append(value))
    with caplog.at_level(logging.WARNING, logger="aioserver.connections"):
        connections.ensure_file_limit(1000)
    assert raised == ([(raised_to, limits[1])] if raised_to else [])
    assert ("needs about 1320 file descriptors" in caplog.text) is warned


@pytest.mark.workers
def test_busy_keep_alive_clients_never_lose_an_answer(config: str) -> None:
    # More keep-alive clients than the limit, each sending its next request as soon as it has
    # the answer: a connection is "idle" for an instant between two requests, and cutting it
    # then made the client lose an answer the server had sent (and logged 200): reclaiming
    # must leave such connections alone.
    import threading

    received = [0]
    failures = [0]
    lock = threading.Lock()

    def client(port: int, until: float) -> None:
        sock = None
        while time.monotonic() < until:
            try:
                sock = sock or connect(port, None)
                sock.sendall(HEALTH)
                answer = read_answer(sock)
            except OSError:
                answer = b""
            with lock:
                if answer.startswith(b"HTTP/1.1 200 "):
                    received[0] += 1
                    continue
                failures[0] += 1
            if sock is not None:
                sock.close()
                sock = None
        if sock is not None:
            sock.close()

    with Server("--config", config, "--limit-connections", "4") as server:
        until = time.monotonic() + 3
        threads = [threading.Thread(target=client, args=(server.port, until)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        server.process.terminate()
        assert server.process.wait(timeout=10) == 0
    served = sum('"GET /health HTTP/1.1" 200' in line for line in server.log)
    assert received[0] > 100
    assert served == received[0], f"{served - received[0]} answers sent and lost, {failures[0]} failures"


# -- answers no one reads: clients whose receive window is tiny (SO_RCVBUF) and that never read
#    an answer far bigger than what the kernels on both ends hold of it.

ECHO_SIZE = 8_000_000
TIMEOUT_LINE = "send timeout"


def echo_request(size: int) -> bytes:
    body = json.dumps({"name": "echo", "elements": ["x" * size]}).encode()
    head = b"POST /workflow HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    return head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


def tiny_window(port: int, context: ssl.SSLContext | None) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # before connecting: the window it offers
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return context.wrap_socket(sock, server_hostname="localhost") if context else sock


def read_to_end(sock: socket.socket) -> bytes:
    """What the server sent until it closed or reset the connection."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionError, ssl.SSLError):
        pass
    return data


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"connection closed after {len(data)} bytes"
        data += chunk
    return data


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_answers_no_one_reads_are_cut_off(
    config: str, pem_files: PemFiles, client_ssl_ctx: ssl.SSLContext, tls: bool
) -> None:
    # The attack: as many connections as the limit, each waiting for an answer it never reads.
    # Its handler waits in aiohttp's drain(); without a send timeout, for ever, and others get 503.
    context = client_ssl_ctx if tls else None
    args = ("--config", config, "--limit-connections", "4", "--timeout-send", "2")
    with Server(*args, *(tls_args(pem_files) if tls else ())) as server:
        stuck = [tiny_window(server.port, context) for _ in range(4)]
        for sock in stuck:
            sock.sendall(echo_request(ECHO_SIZE))
        assert wait_for(lambda: "".join(server.log).count(TIMEOUT_LINE) == 4, timeout=20)
        assert health(server.port, context) == 200
        for sock in stuck:
            assert len(read_to_end(sock)) < ECHO_SIZE  # cut off, the answer unsent
            sock.close()
        server.process.terminate()  # a clean exit: the access log is written out
        assert server.process.wait(timeout=10) == 0
    log = "".join(server.log)
    assert log.count(TIMEOUT_LINE) == 4 and "Traceback" not in log
    # Each request in the access log, once; over plain HTTP its handler was still writing the
    # answer (in aiohttp's drain()), and none of it counts as sent.
    assert log.count('"POST /workflow HTTP/1.1" 200 ') == 4
    assert tls or log.count('"POST /workflow HTTP/1.1" 200 0 ') == 4


def test_answers_left_in_the_buffer_after_the_handler_are_cut_off() -> None:
    # The handler has returned and the connection is idle, or closed by the keep-alive timer,
    # but part of its answer is still in the transport's buffer: the transport waits for the
    # client to take it before it lets go of the connection.
    args = ("--limit-connections", "1", "--timeout-send", "2", "--timeout-keep-alive", "1")
    with Server(*args, env={"EXTENSIONS": "sample_plugins.add_unsent"}) as server:
        stuck = tiny_window(server.port, None)
        stuck.sendall(b"GET /unsent HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert wait_for(lambda: '"GET /unsent HTTP/1.1" 200' in "".join(server.log))  # the handler is done
        assert wait_for(lambda: health(server.port, None) == 200, timeout=20)
        assert len(read_to_end(stuck)) < 40_000
        stuck.close()
    log = "".join(server.log)
    assert log.count(TIMEOUT_LINE) == 1 and "Traceback" not in log


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_a_slow_reader_is_never_cut_off(
    config: str, pem_files: PemFiles, client_ssl_ctx: ssl.SSLContext, tls: bool
) -> None:
    # 64 KiB every half second: the kernel makes room for the server's next write only once
    # about a third of its send buffer (MBs) is read, so for seconds on end the server's own
    # buffer does not move; the client does, and that is progress.
    context = client_ssl_ctx if tls else None
    args = ("--config", config, "--timeout-send", "2")
    with Server(*args, *(tls_args(pem_files) if tls else ())) as server:
        with tiny_window(server.port, context) as sock:
            sock.sendall(echo_request(ECHO_SIZE))
            answer = b""
            slow_until = time.monotonic() + 5  # the kernel alone would not take more for longer than that
            while time.monotonic() < slow_until:
                answer += read_exactly(sock, 65536)
                time.sleep(0.5)
            head, _, body = answer.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            body += read_exactly(sock, length - len(body))  # then the rest, as fast as it comes
        assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body) == ["x" * ECHO_SIZE]
    assert TIMEOUT_LINE not in "".join(server.log)


def test_stalled_answers_make_room_at_the_limit(config: str) -> None:
    # At the limit, a connection whose client has read nothing for a while makes room for a
    # new one long before its send timeout.
    args = ("--config", config, "--limit-connections", "4", "--timeout-send", "60")
    with Server(*args) as server:
        stuck = [tiny_window(server.port, None) for _ in range(4)]
        for sock in stuck:
            sock.sendall(echo_request(ECHO_SIZE))
        assert health(server.port, None) == 503  # all four answering
        assert wait_for(lambda: health(server.port, None) == 200, timeout=20)
        assert len(read_to_end(stuck[0])) < ECHO_SIZE  # the oldest, cut off
        for sock in stuck:
            sock.close()
    log = "".join(server.log)
    assert log.count("connection reset to make room") == 1
    assert TIMEOUT_LINE not in log and "Traceback" not in log
