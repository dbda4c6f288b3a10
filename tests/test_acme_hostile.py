"""ACME under attack, black-box: ``python -m aioserver --acme-domain`` against what others plant
in its state directory, send to its plain listener, or answer as its CA.

A local user, a CA that is hostile or broken, a client of the plain port: none of them may
read a key through the challenge route, stall the server, forge log lines, or make it serve a
certificate it did not check. pebble where a correct CA will do (acmeserver.Pebble), a
hostile one where the CA is the attacker (hostileca.HostileCA).
"""

from __future__ import annotations

import datetime
import http.client
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from acmeserver import Leaf, Pebble
from conftest import PYTHON, TOKEN_HASH, Server, free_port
from hostileca import DAY, HostileCA
from test_acme import (
    DOMAIN,
    FAILED,
    HTTPS,
    LOOPS,
    ORDERING,
    acme_args,
    acme_server,
    log_of,
    request,
    wait_for_log,
)

CHALLENGE = "/.well-known/acme-challenge/"
MINUTE = datetime.timedelta(minutes=1)


def fetch(port: int, path: str) -> tuple[int, bytes]:
    """GET ``path`` on the plain listener as the CA does (Host: the domain); 5 s at most."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path, headers={"Host": DOMAIN})
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


# -- the challenge route


@LOOPS
def test_the_challenge_route_serves_no_file_but_a_challenge_answer(loop: str, tmp_path: Path, pebble: Pebble) -> None:
    """What sits in challenges/ under a token's name is served only if it is a regular file
    holding that token's key authorization: never a link to a key, never a FIFO (whose open
    would block the event loop, and every listener with it)."""
    state = tmp_path / "state"
    with acme_server(pebble, state, loop) as server:
        challenges = state / "challenges"
        planted = {
            "link-to-the-account-key": lambda path: path.symlink_to(state / "account.key"),
            "link-to-the-certificate-key": lambda path: path.symlink_to(state / "certificates" / DOMAIN / "key.pem"),
            "a-copy-of-the-key": lambda path: path.write_bytes((state / "account.key").read_bytes()),
            "a-fifo": lambda path: os.mkfifo(path),
            "a-directory": lambda path: path.mkdir(),
        }
        for token, plant in planted.items():
            plant(challenges / token)
        for token in planted:
            status, body = fetch(pebble.http_port, CHALLENGE + token)
            assert status == 404, (token, body)
            assert b"PRIVATE KEY" not in body
        # An answer as the server writes them is served.
        (challenges / "tok-1").write_bytes(b"tok-1.AbC_d-9")
        assert fetch(pebble.http_port, CHALLENGE + "tok-1") == (200, b"tok-1.AbC_d-9")
        connection = pebble.connect(server.port, DOMAIN)
        assert request(connection, "GET", "/health")[0] == 200
        connection.close()


# -- the state directory


def _start(pebble: Pebble, state: Path) -> subprocess.CompletedProcess[str]:
    """A server on ``state`` that must refuse to start: its exit, within 30 s."""
    env = {k: v for k, v in os.environ.items() if k != "STATE_DIRECTORY"}
    return subprocess.run(
        [PYTHON, "-m", "aioserver", *acme_args(pebble, state, "asyncio"), "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_state_directory_others_can_write_is_refused(tmp_path: Path, pebble: Pebble) -> None:
    """Another local user who can write there could plant a link the challenge route follows,
    or a certificate and key of theirs for the server to serve: exit 2, saying what to do."""
    state = tmp_path / "state"
    for loose in (state, state / "challenges", state / "certificates"):
        loose.mkdir(parents=True, exist_ok=True)
    for loose in (state, state / "challenges", state / "certificates"):
        loose.chmod(0o777)
        result = _start(pebble, state)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "acme_state_dir" in lines[0].replace("-", "_"), result.stderr
        assert f"{loose} is writable by other users (mode 0777)" in lines[0], result.stderr
        assert "Traceback" not in result.stderr
        assert not (state / "account.key").exists()
        loose.chmod(0o700)


def test_a_state_directory_of_another_user_is_refused(tmp_path: Path, pebble: Pebble) -> None:
    """Its owner could replace the certificate and key: exit 2. (Root makes one for another
    user; anyone else finds one of root's.)"""
    if os.geteuid() == 0:
        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        os.chown(state, 65534, 65534)
        owner = 65534
    else:
        state, owner = Path("/"), 0
    result = _start(pebble, state)
    assert result.returncode == 2, result.stderr
    assert f"{state} belongs to another user (uid {owner})" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# -- what the CA sends


@contextmanager
def hostile_server(ca: HostileCA, state: Path, loop: str, pattern: str = HTTPS) -> Iterator[Server]:
    """aioserver with ACME from ``ca``, once ``pattern`` is logged (by default: once it serves HTTPS)."""
    args = (
        "--loop", loop,
        "--acme-domain", DOMAIN,
        "--acme-directory", ca.directory,
        "--acme-ca-certs", str(ca.ca_file),
        "--redirect-http", str(free_port()),
        "--acme-state-dir", str(state),
        "--port", str(free_port()),
    )  # fmt: skip
    with Server(*args, env={"TOKEN": TOKEN_HASH}, pattern=pattern) as server:
        yield server


def served(port: int) -> Leaf:
    """The leaf certificate served for SNI = DOMAIN, whatever it is (the hostile CA is trusted by nobody)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=DOMAIN) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return Leaf.from_der(der)


@LOOPS
@pytest.mark.parametrize("bad", ["other-names", "expired"])
def test_a_renewal_bringing_a_bad_chain_keeps_the_certificate(loop: str, bad: str, tmp_path: Path) -> None:
    """The CA's chain is checked before it replaces anything on disk: a SIGHUP (or the hourly
    reload, or a restart) after a renewal that brought a chain for other names, or one
    expired already, serves the certificate held, not that chain."""
    # 200 s certificates issued 120 s back: the renewal comes 7 to 14 s after the first issue.
    with HostileCA(tmp_path / "ca", valid=(-2 * MINUTE, 80 * datetime.timedelta(seconds=1))) as ca:
        with hostile_server(ca, tmp_path / "state", loop) as server:
            held = served(server.port)
            assert held.names == (DOMAIN,)
            if bad == "other-names":
                ca.names, ca.valid = ("evil.example",), (-MINUTE, 90 * DAY)
            else:
                ca.valid = (-30 * DAY, -DAY)
            failure = wait_for_log(server, FAILED, timeout=60)[0]
            server.process.send_signal(signal.SIGHUP)
            wait_for_log(server, "reloaded TLS certificate, key and CA")
            assert served(server.port) == held
            assert ("does not name " + DOMAIN if bad == "other-names" else "expired") in failure.group(1), failure[0]


@LOOPS
def test_a_problem_document_cannot_forge_log_lines(loop: str, tmp_path: Path) -> None:
    """The CA's problem type and detail are its text, not ours: each control character is
    written as an escape, on the failure's own line."""
    problem = {
        "type": "urn:ietf:params:acme:error:malformed\nFORGED by the type\x1b[2J",
        "detail": "bad\nFORGED by the detail\x1b[31m",
    }
    with HostileCA(tmp_path / "ca", problem=problem) as ca:
        with hostile_server(ca, tmp_path / "state", loop, pattern=ORDERING) as server:
            failure = wait_for_log(server, FAILED)[0]
            assert "FORGED by the type\\x1b[2J" in failure.group(1), failure[0]
            log = log_of(server)
            assert not [line for line in log.splitlines() if line.startswith("FORGED")], log
            assert "\x1b" not in log


@LOOPS
@pytest.mark.parametrize(
    ("retry_after", "least", "most"),
    [
        pytest.param("3600", 3600, 3600, id="an-hour"),
        pytest.param("315360000", 86400, 86400 * 1.1, id="ten-years"),
        pytest.param("Fri, 31 Dec 9999 23:59:59 GMT", 86400, 86400 * 1.1, id="a-date-in-9999"),
    ],
)
def test_retry_after_is_respected_up_to_a_day(
    loop: str, retry_after: str, least: float, most: float, tmp_path: Path
) -> None:
    """A CA saying "come back in ten years" would leave the certificate to expire: a failed
    order is tried again a day later at most (as the backoff's own longest wait)."""
    problem = {"type": "urn:ietf:params:acme:error:rateLimited", "detail": "too many orders"}
    with HostileCA(tmp_path / "ca", problem=problem, status=429, retry_after=retry_after) as ca:
        with hostile_server(ca, tmp_path / "state", loop, pattern=ORDERING) as server:
            failure = wait_for_log(server, FAILED)[0]
            assert "rateLimited" in failure.group(1)
            assert least <= int(failure.group(2)) <= most, failure[0]


@LOOPS
def test_an_oversized_answer_from_the_ca_is_refused(loop: str, tmp_path: Path) -> None:
    """An answer of 8 MiB (it could be endless) is not read whole: the order fails at 1 MiB."""
    with HostileCA(tmp_path / "ca", directory_padding=8 << 20) as ca:
        with hostile_server(ca, tmp_path / "state", loop, pattern=ORDERING) as server:
            failure = wait_for_log(server, FAILED)[0]
            assert "larger than 1048576 bytes" in failure.group(1), failure[0]


@pytest.mark.parametrize("loop", ["uvloop"])  # the order runs in a thread: the loop plays no part
def test_an_answer_that_never_ends_fails_the_order(loop: str, tmp_path: Path) -> None:
    """A CA sending a byte every half second, for ever: each read is quick, the answer never
    ends. It is given up after 30 s and the order fails, to be tried again."""
    with HostileCA(tmp_path / "ca", drip=2) as ca:
        with hostile_server(ca, tmp_path / "state", loop, pattern=ORDERING) as server:
            failure = wait_for_log(server, FAILED, timeout=60)[0]
            assert "did not answer in time" in failure.group(1), failure[0]


@LOOPS
def test_a_state_file_that_cannot_be_written_is_said_and_retried(loop: str, tmp_path: Path, pebble: Pebble) -> None:
    """A directory where the key goes (a restore gone wrong): the order fails saying so, is
    tried again, and succeeds once the way is clear; the certificate manager never dies silently."""
    state = tmp_path / "state"
    (state / "certificates" / DOMAIN / "key.pem").mkdir(parents=True, mode=0o700)
    for directory in (state, state / "certificates", state / "certificates" / DOMAIN):
        directory.chmod(0o700)
    with ordering_server(pebble, state, loop) as server:
        failure = wait_for_log(server, FAILED)[0]
        assert "key.pem" in failure.group(1), failure[0]
        (state / "certificates" / DOMAIN / "key.pem").rmdir()
        wait_for_log(server, HTTPS, timeout=60)
        assert pebble.served_certificate(int(re.findall(HTTPS, log_of(server))[0]), DOMAIN).names == (DOMAIN,)


@contextmanager
def ordering_server(pebble: Pebble, state: Path, loop: str) -> Iterator[Server]:
    """aioserver with ACME from pebble, as soon as it orders."""
    args = (*acme_args(pebble, state, loop), "--port", str(free_port()))
    with Server(*args, env={"TOKEN": TOKEN_HASH}, pattern=ORDERING) as server:
        yield server


RENEWAL = rf"acme: certificate for {re.escape(DOMAIN)} valid until (\S+), renewal at (\S+)"


def _time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


@LOOPS
def test_a_renewal_window_in_the_past_does_not_order_without_end(loop: str, tmp_path: Path) -> None:
    """A CA whose renewal window (RFC 9773) is always over, for every new certificate too:
    one renewal, then not another until an hour later (a tenth of the lifetime at most), not
    an order a second for ever."""
    with HostileCA(tmp_path / "ca", window=(-3650 * DAY, -3649 * DAY)) as ca:
        with hostile_server(ca, tmp_path / "state", loop) as server:
            planned = wait_for_log(server, RENEWAL)[0]
            time.sleep(5)  # an order takes a second here: some would have come by now
            assert ca.orders == 1, log_of(server)
            obtained = _time(planned.group(2)) - datetime.datetime.now(datetime.UTC)
            assert datetime.timedelta(minutes=55) < obtained <= datetime.timedelta(hours=1), planned[0]


@LOOPS
def test_a_renewal_window_after_the_expiry_is_not_waited_for(loop: str, tmp_path: Path) -> None:
    """A window ten years ahead for a certificate of an hour: it would expire, and be served
    expired until the next look. Renewal comes before a tenth of the lifetime is left."""
    lifetime = (-MINUTE, 59 * MINUTE)
    with HostileCA(tmp_path / "ca", valid=lifetime, window=(3650 * DAY, 3651 * DAY)) as ca:
        with hostile_server(ca, tmp_path / "state", loop) as server:
            planned = wait_for_log(server, RENEWAL)[0]
            not_after, due = _time(planned.group(1)), _time(planned.group(2))
            assert due <= not_after - 6 * MINUTE, planned[0]
            assert ca.orders == 1


# -- workflows


def test_a_retrieve_task_keeping_url_hosts_as_folders_may_not_hold_the_state(tmp_path: Path) -> None:
    """With flatten: false a download goes to <directory>/<URL's host>/<path>: into
    $STATE_DIRECTORY (retrieve's default), http://acme/certificates/<domain>/key.pem would
    write over the certificate's key in $STATE_DIRECTORY/acme. Exit 2, as for a retrieve
    directory inside the state."""
    systemd_state = tmp_path / "state"
    systemd_state.mkdir()
    config = tmp_path / "config.yml"
    config.write_text("workflow:\n  fetch:\n    tasks:\n      - {task: retrieve, flatten: false}\n")
    command = [
        *(PYTHON, "-m", "aioserver", "--check", "--config", str(config)),
        *("--acme-domain", DOMAIN, "--redirect-http", "0", "--acme-directory", "https://127.0.0.1:9/dir"),
    ]
    env = {**os.environ, "STATE_DIRECTORY": str(systemd_state)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "workflow.fetch" in done.stderr and "flatten" in done.stderr, done.stderr
    # Flattened, its files are named by the URL's last segment only: beside the state, never in it.
    config.write_text("workflow:\n  fetch:\n    tasks:\n      - {task: retrieve}\n")
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 0, done.stderr
