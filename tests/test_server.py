"""The real ``python -m aioserver`` over HTTPS, driven by curl and openssl as a user would."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from aioserver import server as server_module
from aioserver.systemd import Notifier

from conftest import KEY_PASSWORD, PYTHON, TOKEN, TOKEN_HASH, PemFiles, Server, aioserver_command

CONFIG = """
workflow:
  # The txtai docs' example workflow name; here it echoes (no translation model on a test machine).
  sumfrench: {tasks: [echo]}
  upper: {tasks: [upper]}
  boom: {tasks: [sample_actions.boom]}
auth:
  tokens:
    - {name: reader, sha256: %s, workflows: [sumfrench]}
""" % hashlib.sha256(b"reader-token").hexdigest()


@pytest.fixture
def tls_files(pem_files: PemFiles, tmp_path: Path) -> tuple[Path, Path]:
    """Copies of the server's certificate and key that a test may overwrite before a reload."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(pem_files.cert, cert)
    shutil.copy(pem_files.key, key)
    return cert, key


@pytest.fixture
def https_server(tmp_path: Path, tls_files: tuple[Path, Path]) -> Iterator[Server]:
    config = tmp_path / "config.yml"
    config.write_text(CONFIG)
    cert, key = tls_files
    args = ("--config", str(config), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    with Server(*args, env={"TOKEN": TOKEN_HASH}) as server:
        yield server


def s_client(port: int, *options: str, ca: Path) -> subprocess.CompletedProcess[str]:
    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-brief", "-CAfile", str(ca), *options]
    return subprocess.run(command, input="", capture_output=True, text=True, timeout=20)


def test_txtai_curl_example_over_https(https_server: Server, pem_files: PemFiles) -> None:
    # The client example of txtai's security page, verbatim but for https, host, port and --cacert.
    command = [
        "curl", "--cacert", str(pem_files.ca), "-s",
        "-X", "POST", f"https://localhost:{https_server.port}/workflow",
        "-H", "Content-Type: application/json",
        "-H", f"Authorization: Bearer {TOKEN}",
        "-d", '{"name":"sumfrench", "elements": ["https://github.com/neuml/txtai"]}',
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["https://github.com/neuml/txtai"]

    without_token = subprocess.run(
        [*command[:3], "-i", *command[3:7], "-d", "{}"], capture_output=True, text=True, timeout=20
    )
    assert " 401 " in without_token.stdout.splitlines()[0]
    assert 'www-authenticate: Bearer realm="aioserver"' in without_token.stdout.lower().replace("bearer", "Bearer")
    assert "strict-transport-security: max-age=63072000" in without_token.stdout.lower()


@pytest.mark.parametrize(
    ("options", "accepted"),
    [
        (("-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"), None),
        (("-tls1_2",), "TLSv1.2"),
        (("-tls1_3",), "TLSv1.3"),
        (("-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA"), None),  # CBC: not intermediate
        (("-groups", "x448"), None),
        (("-tls1_2", "-groups", "ffdhe2048"), None),
        (("-groups", "X25519"), "TLSv1.3"),
        (("-groups", "P-256"), "TLSv1.3"),
        (("-groups", "P-384"), "TLSv1.3"),
        (("-tls1_2", "-groups", "X25519:P-256"), "TLSv1.2"),
    ],
)
def test_protocols_ciphers_and_groups(
    https_server: Server, pem_files: PemFiles, options: tuple[str, ...], accepted: str | None
) -> None:
    done = s_client(https_server.port, *options, ca=pem_files.ca)
    if accepted:
        assert done.returncode == 0, done.stderr
        assert f"Protocol version: {accepted}" in done.stderr
        assert "Verification: OK" in done.stderr
    else:
        assert done.returncode != 0
        assert "CONNECTION ESTABLISHED" not in done.stderr


@pytest.mark.workers
def test_sighup_reloads_the_certificate_without_dropping_connections(
    https_server: Server, pem_files: PemFiles, tls_files: tuple[Path, Path], client_ssl_ctx: ssl.SSLContext
) -> None:
    assert "CN = reloaded" not in s_client(https_server.port, ca=pem_files.ca).stderr
    connection = http.client.HTTPSConnection("localhost", https_server.port, context=client_ssl_ctx, timeout=10)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    body = json.dumps({"name": "upper", "elements": ["before"]})
    connection.request("POST", "/workflow", body, headers)
    assert connection.getresponse().read() == b'["BEFORE"]'

    cert, key = tls_files
    shutil.copy(pem_files.other_cert, cert)
    shutil.copy(pem_files.other_key, key)
    sighup(https_server, "reloaded TLS certificate, key and CA")

    after = s_client(https_server.port, ca=pem_files.ca)
    assert after.returncode == 0 and "CN = reloaded" in after.stderr
    # The connection opened before the reload still serves, on its old session.
    connection.request("POST", "/workflow", json.dumps({"name": "upper", "elements": ["after"]}), headers)
    assert connection.getresponse().read() == b'["AFTER"]'
    connection.close()

    # A reload that fails keeps the current certificate and says why.
    cert.write_text("garbage")
    sighup(https_server, "TLS reload failed")
    assert "TLS reload failed, keeping the current certificate: ssl_certfile:" in "".join(https_server.log)
    assert "CN = reloaded" in s_client(https_server.port, ca=pem_files.ca).stderr
    https_server.process.terminate()
    assert https_server.process.wait(timeout=10) == 0


def test_redirect_http_answers_308(tmp_path: Path, pem_files: PemFiles) -> None:
    args = ("--ssl-certfile", str(pem_files.cert), "--ssl-keyfile", str(pem_files.key), "--redirect-http", "0")
    with Server(*args, listeners=2) as server:
        https_port, http_port = server.ports
        connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
        connection.request("POST", "/workflow?x=1&y=%20", body=b"{}", headers={"Host": f"localhost:{http_port}"})
        response = connection.getresponse()
        assert response.status == 308
        assert response.getheader("Location") == f"https://localhost:{https_port}/workflow?x=1&y=%20"
        assert response.getheader("Strict-Transport-Security") is None  # RFC 6797: never over HTTP
        connection.close()


@pytest.mark.workers
def test_secrets_never_reach_logs_or_responses(
    tmp_path: Path, pem_files: PemFiles, client_ssl_ctx: ssl.SSLContext
) -> None:
    config = tmp_path / "config.yml"
    config.write_text(CONFIG)
    args = (
        "--config", str(config), "--log-level", "debug",
        "--ssl-certfile", str(pem_files.cert), "--ssl-keyfile", str(pem_files.encrypted_key),
    )  # fmt: skip
    env = {"TOKEN": TOKEN_HASH, "SSL_KEYFILE_PASSWORD": KEY_PASSWORD, "PYTHONASYNCIODEBUG": "1"}
    answers: list[bytes] = []
    with Server(*args, env=env) as server:
        requests = [
            ("POST", "/workflow", {"Authorization": f"Bearer {TOKEN}"}, {"name": "sumfrench", "elements": [TOKEN]}),
            (
                "POST",
                f"/workflow?token={TOKEN}",
                {"Authorization": f"Bearer {TOKEN}"},
                {"name": "boom", "elements": [1]},
            ),
            ("POST", "/workflow", {"Authorization": f"Bearer {TOKEN_HASH}"}, {"name": "upper", "elements": []}),
            ("POST", "/workflow", {"Authorization": f"Bearer {TOKEN}x"}, {"name": "upper", "elements": []}),
            ("POST", "/workflow", {"Authorization": f"Basic {TOKEN}"}, {}),
            ("POST", "/workflow", {"Authorization": f"Bearer {TOKEN} {TOKEN}"}, {}),
            ("GET", f"/{TOKEN}", {"Authorization": f"Bearer {TOKEN}"}, None),
            ("POST", "/workflow", {"Authorization": "Bearer reader-token"}, {"name": "upper", "elements": ["x"]}),
        ]
        for method, path, headers, body in requests:
            connection = http.client.HTTPSConnection("localhost", server.port, context=client_ssl_ctx, timeout=10)
            if body is not None:
                headers = {**headers, "Content-Type": "application/json"}
            connection.request(method, path, json.dumps(body) if body is not None else None, headers)
            response = connection.getresponse()
            answers.append(str(response.getheaders()).encode() + response.read())
            connection.close()
        server.process.terminate()
        assert server.process.wait(timeout=10) == 0
    log = "".join(server.log)
    assert "DEBUG" in log and "Traceback" in log  # debug logging was on, and the 500 was logged
    assert re.search(r'"POST /workflow HTTP/1.1" 200 .* token [0-9a-f]{16} "sumfrench"\n', log)  # identities
    assert re.search(r' reader [0-9a-f]{16} "upper"\n', log)
    for secret in (TOKEN_HASH, KEY_PASSWORD):
        assert secret not in log and all(secret.encode() not in answer for answer in answers)
    # The token itself appears only where the client put it into a path (logged as sent, without
    # the query) and in the first answer, whose element the echo workflow returns.
    assert log.count(TOKEN) == log.count(f"GET /{TOKEN} ") == 1
    assert all(TOKEN.encode() not in answer for answer in answers[1:])


def test_tokens_over_clear_text_refused_at_start() -> None:
    done = subprocess.run(
        [PYTHON, "-m", "aioserver", "--host", "0.0.0.0", "--port", "0"],
        env={**os.environ, "TOKEN": TOKEN_HASH},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("aioserver: error: command line: --host: tokens would travel in clear text")
    assert TOKEN_HASH not in done.stderr


# -- reloads (SIGHUP): what they revoke takes effect at once

WHOAMI = "GET /whoami HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


def sighup(server: Server, line: str) -> None:
    """Send SIGHUP and wait until the log says ``line`` once more in every worker."""
    before = "".join(server.log).count(line)
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "".join(server.log).count(line) < before + server.workers:
        assert time.monotonic() < deadline, "".join(server.log)
        time.sleep(0.02)


def resume(port: int, ca: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """``openssl s_client`` asking /whoami; stdout says New or Reused, and the answer."""
    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(ca), "-ign_eof", *options]
    return subprocess.run(command, input=WHOAMI, capture_output=True, text=True, timeout=20)


@pytest.mark.parametrize(
    "version",
    [("-tls1_2",), ("-tls1_2", "-no_ticket"), ("-tls1_3",)],
    ids=["tls1.2-ticket", "tls1.2-session-id", "tls1.3-ticket"],
)
def test_reload_revokes_tls_sessions(tmp_path: Path, pem_files: PemFiles, version: tuple[str, ...]) -> None:
    ca = tmp_path / "clients-ca.pem"
    shutil.copy(pem_files.ca, ca)
    session = str(tmp_path / "session.pem")
    args = (
        "--config", "extensions: [sample_plugins.add_whoami]",
        "--ssl-certfile", str(pem_files.cert), "--ssl-keyfile", str(pem_files.key), "--ssl-ca-certs", str(ca),
    )  # fmt: skip
    with Server(*args) as server:
        first = resume(server.port, pem_files.ca, *version, "-cert", str(pem_files.client), "-sess_out", session)
        assert first.stdout.count("New, TLSv1.") == 1 and '"commonName": "alice"' in first.stdout
        # Before a reload the session resumes, even without the certificate: what is revoked next.
        again = resume(server.port, pem_files.ca, *version, "-sess_in", session)
        assert "Reused, TLSv1." in again.stdout and '"commonName": "alice"' in again.stdout

        trustme.CA().cert_pem.write_to_path(ca)  # alice's CA is no longer trusted
        sighup(server, "reloaded TLS certificate, key and CA")
        for certificate in ((), ("-cert", str(pem_files.client))):
            after = resume(server.port, pem_files.ca, *version, "-sess_in", session, *certificate)
            assert "Reused" not in after.stdout and "alice" not in after.stdout
            assert '"client_subject"' not in after.stdout  # no answer at all: the handshake fails


@pytest.mark.workers
def test_token_revocation_does_not_wait_for_workflow_threads(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    keep = "other-token-6b1f"
    tokens.write_text(f"{TOKEN_HASH} ops\n{hashlib.sha256(keep.encode()).hexdigest()} keeper\n")
    config = tmp_path / "config.yml"
    config.write_text(
        "workflow:\n  echo: {tasks: [echo]}\n"
        "  slow: {tasks: [{action: sample_actions.sleepy, args: [8], initialize: sample_actions.nap}]}\n"
    )
    echo = json.dumps({"name": "echo", "elements": [1]})

    def status(token: str, body: str = echo, timeout: float = 5) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        try:
            connection.request("POST", "/workflow", body, headers)
            return connection.getresponse().status
        except OSError:  # timed out, or cut off when the server stops
            return 0
        finally:
            connection.close()

    with Server("--config", str(config), env={"TOKEN_FILE": str(tokens)}) as server:
        assert status(TOKEN) == 200
        # Slow sync work fills every thread workflows use: asyncio's default executor (hooks)
        # and the action threads (40), as a hostile token holder could.
        slow = json.dumps({"name": "slow", "elements": [1]})
        hostile = [threading.Thread(target=status, args=(keep, slow, 3), daemon=True) for _ in range(45)]
        for thread in hostile:
            thread.start()
        time.sleep(1.5)

        tokens.write_text(f"{hashlib.sha256(keep.encode()).hexdigest()} keeper\n")  # ops revoked
        server.process.send_signal(signal.SIGHUP)
        revoked_at = time.monotonic()
        while status(TOKEN) != 401:
            assert time.monotonic() - revoked_at < 1, "the revoked token still works"
            time.sleep(0.05)
        # Every worker reloads within that second too (each says so; the log arrives through a
        # pipe, so give its lines a moment): then none accepts the token.
        while "".join(server.log).count("reloaded tokens: 1 in force") < server.workers:
            assert time.monotonic() - revoked_at < 1.5, "a worker did not reload its tokens"
            time.sleep(0.05)
        assert [status(TOKEN) for _ in range(4)] == [401] * 4


@pytest.mark.workers
def test_sighup_reads_a_new_key_password(tmp_path: Path, tls_certificate_authority: trustme.CA) -> None:
    cert, key, password = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "password"

    def issue(name: str, secret: str) -> None:
        leaf = tls_certificate_authority.issue_cert("localhost", "127.0.0.1", common_name=name)
        leaf.cert_chain_pems[0].write_to_path(cert)
        private = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
        encryption = serialization.BestAvailableEncryption(secret.encode())
        key.write_bytes(
            private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        )
        password.write_text(secret + "\n")

    issue("first", "first-password-1c9e")
    args = ("--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    ca = tmp_path / "ca.pem"
    tls_certificate_authority.cert_pem.write_to_path(ca)
    with Server(*args, "--ssl-keyfile-password-file", str(password)) as server:
        assert "CN = first" in s_client(server.port, ca=ca).stderr
        issue("rotated", "rotated-password-77d0")  # a new key, encrypted with a new password
        sighup(server, "reloaded TLS certificate, key and CA")
        assert "CN = rotated" in s_client(server.port, ca=ca).stderr
    assert "TLS reload failed" not in "".join(server.log)
    assert "rotated-password-77d0" not in "".join(server.log)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_loop_option(loop: str) -> None:
    with Server("--loop", loop) as server:
        assert server.post(b'{"name": "shout", "elements": ["a"]}') == (200, b'["A!"]')
    assert f"event loop: {loop}\n" in "".join(server.log)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_during_start_up_is_handled_once_serving(sig: signal.Signals) -> None:
    # Once the server set itself up, the handlers are in place before anything serves: a stop
    # signal then drains and exits 0, a SIGHUP reloads, instead of the default action killing it.
    with Server(env={"EXTENSIONS": "sample_plugins.slow_start"}, pattern="slow start begins") as server:
        server.process.send_signal(sig)
        if sig == signal.SIGHUP:
            time.sleep(1.5)
            assert server.process.poll() is None  # alive and serving
            server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=10) == 0


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_while_the_app_is_made_is_handled_once_serving(workers: int, sig: signal.Signals) -> None:
    # The app is made (extensions run) in each worker: a signal then, forwarded by the parent,
    # once killed the worker (the parent exited 1) or the single process.
    with Server(
        "--workers", str(workers), env={"EXTENSIONS": "sample_plugins.slow_extension"}, pattern="extending slowly"
    ) as server:
        server.process.send_signal(sig)
        if sig == signal.SIGHUP:
            time.sleep(2)
            assert server.process.poll() is None
            server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=15) == 0
    assert "was killed by" not in "".join(server.log)


async def test_a_burst_of_sighups_is_one_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    reloads: list[None] = []

    async def counted(app: object, config: object) -> None:
        reloads.append(None)

    monkeypatch.setattr(server_module, "reload", counted)
    received: asyncio.Queue[signal.Signals] = asyncio.Queue()
    for _ in range(1000):  # a storm, queued before the loop could act on the first
        received.put_nowait(signal.SIGHUP)
    handling = asyncio.create_task(server_module._handle_signals(received, None, None, Notifier()))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert len(reloads) == 1 and not handling.done()
    received.put_nowait(signal.SIGHUP)
    received.put_nowait(signal.SIGTERM)  # a stop in a burst wins: no reload first
    await asyncio.wait_for(handling, 1)
    assert len(reloads) == 1


@pytest.mark.workers
def test_a_sighup_or_sigusr1_while_starting_is_held_until_serving(tmp_path: Path) -> None:
    """A reload asked for while the server still imports and reads its config (a hook, another
    supervisor) neither kills it nor is lost: it is held until the server can reload, then done."""
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN_HASH + "\n")
    environment = {**os.environ, "TOKEN_FILE": str(tokens)}
    command = aioserver_command("--port", "0")
    process = subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, text=True)
    try:
        # Inside the imports (aiohttp and the rest take most of a second), past the interpreter's
        # own start, before which no Python code can hold a signal: once the process blocks both
        # (its SigBlk in /proc; a fixed 0.2 s was too short on a loaded machine, SIGUSR1 killed it).
        _wait_until_blocked(process.pid, (signal.SIGHUP, signal.SIGUSR1))
        process.send_signal(signal.SIGUSR1)  # ignored once serving (test_lifecycle), held till then
        process.send_signal(signal.SIGHUP)
        assert process.stderr is not None
        watchdog = threading.Timer(30, process.kill)
        watchdog.start()
        log: list[str] = []
        try:
            reloads = 0
            for line in process.stderr:
                log.append(line)
                reloads += "reloaded tokens" in line
                workers = 2 if "--workers" in command else 1
                if reloads == workers:
                    break
        finally:
            watchdog.cancel()
        assert process.poll() is None, "".join(log)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, "".join(log)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        assert process.stderr is not None
        process.stderr.close()


def _wait_until_blocked(pid: int, signals: tuple[signal.Signals, ...], timeout: float = 20) -> None:
    """Wait until process ``pid`` blocks every one of ``signals``; fail if it never does."""
    wanted = sum(1 << (sig - 1) for sig in signals)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        if int(fields["SigBlk"].strip(), 16) & wanted == wanted:
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} did not block {signals} within {timeout}s")


@pytest.mark.workers
def test_reload_reads_the_config_files_auth_tokens_again(tmp_path: Path) -> None:
    """systemctl reload after editing auth.tokens: a removed token is refused, an added one works,
    and a config left with no token keeps the ones in force (never an open service)."""
    other = "other-token-9e107d9d"
    config = tmp_path / "config.yml"

    def write(*tokens: tuple[str, str]) -> None:
        entries = ", ".join(f"{{name: {name}, sha256: {hashlib.sha256(t.encode()).hexdigest()}}}" for name, t in tokens)
        config.write_text(f"auth: {{tokens: [{entries}]}}\nworkflow:\n  echo: {{tasks: [echo]}}\n")

    def status(token: str | None) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            connection.request("POST", "/workflow", json.dumps({"name": "echo", "elements": [1]}), headers)
            return connection.getresponse().status
        finally:
            connection.close()

    write(("ops", TOKEN))
    with Server("--config", str(config)) as server:
        assert (status(TOKEN), status(other)) == (200, 401)
        write(("ci", other))  # ops rotated out, ci in
        sighup(server, "reloaded tokens: 1 in force")
        assert [(status(TOKEN), status(other)) for _ in range(4)] == [(401, 200)] * 4
        config.write_text("workflow:\n  echo: {tasks: [echo]}\n")  # every token gone: refused
        sighup(server, "token reload failed, keeping the 1 tokens in force")
        assert "auth.tokens: no token left" in "".join(server.log)
        assert [(status(None), status(other)) for _ in range(4)] == [(401, 200)] * 4
