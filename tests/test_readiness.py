"""GET /ready and --shutdown-delay (SPEC section 8): 200 while serving, 503 from the stop signal
on, the listeners serving on for the delay so that a balancer notices before they close.

In-process for the states; as deployed (a real ``python -m aioserver``, both loops, and
``--workers 2``) for the stop.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import threading
import time

import pytest

from aioserver import create_app, load_config
from aioserver.readiness import READINESS

from conftest import TOKEN, TOKEN_HASH, Server

CONFIG = """
workflow:
  echo: {tasks: [echo]}
  stuck: {tasks: [{action: sample_actions.sleepy, args: [60]}]}
"""
AUTHORIZED = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
ECHO = json.dumps({"name": "echo", "elements": [1]})
STUCK = json.dumps({"name": "stuck", "elements": [1]})
READY = (200, b'{"status": "ready"}')
STOPPING = (503, b'{"status": "stopping"}')


# -- the states, in-process


async def test_ready_follows_the_lifecycle_and_is_open(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    app = create_app(load_config(CONFIG, env={"TOKEN": TOKEN_HASH}))
    client = await aiohttp_client(app)  # no token sent below: /ready is open, like /health

    async def ready() -> tuple[int, bytes]:
        answer = await client.get("/ready")
        assert answer.headers["Content-Type"] == "application/json"
        assert answer.headers["Cache-Control"] == "no-store"
        return answer.status, await answer.read()

    # What made the app has not said every listener serves (serve() does): not ready yet.
    assert await ready() == (503, b'{"status": "starting"}')
    app[READINESS].serving()
    assert await ready() == READY
    head = await client.head("/ready")
    assert (head.status, await head.read()) == (200, b"")
    app[READINESS].stopping()
    assert await ready() == STOPPING
    app[READINESS].serving()  # a stop is never undone
    assert await ready() == STOPPING
    # Open means /ready only: the rest still needs the token.
    assert (await client.post("/workflow", data=ECHO, headers={"Content-Type": "application/json"})).status == 401
    assert (await client.post("/ready", headers=AUTHORIZED)).status == 405


# -- as deployed


def ask(sock: socket.socket, method: str, path: str, body: str | None = None) -> tuple[int, bytes]:
    """One request on an open connection (never another one), with the token; status and body."""
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    sock.sendall((head + "\r\n" + (body or "")).encode())
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, response.read()


def fresh(port: int, method: str, path: str, body: str | None = None) -> tuple[int, bytes]:
    """One request on a new connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        return ask(sock, method, path, body)


def wait_for_delay(server: Server, seconds: float, timeout: float = 15) -> None:
    """Until every serving process has logged the start of its --shutdown-delay (a worker's
    signal is the SIGTERM its parent forwards)."""
    line = re.compile(rf"stopping in {seconds:g}s \(SIG(?:TERM|INT), --shutdown-delay\)")
    deadline = time.monotonic() + timeout
    while len(line.findall("".join(server.log))) < server.workers:
        assert time.monotonic() < deadline, "no --shutdown-delay line from each process:\n" + "".join(server.log)
        time.sleep(0.02)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.workers
def test_ready_is_200_while_serving_without_a_token() -> None:
    with Server("--config", CONFIG, env={"TOKEN": TOKEN_HASH}) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        connection.request("GET", "/ready")  # no Authorization
        answer = connection.getresponse()
        assert (answer.status, answer.read()) == READY
        connection.close()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=15) == 0


@pytest.mark.workers
def test_sigterm_with_a_shutdown_delay_answers_503_and_serves_until_the_listeners_close() -> None:
    delay = 4.0
    with Server("--config", CONFIG, "--shutdown-delay", str(delay), env={"TOKEN": TOKEN_HASH}) as server:
        kept = socket.create_connection(("127.0.0.1", server.port), timeout=10)  # a balancer's keep-alive connection
        assert ask(kept, "GET", "/ready") == READY
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        wait_for_delay(server, delay)
        # Within the delay: /ready says 503 on the open connection and on new ones, while
        # requests are served as before, on both.
        assert ask(kept, "GET", "/ready") == STOPPING
        for _ in range(4):  # with workers, new connections go to either one
            assert fresh(server.port, "GET", "/ready") == STOPPING
        assert fresh(server.port, "POST", "/workflow", ECHO) == (200, b"[1]")
        assert ask(kept, "POST", "/workflow", ECHO) == (200, b"[1]")
        checked = time.monotonic() - signalled
        assert checked < delay, f"the checks took {checked:.1f}s, longer than the delay: they prove nothing"
        assert "shutting down" not in "".join(server.log)
        server.process.send_signal(signal.SIGTERM)  # again (an impatient operator): the delay holds
        # Then the listeners close: new connections are refused, the idle one is closed.
        while not refused(server.port):
            assert time.monotonic() - signalled < delay + 10, "still accepting long after the delay"
            time.sleep(0.05)
        closed = time.monotonic() - signalled
        assert closed >= delay, f"refused {closed:.2f}s after SIGTERM, before the {delay:g}s delay was over"
        assert kept.recv(4096) == b""
        kept.close()
        assert server.process.wait(timeout=15) == 0
    log = "".join(server.log)
    assert log.count("shutting down (SIGTERM)") == server.workers
    assert "SIGTERM ignored: shutting down already" in log
    assert "Traceback" not in log and "was killed by" not in log


@pytest.mark.workers
def test_sigterm_without_a_shutdown_delay_closes_the_listeners_at_once() -> None:
    with Server("--config", CONFIG, env={"TOKEN": TOKEN_HASH}) as server:
        assert fresh(server.port, "GET", "/ready") == READY
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        while not refused(server.port):
            assert time.monotonic() - signalled < 5, "still accepting 5 s after SIGTERM without a delay"
            time.sleep(0.02)
        assert server.process.wait(timeout=15) == 0
    log = "".join(server.log)
    assert "--shutdown-delay" not in log and "Traceback" not in log


@pytest.mark.workers
def test_a_second_sigint_ends_the_delay_and_cuts_requests_off() -> None:
    args = ("--config", CONFIG, "--shutdown-delay", "60", "--timeout-graceful-shutdown", "60")
    with Server(*args, env={"TOKEN": TOKEN_HASH}) as server:
        answers: list[tuple[int, bytes]] = []
        stuck = threading.Thread(target=lambda: answers.append(fresh(server.port, "POST", "/workflow", STUCK)))
        stuck.start()
        time.sleep(1)  # the request is in its action now
        server.process.send_signal(signal.SIGINT)  # Ctrl-C: a minute's delay, then a minute's drain
        wait_for_delay(server, 60)
        assert fresh(server.port, "GET", "/ready") == STOPPING
        again = time.monotonic()
        server.process.send_signal(signal.SIGINT)  # Ctrl-C again: stop now
        assert server.process.wait(timeout=30) == 0
        took = time.monotonic() - again
        stuck.join(30)
    log = "".join(server.log)
    assert took < 10, f"a second SIGINT took {took:.1f}s to stop"
    assert answers == [(503, b'{"error": "server shutting down: the request was cut off"}')]
    assert "second SIGINT: stopping now" in log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log and "was killed by" not in log
