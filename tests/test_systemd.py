"""systemd for real: sd_notify on a datagram socket we bind, socket activation through
systemd-socket-activate, credentials, and the unit files checked by systemd-analyze."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aioserver import systemd
from aioserver.options import Settings

from conftest import PYTHON, TESTS, TOKEN, TOKEN_HASH, PemFiles, free_port
from unitfiles import Installed, UnitFile, running, service_unit, socket_unit

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
    assert re.search(r'"POST /workflow HTTP/1.1" 200 .* systemd \w{16} "echo"$', log.read_text(), re.M)


# -- the unit files


def test_units_verify(tmp_path: Path) -> None:
    """The units and their drop-ins for nginx (systemd-analyze reads X.d/*.conf beside X)."""
    # verify checks that ExecStart's program exists: point it at this venv's console script.
    files = ["aioserver.socket", "aioserver.service", "aioserver.socket.d/nginx.conf", "aioserver.service.d/nginx.conf"]
    for name in files:
        text = (CONF / name).read_text()
        assert name.startswith("aioserver.socket") or INSTALLED in text
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text.replace(INSTALLED, str(Path(sys.executable).parent / "aioserver")))
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


# -- the shipped units, installed as the README says and run as systemd runs them (unitfiles.py)

ROTATED_TOKEN = "rotated-token-8f14e45fceea167a"
ROTATED_HASH = hashlib.sha256(ROTATED_TOKEN.encode()).hexdigest()


@pytest.fixture
def installed(pem_files: PemFiles) -> Iterator[Installed]:
    """The README's "Run it with systemd" done: config, certificate, key and token file in /etc/aioserver."""
    root = Installed()
    root.install(CONF / "config.yml", "/etc/aioserver/config.yml")
    root.install(pem_files.cert, "/etc/aioserver/cert.pem")
    root.install(pem_files.key, "/etc/aioserver/tls.key", 0o640, group=True)
    root.install(f"{TOKEN_HASH} ops\n", "/etc/aioserver/token", 0o640, group=True)
    yield root
    root.remove()


def served_certificate(port: int, context: ssl.SSLContext) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            certificate = tls.getpeercert(binary_form=True)
    assert certificate is not None
    return certificate


def first_certificate(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(
        path.read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    )


def shout(port: int, context: ssl.SSLContext, token: str) -> int:
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
    try:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        connection.request("POST", "/workflow", '{"name": "shout", "elements": ["hi"]}', headers)
        response = connection.getresponse()
        body = response.read()
        assert response.status != 200 or body == b'["HI!"]'
        return response.status
    finally:
        connection.close()


LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


@LOOPS
@pytest.mark.parametrize("workers", [1, 2])
def test_reload_rotates_key_certificate_and_tokens(
    loop: str, workers: int, installed: Installed, pem_files: PemFiles, client_ssl_ctx: ssl.SSLContext
) -> None:
    """README's rotation: new files in /etc/aioserver (certbot's new key too), `systemctl reload`."""
    extra = ("--loop", loop, "--workers", str(workers))
    with running(installed, service_unit(), socket_unit(), extra=extra) as service:
        service.ready()
        assert served_certificate(service.port, client_ssl_ctx) == first_certificate(pem_files.cert)
        assert shout(service.port, client_ssl_ctx, TOKEN) == 200

        installed.install(pem_files.other_key, "/etc/aioserver/tls.key", 0o640, group=True)
        installed.install(pem_files.other_cert, "/etc/aioserver/cert.pem")
        installed.install(f"{ROTATED_HASH} ops\n", "/etc/aioserver/token", 0o640, group=True)
        service.reload()
        service.wait_for(r"reloaded TLS|TLS reload failed", count=workers)
        service.wait_for(r"reloaded tokens|token reload failed", count=workers)
        assert "failed" not in service.text()
        for _ in range(3 * workers):  # whichever worker accepts
            assert served_certificate(service.port, client_ssl_ctx) == first_certificate(pem_files.other_cert)
        assert shout(service.port, client_ssl_ctx, ROTATED_TOKEN) == 200
        assert shout(service.port, client_ssl_ctx, TOKEN) == 401  # revoked
        assert service.stop() == 0


@LOOPS
def test_a_half_written_pair_keeps_the_current_certificate(
    loop: str, installed: Installed, pem_files: PemFiles, client_ssl_ctx: ssl.SSLContext
) -> None:
    """A reload between the key's and the certificate's replacement, or of a file cut short,
    keeps the certificate in force and says why; the next reload of a whole pair takes it."""
    old, new = first_certificate(pem_files.cert), first_certificate(pem_files.other_cert)
    new_key = pem_files.other_key.read_bytes()
    with running(installed, service_unit(), socket_unit(), extra=("--loop", loop)) as service:
        service.ready()
        key = installed.path("/etc/aioserver/tls.key")
        steps = [  # path, content, mode, readable by the service's group, what the log says
            (
                "/etc/aioserver/cert.pem",
                pem_files.other_cert.read_bytes(),
                0o644,
                False,
                "does not match the certificate",
            ),
            ("/etc/aioserver/tls.key", new_key[: len(new_key) // 2], 0o640, True, "cannot load the private key"),
            # certbot's privkey.pem as it comes (0600 root): the README's "-g aioserver" forgotten.
            ("/etc/aioserver/tls.key", new_key, 0o600, False, f"cannot read {key}: Permission denied"),
        ]
        for number, (path, content, mode, group, problem) in enumerate(steps, start=1):
            installed.install(content, path, mode, group=group)
            service.reload()
            line = service.wait_for(r"TLS reload failed", count=number)[-1]
            assert "keeping the current certificate: ssl_" in line and problem in line, line
            assert served_certificate(service.port, client_ssl_ctx) == old
        installed.install(new_key, "/etc/aioserver/tls.key", 0o640, group=True)
        service.reload()
        service.wait_for(r"reloaded TLS certificate")
        assert served_certificate(service.port, client_ssl_ctx) == new
        assert service.stop() == 0


def restarts(unit: UnitFile, status: int) -> bool:
    """Whether systemd restarts the service after its main process exits with ``status``."""
    prevented = {int(s) for value in unit.values("Service", "RestartPreventExitStatus") for s in value.split()}
    if status in prevented:
        return False
    return {"always": True, "on-failure": status != 0}.get(unit.value("Service", "Restart") or "no", False)


def test_a_configuration_error_is_not_restarted(installed: Installed) -> None:
    installed.install("server:\n  bogus: 1\n", "/etc/aioserver/config.yml")
    with running(installed, service_unit(), socket_unit()) as service:
        status = service.process.wait(timeout=30)
    assert status == 2
    config = installed.path("/etc/aioserver/config.yml")
    assert service.text().splitlines()[-1].startswith(f"aioserver: error: {config}: server.bogus: unknown option")
    unit = service_unit()
    assert not restarts(unit, 2)  # fixing the file is the operator's job: restarting forever helps nobody
    assert restarts(unit, 1)  # a runtime failure (1) is worth another try


def test_the_unit_gives_room_for_the_connection_limit(installed: Installed) -> None:
    with running(installed, service_unit(), socket_unit()) as service:
        service.ready()
        limits = Path(f"/proc/{service.process.pid}/limits").read_text()
        assert service.stop() == 0
    soft = int(re.search(r"Max open files\s+(\d+)", limits).group(1))  # type: ignore[union-attr]
    assert soft >= Settings().limit_connections + 100
    assert "RLIMIT_NOFILE" not in service.text()


def test_sysusers_makes_the_units_user_and_group(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    done = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(CONF / "aioserver.sysusers")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    unit = service_unit()
    user, group = unit.value("Service", "User"), unit.value("Service", "Group")
    passwd = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/group").read_text().splitlines()}
    assert user in passwd and group in groups
    assert int(passwd[user][2]) < 1000 and passwd[user][3] == groups[group][2]  # a system user, its own group
    assert passwd[user][6] == "/usr/sbin/nologin"


@pytest.fixture
def page_server() -> Iterator[str]:
    """A URL on 127.0.0.1 answering a small text, for retrieve tasks to download."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = b"retrieved text\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/page.txt"
    server.shutdown()
    server.server_close()


def retrieve_config(url: str, directory: str | None) -> str:
    where = f", directory: {directory}" if directory else ""
    port = url.split(":")[2].split("/")[0]
    return f"workflow:\n  download:\n    tasks: [{{task: retrieve{where}}}]\nsafeopen:\n  allow: ['127.0.0.1:{port}']\n"


def post_workflow(port: int, context: ssl.SSLContext, name: str, elements: list[str]) -> tuple[int, bytes]:
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
    try:
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        connection.request("POST", "/workflow", json.dumps({"name": name, "elements": elements}), headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@LOOPS
def test_retrieve_writes_in_the_units_state_directory(
    loop: str, installed: Installed, page_server: str, client_ssl_ctx: ssl.SSLContext
) -> None:
    """ProtectSystem=strict leaves the service one place to write: its StateDirectory=."""
    installed.install(retrieve_config(page_server, None), "/etc/aioserver/config.yml")
    with running(installed, service_unit(), socket_unit(), extra=("--loop", loop)) as service:
        service.ready()
        status, body = post_workflow(service.port, client_ssl_ctx, "download", [page_server])
        assert service.stop() == 0
    assert status == 200, body
    written = installed.path("/var/lib/aioserver/page.txt")
    assert json.loads(body) == [str(written)]
    assert written.read_bytes() == b"retrieved text\n"
    assert (written.stat().st_uid, written.stat().st_mode & 0o777) == (installed.uid, 0o600)  # UMask=0077


@pytest.mark.parametrize("check", [False, True], ids=["start", "check"])
@pytest.mark.parametrize(
    ("protect", "mode", "problem"),
    [
        ("strict", 0o755, "Read-only file system"),  # the unit as shipped: /srv is not its to write
        (None, 0o555, "Permission denied"),  # without ProtectSystem=: a directory not the service's
    ],
)
def test_an_unwritable_retrieve_directory_is_a_configuration_error(
    check: bool, protect: str | None, mode: int, problem: str, installed: Installed, page_server: str
) -> None:
    directory = installed.path("/srv/downloads")
    directory.mkdir(parents=True)
    directory.chmod(mode)
    directory.parent.chmod(0o755)
    installed.install(retrieve_config(page_server, str(directory)), "/etc/aioserver/config.yml")
    unit = service_unit()
    unit.sections["Service"]["ProtectSystem"] = [protect] if protect else []
    with running(installed, unit, socket_unit(), extra=("--check",) if check else ()) as service:
        status = service.process.wait(timeout=30)
    assert status == 2, service.text()
    config = installed.path("/etc/aioserver/config.yml")
    assert service.text().splitlines()[-1] == (
        f"aioserver: error: {config}: workflow.download.tasks[0].directory: cannot write in {directory}: {problem}"
    )
    assert list(directory.iterdir()) == []


def worker_pids(parent: int) -> set[int]:
    return {int(pid) for pid in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()}


@LOOPS
def test_a_replaced_worker_serves_the_rotated_files(
    loop: str, installed: Installed, pem_files: PemFiles, client_ssl_ctx: ssl.SSLContext
) -> None:
    """A worker that dies after a reload is replaced by one with the reloaded key, certificate
    and tokens, not the ones the service started with: a revoked token stays revoked."""
    with running(installed, service_unit(), socket_unit(), extra=("--loop", loop, "--workers", "2")) as service:
        service.ready()
        installed.install(pem_files.other_key, "/etc/aioserver/tls.key", 0o640, group=True)
        installed.install(pem_files.other_cert, "/etc/aioserver/cert.pem")
        installed.install(f"{ROTATED_HASH} ops\n", "/etc/aioserver/token", 0o640, group=True)
        service.reload()
        service.wait_for(r"reloaded TLS certificate", count=2)
        service.wait_for(r"reloaded tokens", count=2)
        workers = worker_pids(service.process.pid)
        assert len(workers) == 2
        for victim in workers:  # both, one after the other: every connection meets a new one
            os.kill(victim, signal.SIGKILL)
            service.wait_for(r"serving on", count=2 + len(workers - worker_pids(service.process.pid)))
        service.wait_for(r"serving on", count=4)
        assert not workers & worker_pids(service.process.pid)
        for _ in range(6):
            assert served_certificate(service.port, client_ssl_ctx) == first_certificate(pem_files.other_cert)
            assert shout(service.port, client_ssl_ctx, TOKEN) == 401
            assert shout(service.port, client_ssl_ctx, ROTATED_TOKEN) == 200
        assert service.stop() == 0
