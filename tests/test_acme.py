"""Automatic certificates (SPEC section 6), black-box: ``python -m aioserver --acme-domain`` against pebble.

Every server here gets its certificate from a real ACME server (acmeserver.Pebble), answers
pebble's http-01 validation on its ``--redirect-http`` port, and is checked as a browser would
check it: a TLS handshake with SNI = the domain, the chain verified against pebble's root.
ACME needs the ``acme`` extra, which the test venv holds: the tests choose their loops
(``--loop``), so conftest runs them there.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import re
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from acmeserver import Leaf, Pebble, new_key_pem, peer_leaf
from conftest import PYTHON, TOKEN, TOKEN_HASH, PemFiles, Server, free_port, no_extras_python

DOMAIN = "api.aioserver.test"
LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
ORDERING = rf"acme: ordering a certificate for {re.escape(DOMAIN)} from "
OBTAINED = rf"acme: certificate for {re.escape(DOMAIN)} obtained, valid until \S+"
FAILED = rf"acme: order for {re.escape(DOMAIN)} failed: (.+); retrying in (\d+)s"
HTTPS = r"serving on https://127\.0\.0\.1:(\d+)"


@pytest.fixture
def short_lived(tmp_path: Path) -> Iterator[Pebble]:
    """A pebble whose certificates live 60 s: renewal (a third left) comes about 40 s after issuance."""
    with Pebble(tmp_path / "pebble", validity=60) as running:
        yield running


def acme_args(pebble: Pebble, state: Path | None, loop: str) -> tuple[str, ...]:
    """The options of SPEC section 6 for DOMAIN from ``pebble`` (no --acme-state-dir if ``state`` is None)."""
    return (
        "--loop", loop,
        "--acme-domain", DOMAIN,
        "--acme-email", "ops@aioserver.test",
        "--acme-directory", pebble.directory,
        "--acme-ca-certs", str(pebble.ca_file),
        "--redirect-http", str(pebble.http_port),
    ) + (("--acme-state-dir", str(state)) if state else ())  # fmt: skip


@contextmanager
def acme_server(
    pebble: Pebble,
    state: Path | None,
    loop: str,
    *extra: str,
    env: dict[str, str] | None = None,
    listeners: int = 1,
    prefix: tuple[str, ...] = (),
) -> Iterator[Server]:
    """aioserver with ACME for DOMAIN (a token set: no Host guard), once it serves HTTPS; ``.port`` is that port."""
    port = free_port()
    args = (*acme_args(pebble, state, loop), "--port", str(port), *extra)
    environment = {"TOKEN": TOKEN_HASH, **(env or {})}
    with Server(*args, env=environment, listeners=listeners, pattern=HTTPS, prefix=prefix) as server:
        assert server.port == port
        yield server


def log_of(server: Server) -> str:
    return "".join(server.log)


def wait_for_log(server: Server, pattern: str, count: int = 1, timeout: float = 30) -> list[re.Match[str]]:
    """The first ``count`` matches of ``pattern`` in the server's log, once there are as many."""
    deadline = time.monotonic() + timeout
    while True:
        found = list(re.finditer(pattern, log_of(server)))
        if len(found) >= count:
            return found[:count]
        if server.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{count} x {pattern!r} not logged within {timeout}s:\n{log_of(server)}")
        time.sleep(0.1)


def eventually(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout}s"
        time.sleep(0.2)


def request(connection: http.client.HTTPConnection, method: str, path: str, body: object = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    connection.request(method, path, None if body is None else json.dumps(body), headers)
    response = connection.getresponse()
    return response.status, response.read()


def state_files(state: Path) -> dict[str, Path]:
    certificates = state / "certificates" / DOMAIN
    return {"account": state / "account.key", "chain": certificates / "fullchain.pem", "key": certificates / "key.pem"}


# -- issuance


@LOOPS
def test_first_issuance(loop: str, tmp_path: Path, pebble: Pebble) -> None:
    """The plain listener first (pebble validates through it), then the certificate, then HTTPS, then READY=1."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    port = free_port()
    args = (*acme_args(pebble, tmp_path / "state", loop), "--port", str(port))
    env = {"TOKEN": TOKEN_HASH, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    # Back as soon as the order starts: the plain listener serves by then.
    with notify, Server(*args, env=env, pattern=ORDERING) as server:
        redirect = http.client.HTTPConnection("127.0.0.1", pebble.http_port, timeout=10)
        redirect.request("GET", "/health", headers={"Host": f"{DOMAIN}:{pebble.http_port}"})
        answer = redirect.getresponse()
        assert (answer.status, answer.getheader("Location")) == (308, f"https://{DOMAIN}:{port}/health")
        redirect.close()

        while "READY=1" not in notify.recv(4096).decode().splitlines():
            pass  # a STATUS= while the order runs, say
        served = pebble.served_certificate(port, DOMAIN)  # READY=1 means HTTPS serves, with pebble's certificate
        assert served.names == (DOMAIN,)
        assert served == Leaf.from_pem(state_files(tmp_path / "state")["chain"].read_text())
        log = log_of(server)
        ordering, obtained, serving = (
            re.search(p, log) for p in (ORDERING + re.escape(pebble.directory), OBTAINED, HTTPS)
        )
        assert ordering and obtained and serving, log
        assert ordering.start() < obtained.start() < serving.start()
        assert serving.group(1) == str(port) and log.count("serving on https://") == 1

        connection = pebble.connect(port, DOMAIN)
        assert request(connection, "GET", "/health")[0] == 200
        assert request(connection, "POST", "/workflow", {"name": "shout", "elements": ["hi"]}) == (200, b'["HI!"]')
        connection.close()


@LOOPS
def test_a_restart_reuses_the_certificate(loop: str, tmp_path: Path, pebble: Pebble) -> None:
    """Nothing ordered while the certificate has more than a third of its life left; under systemd,
    the state directory is $STATE_DIRECTORY's."""
    state = tmp_path / "systemd" / "acme"  # under systemd, $STATE_DIRECTORY/acme
    with acme_server(pebble, state, loop) as server:
        first = pebble.served_certificate(server.port, DOMAIN)
    env = {"STATE_DIRECTORY": str(tmp_path / "systemd")}
    with acme_server(pebble, None, loop, env=env) as server:
        assert pebble.served_certificate(server.port, DOMAIN).serial == first.serial
        wait_for_log(server, rf"acme: certificate for {re.escape(DOMAIN)} valid until \S+, renewal at \S+")
        assert "acme: ordering" not in log_of(server)


@LOOPS
def test_a_name_added_keeps_the_certificate_held_serving(loop: str, tmp_path: Path, pebble: Pebble) -> None:
    """A second name whose DNS does not point at the server yet: the certificate held serves
    the first name on at once (HTTPS, READY=1) while the order for both fails, said and retried."""
    state = tmp_path / "state"
    with acme_server(pebble, state, loop) as server:
        first = pebble.served_certificate(server.port, DOMAIN)
    added = "www.aioserver.test"
    pebble.unresolvable(added)
    with acme_server(pebble, state, loop, "--acme-domain", f"{DOMAIN},{added}") as server:
        assert pebble.served_certificate(server.port, DOMAIN).serial == first.serial
        failure = wait_for_log(server, FAILED)[0]
        assert added in failure.group(1), failure.group(0)
        assert pebble.served_certificate(server.port, DOMAIN).serial == first.serial
        assert len(re.findall(rf"does not name {re.escape(added)}", log_of(server))) == 1  # said once


# -- renewal


@LOOPS
def test_renewal_swaps_in_the_new_certificate_for_new_connections(
    loop: str, tmp_path: Path, short_lived: Pebble
) -> None:
    """About 40 s into a 60 s certificate, a new one; a keep-alive connection keeps the old."""
    pebble = short_lived
    with acme_server(pebble, tmp_path / "state", loop, "--timeout-keep-alive", "120") as server:
        old = pebble.served_certificate(server.port, DOMAIN)
        kept = pebble.connect(server.port, DOMAIN)
        assert request(kept, "GET", "/health")[0] == 200

        wait_for_log(server, OBTAINED, count=2, timeout=90)
        eventually(lambda: pebble.served_certificate(server.port, DOMAIN).serial != old.serial)
        new = pebble.served_certificate(server.port, DOMAIN)
        # Renewed when about a third of its life was left: not at once, not after it expired.
        assert old.not_before + old.lifetime / 2 < new.not_before < old.not_after
        assert new.names == (DOMAIN,) and new.not_after > old.not_after
        assert request(kept, "GET", "/health")[0] == 200  # the open connection answers, with the old certificate
        assert peer_leaf(kept) == old
        kept.close()
        assert Leaf.from_pem(state_files(tmp_path / "state")["chain"].read_text()) == new


@LOOPS
def test_a_failed_renewal_keeps_the_certificate_and_retries(loop: str, tmp_path: Path, short_lived: Pebble) -> None:
    """pebble down when the renewal is due: the old certificate serves on, the log says why;
    pebble back (a new root, no accounts): the retry, 15 s later, brings a new certificate."""
    pebble = short_lived
    with acme_server(pebble, tmp_path / "state", loop) as server:
        old_root = pebble.root_pem()
        old = pebble.served_certificate(server.port, DOMAIN)
        pebble.stop()

        failure = wait_for_log(server, FAILED, timeout=90)[0]
        assert "refused" in failure.group(1).lower(), failure.group(0)
        assert 15 <= int(failure.group(2)) <= 17  # 15 s, a little later at random
        assert pebble.served_certificate(server.port, DOMAIN, root=old_root) == old

        pebble.start()
        wait_for_log(server, OBTAINED, count=2, timeout=60)
        new_root = pebble.root_pem()
        eventually(lambda: _verifies(pebble, server.port, new_root))
        new = pebble.served_certificate(server.port, DOMAIN, root=new_root)
        assert new.serial != old.serial and new.names == (DOMAIN,)
        assert len(re.findall(FAILED, log_of(server))) == 1


@contextmanager
def small_disk(state: Path, size: str = "256k") -> Iterator[tuple[tuple[str, ...], Callable[[int], Path]]]:
    """A prefix that runs aioserver with ``state`` on a tmpfs of ``size``, in a mount namespace of
    its own (gone with the process), and the path through which the test sees it: ``/proc/PID/root``."""
    state.mkdir(parents=True, exist_ok=True)
    mount = 'mount -t tmpfs -o size="$1",mode=0700 aioserver-state "$2" && shift 2 && exec "$@"'
    prefix = ("unshare", "--mount", "--propagation", "private", "--", "sh", "-c", mount, "sh", size, str(state))
    yield prefix, lambda pid: Path(f"/proc/{pid}/root") / str(state).lstrip("/")


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` up with one file, until it has no room left."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as file:
        try:
            while True:
                file.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


@LOOPS
def test_a_full_state_directory_keeps_the_certificate_and_retries(
    loop: str, tmp_path: Path, short_lived: Pebble
) -> None:
    """The state directory's disk full when the renewal is due: the old certificate serves on,
    the log says why (not silence, and no renewal ever again); room again, the retry renews."""
    pebble = short_lived
    with small_disk(tmp_path / "state") as (prefix, seen):
        with acme_server(pebble, tmp_path / "state", loop, prefix=prefix) as server:
            old = pebble.served_certificate(server.port, DOMAIN)
            filler = fill(seen(server.process.pid))

            failure = wait_for_log(server, FAILED, timeout=90)[0]
            assert "No space left on device" in failure.group(1), failure.group(0)
            assert pebble.served_certificate(server.port, DOMAIN) == old

            filler.unlink()
            wait_for_log(server, OBTAINED, count=2, timeout=60)
            eventually(lambda: pebble.served_certificate(server.port, DOMAIN).serial != old.serial)
            assert "Traceback" not in log_of(server)


def _verifies(pebble: Pebble, port: int, root: str) -> bool:
    try:
        pebble.served_certificate(port, DOMAIN, root=root)
    except OSError:  # ssl.SSLCertVerificationError among them: still the old one
        return False
    return True


# -- state


@LOOPS
def test_state_files_are_private(loop: str, tmp_path: Path, pebble: Pebble) -> None:
    """0700 directories, 0600 files, whatever the umask (here none)."""
    state = tmp_path / "state"
    umask = os.umask(0)
    try:
        with acme_server(pebble, state, loop):
            pass
    finally:
        os.umask(umask)
    for directory in (state, state / "certificates", state / "certificates" / DOMAIN):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    for path in state_files(state).values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in state.rglob("*"):  # whatever else it keeps there too
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path


DAMAGES = [
    "chain-corrupt",
    "chain-empty",
    "key-missing",
    "key-of-another-certificate",
    "account-corrupt-no-certificate",
]


def _damage(files: dict[str, Path], damage: str) -> None:
    garbage = b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n"
    if damage == "chain-corrupt":
        files["chain"].write_bytes(garbage)
    elif damage == "chain-empty":
        files["chain"].write_bytes(b"")
    elif damage == "key-missing":
        files["key"].unlink()
    elif damage == "key-of-another-certificate":  # valid, but not the certificate's
        files["key"].write_bytes(new_key_pem())
    else:  # an order is due, and the account key is unreadable
        files["account"].write_bytes(garbage.replace(b"CERTIFICATE", b"PRIVATE KEY"))
        files["chain"].unlink()
        files["key"].unlink()


@LOOPS
@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_state_is_recreated(loop: str, damage: str, tmp_path: Path, pebble: Pebble) -> None:
    """A corrupt, missing or mismatched file in the state directory: a new order, never a crash."""
    state = tmp_path / "state"
    with acme_server(pebble, state, loop) as server:
        first = pebble.served_certificate(server.port, DOMAIN)
    files = state_files(state)
    _damage(files, damage)
    with acme_server(pebble, state, loop) as server:
        served = pebble.served_certificate(server.port, DOMAIN)
        assert served.serial != first.serial
        assert len(re.findall(ORDERING, log_of(server))) == 1
    assert Leaf.from_pem(files["chain"].read_text()) == served
    key = serialization.load_pem_private_key(files["key"].read_bytes(), password=None)
    assert key.public_key() == _public_key_of(files["chain"])
    serialization.load_pem_private_key(files["account"].read_bytes(), password=None)


def _public_key_of(chain: Path) -> object:
    return x509.load_pem_x509_certificate(chain.read_bytes()).public_key()


# -- workers


@LOOPS
def test_one_worker_orders_every_worker_serves(loop: str, tmp_path: Path, pebble: Pebble) -> None:
    with acme_server(pebble, tmp_path / "state", loop, "--workers", "2", listeners=2) as server:
        assert len(re.findall(ORDERING, log_of(server))) == 1
        chain = Leaf.from_pem(state_files(tmp_path / "state")["chain"].read_text())
        for _ in range(8):  # whichever worker accepts
            assert pebble.served_certificate(server.port, DOMAIN) == chain


@LOOPS
def test_services_for_other_names_share_a_state_directory(loop: str, tmp_path: Path, pebble: Pebble) -> None:
    """Two services on one host, one state directory (two copies of the unit share its
    StateDirectory=): each one orders its own certificate, neither waits for the other's.

    pebble validates every name on one port: the first's plain listener answers the second's
    challenges too, from the directory they share, as each would on its own address."""
    state = tmp_path / "state"
    other = "admin.aioserver.test"
    with acme_server(pebble, state, loop) as first:
        args = [
            *acme_args(pebble, state, loop),
            *("--acme-domain", other, "--redirect-http", str(free_port()), "--port", str(free_port())),
        ]
        with Server(*args, env={"TOKEN": TOKEN_HASH}, pattern=HTTPS) as second:
            assert pebble.served_certificate(second.port, other).names == (other,)
            assert pebble.served_certificate(first.port, DOMAIN).names == (DOMAIN,)
            assert "another process orders" not in log_of(second)
    assert (state / "certificates" / other / "fullchain.pem").exists()


@LOOPS
def test_a_worker_replaced_after_a_reload_serves_https(loop: str, tmp_path: Path, pebble: Pebble) -> None:
    """systemctl reload (the parent reads the certificate too), then workers die: each one
    forked to replace them serves HTTPS, not only the plain listener."""
    with acme_server(pebble, tmp_path / "state", loop, "--workers", "2", listeners=2) as server:
        served = pebble.served_certificate(server.port, DOMAIN)
        server.process.send_signal(signal.SIGHUP)
        wait_for_log(server, r"reloaded TLS certificate", count=2)
        workers = [
            int(pid)
            for pid in Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
        ]
        for number, pid in enumerate(workers, start=1):  # one after the other: the lock's holder among them
            os.kill(pid, signal.SIGKILL)
            wait_for_log(server, r"worker \d+ started", count=2 + number)
        wait_for_log(server, HTTPS, count=4)
        for _ in range(6):  # whichever worker accepts
            assert pebble.served_certificate(server.port, DOMAIN) == served


# -- configuration errors: exit 2, one line naming the option


@pytest.mark.parametrize(
    ("given", "option"),
    [
        pytest.param("with-ssl-certfile", r"ssl[_-]certfile", id="with-ssl-certfile"),
        pytest.param("without-redirect-http", r"redirect[_-]http", id="without-redirect-http"),
        pytest.param("without-state-dir", r"acme[_-]state[_-]dir", id="without-state-dir"),
    ],
)
def test_configuration_errors(given: str, option: str, tmp_path: Path, pem_files: PemFiles) -> None:
    args = [
        "--acme-domain", DOMAIN,
        "--acme-email", "ops@aioserver.test",
        "--acme-directory", "https://127.0.0.1:9/dir",  # never reached
        "--port", "0",
    ]  # fmt: skip
    if given != "without-redirect-http":
        args += ["--redirect-http", "0"]
    if given != "without-state-dir":
        args += ["--acme-state-dir", str(tmp_path / "state")]
    if given == "with-ssl-certfile":
        args += ["--ssl-certfile", str(pem_files.cert), "--ssl-keyfile", str(pem_files.key)]
    env = {k: v for k, v in os.environ.items() if k != "STATE_DIRECTORY"}
    result = subprocess.run([PYTHON, "-m", "aioserver", *args], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(option, lines[0]), result.stderr
    assert not (tmp_path / "state").exists()


def test_acme_without_its_extra_says_what_to_install(tmp_path: Path) -> None:
    """The README's first command installs no ACME library: --acme-domain says which extra to add."""
    args = [
        *("--acme-domain", DOMAIN, "--acme-email", "ops@aioserver.test"),
        *("--acme-directory", "https://127.0.0.1:9/dir", "--acme-state-dir", str(tmp_path / "state")),
        *("--redirect-http", "0", "--port", "0"),
    ]
    result = subprocess.run([no_extras_python(), "-m", "aioserver", *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "pip install 'aioserver[acme]'" in result.stderr
    assert "Traceback" not in result.stderr
