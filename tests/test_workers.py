"""--workers N: several processes on the same socket, restarted when they die, stopped together."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

from test_systemd import NotifySocket

from conftest import Server

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
