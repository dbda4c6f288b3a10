"""systemd for real: sd_notify on a datagram socket we bind, socket activation through
systemd-socket-activate, credentials, and the unit files checked by systemd-analyze."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aioserver import systemd

from conftest import PYTHON, TESTS, TOKEN, TOKEN_HASH, PemFiles, free_port

CONF = TESTS.parent / "conf"
# The systemd Debian package's tools; no running systemd is needed (.ci/run installs them).
ANALYZE = "systemd-analyze"
INSTALLED = "/opt/aioserver/bin/aioserver"  # the unit's ExecStart, as the README installs it


class NotifySocket:
    """The datagram socket a service manager would listen on: a path or an abstract ``@name``."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(15)

    def next(self) -> list[str]:
        return self.sock.recv(4096).decode().splitlines()

    def wait_for(self, line: str) -> list[list[str]]:
        """Every message up to and including the first one holding ``line``."""
        seen = []
        while True:
            message = self.next()
            seen.append(message)
            if line in message:
                return seen


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    address = str(tmp_path / "notify") if request.param == "path" else f"@aioserver-test-{os.getpid()}-{time.time_ns()}"
    listener = NotifySocket(address)
    yield listener
    listener.sock.close()


def health(port: int, context: ssl.SSLContext | None = None) -> int:
    if context:
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            "localhost", port, context=context, timeout=10
        )
    else:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status
    finally:
        connection.close()


def start(*args: str, env: dict[str, str], log: Path, prefix: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    with open(log, "wb") as stderr:
        return subprocess.Popen(
            [*prefix, PYTHON, "-m", "aioserver", *args],
            env={**os.environ, "PYTHONPATH": str(TESTS), **env},
            stderr=stderr,
        )


# -- sd_notify


def test_notifier_without_socket_is_a_no_op() -> None:
    notifier = systemd.Notifier.from_env({})
    assert not notifier.enabled
    notifier.ready()  # nothing to send to, nothing raised


def test_notifier_sends_to_path_and_abstract_sockets(notify_socket: NotifySocket) -> None:
    notifier = systemd.Notifier.from_env({"NOTIFY_SOCKET": notify_socket.address})
    notifier.ready("up")
    assert notify_socket.next() == ["READY=1", "STATUS=up"]
    notifier.reloading()
    reloading, monotonic = notify_socket.next()
    assert reloading == "RELOADING=1"
    usec = int(monotonic.removeprefix("MONOTONIC_USEC="))
    assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 5_000_000


def test_notifier_survives_a_vanished_manager(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = systemd.Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    notifier.stopping()
    assert "sd_notify STOPPING=1 failed" in caplog.text
    for _ in range(10):  # a worker pings its parent every second: a gone parent is said once
        notifier.watchdog()
    assert caplog.text.count("sd_notify") == 1
    manager = NotifySocket(str(tmp_path / "gone"))  # back: the next failure is news again
    notifier.watchdog()
    assert manager.next() == ["WATCHDOG=1"]
    manager.sock.close()
    notifier.watchdog()
    assert caplog.text.count("sd_notify") == 2


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "2000000"}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    assert systemd.watchdog_interval(env) == interval


def test_server_lifecycle_notifications(notify_socket: NotifySocket, tmp_path: Path) -> None:
    port = free_port()
    env = {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "400000"}
    process = start("--port", str(port), env=env, log=tmp_path / "log")
    try:
        assert notify_socket.next()[0] == "READY=1"
        assert health(port) == 200  # the port answers once READY is out
        # Pings every 0.2 s (half of WATCHDOG_USEC) while the loop turns.
        started = time.monotonic()
        assert notify_socket.next() == ["WATCHDOG=1"] and notify_socket.next() == ["WATCHDOG=1"]
        assert time.monotonic() - started < 1.5

        process.send_signal(signal.SIGHUP)
        reload = [m for m in notify_socket.wait_for("READY=1") if m != ["WATCHDOG=1"]]
        assert [m[0] for m in reload] == ["RELOADING=1", "READY=1"]
        assert reload[0][1].startswith("MONOTONIC_USEC=")

        process.send_signal(signal.SIGTERM)
        assert notify_socket.wait_for("STOPPING=1")[-1][0] == "STOPPING=1"
        assert process.wait(timeout=15) == 0
    finally:
        process.kill()
        process.wait()


# -- socket activation


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_socket_activation(tls: bool, tmp_path: Path, pem_files: PemFiles, client_ssl_ctx: ssl.SSLContext) -> None:
    port = free_port()
    args = ["--port", "1"]  # never bound: the passed socket is served instead
    if tls:
        args += ["--ssl-certfile", str(pem_files.cert), "--ssl-keyfile", str(pem_files.key)]
    prefix = ("systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=web", "-E", "PYTHONPATH", "-E", "TOKEN")
    log = tmp_path / "log"
    process = start(*args, env={"TOKEN": TOKEN_HASH}, log=log, prefix=prefix)
    try:
        deadline = time.monotonic() + 10
        while True:  # until systemd-socket-activate listens; the first connection starts us
            try:
                status = health(port, client_ssl_ctx if tls else None)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        assert status == 200
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        if tls:
            connection = http.client.HTTPSConnection("localhost", port, context=client_ssl_ctx, timeout=10)
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        connection.request("POST", "/workflow", '{"name": "echo", "elements": [1]}', headers)
        assert connection.getresponse().read() == b"[1]"
        connection.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        process.kill()
        process.wait()
    scheme = "https" if tls else "http"
    assert f"serving on {scheme}://127.0.0.1:{port}" in log.read_text()
    assert "cannot listen" not in log.read_text()


@pytest.mark.parametrize(
    ("address", "extra", "status"),
    [
        ("0.0.0.0", (), 2),  # tokens in clear text on the network
        ("0.0.0.0", ("--trusted-proxies", "10.0.0.0/8"), 0),  # a TLS proxy in front
        ("127.0.0.1", (), 0),
    ],
)
def test_clear_text_guard_judges_activated_sockets(
    address: str, extra: tuple[str, ...], status: int, tmp_path: Path
) -> None:
    port = free_port()
    prefix = ("systemd-socket-activate", "-l", f"{address}:{port}", "-E", "PYTHONPATH", "-E", "TOKEN")
    process = start("--check", *extra, env={"TOKEN": TOKEN_HASH}, log=tmp_path / "log", prefix=prefix)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert process.wait(timeout=15) == status
    finally:
        process.kill()
        process.wait()
    if status == 2:
        assert (
            (tmp_path / "log")
            .read_text()
            .splitlines()[-1]
            .startswith(
                f"aioserver: error: environment: LISTEN_FDS: tokens would travel in clear text on the activated socket 0.0.0.0:{port}"
            )
        )


def test_listen_fds_ignores_sockets_for_another_process() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"}
    assert systemd.listen_fds(env) == []
    assert env == {}  # unset all the same: they are not for our children either


# -- credentials


def test_credentials_directory_supplies_token_and_key(
    tmp_path: Path, pem_files: PemFiles, client_ssl_ctx: ssl.SSLContext
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "token").write_text(f"{TOKEN_HASH} systemd\n")
    shutil.copy(pem_files.key, credentials / "tls.key")
    port = free_port()
    log = tmp_path / "log"
    args = ("--port", str(port), "--ssl-certfile", str(pem_files.cert))
    process = start(*args, env={"CREDENTIALS_DIRECTORY": str(credentials)}, log=log)
    try:
        deadline = time.monotonic() + 10
        while "serving on" not in log.read_text():
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()
            time.sleep(0.05)
        connection = http.client.HTTPSConnection("localhost", port, context=client_ssl_ctx, timeout=10)
        connection.request("POST", "/workflow", '{"name": "echo", "elements": []}')
        response = connection.getresponse()
        assert (response.status, response.read()) == (401, b'{"error": "authorization required"}')
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        connection.request("POST", "/workflow", '{"name": "echo", "elements": ["x"]}', headers)
        assert connection.getresponse().read() == b'["x"]'
        connection.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        process.kill()
        process.wait()
    assert re.search(r'"POST /workflow HTTP/1.1" 200 .* systemd$', log.read_text(), re.M)


# -- the unit files


def test_units_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at this venv's console script.
    for unit in ("aioserver.socket", "aioserver.service"):
        text = (CONF / unit).read_text()
        assert unit == "aioserver.socket" or INSTALLED in text
        (tmp_path / unit).write_text(text.replace(INSTALLED, str(Path(sys.executable).parent / "aioserver")))
    done = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(tmp_path / "aioserver.socket"), str(tmp_path / "aioserver.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "aioserver" not in done.stderr, done.stderr  # no warning about our units


def test_service_exposure_score() -> None:
    done = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--threshold=20", "--no-pager", str(CONF / "aioserver.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    score = float(re.search(r"Overall exposure level for aioserver\.service: (\d+\.\d+)", done.stdout).group(1))  # type: ignore[union-attr]
    assert score <= 2.0, done.stdout
    assert f"score {score}" in (TESTS.parent / "README.md").read_text()  # what the README records
