"""--workers N: several processes on the same socket, restarted when they die, stopped together."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

from test_systemd import NotifySocket

from conftest import TOKEN, TOKEN_HASH, Server

CONFIG = "workflow:\n  pid: {tasks: [sample_actions.hold_loop]}\n  fast: {tasks: [sample_actions.pid]}\n"


def post(port: int, name: str) -> int:
    body = json.dumps({"name": name, "elements": [1]}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/workflow", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(json.loads(response.read())[0])


def serving_pids(port: int) -> set[int]:
    """The pids of two workers: the first request holds its worker's loop, so the second
    connection can only be accepted by another worker."""
    pids: list[int] = []
    holder = threading.Thread(target=lambda: pids.append(post(port, "pid")))
    holder.start()
    time.sleep(0.2)
    pids.append(post(port, "fast"))
    holder.join()
    return set(pids)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_serve_restart_and_stop(tmp_path: Path) -> None:
    notify = NotifySocket(str(tmp_path / "notify"))
    args = ("--config", CONFIG, "--workers", "2")
    with Server(*args, env={"NOTIFY_SOCKET": notify.address}, listeners=2) as server:
        assert server.ports[0] == server.ports[1]  # one socket, bound once by the parent
        assert notify.next()[:2] == ["READY=1", "STATUS=2 workers serving"]  # from the parent, for both
        pids = serving_pids(server.port)
        assert len(pids) == 2 and server.process.pid not in pids

        # SIGHUP reaches every worker; the parent announces READY once all have reloaded.
        server.process.send_signal(signal.SIGHUP)
        assert notify.next()[0] == "RELOADING=1"
        assert notify.next()[0] == "READY=1"

        victim = pids.pop()
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while "".join(server.log).count("serving on") < 3:  # the replacement serves
            assert time.monotonic() < deadline, "".join(server.log)
            time.sleep(0.05)
        replaced = serving_pids(server.port)
        assert len(replaced) == 2 and victim not in replaced and pids <= replaced
        assert f"(pid {victim}) was killed by SIGKILL; restarting" in "".join(server.log)

        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=15) == 0
        assert not any(alive(pid) for pid in replaced)
        assert "STOPPING=1" in notify.wait_for("STOPPING=1")[-1]
    notify.sock.close()
    log = "".join(server.log)
    assert log.count("INFO aioserver: stopped") == 2  # each worker finished cleanly
    assert "ERROR" not in log.split("restarting in")[1]


def test_each_worker_throttles_on_its_own() -> None:
    """What "Workers and scaling" says: the failure count is per worker process, so one client
    may fail ten times a minute at each worker (and at each host) before all refuse it."""
    env = {"TOKEN": TOKEN_HASH}
    with Server("--config", CONFIG, "--workers", "2", env=env, listeners=2) as server:
        by_worker: dict[int, http.client.HTTPConnection] = {}  # a keep-alive connection per worker
        deadline = time.monotonic() + 30
        while len(by_worker) < 2:
            assert time.monotonic() < deadline, "the connections never reached both workers"
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            worker = int(json.loads(ask(connection, TOKEN, "fast"))[0])
            if worker in by_worker:
                connection.close()
            else:
                by_worker[worker] = connection
        statuses = [[ask_status(connection, "wrong") for _ in range(11)] for connection in by_worker.values()]
        for connection in by_worker.values():
            connection.close()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=15) == 0
    assert statuses == [[401] * 10 + [429]] * 2


def ask(connection: http.client.HTTPConnection, token: str, name: str) -> bytes:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    connection.request("POST", "/workflow", json.dumps({"name": name, "elements": [1]}), headers)
    response = connection.getresponse()
    body = response.read()
    assert response.status == 200, body
    return body


def ask_status(connection: http.client.HTTPConnection, token: str) -> int:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    connection.request("POST", "/workflow", '{"name": "fast", "elements": [1]}', headers)
    response = connection.getresponse()
    response.read()
    return response.status
