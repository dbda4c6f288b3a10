"""X-Request-ID (SPEC section 8), on the real ``python -m aioserver`` in each conftest deployment.

Every answer carries one: the client's when it is 1-128 characters of ``A-Z a-z 0-9 . _ -``,
else a new one; its access line and error lines carry the same; a 500's error id is it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import threading
import time

import pytest

from aioserver import requestids

from conftest import TOKEN, TOKEN_HASH, PemFiles, Server

NEW_ID = re.compile(r"[0-9a-f]{16}")
CONFIG = (
    "workflow:\n"
    "  echo: {tasks: [echo]}\n"
    "  boom: {tasks: [sample_actions.boom]}\n"
    "  nap: {tasks: [{action: sample_actions.async_sleepy, args: [2]}]}\n"
)
BEARER = f"Authorization: Bearer {TOKEN}\r\n".encode()

Answer = tuple[int, list[tuple[str, str]], bytes]


def ask(port: int, raw: bytes, context: ssl.SSLContext | None = None) -> Answer:
    """Send ``raw`` on a new connection; the status, headers (in order) and body of the answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname="localhost")
    with sock:
        sock.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"the server closed before answering: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = [(name.strip().lower(), value.strip()) for name, _, value in (line.partition(":") for line in lines)]
        length = 0 if raw.startswith(b"HEAD ") else int(dict(headers).get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(status_line.split()[1]), headers, body


def request_id(answer: Answer) -> str:
    """The answer's one X-Request-ID."""
    [value] = [value for name, value in answer[1] if name == "x-request-id"]
    return value


def post(body: bytes, *headers: bytes, path: bytes = b"/workflow") -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
        % (path, len(body), b"".join(headers), body)
    )


def access_line(server: Server, rid: str, timeout: float = 5) -> str:
    """The access line of request ``rid`` (written within 0.1 s of its answer)."""
    pattern = re.compile(rf'" \d{{3}} \d+ \d+\.\d{{3}}s \S+ {re.escape(rid)} ')
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [line for line in list(server.log) if " INFO aiohttp.access: " in line and pattern.search(line)]
        if lines:
            [line] = lines
            return line
        time.sleep(0.05)
    raise AssertionError(f"no access line for request {rid}:\n" + "".join(server.log))


ECHO = b'{"name": "echo", "elements": [1]}'

# (what the client sends as X-Request-ID, the id it gets back: None for a new one)
GIVEN = [
    (b"abc", "abc"),
    (b"A-Z.a_z-09", "A-Z.a_z-09"),
    (b"x" * 128, "x" * 128),
    (b"  padded\t", "padded"),  # the spaces around a header's value are not part of it (RFC 9110)
    (b"x" * 129, None),
    (b"a b", None),
    (b"", None),
    (b"abc%0D%0AX-Injected:%20yes", None),
    (b"../../etc/passwd", None),
    (b"caf\xc3\xa9", None),  # UTF-8
    (b"\xe2\x80\xa8line-separator", None),
    (b"semi;colon", None),
    (b'"quoted"', None),
]


def test_a_fit_request_id_is_echoed_and_any_other_replaced() -> None:
    with Server("--config", CONFIG, env={"TOKEN": TOKEN_HASH}) as server:
        for given, expected in GIVEN:
            answer = ask(server.port, post(ECHO, BEARER, b"X-Request-ID: %s\r\n" % given))
            assert answer[0] == 200 and answer[2] == b"[1]", (given, answer)
            rid = request_id(answer)
            if expected is None:
                assert NEW_ID.fullmatch(rid), (given, rid)
            else:
                assert rid == expected, given
            assert access_line(server, rid).rstrip().endswith(f' token {rid} "echo"')
        # Without one, each request gets its own.
        ids = {request_id(ask(server.port, post(ECHO, BEARER))) for _ in range(20)}
        assert len(ids) == 20 and all(NEW_ID.fullmatch(rid) for rid in ids)


def test_a_request_id_cannot_inject_a_header_or_a_line() -> None:
    with Server("--config", CONFIG, env={"TOKEN": TOKEN_HASH}) as server:
        # A line feed ends the header: what follows is another header, never part of the id.
        answer = ask(server.port, post(ECHO, BEARER, b"X-Request-ID: abc\r\nX-Injected: yes\r\n"))
        assert answer[0] == 200 and request_id(answer) == "abc"
        assert all(name != "x-injected" for name, _ in answer[1])
        # A bare CR (or LF) inside a value is not HTTP: 400, with an id of the server's own.
        for hostile in (b"abc\rX-Injected: yes", b"abc\x00", b"abc\x1b[31m"):
            answer = ask(server.port, post(ECHO, BEARER, b"X-Request-ID: %s\r\n" % hostile))
            assert answer[0] == 400, (hostile, answer)
            rid = request_id(answer)
            assert NEW_ID.fullmatch(rid) and all(name != "x-injected" for name, _ in answer[1])
            assert '"UNKNOWN / HTTP/1.0" 400' in access_line(server, rid)
        # Two ids: the first is the request's (as a proxy adding its own after the client's sees it).
        answer = ask(server.port, post(ECHO, BEARER, b"X-Request-ID: first\r\nX-Request-ID: second\r\n"))
        assert request_id(answer) == "first"
    log = "".join(server.log)
    assert "X-Injected" not in log and "\x1b" not in log


def test_every_answer_carries_a_request_id(pem_files: PemFiles, client_ssl_ctx: ssl.SSLContext) -> None:
    args = (
        "--config", CONFIG, "--ssl-certfile", str(pem_files.cert), "--ssl-keyfile", str(pem_files.key),
        "--redirect-http", "0", "--max-body-size", "1000", "--limit-concurrency", "1",
    )  # fmt: skip
    with Server(*args, env={"TOKEN": TOKEN_HASH}, listeners=2) as server:
        https, plain = server.ports

        def answer(status: int, raw: bytes, context: ssl.SSLContext | None = client_ssl_ctx, port: int = https) -> None:
            for given, expected in ((b"", None), (b"X-Request-ID: trace-%d\r\n" % status, f"trace-{status}")):
                got = ask(port, raw.replace(b"\r\n\r\n", b"\r\n%s\r\n" % given, 1), context)
                assert got[0] == status, (status, got)
                rid = request_id(got)
                assert rid == expected if expected else NEW_ID.fullmatch(rid), (status, rid)
                assert f'" {status} ' in access_line(server, rid)

        answer(200, post(ECHO, BEARER))
        answer(401, post(ECHO))
        answer(404, b"GET /nowhere HTTP/1.1\r\nHost: localhost\r\n%s\r\n" % BEARER)
        answer(405, b"GET /workflow HTTP/1.1\r\nHost: localhost\r\n%s\r\n" % BEARER)
        answer(413, post(b"[" + b"1," * 600 + b"1]", BEARER))
        answer(415, post(ECHO, BEARER).replace(b"application/json", b"text/plain"))
        answer(400, post(b"{", BEARER))
        answer(500, post(b'{"name": "boom", "elements": [1]}', BEARER))
        answer(308, b"GET /workflow HTTP/1.1\r\nHost: localhost\r\n\r\n", None, plain)
        # --limit-concurrency 1: while a workflow runs, another is refused, 503.
        running = threading.Thread(
            target=ask, args=(https, post(b'{"name": "nap", "elements": [1]}', BEARER), client_ssl_ctx)
        )
        running.start()
        time.sleep(0.5)
        try:
            answer(503, post(ECHO, BEARER))
        finally:
            running.join()


def test_a_connection_refused_at_the_limit_carries_a_request_id() -> None:
    # No request is made of it (a refused connection is answered from its raw head), but the
    # 503 carries an id all the same: the client's when fit.
    with Server("--config", CONFIG, "--limit-connections", "1", env={"TOKEN": TOKEN_HASH}) as server:
        busy = threading.Thread(target=ask, args=(server.port, post(b'{"name": "nap", "elements": [1]}', BEARER)))
        busy.start()
        time.sleep(0.5)
        try:
            for given, expected in (
                (b"", None),
                (b"x-request-id: cap.1\r\n", "cap.1"),
                (b"X-Request-ID: a b\r\n", None),
            ):
                answer = ask(server.port, post(ECHO, BEARER, given))
                assert answer[0] == 503 and json.loads(answer[2]) == {"error": "too many connections"}
                rid = request_id(answer)
                assert rid == expected if expected else NEW_ID.fullmatch(rid), rid
        finally:
            busy.join()


@pytest.mark.workers
def test_a_500s_error_id_is_its_request_id() -> None:
    with Server("--config", CONFIG, env={"TOKEN": TOKEN_HASH}) as server:
        boom = b'{"name": "boom", "elements": [1]}'
        for given in (b"", b"X-Request-ID: my-trace.42\r\n"):
            answer = ask(server.port, post(boom, BEARER, given))
            assert answer[0] == 500
            rid = request_id(answer)
            assert rid == "my-trace.42" if given else NEW_ID.fullmatch(rid)
            assert json.loads(answer[2]) == {"error": f"internal error, id {rid}", "id": rid}
            assert access_line(server, rid).rstrip().endswith(f' token {rid} "boom"')
            [error] = [line for line in server.log if " ERROR aioserver.error: " in line and rid in line]
            assert f"error {rid} while handling POST /workflow" in error


def until_closed(port: int, raw: bytes, context: ssl.SSLContext | None = None) -> bytes:
    """Send ``raw`` on a new connection; all the server sends until it closes the connection (or 5 s)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname="localhost")
    received = b""
    with sock:
        sock.sendall(raw)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (ConnectionResetError, ssl.SSLError):  # an answer cut short: reset, or no close_notify
            pass
        except TimeoutError:  # the connection is kept open
            pass
    return received


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_an_error_once_the_answer_has_begun_resets_the_connection(
    scheme: str, pem_files: PemFiles, client_ssl_ctx: ssl.SSLContext
) -> None:
    """No second answer inside the first: with Content-Length, its bytes would end the first
    answer's body and the rest be taken for the answer to the next request on the connection
    (a proxy's keep-alive connection serves other clients). The error is logged under the
    request's id, its access line says 500 (or the HTTP error's status) and 0 bytes."""
    tls = ("--ssl-certfile", str(pem_files.cert), "--ssl-keyfile", str(pem_files.key)) if scheme == "https" else ()
    context = client_ssl_ctx if scheme == "https" else None
    env = {"TOKEN": TOKEN_HASH, "EXTENSIONS": "sample_plugins.add_broken_stream"}
    with Server("--config", CONFIG, *tls, env=env) as server:
        for framing, error, status in (
            ("length", "raise", 500),
            ("chunked", "raise", 500),
            ("length", "forbidden", 403),
        ):
            rid = f"broken-{framing}-{error}"
            broken = b"GET /broken/%s/%s HTTP/1.1\r\nHost: localhost\r\n%sX-Request-ID: %s\r\n\r\n" % (
                framing.encode(),
                error.encode(),
                BEARER,
                rid.encode(),
            )
            received = until_closed(server.port, broken + b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n", context)
            head, _, body = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and received.count(b"HTTP/1.1 ") == 1, received
            # Cut short where it broke: a client can tell (9 bytes of 100; no last chunk).
            assert body == (b"part one\n" if framing == "length" else b"9\r\npart one\n\r\n"), received
            line = access_line(server, rid)
            assert f'"GET /broken/{framing}/{error} HTTP/1.1" {status} 0 ' in line, line
        # An interim 100 Continue is no answer begun: the error is answered.
        expecting = b"Expect: 100-continue\r\nX-Request-ID: after-100\r\n"
        head, _, body = post(b'{"name": "boom", "elements": [1]}', BEARER, expecting).partition(b"\r\n\r\n")
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname="localhost")
        with sock:
            sock.sendall(head + b"\r\n\r\n")
            assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(body)
            answer = b""
            while b'"}' not in answer:
                chunk = sock.recv(65536)
                assert chunk, answer
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 500 ") and b"X-Request-ID: after-100\r\n" in answer, answer
        assert answer.endswith(b'{"error": "internal error, id after-100", "id": "after-100"}'), answer
        access_line(server, "after-100")
    log = "".join(server.log)
    for framing in ("length", "chunked"):
        rid = f"broken-{framing}-raise"
        assert f"ERROR aioserver.error: error {rid} while handling GET /broken/{framing}/raise" in log, log
        assert (
            f"WARNING aioserver.error: error {rid} came once the answer to GET /broken/{framing}/raise had begun" in log
        )
    assert "RuntimeError: the stream broke" in log
    assert "WARNING aioserver.error: error broken-length-forbidden came once the answer" in log


def test_new_ids_differ_across_forked_workers() -> None:
    # Forked processes inherit their parent's generator: each one is seeded anew.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, requestids.new_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert NEW_ID.fullmatch(child) and child != requestids.new_id()


def test_new_ids_are_sixteen_hex_digits_and_do_not_repeat_across_batches() -> None:
    """Ids are made a batch at a time: across several batches, each is 16 hex digits and new."""
    ids = [requestids.new_id() for _ in range(3 * requestids._BATCH + 7)]
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_worker_hands_out_none_of_its_parents_ids() -> None:
    """After a fork, the child's next ids are not those the parent hands out next (nor equal to each other)."""
    requestids.new_id()  # a batch under way in the parent
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(write, ",".join(requestids.new_id() for _ in range(5)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split(",")
    os.waitpid(pid, 0)
    parent = [requestids.new_id() for _ in range(5)]
    assert len(child) == 5 and not set(child) & set(parent)
