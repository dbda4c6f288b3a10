"""Stopping, signals and supervision as deployed: a real ``python -m aioserver``, on both event
loops, as one process and with ``--workers 2``."""

from __future__ import annotations

import http.client
import json
import os
import re
import threading
import time

import pytest

from conftest import TOKEN, TOKEN_HASH, Server

LOOPS = ["asyncio", "uvloop"]
WORKERS = [1, 2]

CONFIG = """
workflow:
  echo: {tasks: [echo]}
  slow: {tasks: [{action: sample_actions.sleepy, args: [2]}]}
  stuck: {tasks: [{action: sample_actions.sleepy, args: [60]}]}
  async_stuck: {tasks: [{action: sample_actions.async_sleepy, args: [60]}]}
  loop_stuck: {tasks: [{action: sample_actions.block_loop, args: [600]}]}
"""


def start(loop: str, workers: int, *args: str, env: dict[str, str] | None = None) -> Server:
    """The server on ``loop`` with ``workers`` processes, once every one of them serves."""
    return Server("--config", CONFIG, "--loop", loop, "--workers", str(workers), *args, env=env, listeners=workers)


def request(port: int, method: str, path: str, body: str | None = None, timeout: float = 30) -> tuple[int, bytes]:
    """Status and body; status 0 when the connection failed or was cut without an answer."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    try:
        connection.request(method, path, body, headers)
        response = connection.getresponse()
        return response.status, response.read()
    except OSError:
        return 0, b""
    finally:
        connection.close()


def run(port: int, name: str) -> tuple[int, bytes]:
    return request(port, "POST", "/workflow", json.dumps({"name": name, "elements": [1]}))


class InFlight:
    """Requests sent from threads, their answers collected."""

    def __init__(self, port: int, *names: str) -> None:
        self.answers: dict[str, tuple[int, bytes]] = {}
        self.threads = [threading.Thread(target=self._send, args=(port, name), daemon=True) for name in names]
        for thread in self.threads:
            thread.start()

    def _send(self, port: int, name: str) -> None:
        self.answers[name] = run(port, name)

    def join(self, timeout: float = 30) -> dict[str, tuple[int, bytes]]:
        for thread in self.threads:
            thread.join(timeout)
        return self.answers


def wait_for_log(server: Server, text: str, count: int = 1, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while "".join(server.log).count(text) < count:
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n" + "".join(server.log)
        time.sleep(0.05)


def worker_pids(server: Server) -> list[int]:
    return [int(pid) for pid in re.findall(r"worker \d started, pid (\d+)", "".join(server.log))]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- HEAD /health


@pytest.mark.parametrize("loop", LOOPS)
def test_head_health_is_200_without_a_body_and_open(loop: str) -> None:
    with start(loop, 1, env={"TOKEN": TOKEN_HASH}) as server:
        status, body = request(server.port, "HEAD", "/health")
        assert (status, body) == (200, b"")
        assert request(server.port, "GET", "/health") == (200, b'{"status": "ok"}')
        # Open means /health only: any other HEAD still needs the token.
        assert request(server.port, "HEAD", "/workflow")[0] == 401
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        connection.request("HEAD", "/workflow", headers={"Authorization": f"Bearer {TOKEN}"})
        assert connection.getresponse().status == 405
        connection.close()
