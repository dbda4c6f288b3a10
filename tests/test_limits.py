"""Limits: body size and time, running workflows, workflow time, connections, slow and bad clients."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from aioserver import connections, create_app, load_config
from aioserver.limits import LimitedRunner, WorkflowLimits

import sample_actions
from conftest import TOKEN, TOKEN_HASH, ClientFactory, exchange

CONFIG = """
server:
  max_body_size: 1024
  limit_concurrency: 2
  timeout_workflow: 0.5
  timeout_request_body: 0.5
  timeout_keep_alive: 1
  limit_connections: 4
  max_field_size: 200
workflow:
  echo: {tasks: [echo]}
  nap: {tasks: [{action: sample_actions.async_sleepy, args: [0.3]}]}
  long: {tasks: [{action: sample_actions.async_sleepy, args: [5]}]}
  stuck: {tasks: [{action: sample_actions.sleepy, args: [2]}]}
"""


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, LimitedRunner]]:
    """The app behind the runner the CLI uses (connection limit, header limits), on a real port."""
    config = load_config(CONFIG)
    runner = LimitedRunner(create_app(config), config.settings, keepalive_timeout=1, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner.addresses[0][1], runner
    await runner.cleanup()


def header(answer: bytes, name: bytes) -> bytes | None:
    """The value of a header of an answer; names are case-insensitive (RFC 9110 section 5.1)."""
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.lower() == name.lower():
            return value.strip()
    return None


def post(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST /workflow HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\n"
        + extra
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


async def test_declared_oversize_body_is_413_before_it_is_sent(server: tuple[int, LimitedRunner]) -> None:
    port, _ = server
    head = (
        b"POST /workflow HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\n"
        b"Content-Length: 10000000\r\n\r\n"
    )
    answer = await exchange(port, head, wait=3)  # no body sent: the answer does not wait for it
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b'"error": "Maximum request body size 1024 exceeded' in answer


async def test_streamed_oversize_body_is_413(make_client: ClientFactory) -> None:
    client = await make_client(CONFIG)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"x" * 100

    # chunked: no length declared
    response = await client.post("/workflow", data=chunks(), headers={"Content-Type": "application/json"})
    assert response.status == 413
    assert "Maximum request body size 1024 exceeded" in (await response.json())["error"]


async def test_slow_body_is_408(server: tuple[int, LimitedRunner]) -> None:
    port, _ = server
    head = (
        b"POST /workflow HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\n"
        b'Content-Length: 50\r\n\r\n{"name"'
    )
    started = time.monotonic()
    answer = await exchange(port, head)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"body not received within 0.5s" in answer
    assert time.monotonic() - started < 4


async def test_concurrency_limit_is_503_with_retry_after(make_client: ClientFactory) -> None:
    client = await make_client(CONFIG)
    body = {"name": "nap", "elements": [1]}
    responses = await asyncio.gather(*(client.post("/workflow", json=body) for _ in range(3)))
    statuses = sorted(r.status for r in responses)
    assert statuses == [200, 200, 503]
    refused = next(r for r in responses if r.status == 503)
    assert refused.headers["Retry-After"] == "1"
    assert (await refused.json())["error"] == "too many workflows running, retry later"
    # Slots free up again.
    assert (await client.post("/workflow", json=body)).status == 200


async def test_async_workflow_over_time_is_504_and_cancelled(make_client: ClientFactory) -> None:
    client = await make_client(CONFIG)
    sample_actions.CANCELLED.clear()
    response = await client.post("/workflow", json={"name": "long", "elements": [1]})
    assert response.status == 504
    assert await response.json() == {"error": "the workflow took longer than 0.5s"}
    assert sample_actions.CANCELLED == ["async_sleepy"]


async def test_sync_workflow_over_time_is_504_and_the_loop_keeps_serving(make_client: ClientFactory) -> None:
    client = await make_client(CONFIG)
    started = time.monotonic()
    response = await client.post("/workflow", json={"name": "stuck", "elements": [1]})
    assert response.status == 504
    assert time.monotonic() - started < 1.5  # answered at the limit, not when the 2 s thread ends
    assert (await client.get("/health")).status == 200
    assert (await client.post("/workflow", json={"name": "echo", "elements": [1]})).status == 200


async def test_slowloris_is_cut_off_while_others_are_served(server: tuple[int, LimitedRunner]) -> None:
    port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    closed_after = None
    for piece in [b"GET /health HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n"] + [b"X-Slow-%d: 1\r\n" % i for i in range(20)]:
        writer.write(piece)
        # Meanwhile a well-behaved client is served at once.
        assert (
            await exchange(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        ).startswith(b"HTTP/1.1 200 ")
        try:
            if await asyncio.wait_for(reader.read(1), 0.25) == b"":
                closed_after = time.monotonic() - started
                break
        except TimeoutError:
            continue
    writer.close()
    assert closed_after is not None and closed_after < 3  # timeout_keep_alive is 1 s


async def test_idle_keep_alive_connection_is_closed(server: tuple[int, LimitedRunner]) -> None:
    port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    started = time.monotonic()
    answer = await asyncio.wait_for(reader.read(), 5)  # until the server closes
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ") and 0.5 < time.monotonic() - started < 4


async def test_connection_limit_reclaims_the_oldest_idle_connection(
    server: tuple[int, LimitedRunner], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Idle for 0.2 s is idle enough here: the keep-alive timer (1 s) must not close them first.
    monkeypatch.setattr(connections, "RECLAIM_IDLE", 0.2)
    port, runner = server
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
    await asyncio.sleep(0.05)
    assert len(runner.connections) == 4  # counted from accept, before any request
    busy = await exchange(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", wait=0.5)
    assert busy.startswith(b"HTTP/1.1 503 ")  # the held ones sent nothing yet, but only just now
    await asyncio.sleep(0.3)  # now they have been idle long enough
    with caplog.at_level(logging.INFO, logger="aioserver.connections"):
        first = await exchange(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 200 ")
        assert await asyncio.wait_for(held[0][0].read(), 5) == b""  # the oldest made room
        second = await exchange(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert second.startswith(b"HTTP/1.1 200 ")
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.1)
    assert caplog.text.count("connection limit reached: 4 open") == 1  # once per episode
    assert "connections back under the limit" in caplog.text
    assert len(runner.connections) == 0


@pytest.mark.parametrize(
    ("request_bytes", "kind"),
    [
        (post(b"{}", b"Authorization: Bearer " + TOKEN.encode() + b"\x01x\r\n"), b"BadHttpMessage"),
        (post(b"{}", b"Authorization: Bearer " + TOKEN.encode() + b"A" * 300 + b"\r\n"), b"LineTooLong"),
        (b"GET /a b/" + TOKEN.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"BadStatusLine"),
    ],
)
async def test_malformed_http_is_json_and_never_echoed_or_logged(
    server: tuple[int, LimitedRunner], caplog: pytest.LogCaptureFixture, request_bytes: bytes, kind: bytes
) -> None:
    port, _ = server
    with caplog.at_level(logging.DEBUG):
        answer = await exchange(port, request_bytes)
    assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0]
    assert b'{"error": "malformed HTTP request (' + kind + b')"}' in answer
    assert header(answer, b"Server") == b"aioserver"  # not aiohttp's, with its version
    assert TOKEN.encode() not in answer and TOKEN not in caplog.text and "Traceback" not in caplog.text
    assert f"malformed request from 127.0.0.1: {kind.decode()}" in caplog.text  # who, and what, for the operator


async def inline_server(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> tuple[int, LimitedRunner]:
    """A tiny app of one handler, without the service's error middleware, behind LimitedRunner."""
    app = web.Application()
    app.router.add_get("/", handler)
    runner = LimitedRunner(app, load_config(CONFIG).settings, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner.addresses[0][1], runner


@pytest.mark.parametrize(
    ("error", "status", "problem"),
    [
        (RuntimeError(f"secret {TOKEN}"), 500, "RuntimeError"),
        (TimeoutError(), 504, "error"),  # aiohttp's handler timeout: it gives no exception
    ],
)
async def test_errors_past_the_middlewares_are_json_naming_no_detail(
    caplog: pytest.LogCaptureFixture, error: Exception, status: int, problem: str
) -> None:
    async def failing(request: web.Request) -> web.StreamResponse:
        raise error

    port, runner = await inline_server(failing)
    try:
        with caplog.at_level(logging.DEBUG):
            answer = await exchange(port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    finally:
        await runner.cleanup()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status) and header(answer, b"Server") == b"aioserver"
    assert json.loads(body) == {"error": f"internal error ({problem})"}
    assert f"error {problem} while handling a request from 127.0.0.1" in caplog.text
    assert TOKEN not in caplog.text and TOKEN.encode() not in answer


async def test_a_workflow_is_cut_off_at_its_deadline_and_an_idle_process_sweeps_no_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    clock = [loop.time()]
    monkeypatch.setattr(loop, "time", lambda: clock[0])  # asyncio's loop: time moves when we say
    limits = WorkflowLimits(concurrency=1, timeout=4)  # a sweep every second
    sweeps: list[float] = []
    sweep = limits._sweep
    monkeypatch.setattr(limits, "_sweep", lambda: (sweeps.append(clock[0]), sweep()))

    async def settle() -> None:
        for _ in range(10):
            await asyncio.sleep(0)

    running = asyncio.create_task(limits.run(lambda: asyncio.sleep(3600)))
    await settle()
    clock[0] += 4  # the deadline, to the last bit
    await settle()
    try:
        assert running.done()
        with pytest.raises(web.HTTPGatewayTimeout):
            running.result()
    finally:
        running.cancel()
    idle_from = len(sweeps)
    for _ in range(10):
        clock[0] += 1
        await settle()
    assert len(sweeps) <= idle_from + 1  # the one that finds nothing left to watch


def test_limits_used_by_a_later_loop_of_the_thread_watch_that_loop_s_task() -> None:
    """The loop of the last run is kept (get_running_loop() is a system call on 3.11); a run on
    a new loop, the first one gone, times out on the new loop's task, not on nothing."""
    limits = WorkflowLimits(concurrency=1, timeout=0.2)
    assert asyncio.run(limits.run(lambda: asyncio.sleep(0, "first"))) == "first"

    async def second() -> None:
        with pytest.raises(web.HTTPGatewayTimeout):
            await limits.run(lambda: asyncio.sleep(3600))

    asyncio.run(asyncio.wait_for(second(), 5))
    assert not limits._deadlines


async def test_limits_hold_with_tokens(make_client: ClientFactory) -> None:
    client = await make_client(CONFIG, env={"TOKEN": TOKEN_HASH})
    response = await client.post(
        "/workflow", json={"name": "long", "elements": []}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert (response.status, await response.json()) == (200, [])  # no element, no call, no wait


async def test_runners_given_one_count_of_connections_share_it() -> None:
    """As serve() gives the main listener's runner and the redirect listener's: one limit for both.

    An empty count is falsy (``len`` 0): taken for "none given", each runner got a count of its
    own, and the process could hold twice its limit (and its file descriptors' budget).
    """
    shared = connections.Connections(2, 60)
    runners = [LimitedRunner(web.Application(), load_config(CONFIG).settings, shared, handle_signals=False)]
    runners.append(LimitedRunner(web.Application(), load_config(CONFIG).settings, shared, handle_signals=False))
    ports = []
    for runner in runners:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ports.append(runner.addresses[0][1])
    try:
        assert all(runner.connections is shared for runner in runners)
        held = [await asyncio.open_connection("127.0.0.1", port) for port in ports]
        await asyncio.sleep(0.05)
        assert len(shared) == 2
        # Both held ones just opened (not idle yet): the limit is reached, across both listeners.
        third = await exchange(ports[0], b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert third.startswith(b"HTTP/1.1 503 ")
        for _, writer in held:
            writer.close()
    finally:
        for runner in runners:
            await runner.cleanup()
