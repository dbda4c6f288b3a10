"""The access log (SPEC section 8), on the real ``python -m aioserver`` in each conftest deployment.

One line per request through ``logging`` (a user's handler sees it), hidden below ``--log-level
info``, none at all with ``--no-access-log``; it names the request id, the workflow, the body's
bytes, and its time carries the UTC offset.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_requestids import BEARER, ECHO, ask, post, request_id

from aioserver.logs import PIPE_BUF
from aioserver.logtext import LONGEST_PATH

from conftest import PYTHON, TESTS, TOKEN, TOKEN_HASH, Server, free_port

CONFIG = "workflow:\n  echo: {tasks: [echo]}\n  boom: {tasks: [sample_actions.boom]}\n"
TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"


def get(path: bytes, method: bytes = b"GET", *headers: bytes) -> bytes:
    return b"%s %s HTTP/1.1\r\nHost: localhost\r\n%s%s\r\n" % (method, path, BEARER, b"".join(headers))


READY = r"sample_plugins: logging records to a file"


def until_listening(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def wait_for(server: Server, pattern: str, count: int = 1, timeout: float = 5) -> list[str]:
    """The log lines matching ``pattern``, once there are ``count`` of them."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in list(server.log) if re.search(pattern, line)]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_an_access_line_names_the_request_its_id_workflow_and_body_bytes() -> None:
    with Server("--config", CONFIG, env={"TOKEN": TOKEN_HASH}) as server:
        answers = {
            "echo": ask(server.port, post(ECHO, BEARER, b"X-Request-ID: echo-1\r\n")),
            "health": ask(server.port, get(b"/health", b"GET", b"X-Request-ID: health-1\r\n")),
            "head": ask(server.port, get(b"/health", b"HEAD", b"X-Request-ID: head-1\r\n")),
            "missing": ask(server.port, get(b"/missing?token=secret", b"GET", b"X-Request-ID: missing-1\r\n")),
            "unknown": ask(server.port, post(b'{"name": "a \\"b\\" \\\\ \\u2028", "elements": []}', BEARER)),
        }
        lines = wait_for(server, r" INFO aiohttp\.access: ", count=5)
    assert [answer[0] for answer in answers.values()] == [200, 200, 200, 404, 404]
    access = "".join(lines)
    prefix = rf"{TIME} INFO aiohttp\.access: 127\.0\.0\.1 http "
    assert re.search(rf'^{prefix}"POST /workflow HTTP/1\.1" 200 3 \d+\.\d{{3}}s token echo-1 "echo"$', access, re.M)
    health = len(answers["health"][2])
    assert re.search(rf'^{prefix}"GET /health HTTP/1\.1" 200 {health} \d\.\d{{3}}s - health-1 -$', access, re.M)
    assert re.search(rf'^{prefix}"HEAD /health HTTP/1\.1" 200 0 \d\.\d{{3}}s - head-1 -$', access, re.M)
    missing = len(answers["missing"][2])
    assert re.search(rf'^{prefix}"GET /missing HTTP/1\.1" 404 {missing} \S+ token missing-1 -$', access, re.M)
    # A name a client made up is escaped: quotes, backslashes, a line separator; one line.
    unknown = request_id(answers["unknown"])
    assert re.search(rf'token {unknown} "a \\"b\\" \\\\ \\u2028"$', access, re.M), access
    assert "\u2028" not in access and "secret" not in access


def test_a_streamed_answers_bytes_are_its_body_on_the_wire() -> None:
    # Chunked: no Content-Length to go by; the bytes are what followed the head (chunk framing included).
    env = {"TOKEN": TOKEN_HASH, "EXTENSIONS": "sample_plugins.add_chunks"}
    with Server("--config", CONFIG, env=env) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(get(b"/chunks", b"GET", b"Connection: close\r\n", b"X-Request-ID: chunks-1\r\n"))
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        body = raw.partition(b"\r\n\r\n")[2]
        assert body.endswith(b"0\r\n\r\n") and b"b" * 300 in body
        [line] = wait_for(server, r"chunks-1")
    assert f'"GET /chunks HTTP/1.1" 200 {len(body)} ' in line


@pytest.mark.workers
def test_access_lines_follow_the_log_level(tmp_path: Path) -> None:
    for level, shown in (("warning", False), ("error", False), ("info", True), ("debug", True)):
        records = tmp_path / f"records-{level}"
        env = {"TOKEN": TOKEN_HASH, "EXTENSIONS": "sample_plugins.log_records", "RECORDS_FILE": str(records)}
        # Above INFO the server says nothing as it starts: the extension's line tells it is about to serve.
        port = free_port()
        with Server("--config", CONFIG, "--port", str(port), "--log-level", level, env=env, pattern=READY) as server:
            until_listening(port)
            for _ in range(5):
                assert ask(port, post(ECHO, BEARER))[0] == 200
            boom = ask(port, post(b'{"name": "boom", "elements": [1]}', BEARER))
            assert boom[0] == 500
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=20) == 0
        log = "".join(server.log)
        access = [line for line in server.log if "aiohttp.access" in line]
        seen = [json.loads(line) for line in records.read_text().splitlines()]
        # The access lines only at INFO or below, on stderr as for a user's handler; the 500's
        # error line at every one of these levels.
        assert len(access) == (6 if shown else 0), (level, access)
        assert len([r for r in seen if r["name"] == "aiohttp.access"]) == (6 if shown else 0), level
        assert f"error {request_id(boom)} while handling POST /workflow" in log, (level, log)


@pytest.mark.workers
def test_no_access_log_means_no_access_logging_at_all(tmp_path: Path) -> None:
    records = tmp_path / "records"
    env = {
        "TOKEN": TOKEN_HASH,
        "EXTENSIONS": "sample_plugins.log_records,sample_plugins.count_access_log",
        "RECORDS_FILE": str(records),
    }
    for switch, lines in (("--no-access-log", 0), ("--access-log", 8)):
        records.unlink(missing_ok=True)
        with Server("--config", CONFIG, switch, env=env) as server:
            for _ in range(3):
                assert ask(server.port, post(ECHO, BEARER))[0] == 200
            # The access logger's work, in the process that answers (with workers, any of them).
            calls = [json.loads(ask(server.port, get(b"/access-log-calls"))[2]) for _ in range(4)]
            if lines == 0:
                assert calls == [0, 0, 0, 0]
            elif server.workers == 1:
                assert calls == [3, 4, 5, 6]
            assert ask(server.port, post(b'{"name": "boom", "elements": [1]}', BEARER))[0] == 500
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=20) == 0
        access = [line for line in server.log if "aiohttp.access" in line]
        seen = [json.loads(line) for line in records.read_text().splitlines()]
        assert len(access) == lines and len([r for r in seen if r["name"] == "aiohttp.access"]) == lines, switch
        assert any(r["name"] == "aioserver.error" for r in seen)  # error lines are not access lines


def test_a_users_logging_handler_sees_access_records(tmp_path: Path) -> None:
    records = tmp_path / "records"
    env = {"TOKEN": TOKEN_HASH, "EXTENSIONS": "sample_plugins.log_records", "RECORDS_FILE": str(records)}
    with Server("--config", CONFIG, env=env) as server:
        assert ask(server.port, post(ECHO, BEARER, b"X-Request-ID: mine-1\r\n"))[0] == 200
        assert ask(server.port, get(b"/health?x=1", b"GET", b"X-Request-ID: mine-2\r\n"))[0] == 200
        wait_for(server, r"mine-2")
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=20) == 0
    access = [
        record for record in map(json.loads, records.read_text().splitlines()) if record["name"] == "aiohttp.access"
    ]
    assert len(access) == 2
    seen: dict[Any, dict[str, Any]] = {record["request_id"]: record for record in access}
    echo = seen["mine-1"]
    assert echo["message"] in "".join(server.log)  # the same line as on stderr
    assert {k: v for k, v in echo.items() if k not in ("duration", "message")} == {
        "name": "aiohttp.access",
        "levelname": "INFO",
        "client": "127.0.0.1",
        "scheme": "http",
        "method": "POST",
        "path": "/workflow",
        "status": 200,
        "bytes": 3,
        "identity": "token",
        "request_id": "mine-1",
        "workflow": "echo",
    }
    assert isinstance(echo["duration"], float) and 0 <= echo["duration"] < 5
    health = seen["mine-2"]
    assert (health["path"], health["workflow"], health["identity"]) == ("/health", None, None)
    assert TOKEN not in records.read_text()


@pytest.mark.workers
def test_a_handler_that_replaces_stderrs_gets_every_record_and_stderr_none(tmp_path: Path) -> None:
    # The README's journald example: under systemd, stderr goes to the journal already, so the
    # extension replaces aioserver's handler rather than adding one (each line would be there twice).
    records = tmp_path / "records"
    env = {"TOKEN": TOKEN_HASH, "EXTENSIONS": "sample_plugins.replace_log_handlers", "RECORDS_FILE": str(records)}
    port = free_port()
    ready = r"sample_plugins: logging records to a file only"
    with Server("--config", CONFIG, "--port", str(port), env=env, pattern=ready) as server:
        until_listening(port)
        for number in range(5):
            assert ask(port, post(ECHO, BEARER, b"X-Request-ID: replaced-%d\r\n" % number))[0] == 200
        assert ask(port, post(b'{"name": "boom", "elements": [1]}', BEARER))[0] == 500
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=20) == 0
    seen = [json.loads(line) for line in records.read_text().splitlines()]
    access = [record for record in seen if record["name"] == "aiohttp.access"]
    assert sorted(record["request_id"] for record in access if record["status"] == 200) == [
        f"replaced-{number}" for number in range(5)
    ]
    assert all(record["workflow"] in ("echo", "boom") and record["identity"] == "token" for record in access)
    assert any(record["name"] == "aioserver.error" for record in seen)
    assert not [line for line in server.log if "aiohttp.access" in line or "aioserver.error" in line]


def test_a_refused_tokens_name_is_in_the_access_line() -> None:
    # A token that may not call a route, or run a workflow, is known: which one was refused is
    # what an operator looks for. A token that matches none is nobody's.
    scoped = "scoped-token-5e1d"
    config = (
        CONFIG
        + f"auth:\n  tokens:\n    - {{name: admin, sha256: {TOKEN_HASH}}}\n"
        + f"    - {{name: ci, sha256: {hashlib.sha256(scoped.encode()).hexdigest()}, workflows: [echo]}}\n"
    )
    env = {"EXTENSIONS": "sample_plugins.add_items"}
    as_ci = f"Authorization: Bearer {scoped}\r\n".encode()
    as_nobody = b"Authorization: Bearer x\r\n"
    with Server("--config", config, env=env) as server:
        answers = [
            ask(server.port, get(b"/stats", b"GET", b"X-Request-ID: route-1\r\n").replace(BEARER, as_ci)),
            ask(server.port, post(b'{"name": "boom", "elements": [1]}', as_ci, b"X-Request-ID: workflow-1\r\n")),
            ask(server.port, post(ECHO, as_ci, b"X-Request-ID: allowed-1\r\n")),
            ask(server.port, get(b"/stats", b"GET", b"X-Request-ID: nobody-1\r\n").replace(BEARER, as_nobody)),
        ]  # fmt: skip
        lines = wait_for(server, r"aiohttp\.access: .* \w+-1 ", count=4)
    assert [answer[0] for answer in answers] == [403, 403, 200, 401]
    access = "".join(lines)
    assert re.search(r'"GET /stats HTTP/1\.1" 403 \d+ \S+ ci route-1 -$', access, re.M), access
    assert re.search(r'"POST /workflow HTTP/1\.1" 403 \d+ \S+ ci workflow-1 "boom"$', access, re.M), access
    assert re.search(r'"POST /workflow HTTP/1\.1" 200 \d+ \S+ ci allowed-1 "echo"$', access, re.M), access
    assert re.search(r'"GET /stats HTTP/1\.1" 401 \d+ \S+ - nobody-1 -$', access, re.M), access


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB$", status, re.M).group(1)) / 1024  # type: ignore[union-attr]


def test_workflow_names_clients_make_up_are_not_kept(tmp_path: Path) -> None:
    # The access log keeps the names it has shown, to show the configured ones again at no cost:
    # not a client's 4 MiB name (any token may send one, and be refused 403 or 404), 1024 times.
    with Server("--config", CONFIG, env={"TOKEN": TOKEN_HASH}) as server:

        def send(count: int) -> None:
            for number in range(count):
                name = f"{number}-{server.port}-" + "n" * (4 << 20)
                answer = ask(server.port, post(json.dumps({"name": name, "elements": []}).encode(), BEARER))
                assert answer[0] == 404

        send(10)  # the allocator's pools made
        before = rss_mib(server.process.pid)
        send(40)
        grown = rss_mib(server.process.pid) - before
        assert len(wait_for(server, r'" 404 \d+ \S+ token \S+ "\d+-', count=50)) == 50
    assert grown < 60, f"{grown:.0f} MiB kept after 40 names of 4 MiB"


# -- what a client sends cannot make a line that one write to a pipe does not keep whole


@pytest.mark.parametrize(("log_format", "parser"), [("json", "C"), ("text", "pure-Python")])
def test_an_access_line_fits_one_write_to_a_pipe_whatever_the_client_sends(log_format: str, parser: str) -> None:
    # A write of at most PIPE_BUF bytes to a pipe is never cut into by another process's
    # (the workers', an action process's): a longer line may be. aiohttp's C parser takes a
    # request line of 8 KiB (--max-line-size) with any printable ASCII in its path, '"' and '\\'
    # included; its pure-Python one any method too.
    env = {"TOKEN": TOKEN_HASH, **({"AIOHTTP_NO_EXTENSIONS": "1"} if parser == "pure-Python" else {})}
    rid = "r" * 128
    long_path = b"/" + b"%41" * 2700  # still percent-encoded, as logged
    with Server("--config", CONFIG, "--log-format", log_format, env=env) as server:
        sent = {
            "long": ask(server.port, get(long_path, b"GET", b"X-Request-ID: long-1\r\n")),
            "quotes": ask(server.port, get(b'/a"b\\c"', b"GET", b"X-Request-ID: quotes-1\r\n")),
            "method": ask(server.port, get(b"/" + b"b" * 3000, b"M" * 5000, b"X-Request-ID: method-1\r\n")),
            "name": ask(server.port, post(json.dumps({"name": "\U000e0001\\\"" * 200, "elements": []}).encode(),
                                          BEARER, b"X-Request-ID: %s\r\n" % rid.encode())),
        }  # fmt: skip
        lines = wait_for(server, r"aiohttp\.access", count=4)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=20) == 0
    assert [answer[0] for answer in sent.values()] == [404, 404, 400 if parser == "C" else 404, 404], sent
    assert len(lines) == 4, lines
    for line in server.log:
        assert len(line.encode()) <= PIPE_BUF, (len(line.encode()), line[:200])
        if log_format == "json":
            json.loads(line)
    if log_format == "json":
        access = {record["request_id"]: record for record in map(json.loads, lines)}
        assert access["long-1"]["path"] == long_path.decode()[:LONGEST_PATH] + "..."
        assert access["quotes-1"]["path"] == "/a%22b%5Cc%22"
        assert access[rid]["workflow"].startswith('\\U000e0001\\"')
        text = [record["message"] for record in access.values()]
    else:
        text = lines
    [quotes] = [line for line in text if "quotes-1" in line]
    assert '"GET /a%22b%5Cc%22 HTTP/1.1" 404 ' in quotes  # the request stays one quoted field
    [method] = [line for line in text if "method-1" in line or " 400 " in line]
    if parser == "pure-Python":  # the C parser refuses a method it does not know: no method to log
        assert f'"{"M" * 32}... /{"b" * (LONGEST_PATH - 1)}... HTTP/1.1" 404 ' in method


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_lines_of_workers_never_cut_into_each_other(loop: str) -> None:
    """Under load, with a log reader slower than the workers write (journald busy, a shipper, a
    full pipe): a write of more than PIPE_BUF bytes goes into the pipe in pieces as it frees
    up, and the other worker's lines land between them."""
    port = free_port()
    command = [PYTHON, "-m", "aioserver", "--config", CONFIG, "--port", str(port), "--loop", loop]
    command += ["--workers", "2", "--log-format", "json"]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(TESTS)}, stderr=subprocess.PIPE)
    assert process.stderr is not None
    read = bytearray()
    slow = threading.Event()
    slow.set()

    def reader() -> None:
        assert process.stderr is not None
        while chunk := os.read(process.stderr.fileno(), PIPE_BUF):
            read.extend(chunk)
            if slow.is_set() and read.count(b"serving on") >= 2:
                time.sleep(0.002)

    def client(failures: list[BaseException]) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            for i in range(60):
                connection.request("GET", "/" + "a" * 6000 + str(i))
                response = connection.getresponse()
                response.read()
                assert response.status == 404
        except BaseException as exc:
            failures.append(exc)
        finally:
            connection.close()

    reading = threading.Thread(target=reader)
    reading.start()
    try:
        until_listening(port)
        deadline = time.monotonic() + 10
        while read.count(b"serving on") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        failures: list[BaseException] = []
        clients = [threading.Thread(target=client, args=(failures,)) for _ in range(6)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        assert not failures, failures
    finally:
        slow.clear()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        finally:
            process.kill()
            reading.join()
            process.stderr.close()
    lines = read.decode().splitlines()
    broken = [line for line in lines if not line.startswith('{"time":') or not line.endswith("}")]
    assert not broken, f"{len(broken)} of {len(lines)} lines cut into, such as {broken[0][:200]!r}"
    records = [json.loads(line) for line in lines]
    assert sum(record["logger"] == "aiohttp.access" for record in records) == 6 * 60
    assert process.returncode == 0
