"""Connections from accept to close, on the real server (in each conftest deployment: both loops), and in-process.

Idle and handshaking connections make room for new ones; only busy ones mean a 503, which is
answered in full (never a reset); TLS handshakes count from accept and are bounded in time; an
answer its client does not read is cut off after --timeout-send without progress, and sooner
when its connection is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.client
import json
import logging
import os
import re
import resource
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
import trustme
from aiohttp import web

from aioserver import connections, load_config
from aioserver.connections import Connections, TLSSite, overloaded
from aioserver.limits import LimitedRunner
from aioserver.tls import ReloadableContext

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
        try:
            for sock in stuck:
                sock.sendall(echo_request(ECHO_SIZE))
            assert wait_for(lambda: "".join(server.log).count(TIMEOUT_LINE) == 4, timeout=20)
            # The line is logged as the connection is cut: its slot is free a moment later (a
            # loaded machine once answered the first try 503).
            assert wait_for(lambda: health(server.port, context) == 200, timeout=5)
            for sock in stuck:
                assert len(read_to_end(sock)) < ECHO_SIZE  # cut off, the answer unsent
        finally:
            for sock in stuck:
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


# -- in-process: the same machinery on asyncio's loop in this process (where a mutation tester
#    sees it): a tiny app behind LimitedRunner, on TCP or TLSSite listeners on 127.0.0.1.

BIG = 8_000_000
CHUNK = 65536


def tiny_app() -> web.Application:
    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def nap(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.json_response("slept")

    async def big(request: web.Request) -> web.Response:  # aiohttp writes it out, waiting in drain()
        return web.Response(body=b"x" * BIG)

    async def unsent(request: web.Request) -> web.Response:  # the handler and aiohttp done, the transport writes
        assert request.transport is not None
        request.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return web.Response(body=b"x" * 40_000)

    async def stream(request: web.Request) -> web.StreamResponse:  # the handler writes, waiting in drain()
        response = web.StreamResponse()
        response.content_length = BIG
        await response.prepare(request)
        for _ in range(BIG // CHUNK):
            await response.write(b"x" * CHUNK)
        return response

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/nap", nap)
    app.router.add_get("/big", big)
    app.router.add_get("/stream", stream)
    app.router.add_get("/unsent", unsent)
    return app


def listening(family: socket.AddressFamily = socket.AF_INET, address: object = ("127.0.0.1", 0)) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind(address)
    sock.listen(128)
    return sock


@contextlib.asynccontextmanager
async def serving(
    limit: int = 4,
    send_timeout: float = 60.0,
    tls: ssl.SSLContext | None = None,
    handshake_timeout: float = 10.0,
    sock: socket.socket | None = None,
) -> AsyncIterator[tuple[int, Connections, web.BaseSite]]:
    """The tiny app served in this process: its port, its connections and its site."""
    connections = Connections(limit, send_timeout)
    settings = load_config("server: {}\n").settings
    # A client that goes away cancels its handler, as in server.py.
    runner = LimitedRunner(tiny_app(), settings, connections, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    sock = sock or listening()
    site: web.BaseSite
    if tls:
        context = cast(ReloadableContext, SimpleNamespace(current=tls))
        site = TLSSite(runner, sock, context, connections, runner.make_handler, handshake_timeout)
    else:
        site = web.SockSite(runner, sock)
    await site.start()
    try:
        address = sock.getsockname()
        yield (address[1] if isinstance(address, tuple) else 0), connections, site
    finally:
        await runner.cleanup()
        sock.close()


@pytest.fixture(scope="session")
def server_ssl_ctx(tls_certificate: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_certificate.configure_cert(context)
    return context


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def opened(
    port: int, context: ssl.SSLContext | None = None, window: int | None = None, limit: int = CHUNK
) -> Stream:
    """A client connection (TLS: handshake done); ``window``: a tiny receive buffer, for a client that reads nothing.

    asyncio reads ahead up to twice ``limit`` for the client: a small one stops it sooner.
    """
    sock = socket.socket()
    if window:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(
        sock=sock, ssl=context, server_hostname="localhost" if context else None, limit=limit
    )


def overloaded_answer(answer: bytes) -> bool:
    """Whether ``answer`` is the 503 of a refused connection, with a new request id."""
    return re.fullmatch(re.escape(overloaded("zzzz")).replace(b"zzzz", rb"[0-9a-f]{16}"), answer) is not None


async def ask(stream: Stream, request: bytes = HEALTH) -> bytes:
    """The answer to one request (head and Content-Length body), or what came before the end."""
    reader, writer = stream
    writer.write(request)
    try:
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            return head + await reader.readexactly(length)
    except asyncio.IncompleteReadError as closed:
        return closed.partial


async def ended(reader: asyncio.StreamReader, timeout: float = 10) -> bool:
    """Whether the server ends the connection (close or reset) within ``timeout``, reading all it sends."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(CHUNK):
                pass
    except TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError):
        pass
    return True


def closed(*streams: Stream) -> None:
    for _, writer in streams:
        writer.close()


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_in_process_idle_connections_make_room_once_idle_oldest_first(
    tls: bool,
    server_ssl_ctx: ssl.SSLContext,
    client_ssl_ctx: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(connections, "RECLAIM_IDLE", 0.3)
    context = client_ssl_ctx if tls else None
    caplog.set_level(logging.INFO, logger="aioserver.connections")
    async with serving(limit=4, tls=server_ssl_ctx if tls else None) as (port, open_, _):
        held = [await opened(port, context) for _ in range(4)]
        await asyncio.sleep(0.05)
        assert len(open_) == 4  # counted from accept, before any request
        # Idle, but only just: not yet reclaimed, and all are: 503.
        late = await opened(port, context)
        assert overloaded_answer(await ask(late))
        assert len(open_) == 4  # nor was one of them cut off for it
        await asyncio.sleep(0.4)
        newcomers = [await opened(port, context) for _ in range(2)]
        for stream in newcomers:
            assert (await ask(stream)).startswith(b"HTTP/1.1 200 ")
        assert await ended(held[0][0]) and await ended(held[1][0])  # the oldest two made room
        assert (await ask(held[2])).startswith(b"HTTP/1.1 200 ")
        assert len(open_) == 4
        closed(newcomers[0])
        await asyncio.sleep(0.1)
        assert len(open_) == 3
        closed(*held, late, newcomers[1])
        await asyncio.sleep(0.1)
        assert len(open_) == 0
    assert [r.getMessage() for r in caplog.records if r.name == "aioserver.connections"] == [
        "connection limit reached: 4 open; closing the oldest idle or handshaking connection"
        " (else one whose client reads nothing) for each new one, answering 503 while none is",
        "connections back under the limit (3 open): 2 idle or handshaking and 0 stalled ones closed to make room,"
        " 1 refused meanwhile",
    ]


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_in_process_busy_connections_mean_503_in_full(
    tls: bool, server_ssl_ctx: ssl.SSLContext, client_ssl_ctx: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connections, "RECLAIM_IDLE", 0.0)  # busy, not idle, is what keeps them
    context = client_ssl_ctx if tls else None
    async with serving(limit=2, tls=server_ssl_ctx if tls else None) as (port, open_, _):
        busy = [await opened(port, context) for _ in range(2)]
        for _, writer in busy:
            writer.write(b"GET /nap HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await asyncio.sleep(0.2)
        for request in (HEALTH, b"GET /health HTTP/1.1\n\n"):  # a bare LF ends a head too
            refused = await opened(port, context)
            assert overloaded_answer(await ask(refused, request))
            assert await ended(refused[0], timeout=5)  # and the server closes its end
            closed(refused)
        for stream in busy:
            assert (await ask(stream, b"")).startswith(b"HTTP/1.1 200 ")  # not disturbed
        closed(*busy)


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_in_process_sends_nothing_and_is_answered_in_time(
    tls: bool, server_ssl_ctx: ssl.SSLContext, client_ssl_ctx: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused client that sends no request is answered after ANSWER_WAIT, then cut off after as long."""
    monkeypatch.setattr(connections, "ANSWER_WAIT", 0.5)
    context = client_ssl_ctx if tls else None
    async with serving(limit=1, tls=server_ssl_ctx if tls else None) as (port, _, _):
        busy = await opened(port, context)
        busy[1].write(b"GET /nap HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await asyncio.sleep(0.1)
        reader, writer = await opened(port, context)
        started = time.monotonic()
        assert overloaded_answer(await reader.readexactly(len(overloaded("0" * 16))))
        assert time.monotonic() - started >= 0.4
        # The client neither sends nor closes: the server's end goes after ANSWER_WAIT more.
        assert await ended(reader, timeout=5)
        closed(busy, (reader, writer))


@pytest.mark.parametrize(
    ("tls", "path"),  # see tiny_app; /unsent over TLS: asyncio's TLS client would read all 40 KB ahead
    [(False, "/stream"), (False, "/big"), (False, "/unsent"), (True, "/stream"), (True, "/big")],
)
async def test_in_process_answers_no_one_reads_are_cut_off_after_the_send_timeout(
    tls: bool,
    path: str,
    server_ssl_ctx: ssl.SSLContext,
    client_ssl_ctx: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="aioserver.connections")
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    async with serving(limit=4, send_timeout=1, tls=server_ssl_ctx if tls else None) as (port, open_, _):
        reader, writer = await opened(port, client_ssl_ctx if tls else None, window=2048, limit=1024)
        client = writer.get_extra_info("sockname")[1]
        writer.write(b"GET %s HTTP/1.1\r\nHost: localhost\r\n\r\n" % path.encode())
        started = time.monotonic()
        await asyncio.sleep(0.5)
        assert len(open_) == 1 and not reader.at_eof()
        await asyncio.sleep(2)  # stalled for the send timeout: reset, at the next sweep (every 0.25 s)
        assert len(open_) == 0
        assert (await reader.read(CHUNK)).startswith(b"HTTP/1.1 200 ")  # what it holds, then a reset:
        with pytest.raises(ConnectionResetError):  # what the kernel held for it is dropped too
            async with asyncio.timeout(5):
                while await reader.read(CHUNK):
                    pass
        assert time.monotonic() - started >= 1
        writer.close()
        await asyncio.sleep(0.1)
    # An answer cut off in aiohttp's drain() is logged all the same: woken with an error first,
    # rather than cancelled unlogged by the reset (a handler's own write() raises to it instead).
    access = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert len(access) == (path != "/stream") and all(f'"GET {path} HTTP/1.1" 200 ' in line for line in access)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "aioserver.connections"]
    assert re.fullmatch(
        rf"send timeout: 127\.0\.0\.1:{client} read nothing for 1s, [1-9][0-9]+ bytes or more unsent; connection reset",
        line,
    ), line


async def test_in_process_a_slow_reader_is_never_cut_off(caplog: pytest.LogCaptureFixture) -> None:
    """It takes 64 KiB every 0.3 s: the server's buffer may not move for seconds, the kernel's queue does.

    Plain HTTP only: asyncio's TLS client reads ahead into buffers of its own (hundreds of KiB),
    so at this pace it would take nothing from the network for about the 1 s timeout used here
    (test_a_slow_reader_is_never_cut_off covers TLS, with a 2 s timeout, on both loops).
    """
    caplog.set_level(logging.INFO, logger="aioserver.connections")
    async with serving(limit=4, send_timeout=1) as (port, open_, _):
        reader, writer = await opened(port, window=2048)
        writer.write(b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n")
        received = 0
        slow_until = time.monotonic() + 3
        while time.monotonic() < slow_until:
            received += len(await reader.readexactly(CHUNK))
            await asyncio.sleep(0.3)
        while chunk := await reader.read(CHUNK):  # then the rest, as fast as it comes
            received += len(chunk)
            if received >= BIG:
                break
        assert received > BIG and len(open_) == 1
        writer.close()
    assert "send timeout" not in caplog.text


async def test_in_process_stalled_answers_make_room_at_the_limit(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connections, "RECLAIM_STALLED", 0.6)
    monkeypatch.setattr(connections, "SWEEP_EVERY", 0.2)
    caplog.set_level(logging.INFO, logger="aioserver.connections")
    async with serving(limit=2, send_timeout=60) as (port, open_, _):
        stuck = [await opened(port, window=2048) for _ in range(2)]
        for _, writer in stuck:
            writer.write(b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await asyncio.sleep(0.3)  # both stalled, but not for long enough yet
        refused = await opened(port)
        assert overloaded_answer(await ask(refused))
        closed(refused)
        await asyncio.sleep(0.8)
        newcomer = await opened(port)
        assert (await ask(newcomer)).startswith(b"HTTP/1.1 200 ")
        assert await ended(stuck[0][0])  # the oldest, cut off
        client = stuck[0][1].get_extra_info("sockname")[1]
        assert not stuck[1][0].at_eof() and len(open_) == 2
        closed(*stuck, newcomer)
        await asyncio.sleep(0.1)
    lines = [r.getMessage() for r in caplog.records if r.name == "aioserver.connections"]
    assert len(lines) == 3 and lines[0].startswith("connection limit reached: 2 open;")
    assert re.fullmatch(
        rf"connection limit: 127\.0\.0\.1:{client} read nothing for 1s, [1-9][0-9]+ bytes or more unsent;"
        " connection reset to make room",
        lines[1],
    ), lines[1]
    assert lines[2] == (
        "connections back under the limit (1 open): 0 idle or handshaking and 1 stalled ones closed to make room,"
        " 1 refused meanwhile"
    )


async def raw(port: int) -> Stream:
    """A TCP connection that never starts its TLS handshake."""
    return await asyncio.open_connection("127.0.0.1", port)


async def test_in_process_handshakes_count_are_bounded_and_make_room_first(
    server_ssl_ctx: ssl.SSLContext, client_ssl_ctx: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aioserver.connections")
    async with serving(limit=2, tls=server_ssl_ctx, handshake_timeout=1) as (port, open_, _):
        idle = await opened(port, client_ssl_ctx)  # its handshake done, idle only just now
        handshaking = await raw(port)
        await asyncio.sleep(0.1)
        assert len(open_) == 2  # counted from accept, handshake or not
        newcomer = await opened(port, client_ssl_ctx)
        # The one still handshaking made room, though younger than the idle one, and at once.
        assert await ended(handshaking[0], timeout=0.5)
        assert (await ask(newcomer)).startswith(b"HTTP/1.1 200 ")
        assert (await ask(idle)).startswith(b"HTTP/1.1 200 ")
        closed(idle, newcomer, handshaking)
        await asyncio.sleep(0.1)
        assert len(open_) == 0
        # A handshake that does not finish in time is cut off, and no longer counts.
        slow = await raw(port)
        started = time.monotonic()
        assert await ended(slow[0], timeout=5)
        assert time.monotonic() - started >= 0.8
        await asyncio.sleep(0.1)
        assert len(open_) == 0
        # Nor does one that fails.
        bad = await raw(port)
        bad[1].write(b"GET / HTTP/1.1\r\n\r\n")
        assert await ended(bad[0], timeout=0.8)
        await asyncio.sleep(0.1)
        assert len(open_) == 0
        closed(slow, bad)
    assert "TLS handshake failed: " in caplog.text


async def test_in_process_refused_handshakes_free_their_place_among_those_answered(
    server_ssl_ctx: ssl.SSLContext, client_ssl_ctx: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ANSWERING refusals at once at most, beyond that closed unanswered; each frees its place when it ends."""
    monkeypatch.setattr(connections, "ANSWERING", 1)
    async with serving(limit=1, tls=server_ssl_ctx, handshake_timeout=0.5) as (port, _, _):
        busy = await opened(port, client_ssl_ctx)
        busy[1].write(b"GET /nap HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await asyncio.sleep(0.1)
        first = await raw(port)  # refused, to be answered once its handshake is done: it never is
        second = await raw(port)  # refused, none more answered: closed at once
        assert await ended(second[0], timeout=0.3)
        assert await ended(first[0], timeout=3)  # its handshake timed out: its place is free again
        third = await opened(port, client_ssl_ctx)
        fourth = await raw(port)  # and one place only
        assert await ended(fourth[0], timeout=0.3)
        assert overloaded_answer(await ask(third))
        closed(busy, first, second, third, fourth)


async def test_in_process_out_of_descriptors_accepting_pauses_and_resumes(
    server_ssl_ctx: ssl.SSLContext,
    client_ssl_ctx: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(connections, "ACCEPT_RETRY_DELAY", 0.5)
    failures = [errno.EMFILE, errno.ECONNABORTED]

    class Listener(socket.socket):
        def accept(self) -> tuple[socket.socket, object]:
            if failures:
                error = failures.pop(0)
                raise OSError(error, os.strerror(error))
            return super().accept()

    sock = Listener(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    caplog.set_level(logging.INFO, logger="aioserver.connections")
    async with serving(tls=server_ssl_ctx, sock=sock) as (port, open_, site):
        started = time.monotonic()
        connecting = asyncio.ensure_future(opened(port, client_ssl_ctx))  # waits in the kernel's queue meanwhile
        await asyncio.sleep(0.2)
        assert site._server is not None and site._server.is_serving() is False  # paused
        client = await connecting
        assert time.monotonic() - started >= 0.4
        assert (await ask(client)).startswith(b"HTTP/1.1 200 ")
        assert not failures and site._server is not None and site._server.is_serving()
        closed(client)
    assert [r.getMessage() for r in caplog.records] == [
        "cannot accept connections: Too many open files; trying again in 0.5s"
    ]


@pytest.mark.parametrize(
    ("family", "address", "name"),
    [
        (socket.AF_INET, ("127.0.0.1", 0), r"https://127\.0\.0\.1:[0-9]+"),
        (socket.AF_INET6, ("::1", 0), r"https://\[::1\]:[0-9]+"),
        (socket.AF_UNIX, "aioserver.sock", r"https\+unix://.*/aioserver\.sock"),
    ],
)
async def test_in_process_tls_site_names(
    family: socket.AddressFamily, address: object, name: str, server_ssl_ctx: ssl.SSLContext, tmp_path: Path
) -> None:
    sock = listening(family, str(tmp_path / address) if isinstance(address, str) else address)
    async with serving(tls=server_ssl_ctx, sock=sock) as (_, _, site):
        assert re.fullmatch(name, site.name), site.name


async def test_in_process_stopping_cuts_off_handshakes_in_flight(server_ssl_ctx: ssl.SSLContext) -> None:
    async with serving(tls=server_ssl_ctx, handshake_timeout=30) as (port, open_, site):
        handshaking = await raw(port)
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await site.stop()
        assert time.monotonic() - started < 5  # not the handshake timeout
        assert await ended(handshaking[0], timeout=1)
        closed(handshaking)


async def test_in_process_acceptor_serves_again_once_asked(
    server_ssl_ctx: ssl.SSLContext, client_ssl_ctx: ssl.SSLContext
) -> None:
    async with serving(tls=server_ssl_ctx) as (port, _, site):
        acceptor = site._server
        assert isinstance(acceptor, asyncio.AbstractServer) and acceptor.is_serving()
        acceptor.close()
        assert not acceptor.is_serving()
        await acceptor.start_serving()
        await acceptor.start_serving()  # serving already: nothing more
        assert acceptor.is_serving()
        client = await opened(port, client_ssl_ctx)
        assert (await ask(client)).startswith(b"HTTP/1.1 200 ")
        closed(client)
        with pytest.raises(NotImplementedError) as error:
            await acceptor.serve_forever()
        assert str(error.value) == "served by its site: see TLSSite"


class FakeTransport:
    """What Refusal does to its transport, recorded."""

    def __init__(self, eof: bool = True) -> None:
        self.eof = eof
        self.written = b""
        self.calls: list[str] = []

    def write(self, data: bytes) -> None:
        self.written += data

    def can_write_eof(self) -> bool:
        return self.eof

    def write_eof(self) -> None:
        self.calls.append("write_eof")

    def close(self) -> None:
        self.calls.append("close")

    def abort(self) -> None:
        self.calls.append("abort")

    def is_closing(self) -> bool:
        return "abort" in self.calls


def refused(monkeypatch: pytest.MonkeyPatch, eof: bool = True) -> tuple[connections.Refusal, FakeTransport, list[int]]:
    monkeypatch.setattr(connections, "ANSWER_WAIT", 0.2)
    done: list[int] = []
    refusal = connections.Refusal(lambda: done.append(1))
    transport = FakeTransport(eof)
    refusal.connection_made(cast(asyncio.BaseTransport, transport))
    return refusal, transport, done


@pytest.mark.parametrize(
    ("chunks", "answered"),
    [
        ([b"GET / HTTP/1.1\r\nHost: x\r\n", b"\r\n"], True),
        ([b"GET / HTTP/1.1\nHost: x\n\n"], True),
        ([b"GET / HTTP/1.1\r\nHost: x\r\n"], False),
        ([b"x" * connections.HEAD_LIMIT], False),  # as much as a head may be, not yet ended
        ([b"x" * connections.HEAD_LIMIT, b"x"], True),  # more: answered without waiting for its end
    ],
)
async def test_refusal_answers_once_the_head_is_in(
    monkeypatch: pytest.MonkeyPatch, chunks: list[bytes], answered: bool
) -> None:
    refusal, transport, done = refused(monkeypatch)
    for chunk in chunks:
        refusal.data_received(chunk)
    assert overloaded_answer(transport.written) if answered else transport.written == b""
    assert transport.calls == (["write_eof"] if answered else [])
    answer = transport.written
    refusal.data_received(b"\r\n\r\nthe rest of a body")  # read, never answered twice
    assert overloaded_answer(transport.written) and (transport.written == answer or not answered)
    refusal.connection_lost(None)
    refusal.connection_lost(None)
    assert done == [1]  # its place among those answered freed once


async def test_refusal_timers(monkeypatch: pytest.MonkeyPatch) -> None:
    refusal, transport, done = refused(monkeypatch, eof=False)  # TLS: no half-close
    await asyncio.sleep(0.3)  # no request head in ANSWER_WAIT: answered all the same
    assert overloaded_answer(transport.written) and transport.calls == ["close"]
    await asyncio.sleep(0.3)  # the client does not close in ANSWER_WAIT either: cut off
    assert transport.calls == ["close", "abort"]
    refusal.connection_lost(None)
    assert done == [1]


async def test_refusal_answers_at_the_client_eof_and_not_once_closing(monkeypatch: pytest.MonkeyPatch) -> None:
    refusal, transport, _ = refused(monkeypatch)
    refusal.data_received(b"GET / HTTP/1.1\r\n")
    assert refusal.eof_received() is False  # the transport closes once the answer is out
    answer = transport.written
    assert overloaded_answer(answer)
    assert refusal.eof_received() is False and transport.written == answer
    refusal.connection_lost(None)
    await asyncio.sleep(0.3)  # its timers are gone with it
    assert transport.calls == ["write_eof"]
    refusal, transport, _ = refused(monkeypatch)
    transport.abort()
    refusal.eof_received()
    await asyncio.sleep(0.3)
    assert transport.written == b""


async def test_refusal_unanswered_is_closed_at_once() -> None:
    refusal = connections.Refusal(None)
    assert not refusal.answers
    transport = FakeTransport()
    refusal.connection_made(cast(asyncio.BaseTransport, transport))
    assert transport.calls == ["abort"]
    refusal.connection_lost(None)


@pytest.mark.parametrize(
    ("limits", "setrlimit", "raised_to", "warned"),
    [
        ((resource.RLIM_INFINITY, resource.RLIM_INFINITY), None, None, False),
        ((1320, 2000), None, None, False),  # just enough already
        ((1319, 2000), None, 1320, False),
        ((1024, resource.RLIM_INFINITY), None, 1320, False),
        ((1024, 1200), None, 1200, True),  # as far as it goes, and said
        ((1024, 4096), ValueError, None, True),  # not allowed: said
        ((1024, 4096), OSError, None, True),
    ],
)
def test_file_limit_cases(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    limits: tuple[int, int],
    setrlimit: type[Exception] | None,
    raised_to: int | None,
    warned: bool,
) -> None:
    raised: list[tuple[int, int]] = []

    def set_limit(kind: int, value: tuple[int, int]) -> None:
        assert kind == resource.RLIMIT_NOFILE
        if setrlimit:
            raise setrlimit("no")
        raised.append(value)

    monkeypatch.setattr(resource, "getrlimit", lambda kind: limits if kind == resource.RLIMIT_NOFILE else (0, 0))
    monkeypatch.setattr(resource, "setrlimit", set_limit)
    with caplog.at_level(logging.WARNING, logger="aioserver.connections"):
        connections.ensure_file_limit(1000)
    assert raised == ([(raised_to, limits[1])] if raised_to else [])
    soft = raised_to or limits[0]
    assert [r.getMessage() for r in caplog.records] == (
        [
            f"--limit-connections 1000 needs about 1320 file descriptors, but RLIMIT_NOFILE allows {soft}:"
            " raise it (LimitNOFILE=, ulimit -n) or lower --limit-connections"
        ]
        if warned
        else []
    )


def test_kernel_queue_is_what_the_peer_has_not_acknowledged() -> None:
    assert connections._kernel_queue(-1) == 0
    with listening() as server:
        sender = socket.socket()
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        sender.connect(server.getsockname())
        receiver, _ = server.accept()
        receiver.setblocking(False)
        with sender, receiver:
            assert connections._kernel_queue(sender.fileno()) == 0
            sender.setblocking(False)
            sent = 0
            with contextlib.suppress(BlockingIOError):
                while True:
                    sent += sender.send(b"x" * 4096)
            assert 0 < connections._kernel_queue(sender.fileno()) <= sent
            received = 0
            deadline = time.monotonic() + 10
            while received < sent and time.monotonic() < deadline:
                with contextlib.suppress(BlockingIOError):
                    received += len(receiver.recv(1 << 20))
            assert wait_for(lambda: connections._kernel_queue(sender.fileno()) == 0)


@pytest.mark.parametrize(
    ("peername", "shown"),
    [
        (("127.0.0.1", 4711), "127.0.0.1:4711"),
        (("::1", 4711, 0, 0), "[::1]:4711"),
        ("", "a client"),
        (None, "a client"),
    ],
)
def test_peers_are_named_in_the_log_as_addresses_with_ports(peername: object, shown: str) -> None:
    transport = SimpleNamespace(get_extra_info=lambda name: peername if name == "peername" else None)
    assert connections.peer(cast(asyncio.Transport, transport)) == shown
