"""Request bodies and log lines: admission before reading, exact size limits, log lines encoded.

In-process tests run the app behind the runner the CLI uses, on a real port, on asyncio's loop;
black-box tests run ``python -m aioserver`` (on uvloop) and watch its log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from aioserver import create_app, load_config
from aioserver.errors import UpstreamError
from aioserver.limits import LimitedRunner
from aioserver.logtext import loggable

from conftest import Server

JSON = b"Content-Type: application/json\r\n"
MAX = 2048  # the in-process server's --max-body-size
CONFIG = f"""
server:
  max_body_size: {MAX}
  limit_concurrency: 1
  timeout_request_body: 2
workflow:
  echo: {{tasks: [echo]}}
  nap: {{tasks: [{{action: sample_actions.async_sleepy, args: [1]}}]}}
"""


Serve = Callable[..., Awaitable[int]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start the app for a config behind LimitedRunner on a real port; give the port."""
    runners: list[LimitedRunner] = []

    async def start(yaml_text: str, setup: Callable[[web.Application], None] | None = None) -> int:
        config = load_config(yaml_text)
        app = create_app(config)
        if setup is not None:
            setup(app)
        runner = LimitedRunner(app, config.settings, handle_signals=False)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return int(runner.addresses[0][1])

    yield start
    for runner in runners:
        await runner.cleanup()


async def exchange(port: int, data: bytes, wait: float = 5) -> bytes:
    """Send raw bytes; return the server's answer (head and body), up to when it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        async with asyncio.timeout(wait):
            head = await reader.readuntil(b"\r\n\r\n")
            found = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
            return head + (await reader.readexactly(int(found.group(1))) if found else await reader.read())
    finally:
        writer.close()


def head(length: int | None, path: bytes = b"/workflow") -> bytes:
    """A POST head: a declared length, or chunked when None."""
    framing = b"Transfer-Encoding: chunked\r\n" if length is None else b"Content-Length: %d\r\n" % length
    return b"POST " + path + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n" + JSON + framing + b"\r\n"


def chunked(body: bytes, size: int = 500) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


ECHO_FRAME = (b'{"name": "echo", "elements": ["', b'", 1]}')


def echo_body(length: int) -> bytes:
    """A valid echo request of exactly ``length`` bytes: a string of x, and 1."""
    start, end = ECHO_FRAME
    return start + b"x" * (length - len(start) - len(end)) + end


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def payload(answer: bytes) -> Any:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])


# -- exact size limits (a 413 off by one byte or by a factor of two must fail a test)


@pytest.mark.parametrize("framing", ["declared", "chunked"])
async def test_body_of_exactly_the_limit_is_accepted(serve: Serve, framing: str) -> None:
    port = await serve(CONFIG)
    body = echo_body(MAX)
    assert len(body) == MAX
    sent = head(len(body)) + body if framing == "declared" else head(None) + chunked(body)
    answer = await exchange(port, sent)
    assert status(answer) == 200
    assert payload(answer) == ["x" * (MAX - len(b"".join(ECHO_FRAME))), 1]


async def test_one_byte_over_declared_is_413_before_the_body_is_sent(serve: Serve) -> None:
    port = await serve(CONFIG)
    started = time.monotonic()
    answer = await exchange(port, head(MAX + 1))  # no body: the answer does not wait for it
    assert status(answer) == 413, answer
    assert payload(answer) == {"error": f"Maximum request body size {MAX} exceeded."}
    assert time.monotonic() - started < 1.5  # not the 408 that waiting for the body would give at 2 s


async def test_one_byte_over_chunked_is_413(serve: Serve) -> None:
    port = await serve(CONFIG)
    answer = await exchange(port, head(None) + chunked(echo_body(MAX + 1)))
    assert status(answer) == 413
    assert f"Maximum request body size {MAX} exceeded" in payload(answer)["error"]


# -- --limit-concurrency admits before reading the body


async def test_over_the_concurrency_limit_is_503_before_the_body_is_read(serve: Serve) -> None:
    port = await serve(CONFIG)  # limit_concurrency: 1
    nap = b'{"name": "nap", "elements": ["z"]}'
    running = asyncio.create_task(exchange(port, head(len(nap)) + nap))
    await asyncio.sleep(0.3)  # the nap workflow (1 s) holds the only slot
    started = time.monotonic()
    answer = await exchange(port, head(MAX))  # a head, and no body
    assert status(answer) == 503
    assert b"\r\nRetry-After: 1\r\n" in answer
    assert payload(answer) == {"error": "too many workflows running, retry later"}
    assert time.monotonic() - started < 1.5  # not the 408 that waiting for the body would give at 2 s
    assert status(await running) == 200


async def test_a_slow_upload_holds_its_slot_and_no_more(serve: Serve) -> None:
    port = await serve(CONFIG)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head(MAX) + b'{"name": "echo", ')  # the rest never comes
    await asyncio.sleep(0.2)
    body = b'{"name": "echo", "elements": [1]}'
    assert status(await exchange(port, head(len(body)) + body)) == 503
    writer.close()  # the slow upload gives up: its slot is free again
    await reader.read()
    await asyncio.sleep(0.1)
    assert payload(await exchange(port, head(len(body)) + body)) == [1]


# -- log lines: what a client sent stays encoded, on its own line


@pytest.mark.parametrize(
    ("text", "logged"),
    [
        ("/workflow", "/workflow"),
        ("/a%0Ab", "/a%0Ab"),
        ("/a\nb\r", "/a\\nb\\r"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("a\x85b\u2028c\u2029d", "a\\x85b\\u2028c\\u2029d"),
        ("a\udcffb", "a\\udcffb"),
        ("caf\u00e9 \u6587", "caf\u00e9 \u6587"),
    ],
)
def test_loggable(text: str, logged: str) -> None:
    assert loggable(text) == logged


def _failing_routes(app: web.Application) -> None:
    async def upstream(request: web.Request) -> web.Response:
        raise UpstreamError("fetch: http://example.org/x answered HTTP 500\nforged line")

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("broken")

    app.router.add_get("/upstream/{tail}", upstream)
    app.router.add_get("/broken/{tail}", broken)


@pytest.mark.parametrize(("path", "level"), [("/broken", logging.ERROR), ("/upstream", logging.WARNING)])
async def test_error_lines_log_the_path_encoded(
    serve: Serve, caplog: pytest.LogCaptureFixture, path: str, level: int
) -> None:
    port = await serve(CONFIG, _failing_routes)
    request = f"GET {path}/a%0Aforged%20line HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
    with caplog.at_level(logging.WARNING, logger="aioserver.error"):
        answer = await exchange(port, request)
    assert status(answer) in (500, 502)
    [record] = [r for r in caplog.records if r.name == "aioserver.error"]
    assert record.levelno == level
    message = record.getMessage()
    assert f"GET {path}/a%0Aforged%20line" in message and "\n" not in message


# -- the real thing: python -m aioserver on uvloop


SERVER_CONFIG = """
workflow:
  echo: {tasks: [echo]}
  nap: {tasks: [{action: sample_actions.async_sleepy, args: [2]}]}
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(SERVER_CONFIG)
    return path


async def test_server_admits_before_reading_the_body(config_file: Path) -> None:
    with Server("--config", str(config_file), "--limit-concurrency", "1") as server:
        body = b'{"name": "nap", "elements": [1]}'
        running = asyncio.create_task(exchange(server.port, head(len(body)) + body))
        await asyncio.sleep(0.5)  # the nap (2 s) holds the only slot
        answer = await exchange(server.port, head(10_000_000), wait=1.5)  # a big upload's head, no body
        assert status(answer) == 503 and payload(answer) == {"error": "too many workflows running, retry later"}
        assert status(await running) == 200


async def test_server_logs_an_encoded_path_on_one_line(config_file: Path) -> None:
    env = {"DEPENDENCIES": "sample_plugins.crash"}  # every request but /health fails: 500
    with Server("--config", str(config_file), env=env) as server:
        forged = "2026-01-01 00:00:00,000 ERROR aioserver.error: forged"
        path = "/workflow%0A" + forged.replace(" ", "%20")
        body = b'{"name": "echo", "elements": [1]}'
        answer = await exchange(server.port, head(len(body), path.encode()) + body)
        assert status(answer) == 500
        error_id = payload(answer)["id"]
        deadline = time.monotonic() + 5
        while not any(path in line and " 500 " in line for line in server.log) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the access log is written in batches
        log = list(server.log)
        [error_line] = [line for line in log if error_id in line]
        assert error_line.rstrip().endswith(f"error {error_id} while handling POST {path}")
        assert sum(path in line and " 500 " in line for line in log) == 1  # and one access line
        assert not any(line.startswith(forged) for line in log)
        assert all(path in line for line in log if "forged" in line)  # only ever mentioned encoded


async def test_server_access_line_escapes_what_the_pure_python_parser_lets_through(config_file: Path) -> None:
    # aiohttp's C parser refuses bytes over 0x7f in a request target; its pure-Python one (where
    # no wheel fits, or AIOHTTP_NO_EXTENSIONS is set) lets a raw U+2028 LINE SEPARATOR through.
    with Server("--config", str(config_file), env={"AIOHTTP_NO_EXTENSIONS": "1"}) as server:
        request = b"GET /a\xe2\x80\xa8b\xc2\x85c HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        assert status(await exchange(server.port, request)) == 404
        deadline = time.monotonic() + 5
        while not any(" 404 " in line for line in server.log) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the access log is written in batches
        [line] = [line for line in server.log if " 404 " in line]
        assert '"GET /a\\u2028b\\x85c HTTP/1.1" 404 ' in line
        assert not any("\u2028" in line or "\x85" in line for line in server.log)
