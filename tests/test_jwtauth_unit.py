"""JWT access tokens (SPEC section 7, auth.jwt), in process: the settings, the key sets, and
the verification of real tokens signed by real keys (tests/jwtissuer.py), with a real JWKS
served over HTTPS on 127.0.0.1 where keys are fetched.

No test here starts ``python -m aioserver``: mutmut runs this file against jwtauth.py's
mutants (setup.cfg), and its coverage of each test sees the code run in this process only.
test_jwtauth.py drives the real server, as deployed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from jwtissuer import (
    AUDIENCE,
    INSUFFICIENT,
    ISSUER,
    JWKSServer,
    Keys,
    SigningKey,
    config,
    hmac_with_public_key,
    jwks,
    make_keys,
    tampered,
    unsigned,
    with_header,
)

from aioserver import create_app, jwtauth, load_config
from aioserver.auth import Token
from aioserver.cli import main
from aioserver.errors import ConfigError
from aioserver.jwtauth import JWTIdentity, JWTVerifier, parse_jwks, parse_settings

from conftest import TOKEN, ClientFactory


@pytest.fixture(scope="module")
def keys() -> Keys:
    return make_keys()


@pytest.fixture
def provider(tmp_path: Path, keys: Keys) -> Iterator[JWKSServer]:
    with JWKSServer(tmp_path / "idp", jwks(keys.es)) as server:
        yield server


# -- the configuration: each mistake names its file, key and problem


@pytest.mark.parametrize(
    ("section", "key", "problem"),
    [
        ("[]", "auth.jwt", "expected a mapping with issuer, audience, jwks, algorithms, leeway"),
        ("{audience: a, jwks: j.json}", "auth.jwt.issuer", "required"),
        ("{issuer: i, jwks: j.json}", "auth.jwt.audience", "required"),
        ("{issuer: i, audience: a}", "auth.jwt.jwks", "required"),
        ("{issuer: '', audience: a, jwks: j.json}", "auth.jwt.issuer", "expected the provider's issuer URL"),
        ("{issuer: i, audience: [], jwks: j.json}", "auth.jwt.audience", "expected this API's name"),
        ("{issuer: i, audience: [a, 1], jwks: j.json}", "auth.jwt.audience", "expected this API's name"),
        ("{issuer: i, audience: a, jwks: j.json, scope: x}", "auth.jwt.scope", "unknown key; known: issuer,"),
        ("{issuer: i, audience: a, jwks: 'http://idp.example/jwks'}", "auth.jwt.jwks", "expected an https URL:"),
        ("{issuer: i, audience: a, jwks: 'ftp://idp.example/jwks'}", "auth.jwt.jwks", "expected an https URL:"),
        ("{issuer: i, audience: a, jwks: 'https:///jwks'}", "auth.jwt.jwks", "expected an https URL with a host"),
        ("{issuer: i, audience: a, jwks: 7}", "auth.jwt.jwks", "expected the key set's https URL or a file path"),
        ("{issuer: i, audience: a, jwks: j.json, algorithms: [none]}", "auth.jwt.algorithms", "'none' is refused"),
        ("{issuer: i, audience: a, jwks: j.json, algorithms: [NONE]}", "auth.jwt.algorithms", "'none' is refused"),
        ("{issuer: i, audience: a, jwks: j.json, algorithms: [RS256, HS256]}", "auth.jwt.algorithms", "HS256 is"),
        ("{issuer: i, audience: a, jwks: j.json, algorithms: [hs512]}", "auth.jwt.algorithms", "hs512 is refused"),
        ("{issuer: i, audience: a, jwks: j.json, algorithms: [ES256K]}", "auth.jwt.algorithms", "unknown algorithm"),
        ("{issuer: i, audience: a, jwks: j.json, algorithms: []}", "auth.jwt.algorithms", "expected a list"),
        ("{issuer: i, audience: a, jwks: j.json, algorithms: RS256}", "auth.jwt.algorithms", "expected a list"),
        ("{issuer: i, audience: a, jwks: j.json, leeway: -1}", "auth.jwt.leeway", "expected seconds of clock skew"),
        ("{issuer: i, audience: a, jwks: j.json, leeway: 301}", "auth.jwt.leeway", "expected seconds of clock skew"),
        ("{issuer: i, audience: a, jwks: j.json, leeway: true}", "auth.jwt.leeway", "expected seconds of clock skew"),
    ],
)
def test_bad_jwt_settings(section: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(f"auth:\n  jwt: {section}\n")
    assert (error.value.source, error.value.key) == ("<inline config>", key)
    assert error.value.problem.startswith(problem), error.value.problem


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read: No such file or directory"),
        ("{", "not JSON"),
        ('{"keys": {}}', 'expected a JSON object with a "keys" list'),
        ('{"keys": []}', "no usable key"),
        ('{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}', "no usable key (key 'h' left out: a symmetric key"),
    ],
)
def test_a_key_set_file_that_will_not_do(tmp_path: Path, content: str | None, problem: str) -> None:
    path = tmp_path / "jwks.json"
    if content is not None:
        path.write_text(content)
    (tmp_path / "config.yml").write_text(f"auth:\n  jwt: {{issuer: i, audience: a, jwks: {path}}}\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(tmp_path / "config.yml"))
    assert str(error.value).startswith(f"{tmp_path / 'config.yml'}: auth.jwt.jwks: {path}: {problem}")


def test_check_exits_2_naming_file_key_and_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.yml").write_text("auth:\n  jwt: {issuer: i, audience: a, jwks: j.json, algorithms: [HS256]}\n")
    assert main(["--config", str(tmp_path / "config.yml"), "--check"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"aioserver: error: {tmp_path / 'config.yml'}: auth.jwt.algorithms: HS256 is refused")


def test_jwt_tokens_are_tokens_over_clear_text_too(keys: Keys, tmp_path: Path) -> None:
    (tmp_path / "jwks.json").write_text(json.dumps(jwks(keys.es)))
    text = f"auth:\n  jwt: {{issuer: i, audience: a, jwks: {tmp_path / 'jwks.json'}}}\n"
    with pytest.raises(ConfigError, match="tokens would travel in clear text on 0.0.0.0"):
        load_config(text, cli={"host": "0.0.0.0"})
    assert load_config(text, cli={"host": "0.0.0.0", "allow_insecure_http": True}).jwt is not None


def test_a_key_set_keeps_only_the_keys_that_will_do(keys: Keys) -> None:
    small = SigningKey("RS256", "small", bits=1024)
    document = jwks(
        keys.es,
        {**keys.rs.jwk(), "alg": "RS256"},
        keys.ed,
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        {**keys.es.jwk(), "kid": "private", "d": "AAAA"},
        {**keys.es.jwk(), "kid": "encryption", "use": "enc"},
        {**keys.rs.jwk(), "kid": "rs512", "alg": "RS512"},
        {**keys.es.jwk(), "kid": "p384", "crv": "P-384"},
        {**keys.es.jwk(), "kid": "broken", "x": "AAAA"},
        small,
        {k: v for k, v in keys.es.jwk().items() if k != "kid"},
        {**keys.ed.jwk(), "kid": "twice"},
        {**keys.es.jwk(), "kid": "twice"},
        {**keys.es.jwk(), "kid": "listed", "crv": ["P-256"]},
    )
    found, notes = parse_jwks(json.dumps(document).encode(), frozenset({"ES256", "RS256", "EdDSA"}))
    assert {kid: sorted(key.algorithms) for kid, key in found.items()} == {
        "es": ["ES256"],
        "rs": ["RS256"],
        "ed": ["EdDSA"],
    }
    assert notes == [
        "key 'hmac' left out: a symmetric key (HMAC is never used)",
        "key 'private' left out: it holds a private key",
        "key 'encryption' left out: not for signatures (use)",
        "key 'rs512' left out: kty 'RSA', alg 'RS512' fits none of auth.jwt.algorithms",
        "key 'p384' left out: kty 'EC', crv 'P-384' fits none of auth.jwt.algorithms",
        "key 'broken' left out: not a valid EC key",
        "key 'small' left out: an RSA key of 1024 bits (at least 2048)",
        "key #10 left out: no kid, by which tokens name their key",
        "key 'twice' left out: more than one key has this kid",
        "key 'listed' left out: its kty, crv or alg is not a string",
    ]
    # An RSA key without alg verifies what the config allows of RSA.
    found, _ = parse_jwks(json.dumps(jwks(keys.rs)).encode(), frozenset({"RS256", "PS384", "ES256"}))
    assert found["rs"].algorithms == {"RS256", "PS384"}


# -- scopes: a JWT runs workflows, and only those its scope names


@pytest.mark.parametrize(
    ("scope", "runs", "denied"),
    [
        ("workflow:echo", {"echo"}, {"upper", "*", ""}),
        ("openid workflow:echo  workflow:upper", {"echo", "upper"}, {"other"}),
        ("workflow:*", {"echo", "upper", "anything"}, set()),
        ("workflow: echo workflow:", set(), {"echo", ""}),
        ("echo upper Workflow:echo workflow_echo", set(), {"echo", "upper"}),
    ],
)
async def test_scope_grants_workflows(keys: Keys, scope: str, runs: set[str], denied: set[str]) -> None:
    found, _ = parse_jwks(json.dumps(jwks(keys.es)).encode(), frozenset({"ES256"}))
    verifier = JWTVerifier(parse_settings({"issuer": ISSUER, "audience": AUDIENCE, "jwks": "j.json"}, "test"), found)
    token = await verifier.verify(keys.es.mint(scope=scope))
    assert isinstance(token, JWTIdentity) and isinstance(token, Token)
    assert token.name == "alice"
    assert all(token.may_run(name) for name in runs)
    assert not any(token.may_run(name) for name in denied)


async def test_a_jwt_calls_no_other_route(aiohttp_client, keys: Keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "jwks.json").write_text(json.dumps(jwks(keys.es)))
    app = create_app(load_config(config(tmp_path / "jwks.json")))

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"stats": 1})

    app.router.add_get("/stats", stats)
    client = await aiohttp_client(app)
    for scope in ("workflow:*", "workflow:/stats", "workflow:stats"):
        answer = await client.get("/stats", headers={"Authorization": f"Bearer {keys.es.mint(scope=scope)}"})
        assert (answer.status, answer.headers["WWW-Authenticate"]) == (403, INSUFFICIENT), scope
    answer = await client.get("/stats", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status == 200


# -- verified tokens are remembered, never past their expiry, nor past their key


async def test_a_remembered_token_still_expires(make_client: ClientFactory, keys: Keys, tmp_path: Path) -> None:
    (tmp_path / "jwks.json").write_text(json.dumps(jwks(keys.es)))
    client = await make_client(config(tmp_path / "jwks.json", leeway=0))
    token = keys.es.mint(exp=int(time.time()) + 2)
    body = {"name": "echo", "elements": [1]}
    headers = {"Authorization": f"Bearer {token}"}
    for _ in range(3):
        assert (await client.post("/workflow", json=body, headers=headers)).status == 200
    expires = int(jwt.decode(token, options={"verify_signature": False})["exp"])
    while (await client.post("/workflow", json=body, headers=headers)).status == 200:
        assert time.time() < expires + 5, "still accepted, long expired"
        await asyncio.sleep(0.1)
    assert time.time() >= expires


async def test_keys_are_fetched_every_so_often(  # type: ignore[no-untyped-def]
    provider: JWKSServer, aiohttp_client, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The provider first: it stops after the client, which holds a connection to it open.
    monkeypatch.setenv("SSL_CERT_FILE", str(provider.ca_file))
    settings = parse_settings({"issuer": ISSUER, "audience": AUDIENCE, "jwks": provider.url}, "test")
    verifier = JWTVerifier(settings, refresh_every=0.3)
    app = web.Application()
    verifier.setup(app)
    await aiohttp_client(app)
    await until(lambda: provider.fetches >= 3, "three fetches")
    provider.document = jwks(keys.rs)
    await until(lambda: "rs" in verifier.keys, "the new key in force")
    assert await verifier.verify(keys.rs.mint()) is not None
    assert "es" not in verifier.keys


# -- each check of a token, in process: the verdict and the reason logged, never the token

LOCATION = "/nonexistent/jwks.json"  # a key set file, its keys given to the verifier here


def verifier_of(*signing: SigningKey, **more: Any) -> JWTVerifier:
    """A verifier of auth.jwt (``more`` settings) whose key set holds ``signing``'s public keys."""
    settings = parse_settings({"issuer": ISSUER, "audience": AUDIENCE, "jwks": LOCATION, **more}, "test")
    found, notes = parse_jwks(json.dumps(jwks(*signing)).encode(), settings.algorithms)
    return JWTVerifier(settings, found, notes)


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "aioserver.jwt" and record.levelno == logging.INFO and "JWT refused" in record.getMessage()
    ]


async def until(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Wait for ``condition``, polled every 20 ms; the test fails naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.02)


REFUSALS: list[tuple[str, Callable[[Keys], str], str]] = [
    ("expired", lambda k: k.es.mint(exp=int(time.time()) - 60), "expired"),
    ("not yet valid", lambda k: k.es.mint(nbf=int(time.time()) + 60), "not valid yet"),
    ("issued in the future", lambda k: k.es.mint(iat=int(time.time()) + 60), "not valid yet"),
    ("wrong issuer", lambda k: k.es.mint(iss=ISSUER + "/"), f"wrong issuer {ISSUER + '/'!r}"),
    ("wrong audience", lambda k: k.es.mint(aud="other-api"), "wrong audience 'other-api'"),
    ("audiences not ours", lambda k: k.es.mint(aud=["a", "b"]), "wrong audience ['a', 'b']"),
    ("issuer on two lines", lambda k: k.es.mint(iss="x\ny"), "wrong issuer 'x\\ny'"),
    ("no exp", lambda k: k.es.mint(exp=None), "no 'exp' claim"),
    ("no nbf", lambda k: k.es.mint(nbf=None), "no 'nbf' claim"),
    ("no iss", lambda k: k.es.mint(iss=None), "no 'iss' claim"),
    ("no aud", lambda k: k.es.mint(aud=None), "no 'aud' claim"),
    ("no sub", lambda k: k.es.mint(sub=None), "no 'sub' claim"),
    ("empty sub", lambda k: k.es.mint(sub=""), "its 'sub' claim is not a name"),
    ("scope a list", lambda k: k.es.mint(scope=["workflow:echo"]), "its 'scope' claim is not a space-separated string"),
    ("unknown kid", lambda k: k.es.mint(header={"kid": "nobody"}), f"no key 'nobody' in the key set {LOCATION}"),
    (
        "a long unknown kid, cut",
        lambda k: k.es.mint(header={"kid": "k" * 100}),
        f"no key {'k' * 64!r} in the key set {LOCATION}",
    ),
    ("a kid on two lines", lambda k: k.es.mint(header={"kid": "a\nb"}), f"no key 'a\\\\nb' in the key set {LOCATION}"),
    ("no kid", lambda k: with_header(k.es.mint(), kid=None), "no kid in its header: which key signed it is not said"),
    (
        "a kid not a string",
        lambda k: with_header(k.es.mint(), kid=7),
        "malformed (InvalidTokenError: …",
    ),
    ("alg none", lambda k: unsigned("rs"), "algorithm 'none' is not allowed for key 'rs'"),
    ("no alg", lambda k: with_header(k.rs.mint(), alg=None), "algorithm 'NoneType' is not allowed for key 'rs'"),
    (
        "HS256, the public key its secret",
        lambda k: hmac_with_public_key(k.rs),
        "algorithm 'HS256' is not allowed for key 'rs'",
    ),
    ("alg a list", lambda k: with_header(k.rs.mint(), alg=["RS256"]), "algorithm 'list' is not allowed for key 'rs'"),
    (
        "an EC alg for the RSA key",
        lambda k: with_header(k.rs.mint(), alg="ES256"),
        "algorithm 'ES256' is not allowed for key 'rs'",
    ),
    (
        "a long alg, cut",
        lambda k: with_header(k.rs.mint(), alg="X" * 50),
        f"algorithm {'X' * 32!r} is not allowed for key 'rs'",
    ),
    ("signed by another key", lambda k: k.impostor.mint(), "bad signature"),
    ("payload tampered with", lambda k: tampered(k.es.mint(), scope="workflow:*"), "bad signature"),
    ("nonsense", lambda k: "not.a.jwt", "malformed (DecodeError: …"),
    (
        "exp not a number",
        lambda k: k.es.mint(exp="soon"),
        "invalid (DecodeError: Expiration Time claim (exp) must be an integer.)",
    ),
]


@pytest.mark.parametrize(("name", "token", "reason"), REFUSALS, ids=[case[0] for case in REFUSALS])
async def test_each_refusal_says_why_and_never_the_token(
    keys: Keys, caplog: pytest.LogCaptureFixture, name: str, token: Callable[[Keys], str], reason: str
) -> None:
    verifier = verifier_of(keys.es, keys.rs, keys.ed)
    value = token(keys)
    with caplog.at_level(logging.DEBUG, logger="aioserver.jwt"):
        assert await verifier.verify(value) is None
    said = refusals(caplog)
    if reason.endswith("…"):  # the rest is PyJWT's words
        assert len(said) == 1 and said[0].startswith("JWT refused: " + reason[:-1]), said
    else:
        assert said == ["JWT refused: " + reason]
    for part in value.split("."):
        assert len(part) < 8 or part not in caplog.text
    assert verifier._verified == {}  # nothing refused is remembered


async def test_what_is_accepted_and_who_it_is(keys: Keys) -> None:
    verifier = verifier_of(keys.es, keys.rs, keys.ed)
    for key in (keys.es, keys.rs, keys.ed):
        identity = await verifier.verify(key.mint(sub=f"user-{key.kid}"))
        assert identity is not None and identity.name == f"user-{key.kid}", key.kid
    identity = await verifier.verify(keys.es.mint(sub="eve\nINFO forged", aud=["other", AUDIENCE]))
    assert identity is not None and identity.name == "eve\\nINFO forged"
    assert (identity.digest, identity.workflows, identity.every_workflow) == (b"", frozenset({"echo"}), False)
    identity = await verifier.verify(keys.es.mint(sub="no-scope", scope=None))
    assert identity is not None and identity.workflows == frozenset() and not identity.every_workflow
    identity = await verifier.verify(keys.es.mint(sub="tab", scope="workflow:echo\tworkflow:upper"))
    assert identity is not None and not identity.may_run("upper")  # space-separated (RFC 8693)
    identity = await verifier.verify(keys.es.mint(scope="workflow:* workflow:echo"))
    assert identity is not None and identity.every_workflow and identity.workflows == frozenset({"echo"})


@pytest.mark.parametrize(
    ("leeway", "exp", "nbf", "accepted"),
    [
        (0, -3, -10, False),
        (0, 60, 5, False),
        (100, -50, -60, True),
        (100, -150, -160, False),
        (100, 60, 50, True),
        (100, 200, 150, False),
        (300, -250, -260, True),
    ],
)
async def test_the_leeway_configured(keys: Keys, leeway: int, exp: int, nbf: int, accepted: bool) -> None:
    verifier = verifier_of(keys.es, leeway=leeway)
    now = int(time.time())
    identity = await verifier.verify(keys.es.mint(exp=now + exp, nbf=nbf + now, iat=now + min(nbf, 0)))
    assert (identity is not None) == accepted


async def test_an_rsa_key_verifies_the_rsa_algorithms_configured(keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    pss = SigningKey("RS256", "rs")
    pss.private, pss.alg = keys.rs.private, "PS256"
    verifier = verifier_of(keys.rs, algorithms=["RS256", "PS256"])
    assert verifier.keys["rs"].algorithms == {"RS256", "PS256"}
    assert await verifier.verify(keys.rs.mint()) is not None
    assert await verifier.verify(pss.mint()) is not None
    # A key naming its algorithm verifies that one only.
    found, _ = parse_jwks(json.dumps(jwks({**keys.rs.jwk(), "alg": "RS256"})).encode(), frozenset({"RS256", "PS256"}))
    verifier.keys = found
    with caplog.at_level(logging.INFO, logger="aioserver.jwt"):
        assert await verifier.verify(pss.mint(sub="pss-again")) is None
    assert refusals(caplog) == ["JWT refused: algorithm 'PS256' is not allowed for key 'rs'"]


class Clock:
    """The clocks jwtauth reads, set by the test (PyJWT reads the real one)."""

    def __init__(self) -> None:
        self.now = time.time()
        self.monotonic_now = 1000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.monotonic_now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(jwtauth, "time", clock)
    return clock


async def test_a_verified_token_is_remembered_until_exp_and_the_leeway(keys: Keys, clock: Clock) -> None:
    verifier = verifier_of(keys.es, leeway=20)
    exp = int(time.time()) + 100
    token = keys.es.mint(exp=exp)
    identity = await verifier.verify(token)
    assert identity is not None
    verifier.keys = {}  # were it verified again, it would be refused
    clock.now = exp + 20 - 0.5
    assert await verifier.verify(token) is identity
    clock.now = exp + 20
    assert await verifier.verify(token) is None
    assert token not in verifier._verified


async def test_the_oldest_remembered_is_forgotten_first(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jwtauth, "REMEMBERED", 2)
    verifier = verifier_of(keys.es)
    first, second, third = (keys.es.mint(sub=name) for name in ("first", "second", "third"))
    for token in (first, second, third):
        assert await verifier.verify(token) is not None
    assert list(verifier._verified) == [second, third]
    verifier.keys = {}
    assert await verifier.verify(second) is not None
    assert await verifier.verify(third) is not None
    assert await verifier.verify(first) is None


# -- a key set file, read again


async def test_a_key_set_file_read_again(keys: Keys, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks(keys.es)))
    verifier = load_config(config(path)).jwt
    assert verifier is not None and list(verifier.keys) == ["es"]
    assert verifier.describe() == (
        f"jwt: issuer {ISSUER}, audience {AUDIENCE}, algorithms ES256, EdDSA, RS256, leeway 30s, keys es from {path}"
    )
    fetched = load_config(config("https://idp.example/jwks")).jwt
    assert fetched is not None and fetched.settings.jwks == "https://idp.example/jwks" and fetched.keys == {}
    token = keys.es.mint()
    assert await verifier.verify(token) is not None
    # The same keys: what was verified stays remembered.
    assert verifier.reread_file() is False
    assert token in verifier._verified
    with caplog.at_level(logging.INFO, logger="aioserver.jwt"):
        await verifier.reload()
    assert "reloaded JWT keys (unchanged): es" in caplog.messages
    # The same JWK, its members in another order: the same key.
    path.write_text(json.dumps({"keys": [dict(reversed(list(keys.es.jwk().items())))]}))
    assert verifier.reread_file() is False and token in verifier._verified
    # Another key under the same kid: put in force, what it verified forgotten.
    path.write_text(json.dumps(jwks(keys.impostor)))
    assert verifier.reread_file() is True and verifier._verified == {}
    assert await verifier.verify(token) is None
    assert await verifier.verify(keys.impostor.mint()) is not None
    path.write_text(json.dumps(jwks(keys.es)))
    assert verifier.reread_file() is True
    assert await verifier.verify(token) is not None
    # Keys changed: the tokens remembered are verified again, against them.
    path.write_text(json.dumps(jwks(keys.rs, {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}, keys.ed)))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="aioserver.jwt"):
        await verifier.reload()
    assert caplog.messages == [
        f"JWT keys from {path}: key 'hmac' left out: a symmetric key (HMAC is never used)",
        "reloaded JWT keys: rs, ed",
    ]
    assert verifier._verified == {}
    assert await verifier.verify(token) is None
    assert await verifier.verify(keys.rs.mint()) is not None
    # A broken file keeps the keys in force.
    path.write_text("{")
    with pytest.raises(ConfigError) as error:
        verifier.reread_file()
    assert str(error.value) == f"{path}: not JSON"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="aioserver.jwt"):
        await verifier.reload()
    assert caplog.messages == [f"JWT key reload failed, keeping the 2 keys in force: {path}: not JSON"]
    assert list(verifier.keys) == ["rs", "ed"]


async def test_a_file_s_unknown_kid_is_not_fetched(keys: Keys, clock: Clock) -> None:
    verifier = verifier_of(keys.es)
    assert await verifier._key("rs") is None
    assert verifier._fetching is None and verifier._unknown_kid_fetched == -math.inf


async def test_the_start_with_a_key_set_file(
    aiohttp_client, keys: Keys, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks(keys.es, {**keys.rs.jwk(), "use": "enc"})))
    verifier = load_config(config(path)).jwt
    assert verifier is not None
    app = web.Application()
    verifier.setup(app)
    with caplog.at_level(logging.INFO, logger="aioserver.jwt"):
        await aiohttp_client(app)
    assert caplog.messages == [
        f"JWT access tokens from {ISSUER}, keys from {path}: es",
        f"JWT keys from {path}: key 'rs' left out: not for signatures (use)",
    ]
    assert verifier._session is None


# -- the settings


def test_settings_and_their_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = parse_settings({"issuer": ISSUER, "audience": AUDIENCE, "jwks": "keys/jwks.json"}, "test")
    assert settings == jwtauth.JWTSettings(ISSUER, (AUDIENCE,), str(tmp_path / "keys/jwks.json"))
    assert settings.algorithms == {"ES256", "RS256", "EdDSA"} and settings.leeway == 30.0
    assert not settings.fetched
    settings = parse_settings(
        {
            "issuer": "i",
            "audience": ["a", "b"],
            "jwks": "HTTPS://idp.example/jwks",
            "algorithms": ["PS512"],
            "leeway": 0,
        },
        "test",
    )
    assert (settings.audience, settings.jwks, settings.algorithms, settings.leeway) == (
        ("a", "b"),
        "https://idp.example/jwks",
        {"PS512"},
        0.0,
    )
    assert settings.fetched and isinstance(settings.leeway, float)
    assert parse_settings({"issuer": "i", "audience": "a", "jwks": "/j", "leeway": 300}, "t").leeway == 300.0
    url = "https://idp.example/jwks?from=https://idp.example"
    assert parse_settings({"issuer": "i", "audience": "a", "jwks": url}, "t").jwks == url
    for algorithms, problem in [
        ("RS256", "expected a list of algorithms among ES256, ES384, ES512, RS256, RS384, RS512, PS256, PS384,"),
        (
            ["HS256"],
            "HS256 is refused: HMAC takes a shared secret, and a public key of the key set could pass for"
            " one (key confusion); asymmetric algorithms only",
        ),
    ]:
        with pytest.raises(ConfigError) as error:
            parse_settings({"issuer": "i", "audience": "a", "jwks": "/j", "algorithms": algorithms}, "src")
        assert error.value.problem.startswith(problem), error.value.problem
    assert parse_settings({"issuer": "i", "audience": "a", "jwks": "/j", "leeway": 2.5}, "t").leeway == 2.5
    verifier = JWTVerifier(settings)
    assert verifier.describe() == (
        "jwt: issuer i, audience a, b, algorithms PS512, leeway 0s, keys fetched from https://idp.example/jwks at start"
    )
    with pytest.raises(ConfigError) as error:
        parse_settings({"issuer": "i", "audience": "a", "jwks": "/j", "leeway": 300.5}, "src")
    assert str(error.value) == "src: auth.jwt.leeway: expected seconds of clock skew, 0 to 300"
    with pytest.raises(ConfigError) as error:
        parse_settings({"issuer": "i", "audience": "a", "jwks": "/j", "algorithms": ["RS256", "XS1"]}, "src")
    assert str(error.value) == (
        "src: auth.jwt.algorithms: unknown algorithm 'XS1'; known: ES256, ES384, ES512, RS256, RS384, RS512,"
        " PS256, PS384, PS512, EdDSA"
    )


@pytest.mark.parametrize(
    ("value", "shaped"),
    [
        ("aGVhZA.cGF5bG9hZA.c2ln", True),
        ("aGVhZA.cGF5bG9hZA.", True),  # unsigned: refused as a JWT, not looked up as a token
        ("a-_9.b.c", True),
        ("aGVhZA.cGF5bG9hZA", False),
        ("a.b.c.d", False),
        ("a.b.c\n", False),
        ("a+/.b.c", False),
        (".b.c", False),
        (TOKEN, False),
    ],
)
def test_what_is_shaped_as_a_jwt(value: str, shaped: bool) -> None:
    assert JWTVerifier.is_jwt(value) is shaped


def test_a_key_set_s_entries_that_will_not_do(keys: Keys) -> None:
    document = {
        "keys": [
            "es",
            {**keys.es.jwk(), "kid": ""},
            {**keys.es.jwk(), "kid": "k" * 100, "use": "enc"},
            {**keys.es.jwk(), "kid": "thrice"},
            {**keys.es.jwk(), "kid": "thrice"},
            {**keys.rs.jwk(), "kid": "thrice"},
            {k: v for k, v in keys.ed.jwk().items() if k != "use"},  # use: sig by default
            {**keys.es.jwk(), "kid": "es512", "alg": "ES512", "crv": "P-521"},
        ]
    }
    found, notes = parse_jwks(json.dumps(document).encode(), frozenset({"ES256", "EdDSA"}))
    assert list(found) == ["ed"]
    assert notes == [
        "key #0 left out: no kid, by which tokens name their key",
        "key #1 left out: no kid, by which tokens name their key",
        f"key {'k' * 64!r} left out: not for signatures (use)",
        "key 'thrice' left out: more than one key has this kid",
        "key 'thrice' left out: more than one key has this kid",
        "key 'es512' left out: kty 'EC', crv 'P-521', alg 'ES512' fits none of auth.jwt.algorithms",
    ]
    with pytest.raises(jwtauth.JWKSError) as error:
        parse_jwks(b'{"keys": [{"kty": "oct", "kid": "h"}, {"kid": "x"}]}', frozenset({"ES256"}))
    assert str(error.value) == (
        "no usable key (key 'h' left out: a symmetric key (HMAC is never used);"
        " key 'x' left out: kty None fits none of auth.jwt.algorithms)"
    )
    with pytest.raises(jwtauth.JWKSError) as error:
        parse_jwks(b'{"keys": []}', frozenset({"ES256"}))
    assert str(error.value) == "no usable key"
    for data in (b"\xff", b"[]", b'{"keys": 1}'):
        with pytest.raises(jwtauth.JWKSError):
            parse_jwks(data, frozenset({"ES256"}))


async def test_a_jwt_runs_the_workflows_its_scope_names(make_client: ClientFactory, keys: Keys, tmp_path: Path) -> None:
    (tmp_path / "jwks.json").write_text(json.dumps(jwks(keys.es)))
    client = await make_client(config(tmp_path / "jwks.json"))

    async def run(workflow: str, token: str) -> tuple[int, Any]:
        answer = await client.post(
            "/workflow", json={"name": workflow, "elements": ["hi"]}, headers={"Authorization": f"Bearer {token}"}
        )
        return answer.status, await answer.json()

    assert await run("echo", keys.es.mint(scope="workflow:echo")) == (200, ["hi"])
    assert (await run("upper", keys.es.mint(scope="workflow:echo")))[0] == 403
    assert await run("upper", keys.es.mint(scope="workflow:*")) == (200, ["HI"])
    assert (await run("echo", keys.es.mint(scope="openid echo")))[0] == 403
    # A JWT that may run no workflow is refused before its body is read.
    answer = await client.post(
        "/workflow", data=b"{", headers={"Authorization": f"Bearer {keys.es.mint(scope='openid')}"}
    )
    assert (answer.status, answer.headers["WWW-Authenticate"]) == (403, INSUFFICIENT)
    expired = keys.es.mint(exp=int(time.time()) - 120)
    status, body = await run("echo", expired)
    assert (status, body) == (401, {"error": "invalid token"})


# -- a key set fetched over HTTPS from a provider on 127.0.0.1


async def serving(verifier: JWTVerifier, aiohttp_client: Any) -> None:
    """Start an app that ``verifier`` serves (its keys fetched at start), and wait for its first fetch."""
    app = web.Application()
    verifier.setup(app)
    await aiohttp_client(app)
    await until(
        lambda: verifier._session is not None and verifier._fetching is None and verifier.keys,
        "no keys fetched at start",
    )


def fetched_verifier(provider: JWKSServer, **options: Any) -> JWTVerifier:
    return JWTVerifier(
        parse_settings({"issuer": ISSUER, "audience": AUDIENCE, "jwks": provider.url}, "test"), **options
    )


@pytest.fixture
def trusted(provider: JWKSServer, monkeypatch: pytest.MonkeyPatch) -> JWKSServer:
    """The provider, whose CA the verifier trusts through SSL_CERT_FILE."""
    monkeypatch.setenv("SSL_CERT_FILE", str(provider.ca_file))
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"):  # never used: trust_env=False
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    return provider


async def test_an_unknown_kid_fetches_the_keys_at_most_once_a_minute(  # type: ignore[no-untyped-def]
    trusted: JWKSServer, aiohttp_client, keys: Keys, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    verifier = fetched_verifier(trusted)
    with caplog.at_level(logging.DEBUG, logger="aioserver.jwt"):
        await serving(verifier, aiohttp_client)
    assert trusted.fetches == 1 and list(verifier.keys) == ["es"]
    assert f"JWT keys in force from {trusted.url}: es" in caplog.messages
    assert f"fetching the JWT keys from {trusted.url}: scheduled" in caplog.messages
    assert f"JWT access tokens from {ISSUER}, keys fetched from {trusted.url}" in caplog.messages
    # The provider rotates in a key: the first tokens naming it have the keys fetched, once for all.
    trusted.document = jwks(keys.es, keys.rs)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="aioserver.jwt"):
        found = await asyncio.gather(*(verifier.verify(keys.rs.mint(sub=f"u{n}")) for n in range(3)))
    assert [identity is not None for identity in found] == [True] * 3
    assert trusted.fetches == 2
    assert f"fetching the JWT keys from {trusted.url}: a token names the unknown key 'rs'" in caplog.messages
    # Another within the minute: refused without a fetch, though the provider has it now.
    trusted.document = jwks(keys.es, keys.rs, keys.ed)
    clock.monotonic_now += 59.9
    assert await verifier.verify(keys.ed.mint()) is None
    assert trusted.fetches == 2
    clock.monotonic_now += 0.1
    assert await verifier.verify(keys.ed.mint()) is not None
    assert trusted.fetches == 3
    # The same keys fetched again change nothing: what was verified stays remembered.
    token = keys.ed.mint(sub="remembered")
    assert await verifier.verify(token) is not None
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="aioserver.jwt"):
        await verifier.reload()
    assert caplog.messages == [f"fetching the JWT keys from {trusted.url}: reload"]
    assert trusted.fetches == 4 and token in verifier._verified
    # A key taken out (revoked) takes its tokens with it, remembered or not.
    trusted.document = jwks(keys.es, keys.rs)
    await verifier.reload()
    assert trusted.fetches == 5 and verifier._verified == {}
    assert await verifier.verify(token) is None


@pytest.mark.parametrize(
    ("misbehaviour", "said"),
    [
        ({"status": 500}, "answered 500 Internal Server Error"),
        ({"redirect": "http://127.0.0.1:9/jwks"}, "answered 302 Found"),
        ({"padding": 1}, "1048577 bytes announced, more than 1048576"),
        ({"padding": 1, "chunked": True}, "larger than 1048576 bytes"),
        (
            {"document": {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}},
            "no usable key (key 'h' left out: a symmetric key (HMAC is never used))",
        ),
    ],
)
async def test_a_fetch_that_fails_keeps_the_keys(  # type: ignore[no-untyped-def]
    trusted: JWKSServer,
    aiohttp_client,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    misbehaviour: dict[str, Any],
    said: str,
) -> None:
    monkeypatch.setattr(jwtauth, "FETCH_TIMEOUT", 0.5)
    verifier = fetched_verifier(trusted)
    await serving(verifier, aiohttp_client)
    token = keys.es.mint()
    assert await verifier.verify(token) is not None
    exact = len(json.dumps(trusted.document))
    for name, value in misbehaviour.items():
        setattr(trusted, name, value)
    if "padding" in misbehaviour:  # one byte more than 1 MiB
        trusted.padding = jwtauth.JWKS_LIMIT - exact + 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="aioserver.jwt"):
        await verifier.reload()
    assert caplog.messages == [f"JWT keys not fetched from {trusted.url}, keeping the 1 in force: {said}"]
    assert list(verifier.keys) == ["es"] and token in verifier._verified
    trusted.hang = False
    if "padding" in misbehaviour:  # a key set of exactly 1 MiB will do
        trusted.document = jwks(keys.rs)
        trusted.padding = jwtauth.JWKS_LIMIT - len(json.dumps(trusted.document))
        await verifier.reload()
        assert list(verifier.keys) == ["rs"]


async def test_a_scheduled_fetch_that_failed_is_tried_again_soon(  # type: ignore[no-untyped-def]
    trusted: JWKSServer, aiohttp_client, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jwtauth, "RETRY_AFTER_FAILURE", 0.1)
    trusted.status = 503
    verifier = fetched_verifier(trusted, refresh_every=3600)
    app = web.Application()
    verifier.setup(app)
    await aiohttp_client(app)
    await until(lambda: trusted.fetches >= 3, "three fetches")
    assert verifier.keys == {}
    trusted.status = 200
    await until(lambda: verifier.keys and verifier._fetching is None, "keys fetched again")
    fetches = trusted.fetches
    await asyncio.sleep(1)  # fetched, the next fetch waits an hour (refresh_every), not the retry's wait
    assert trusted.fetches == fetches
    assert await verifier.verify(keys.es.mint()) is not None


async def test_the_providers_certificate_is_verified_in_process(  # type: ignore[no-untyped-def]
    provider: JWKSServer, aiohttp_client, keys: Keys, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", os.devnull)
    monkeypatch.setenv("SSL_CERT_DIR", os.devnull)
    verifier = fetched_verifier(provider)
    app = web.Application()
    verifier.setup(app)
    with caplog.at_level(logging.INFO, logger="aioserver.jwt"):
        await aiohttp_client(app)
        await until(lambda: any("not fetched" in m for m in caplog.messages), "the failed fetch said")
    said = [m for m in caplog.messages if "not fetched" in m]
    prefix = f"JWT keys not fetched from {provider.url}, keeping the 0 in force: "
    assert said[0].startswith(prefix) and "certificate verify failed" in said[0], said
    assert await verifier.verify(keys.es.mint()) is None


async def test_no_fetch_once_the_app_is_gone(trusted: JWKSServer, keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    verifier = fetched_verifier(trusted)
    app = web.Application()
    verifier.setup(app)
    async with TestClient(TestServer(app)):
        await until(lambda: verifier.keys, "keys fetched")
    assert verifier._session is None and verifier._fetching is None
    fetches = trusted.fetches
    with caplog.at_level(logging.DEBUG, logger="aioserver.jwt"):
        assert await verifier.verify(keys.rs.mint()) is None
        await verifier.reload()
        await asyncio.sleep(0.1)
    assert trusted.fetches == fetches
    assert [r.getMessage() for r in caplog.records if r.levelno > logging.INFO] == []


async def test_what_a_fetch_returns_and_a_fault_in_it(  # type: ignore[no-untyped-def]
    trusted: JWKSServer, aiohttp_client, keys: Keys, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    verifier = fetched_verifier(trusted)
    await serving(verifier, aiohttp_client)
    assert trusted.accept == "application/json"
    assert await verifier._fetch("test") is True
    trusted.status = 500
    assert await verifier._fetch("test") is False
    trusted.status = 200

    def fault(data: bytes, algorithms: frozenset[str]) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(jwtauth, "parse_jwks", fault)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="aioserver.jwt"):
        assert await verifier._fetch("test") is False
    assert caplog.messages == [f"JWT keys not fetched from {trusted.url}, keeping the 1 in force"]
    assert caplog.records[0].levelno == logging.ERROR and caplog.records[0].exc_info is not None
    assert list(verifier.keys) == ["es"] and verifier._fetching is None
