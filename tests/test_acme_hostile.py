"""ACME under attack, black-box: ``python -m aioserver --acme-domain`` against what others plant
in its state directory, send to its plain listener, or answer as its CA.

A local user, a CA that is hostile or broken, a client of the plain port: none of them may
read a key through the challenge route, stall the server, forge log lines, or make it serve a
certificate it did not check. pebble where a correct CA will do (acmeserver.Pebble), a
hostile one where the CA is the attacker (hostileca.HostileCA).
"""

from __future__ import annotations

import http.client
import os
import subprocess
from pathlib import Path

from acmeserver import Pebble
from conftest import PYTHON
from test_acme import DOMAIN, LOOPS, acme_args, acme_server, pebble, request  # noqa: F401 (pebble: a fixture)

CHALLENGE = "/.well-known/acme-challenge/"


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
            "link-to-the-certificate-key": lambda path: path.symlink_to(
                state / "certificates" / DOMAIN / "key.pem"
            ),
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
