"""systemd for real: sd_notify on a datagram socket we bind, socket activation through
systemd-socket-activate, credentials, and the unit files checked by systemd-analyze."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from aioserver import systemd
from aioserver.options import Settings

from acmeserver import Pebble
from conftest import PYTHON, TESTS, TOKEN, TOKEN_HASH, PemFiles, free_port
from unitfiles import Installed, Running, UnitFile, running, service_unit, socket_unit

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
                "aioserver: error: environment: LISTEN_FDS: tokens would travel in clear text"
                f" on the activated socket 0.0.0.0:{port}"
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
    files = [
        "aioserver.socket",
        "aioserver.service",
        "aioserver.socket.d/nginx.conf",
        "aioserver.service.d/nginx.conf",
    ]
    _verify(tmp_path, files, ["aioserver.socket", "aioserver.service"])


def test_acme_units_verify(tmp_path: Path) -> None:
    """Automatic HTTPS: the port-80 socket and the service's drop-in, which names it in Sockets= and Requires=."""
    files = ["aioserver.socket", "aioserver-redirect.socket", "aioserver.service", "aioserver.service.d/acme.conf"]
    _verify(tmp_path, files, ["aioserver.socket", "aioserver-redirect.socket", "aioserver.service"])


def _verify(folder: Path, files: list[str], units: list[str]) -> None:
    # verify checks that ExecStart's program exists: point it at this venv's console script.
    for name in files:
        text = (CONF / name).read_text()
        assert ".socket" in name or INSTALLED in text
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(text.replace(INSTALLED, str(Path(sys.executable).parent / "aioserver")))
    done = subprocess.run(
        [ANALYZE, "verify", "--man=no", *(str(folder / unit) for unit in units)],
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


# -- automatic HTTPS under the units: aioserver-redirect.socket and aioserver.service.d/acme.conf, against pebble

ACME_DOMAIN = "api.aioserver.test"
OBTAINED = rf"acme: certificate for {re.escape(ACME_DOMAIN)} obtained"
ACME_FAILED = rf"acme: order for {re.escape(ACME_DOMAIN)} failed: .*; retrying in \d+s"


@pytest.fixture
def acme_installed() -> Iterator[Installed]:
    """The README's "Automatic HTTPS under systemd" done: no certificate or key in /etc/aioserver."""
    root = Installed()
    root.install(CONF / "config.yml", "/etc/aioserver/config.yml")
    root.install(f"{TOKEN_HASH} ops\n", "/etc/aioserver/token", 0o640, group=True)
    yield root
    root.remove()


@pytest.fixture
def acme_pebble(tmp_path: Path) -> Iterator[Pebble]:
    """pebble validating http-01 on the port that stands in for the redirect socket's 80."""
    with Pebble(tmp_path / "pebble", http_port=free_port()) as running:
        yield running


def acme_service(
    installed: Installed, pebble: Pebble, *extra: str, unit: UnitFile | None = None
) -> AbstractContextManager[Running]:
    """The units with the ACME drop-in, its names and CA given as an operator edits them (pebble's here)."""
    ca = installed.install(pebble.ca_file, "/etc/aioserver/acme-ca.pem")
    env = {"ACME_DOMAINS": ACME_DOMAIN, "ACME_DIRECTORY": pebble.directory, "ACME_CA_CERTS": str(ca)}
    sockets = [socket_unit(), socket_unit(name="aioserver-redirect.socket")]
    return running(
        installed, unit or service_unit("acme.conf"), sockets, extra=extra, env=env, ports={"80": pebble.http_port}
    )


def test_the_acme_drop_in_names_the_certificate_and_the_contact() -> None:
    """What the README tells an operator to edit: the names and the address, in the drop-in's environment."""
    environment = dict(
        assignment.split("=", 1)
        for value in service_unit("acme.conf").values("Service", "Environment")
        for assignment in shlex.split(value)
    )
    assert environment["ACME_DOMAINS"] == "api.example.com" and environment["ACME_EMAIL"] == "ops@example.com"
    assert "--ssl-certfile" not in (service_unit("acme.conf").value("Service", "ExecStart") or "")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("workers", [1, 2])
def test_automatic_https_under_the_units(
    loop: str, workers: int, acme_installed: Installed, acme_pebble: Pebble
) -> None:
    """Port 80 answers the CA, READY=1 once HTTPS serves pebble's certificate; the state is the
    service user's, private; reload and restart keep the certificate."""
    installed, pebble = acme_installed, acme_pebble
    extra = ("--loop", loop, "--workers", str(workers))
    with acme_service(installed, pebble, *extra) as service:
        service.ready(timeout=60)
        https = service.ports["443"]
        first = pebble.served_certificate(https, ACME_DOMAIN)  # verified against pebble's root, SNI
        assert first.names == (ACME_DOMAIN,)
        assert len(service.wait_for(OBTAINED)) == 1  # one order, whatever the workers
        plain = http.client.HTTPConnection("127.0.0.1", service.ports["80"], timeout=10)
        plain.request("GET", "/health", headers={"Host": ACME_DOMAIN})
        answer = plain.getresponse()
        # To the HTTPS socket's port (443 but here).
        assert (answer.status, answer.getheader("Location")) == (308, f"https://{ACME_DOMAIN}:{https}/health")
        plain.close()

        service.reload()
        service.wait_for(r"reloaded TLS certificate", count=workers)
        service.wait_for(r"reloaded tokens", count=workers)
        assert pebble.served_certificate(https, ACME_DOMAIN) == first
        assert service.stop() == 0

    state = installed.path("/var/lib/aioserver")
    assert stat.S_IMODE(state.stat().st_mode) == 0o700  # StateDirectoryMode=
    acme = state / "acme"
    for path in [acme, *acme.rglob("*")]:
        assert (path.stat().st_uid, stat.S_IMODE(path.stat().st_mode)) == (
            installed.uid,
            0o700 if path.is_dir() else 0o600,
        ), path
    assert (acme / "certificates" / ACME_DOMAIN / "fullchain.pem").exists()

    with acme_service(installed, pebble, *extra) as service:  # systemctl restart
        service.ready()
        assert pebble.served_certificate(service.ports["443"], ACME_DOMAIN).serial == first.serial
        assert "acme: ordering" not in service.text()
        assert service.stop() == 0


@pytest.mark.parametrize(("loop", "workers"), [("asyncio", 1), ("uvloop", 2)])
def test_the_start_waits_for_the_first_certificate(
    loop: str, workers: int, acme_installed: Installed, acme_pebble: Pebble
) -> None:
    """The CA down at boot: no READY=1 but EXTEND_TIMEOUT_USEC at once and every 30 s (forwarded
    by a workers' parent) and a STATUS= saying why, so that a start timeout shorter than the wait,
    shorter even than 30 s (here 20 s), does not fail the start; the CA back, READY=1 once HTTPS
    serves."""
    installed, pebble = acme_installed, acme_pebble
    unit = service_unit("acme.conf")
    unit.sections["Service"]["TimeoutStartSec"] = ["20s"]  # as a drop-in would set it
    pebble.stop()
    with acme_service(installed, pebble, "--loop", loop, "--workers", str(workers), unit=unit) as service:
        service.wait_for(ACME_FAILED)
        deadline = time.monotonic() + 15
        while not (
            any(line.startswith("EXTEND_TIMEOUT_USEC=") for line in service.messages)
            and any(line.startswith("STATUS=acme: order for") for line in service.messages)
        ):
            assert time.monotonic() < deadline and service.process.poll() is None, (service.messages, service.text())
            assert time.monotonic() < service.start_deadline(), service.text()
            service._receive(0.5)
        assert "READY=1" not in service.messages
        extended = [int(line.partition("=")[2]) for line in service.messages if line.startswith("EXTEND_TIMEOUT")]
        assert all(usec >= 30_000_000 for usec in extended)  # more than the 30 s until the next one
        while time.monotonic() - service.started < 25:  # the CA back once the unit's timeout is past
            assert service.process.poll() is None and time.monotonic() < service.start_deadline(), service.text()
            service._receive(0.5)
        assert "READY=1" not in service.messages
        pebble.start()
        service.ready(timeout=120)  # fails if the start would have timed out: 20 s, as extended
        assert time.monotonic() - service.started > 20
        assert pebble.served_certificate(service.ports["443"], ACME_DOMAIN).names == (ACME_DOMAIN,)
        assert service.stop() == 0


def _activated(prefix: tuple[str, ...], args: tuple[str, ...], trigger: int, log: Path) -> subprocess.Popen[bytes]:
    """aioserver under systemd-socket-activate, started by a first connection to ``trigger``."""
    process = start(*args, env={"TOKEN": TOKEN_HASH}, log=log, prefix=(*prefix, "-E", "PYTHONPATH", "-E", "TOKEN"))
    deadline = time.monotonic() + 10
    while True:  # until systemd-socket-activate listens; the first connection starts us
        try:
            socket.create_connection(("127.0.0.1", trigger), timeout=5).close()
            return process
        except ConnectionRefusedError:
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()
            time.sleep(0.05)


def _acme_options(pebble: Pebble, state: Path, loop: str) -> tuple[str, ...]:
    return (
        *("--loop", loop, "--acme-domain", ACME_DOMAIN, "--acme-directory", pebble.directory),
        *("--acme-ca-certs", str(pebble.ca_file), "--acme-state-dir", str(state)),
        *("--redirect-http", "80"),  # the port of the socket named "redirect", whatever this says
    )


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_acme_on_sockets_passed_by_systemd_socket_activate(loop: str, tmp_path: Path, acme_pebble: Pebble) -> None:
    """The two sockets as systemd passes them (one named redirect): challenges on one, HTTPS on the other."""
    https = free_port()
    listen = ("-l", f"127.0.0.1:{https}", "-l", f"127.0.0.1:{acme_pebble.http_port}", "--fdname=https:redirect")
    log = tmp_path / "log"
    options = _acme_options(acme_pebble, tmp_path / "state", loop)
    process = _activated(("systemd-socket-activate", *listen), options, acme_pebble.http_port, log)
    try:
        deadline = time.monotonic() + 30
        while f"serving on https://127.0.0.1:{https}" not in log.read_text():
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()
            time.sleep(0.1)
        assert acme_pebble.served_certificate(https, ACME_DOMAIN).names == (ACME_DOMAIN,)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        process.kill()
        process.wait()
    assert f"serving on http://127.0.0.1:{acme_pebble.http_port}" in log.read_text()


@pytest.mark.parametrize("names", ["https", "https:http"])
def test_acme_without_a_socket_named_redirect_is_a_configuration_error(names: str, tmp_path: Path) -> None:
    """Port 80 in the HTTPS socket's unit (its name then "https"), or a name mistyped: no plain
    listener would answer the CA, and the start would wait for a certificate forever."""
    ports = [free_port() for _ in names.split(":")]
    listen = [arg for port in ports for arg in ("-l", f"127.0.0.1:{port}")]
    options = (
        *("--acme-domain", ACME_DOMAIN, "--acme-directory", "https://127.0.0.1:9/dir"),  # never reached
        *("--acme-state-dir", str(tmp_path / "state"), "--redirect-http", "80"),
    )
    log = tmp_path / "log"
    process = _activated(("systemd-socket-activate", *listen, f"--fdname={names}"), options, ports[0], log)
    try:
        assert process.wait(timeout=30) == 2, log.read_text()
    finally:
        process.kill()
        process.wait()
    assert log.read_text().splitlines()[-1] == (
        "aioserver: error: environment: LISTEN_FDNAMES: ACME answers the CA's http-01 challenges on the"
        f" socket named redirect (FileDescriptorName=redirect); systemd passed {names.replace(':', ', ')}"
    )
