"""JWT access tokens from an identity provider (SPEC section 7, auth.jwt): keys from a file or
an https URL, the checks of each token, scopes, reloads, and the jwt extra as deployed, each
through a real ``python -m aioserver``. The in-process tests, which mutmut runs against
jwtauth.py's mutants, are in test_jwtauth_unit.py.

Tokens are minted here with keys made here (tests/jwtissuer.py); a key set is served over HTTPS
by a local provider with a trustme certificate, which the server trusts through SSL_CERT_FILE.
Each refusal is checked by its status, its RFC 6750 answer and the reason the log gives, so
that a check weakened shows (another check refusing the token instead says another reason).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from jwtissuer import (
    AUDIENCE,
    INSUFFICIENT,
    INVALID,
    ISSUER,
    JWKSServer,
    Keys,
    b64,
    config,
    hmac_with_public_key,
    jwks,
    make_keys,
    tampered,
    unsigned,
    with_header,
)

from conftest import TOKEN, Deployment, Server, aioserver_command

LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


@pytest.fixture(scope="module")
def keys() -> Keys:
    return make_keys()


def call(
    port: int, token: str | None, workflow: str = "echo", source: str = "127.0.0.1"
) -> tuple[int, str | None, Any]:
    """POST /workflow on a connection of its own, from ``source``: status, WWW-Authenticate, body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        connection.request("POST", "/workflow", json.dumps({"name": workflow, "elements": ["hi"]}), headers)
        response = connection.getresponse()
        return response.status, response.getheader("WWW-Authenticate"), json.loads(response.read())
    finally:
        connection.close()


def log_of(server: Server) -> str:
    return "".join(server.log)


def wait_for_log(server: Server, pattern: str, count: int = 1, timeout: float = 30) -> str:
    """The log once ``pattern`` is in it ``count`` times."""
    deadline = time.monotonic() + timeout
    while len(re.findall(pattern, log_of(server))) < count:
        if server.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{count} x {pattern!r} not logged within {timeout}s:\n{log_of(server)}")
        time.sleep(0.05)
    return log_of(server)


def sighup(server: Server, pattern: str) -> None:
    """SIGHUP, and wait until ``pattern`` is logged once more by every process serving."""
    before = len(re.findall(pattern, log_of(server)))
    server.process.send_signal(signal.SIGHUP)
    wait_for_log(server, pattern, before + server.workers)


def refused(server: Server, reason: str, count: int = 1) -> None:
    """The log says, ``count`` times in all, that a token was refused for ``reason``."""
    wait_for_log(server, r"INFO aioserver\.jwt: JWT refused: " + re.escape(reason), count)


# -- each check, against a key set file: one server, each case from an address of its own


@dataclass(frozen=True)
class Case:
    name: str
    token: Callable[[Keys], str]
    status: int
    reason: str | None = None  # what the log says of a refusal (401)
    workflow: str = "echo"
    identity: str | None = None  # what the access log says (200)


NOW = int(time.time())
CASES = [
    Case("EC P-256 (ES256)", lambda k: k.es.mint(), 200, identity="alice"),
    Case("RSA (RS256)", lambda k: k.rs.mint(sub="rsa-user"), 200, identity="rsa-user"),
    Case("Ed25519 (EdDSA)", lambda k: k.ed.mint(sub="ed-user"), 200, identity="ed-user"),
    Case("sub: two lines", lambda k: k.es.mint(sub="eve\nINFO forged"), 200, identity=r"eve\\nINFO%20forged"),
    # One field of the text line whatever the provider puts in sub: spaces as %20, cut at 128.
    Case("sub: a space", lambda k: k.es.mint(sub="Alice Smith"), 200, identity="Alice%20Smith"),
    Case("sub: 1000 characters", lambda k: k.es.mint(sub="a" * 1000), 200, identity="a" * 128 + r"\.\.\."),
    Case("aud: a list naming us", lambda k: k.es.mint(aud=["other-api", AUDIENCE]), 200),
    Case("expired within the leeway", lambda k: k.es.mint(exp=int(time.time()) - 10), 200),
    Case("expired", lambda k: k.es.mint(exp=int(time.time()) - 60), 401, "expired"),
    Case("valid soon, within the leeway", lambda k: k.es.mint(nbf=int(time.time()) + 10), 200),
    Case("not yet valid", lambda k: k.es.mint(nbf=int(time.time()) + 60), 401, "not valid yet"),
    Case("issued in the future", lambda k: k.es.mint(iat=int(time.time()) + 60), 401, "not valid yet"),
    Case(
        "wrong issuer",
        lambda k: k.es.mint(iss="https://evil.example/realms/aioserver"),
        401,
        "wrong issuer 'https://evil.example/realms/aioserver'",
    ),
    Case("issuer: a part of ours", lambda k: k.es.mint(iss=ISSUER[:-3]), 401, f"wrong issuer {ISSUER[:-3]!r}"),
    Case("issuer: ours and more", lambda k: k.es.mint(iss=ISSUER + "/"), 401, f"wrong issuer {ISSUER + '/'!r}"),
    Case("wrong audience", lambda k: k.es.mint(aud="other-api"), 401, "wrong audience 'other-api'"),
    Case("audience: a part of ours", lambda k: k.es.mint(aud=AUDIENCE[:-1]), 401, f"wrong audience {AUDIENCE[:-1]!r}"),
    Case("no exp", lambda k: k.es.mint(exp=None), 401, "no 'exp' claim"),
    Case("no nbf", lambda k: k.es.mint(nbf=None), 401, "no 'nbf' claim"),
    Case("no iss", lambda k: k.es.mint(iss=None), 401, "no 'iss' claim"),
    Case("no aud", lambda k: k.es.mint(aud=None), 401, "no 'aud' claim"),
    Case("no sub", lambda k: k.es.mint(sub=None), 401, "no 'sub' claim"),
    Case("empty sub", lambda k: k.es.mint(sub=""), 401, "its 'sub' claim is not a name"),
    Case("unknown kid", lambda k: k.es.mint(header={"kid": "nobody"}), 401, "no key 'nobody' in the key set"),
    Case("no kid", lambda k: with_header(k.es.mint(), kid=None), 401, "no kid in its header"),
    Case("alg: none", lambda k: unsigned("rs"), 401, "algorithm 'none' is not allowed for key 'rs'"),
    Case(
        "HS256 keyed with the RSA public key",
        lambda k: hmac_with_public_key(k.rs),
        401,
        "algorithm 'HS256' is not allowed for key 'rs'",
    ),
    Case(
        "an EC algorithm named for the RSA key",
        lambda k: with_header(k.rs.mint(), alg="ES256"),
        401,
        "algorithm 'ES256' is not allowed for key 'rs'",
    ),
    Case("alg: a list", lambda k: with_header(k.rs.mint(), alg=["RS256"]), 401, "algorithm 'list' is not allowed"),
    Case("signed by another key", lambda k: k.impostor.mint(), 401, "bad signature"),
    Case(
        "signed by a key it carries, or points to",
        lambda k: k.impostor.mint(header={"jwk": k.impostor.jwk(), "jku": "https://127.0.0.1:9/jwks"}),
        401,
        "bad signature",
    ),
    Case(
        "payload tampered with",
        lambda k: tampered(k.es.mint(scope="workflow:echo"), sub="mallory", scope="workflow:*"),
        401,
        "bad signature",
    ),
    Case("three parts of nonsense", lambda k: "not.a.jwt", 401, "malformed"),
    Case("a header nested deep", lambda k: f"{b64(b'[' * 3000)}.e30.c2ln", 401, "malformed"),
    Case("scope: workflow:echo, running upper", lambda k: k.es.mint(sub="echoer"), 403, workflow="upper"),
    Case("scope: workflow:*", lambda k: k.es.mint(sub="all", scope="workflow:*"), 200, workflow="upper"),
    Case("scope: another API's", lambda k: k.es.mint(scope="openid profile echo"), 403),
    Case("no scope", lambda k: k.es.mint(scope=None), 403),
    Case("scope: not a string", lambda k: k.es.mint(scope=["workflow:echo"]), 401, "its 'scope' claim is not"),
    Case("a plain token beside", lambda k: TOKEN, 200, identity="static"),
    Case("a wrong plain token", lambda k: "not-a-jwt-nor-a-token", 401),
]


@LOOPS
def test_each_check_of_a_token(loop: str, keys: Keys, tmp_path: Path) -> None:
    (tmp_path / "jwks.json").write_text(json.dumps(jwks(keys.es, keys.rs, keys.ed)))
    tokens = [case.token(keys) for case in CASES]
    with Server("--config", config(tmp_path / "jwks.json"), "--loop", loop) as server:
        for number, (case, token) in enumerate(zip(CASES, tokens, strict=True)):
            # An address each: the throttle counts failures by address.
            status, challenge, body = call(server.port, token, case.workflow, source=f"127.0.0.{number + 2}")
            assert status == case.status, f"{case.name}: {status} {body}"
            if status == 401:
                assert (challenge, body) == (INVALID, {"error": "invalid token"}), case.name
            if status == 403:
                assert challenge == INSUFFICIENT, case.name
            if status == 200:
                assert body == ["hi"] if case.workflow == "echo" else ["HI"], case.name
        for case in CASES:
            if case.reason:
                refused(server, case.reason, sum(c.reason is not None and case.reason in c.reason for c in CASES))
        log = wait_for_log(server, r'"POST /workflow HTTP/1.1" \d+ .*\n', len(CASES))
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
    refusals = re.findall(r"JWT refused: (.*)", log)
    assert len(refusals) == sum(case.reason is not None for case in CASES), refusals
    for case in CASES:
        if case.identity:
            assert re.search(rf'"POST /workflow HTTP/1.1" 200 \d+ \S+ {case.identity} \S+ "echo"\n', log), case.name
    assert "\nINFO forged" not in log
    for token in tokens:  # neither a token, nor its signature, nor its claims reach the log
        for part in token.split("."):
            assert len(part) < 8 or part not in log


@LOOPS
def test_auth_jwt_alone_turns_authorization_on(loop: str, keys: Keys, tmp_path: Path) -> None:
    (tmp_path / "jwks.json").write_text(json.dumps(jwks(keys.es)))
    with Server("--config", config(tmp_path / "jwks.json", tokens=False), "--loop", loop) as server:
        assert call(server.port, None)[:2] == (401, 'Bearer realm="aioserver"')
        assert call(server.port, TOKEN, source="127.0.0.2")[:2] == (401, INVALID)
        # Authorized, no longer open on loopback: any Host name (a proxy's, a tunnel's) is fine.
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        body = json.dumps({"name": "echo", "elements": [1]})
        headers = {"Host": "api.example.com", "Content-Type": "application/json"}
        connection.request("POST", "/workflow", body, {**headers, "Authorization": f"Bearer {keys.es.mint()}"})
        assert connection.getresponse().status == 200
        connection.close()
        # Failures count toward the throttle, JWTs' as tokens'.
        statuses = [call(server.port, keys.es.mint(exp=int(time.time()) - 120))[0] for _ in range(10)]
        assert statuses == [401] * 10
        assert call(server.port, keys.es.mint())[0] == 429  # even a valid one, from there
        assert call(server.port, keys.es.mint(), source="127.0.0.2")[0] == 200


# -- a key set over HTTPS: fetched at start, on an unknown kid (at most once a minute), on SIGHUP


@pytest.fixture
def provider(tmp_path: Path, keys: Keys) -> Iterator[JWKSServer]:
    with JWKSServer(tmp_path / "idp", jwks(keys.es)) as server:
        yield server


def trusting(provider: JWKSServer) -> dict[str, str]:
    """The environment of a server whose trust store is the provider's CA."""
    return {"SSL_CERT_FILE": str(provider.ca_file)}


@LOOPS
def test_keys_fetched_follow_the_providers_rotation(loop: str, keys: Keys, provider: JWKSServer) -> None:
    with Server("--config", config(provider.url), "--loop", loop, env=trusting(provider)) as server:
        wait_for_log(server, r"JWT keys in force from https://127\.0\.0\.1:\d+/jwks: es\n")
        assert provider.fetches == 1
        es = keys.es.mint()
        assert call(server.port, es)[0] == 200
        # The provider adds a key and signs with it: the first token naming it has the keys fetched.
        provider.document = jwks(keys.es, keys.rs)
        assert call(server.port, keys.rs.mint())[0] == 200
        assert provider.fetches == 2
        # Another unknown kid within the minute: no fetch, refused, though the provider has it now.
        provider.document = jwks(keys.es, keys.rs, keys.ed)
        assert call(server.port, keys.ed.mint(), source="127.0.0.2")[0] == 401
        refused(server, "no key 'ed' in the key set")
        assert provider.fetches == 2
        # SIGHUP fetches them now.
        sighup(server, r"JWT keys in force from \S+: es, rs, ed\n")
        assert provider.fetches == 3
        assert call(server.port, keys.ed.mint())[0] == 200
        # A fetch that fails keeps the keys in force.
        provider.status = 500
        sighup(server, r"ERROR aioserver\.jwt: JWT keys not fetched from \S+, keeping the 3 in force: answered 500")
        assert call(server.port, keys.ed.mint(sub="after-a-failed-fetch"))[0] == 200  # a token not seen yet
        # The provider takes a key out (revoked): the tokens it signed, remembered, go with it.
        provider.status = 200
        provider.document = jwks(keys.rs, keys.ed)
        sighup(server, r"JWT keys in force from \S+: rs, ed\n")
        assert call(server.port, es, source="127.0.0.3")[0] == 401
        refused(server, "no key 'es' in the key set")


@LOOPS
def test_a_fetch_is_bounded_and_never_takes_what_it_should_not(loop: str, keys: Keys, provider: JWKSServer) -> None:
    provider.status = 503
    with Server("--config", config(provider.url), "--loop", loop, env=trusting(provider)) as server:
        wait_for_log(server, r"JWT keys not fetched from \S+, keeping the 0 in force: answered 503")
        token = keys.es.mint()
        # An unknown kid: at most one fetch a minute (the one at start was not asked for by a kid).
        assert call(server.port, token, source="127.0.0.2")[0] == 401
        wait_for_log(server, r"keeping the 0 in force: answered 503", 2)
        provider.status = 200
        # A redirect is not followed: it could lead to plain HTTP.
        provider.redirect = "http://127.0.0.1:9/jwks"
        sighup(server, r"keeping the 0 in force: answered 302")
        provider.redirect = None
        # More than 1 MiB is not read on.
        provider.padding = 2 << 20
        sighup(server, r"keeping the 0 in force: 2\d{6} bytes announced, more than 1048576")
        provider.chunked = True  # and when it is not said beforehand
        sighup(server, r"keeping the 0 in force: larger than 1048576 bytes")
        provider.padding, provider.chunked = 0, False
        # A provider that never answers: the loop serves on meanwhile, the fetch ends in 10 s.
        provider.hang = True
        fetches = provider.fetches
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while provider.fetches == fetches:  # asked, and waiting
            assert time.monotonic() < deadline
            time.sleep(0.05)
        started = time.monotonic()
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=1)
        connection.request("GET", "/health")
        assert connection.getresponse().status == 200
        connection.close()
        wait_for_log(server, r"keeping the 0 in force: no whole answer within 10s", timeout=20)
        assert time.monotonic() - started < 15
        provider.hang = False
        # Keys that will not do: symmetric, private, or for other algorithms.
        provider.document = jwks(
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {**keys.es.jwk(), "d": "AAAA"},
            {**keys.rs.jwk(), "alg": "RS512"},
        )
        sighup(server, r"keeping the 0 in force: no usable key \(key 'hmac' left out: a symmetric key")
        assert call(server.port, token, source="127.0.0.3")[0] == 401
        provider.document = jwks(keys.es)
        sighup(server, r"JWT keys in force from \S+: es\n")
        assert call(server.port, token)[0] == 200
    assert token not in log_of(server)


@LOOPS
def test_the_providers_certificate_is_verified(loop: str, keys: Keys, provider: JWKSServer) -> None:
    # The system's trust store, which does not hold the provider's test CA.
    env = {"SSL_CERT_FILE": os.devnull, "SSL_CERT_DIR": os.devnull}
    with Server("--config", config(provider.url), "--loop", loop, env=env) as server:
        wait_for_log(server, r"JWT keys not fetched from \S+, keeping the 0 in force: .*certificate verify failed")
        assert call(server.port, keys.es.mint())[0] == 401


# -- a key set file: read again on SIGHUP, by every worker


@pytest.mark.parametrize(("loop", "workers"), [("asyncio", "1"), ("uvloop", "1"), ("uvloop", "2")])
def test_a_key_set_file_is_read_again_on_sighup(loop: str, workers: str, keys: Keys, tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks(keys.es)))
    args = ("--config", config(path), "--loop", loop, "--workers", workers)
    with Server(*args, listeners=int(workers)) as server:
        es, rs = keys.es.mint(), keys.rs.mint()
        assert [call(server.port, es)[0] for _ in range(4)] == [200] * 4
        assert call(server.port, rs, source="127.0.0.2")[0] == 401
        path.write_text(json.dumps(jwks(keys.rs)))  # the es key rotated out
        sighup(server, r"reloaded JWT keys: rs\n")
        assert [call(server.port, rs)[0] for _ in range(4)] == [200] * 4
        assert [call(server.port, es, source="127.0.0.3")[0] for _ in range(4)] == [401] * 4
        if workers != "1":  # a worker forked after the reload starts from the keys it read
            pids = [int(pid) for pid in re.findall(r"worker \d+ started, pid (\d+)", log_of(server))]
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            wait_for_log(server, r"INFO aioserver: serving on", 2 * len(pids))
            assert [call(server.port, es, source="127.0.0.4")[0] for _ in range(4)] == [401] * 4
        path.write_text("{not json")  # a broken file keeps the keys in force
        sighup(server, rf"JWT key reload failed, keeping the 1 keys in force: {re.escape(str(path))}: not JSON")
        assert [call(server.port, keys.rs.mint(sub="after-a-failed-reload"))[0] for _ in range(4)] == [200] * 4
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0


# -- the jwt extra, as deployed: the default install lacks it


def test_the_jwt_extra_as_deployed(deployment: Deployment, keys: Keys, tmp_path: Path) -> None:
    (tmp_path / "jwks.json").write_text(json.dumps(jwks(keys.es)))
    (tmp_path / "config.yml").write_text(config(tmp_path / "jwks.json"))
    command = aioserver_command("--config", str(tmp_path / "config.yml"), "--check")
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if deployment.no_extras:
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines() == [
            f"aioserver: error: {tmp_path / 'config.yml'}: auth.jwt: needs the jwt extra: pip install 'aioserver[jwt]'"
        ]
        return
    assert done.returncode == 0, done.stderr
    assert (
        f"  jwt: issuer {ISSUER}, audience {AUDIENCE}, algorithms ES256, EdDSA, RS256, leeway 30s,"
        f" keys es from {tmp_path / 'jwks.json'}\n" in done.stdout
    )
    with Server("--config", str(tmp_path / "config.yml")) as server:
        assert call(server.port, keys.es.mint())[0] == 200
