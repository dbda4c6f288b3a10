"""CPU-heavy hostile input against the real ``python -m aioserver`` (on uvloop): the server keeps
answering, the workflow time limit holds, a 504 stops the work, and nothing is left behind."""

from __future__ import annotations

import http.server
import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Server
from test_processes import alive, cpu_seconds, descendants

# Each took the old server 12-40 s of GIL-holding work (the white space one too, at 150 KB).
HOSTILE = [
    "<p>a" + " " * 150_000 + "b</p>",
    "<br>" * 20_000,
    "<!--" * 50_000,
    "<a" * 50_000,
    "<?" * 100_000,
    "</" * 100_000,
]
# Linear, but long: 20 MB of markup is seconds of work for a worker process (on any machine
# this project runs on, more than the 2 s time limit of the tests below).
LONG = ["<p>Solar power is growing fast.<br>" * 600_000]


def post(port: int, name: str, elements: list[str], timeout: float = 120) -> tuple[int, object, float]:
    """POST /workflow: the status, the JSON answer and the seconds it took."""
    body = json.dumps({"name": name, "elements": elements}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/workflow", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, answer = response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        status, answer = error.code, json.loads(error.read())
    return status, answer, time.monotonic() - started


def health_seconds(port: int) -> float:
    started = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as response:
        assert response.status == 200
    return time.monotonic() - started


def in_background(target: object, *args: object) -> tuple[threading.Thread, list[object]]:
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.append(target(*args)), daemon=True)  # type: ignore[operator]
    thread.start()
    return thread, results


def test_health_answers_while_hostile_sumtext_runs() -> None:
    with Server("--timeout-workflow", "60", "--max-body-size", "100000000") as server:
        requests = [in_background(post, server.port, "sumtext", [html]) for html in HOSTILE]
        requests.append(in_background(post, server.port, "sumtext", [LONG[0][: len(LONG[0]) // 4]]))
        probes = []
        while any(thread.is_alive() for thread, _ in requests):
            probes.append(health_seconds(server.port))
            time.sleep(0.1)
        assert probes and max(probes) < 1.0, probes
        for thread, results in requests:
            thread.join()
            status, answer, _ = results[0]  # type: ignore[misc]
            assert status == 200, answer
        assert requests[-1][1][0][1] == [" ".join(["Solar power is growing fast."] * 3)]  # type: ignore[index]


CONFIG = """
workflow:
  sumtext: {tasks: [textractor, summary]}
  spin: {tasks: [{action: sample_actions.spin, args: {seconds: 60}, concurrency: process}]}
"""


@pytest.mark.parametrize(("name", "elements"), [("sumtext", LONG), ("spin", ["x"])], ids=["pipelines", "process"])
def test_a_504_stops_the_work_and_shutdown_leaves_no_process(tmp_path: Path, name: str, elements: list[str]) -> None:
    config = tmp_path / "config.yml"
    config.write_text(CONFIG)
    with Server("--config", str(config), "--timeout-workflow", "2", "--max-body-size", "100000000") as server:
        pid = server.process.pid
        request, results = in_background(post, server.port, name, elements)
        seen: set[int] = set()
        while request.is_alive():  # the processes that did the work
            seen |= descendants(pid)
            time.sleep(0.05)
        status, answer, seconds = results[0]  # type: ignore[misc]
        assert status == 504 and seconds < 5, (status, answer, seconds)
        # The work stopped with the request: a second later, the server's tree is idle.
        time.sleep(0.5)
        tree = {pid} | descendants(pid)
        before = cpu_seconds(tree)
        time.sleep(1.0)
        assert cpu_seconds(tree) - before < 0.3
        assert health_seconds(server.port) < 1.0
        # A worker for the next job, then SIGTERM: the server exits and takes its workers along.
        status, answer, _ = post(server.port, "sumtext", ["<p>One sentence here.</p>"])
        assert status == 200 and answer == ["One sentence here."]
        seen |= descendants(pid)
        assert seen, "the work ran in no worker process"
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
    assert not [child for child in seen if alive(child)]


@pytest.fixture
def page_server() -> Iterator[int]:
    """A web page on 127.0.0.1 made of the hostile inputs, with one sentence of text."""
    page = ("<html><body><p>Solar power is growing fast.</p>" + "".join(HOSTILE)).encode()

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_a_hostile_page_neither_stalls_the_server_nor_outlives_the_time_limit(tmp_path: Path, page_server: int) -> None:
    config = tmp_path / "config.yml"
    config.write_text(
        f"safeopen: {{allow: ['127.0.0.1:{page_server}']}}\n"
        "workflow:\n  page: {tasks: [{action: textractor, task: url}, summary]}\n"
    )
    with Server("--config", str(config), "--timeout-workflow", "2") as server:
        request, results = in_background(post, server.port, "page", [f"http://127.0.0.1:{page_server}/"])
        probes = []
        while request.is_alive():
            probes.append(health_seconds(server.port))
            time.sleep(0.1)
        status, answer, seconds = results[0]  # type: ignore[misc]
        # In the review the old server answered 504 after 52 s, its loop starved; this page is
        # milliseconds of work now.
        assert (status, answer) == (200, ["Solar power is growing fast. a b"]) and seconds < 5, (status, seconds)
        assert max(probes, default=0) < 1.0


@pytest.mark.parametrize(("name", "elements"), [("sumtext", LONG), ("spin", ["x"])], ids=["pipelines", "process"])
def test_a_client_gone_stops_its_work(tmp_path: Path, name: str, elements: list[str]) -> None:
    # Without this, the work of a client that went away ran on to the time limit (300 s by
    # default), holding a worker process and a --limit-concurrency slot.
    config = tmp_path / "config.yml"
    config.write_text(CONFIG)
    with Server("--config", str(config), "--max-body-size", "100000000") as server:
        pid = server.process.pid
        body = json.dumps({"name": name, "elements": elements}).encode()
        head = "POST /workflow HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\n\r\n"
        with socket.create_connection(("127.0.0.1", server.port)) as client:
            client.sendall(head.encode() + body)
            deadline = time.monotonic() + 10
            while not descendants(pid) and time.monotonic() < deadline:  # the work has started
                time.sleep(0.05)
            time.sleep(0.5)
        time.sleep(1.0)  # the client is gone; the server notices and stops the work
        tree = {pid} | descendants(pid)
        before = cpu_seconds(tree)
        time.sleep(1.0)
        assert cpu_seconds(tree) - before < 0.3
        server.process.terminate()
        assert server.process.wait(timeout=30) == 0
    assert "Traceback" not in "".join(server.log)
