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
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from aiohttp import web
from jwtissuer import (
    AUDIENCE,
    INSUFFICIENT,
    ISSUER,
    JWKSServer,
    Keys,
    SigningKey,
    config,
    jwks,
    make_keys,
)

from aioserver import create_app, load_config
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
    deadline = time.monotonic() + 10
    while provider.fetches < 3:
        assert time.monotonic() < deadline, provider.fetches
        await asyncio.sleep(0.05)
    provider.document = jwks(keys.rs)
    deadline = time.monotonic() + 10
    while "rs" not in verifier.keys:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert await verifier.verify(keys.rs.mint()) is not None
    assert "es" not in verifier.keys
