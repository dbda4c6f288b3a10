"""Token authorization: sources, RFC 6750 answers, scopes, throttling, identity, reload."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from aioserver import create_app, load_config
from aioserver.auth import HASH_HINT, FailureThrottle, Token, TokenStore, auth_middleware, parse_token_file
from aioserver.errors import ConfigError
from aioserver.server import reload

from conftest import TOKEN, TOKEN_HASH, ClientFactory

CONFIG = """
workflow:
  echo: {tasks: [echo]}
  upper: {tasks: [upper]}
auth:
  tokens:
    - {name: reader, sha256: %s, workflows: [echo, /whoami]}
""" % hashlib.sha256(b"reader-token").hexdigest()

REALM = 'Bearer realm="aioserver"'


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize(
    "value",
    ["", "not-a-hash", TOKEN, TOKEN_HASH[:-1], TOKEN_HASH + "0", "g" * 64, f"{TOKEN_HASH} extra"],
)
def test_token_must_be_a_sha256_hex_digest(value: str) -> None:
    if not value:
        assert load_config("{}", env={"TOKEN": value}).tokens == ()  # empty: unset
        return
    with pytest.raises(ConfigError) as error:
        load_config("{}", env={"TOKEN": value})
    message = str(error.value)
    assert message.startswith("environment: TOKEN: expected the SHA-256 hex digest")
    assert "bin/aioserver-token" in message
    assert value not in message


def test_token_is_case_insensitive() -> None:
    upper = load_config("{}", env={"TOKEN": TOKEN_HASH.upper()})
    assert TokenStore(upper.tokens).match(TOKEN) is not None


def test_token_file_format() -> None:
    text = f"""
# comment line
{sha("a")}                       # unnamed
{sha("b")} bob
{sha("c")} carol echo,upper      # scoped
"""
    tokens = parse_token_file(text, "tokens.txt")
    assert [(t.name, t.workflows) for t in tokens] == [
        ("tokens.txt:3", None),
        ("bob", None),
        ("carol", frozenset({"echo", "upper"})),
    ]
    assert "digest" not in repr(tokens[0]) and sha("a") not in repr(tokens)


def test_a_comment_may_hold_a_hash_sign() -> None:
    (token,) = parse_token_file(f"{sha('a')} alice  # key #2, see issue #7\n", "tokens.txt")
    assert (token.name, token.workflows) == ("alice", None)


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("nothash bob\n", "line 1", "expected the SHA-256 hex digest"),
        (f"\n{sha('a')} a b c\n", "line 2", "expected HASH [NAME [WORKFLOW,...]]"),
    ],
)
def test_bad_token_file_lines(text: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_token_file(text, "tokens.txt")
    assert (error.value.source, error.value.key) == ("tokens.txt", key)
    assert error.value.problem.startswith(problem)


@pytest.mark.parametrize(
    ("auth", "key", "problem"),
    [
        ("[]", "auth", "expected a mapping with 'tokens', 'clients' or 'jwt'"),
        ("{tokens: {}}", "auth.tokens", "expected a list of {name, sha256, workflows}"),
        ("{tokens: [x]}", "auth.tokens[0]", "expected a mapping {name, sha256, workflows}"),
        ("{tokens: [{name: a}]}", "auth.tokens[0].sha256", HASH_HINT),
        (f"{{tokens: [{{name: '', sha256: {TOKEN_HASH}}}]}}", "auth.tokens[0].name", "expected a non-empty string"),
        (
            f"{{tokens: [{{name: a, sha256: {TOKEN_HASH}, workflows: echo}}]}}",
            "auth.tokens[0].workflows",
            "expected a list of workflow names",
        ),
        (
            f"{{tokens: [{{name: a, sha256: {TOKEN_HASH}, scope: x}}]}}",
            "auth.tokens[0].scope",
            "unknown key; known: name, sha256, workflows",
        ),
        ("{token: x}", "auth.token", "unknown key; known: tokens, clients, jwt"),
    ],
)
def test_bad_auth_section(auth: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(f"auth: {auth}\n")
    # The one line the user reads: where, which key, what is wrong.
    assert str(error.value) == f"<inline config>: {key}: {problem}"


def test_config_token_without_workflows_is_unscoped() -> None:
    (token,) = load_config(f"auth: {{tokens: [{{name: ops, sha256: {TOKEN_HASH}}}]}}\n").tokens
    assert (token.name, token.workflows) == ("ops", None)


def test_token_sources_in_order(tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text(f"{sha('c')} c\n")
    config = load_config(
        f"auth: {{tokens: [{{name: a, sha256: {sha('a')}}}, {{name: b, sha256: {sha('b')}}}]}}\n",
        env={"TOKEN": TOKEN_HASH, "TOKEN_FILE": str(tmp_path / "tokens")},
    )
    assert [t.name for t in config.tokens] == ["token", "a", "b", "c"]


def test_token_file_and_credential(tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text(f"{sha('one')} one\n")
    (tmp_path / "token").write_text(f"{sha('two')} two echo\n")
    config = load_config("{}", env={"TOKEN_FILE": str(tmp_path / "tokens"), "CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert [t.name for t in config.tokens] == ["one", "two"]


def test_no_stray_token_file_without_a_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text(f"{sha('stray')} stray\n")  # as systemd's credential is named
    monkeypatch.chdir(tmp_path)
    assert load_config("{}").tokens == ()


def test_unnamed_tokens_are_named_after_their_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# ops\n{sha('a')}\n")
    (token,) = load_config("{}", env={"TOKEN_FILE": str(path)}).tokens
    assert token.name == f"{path}:2"
    path.write_text("nothash\n")
    with pytest.raises(ConfigError) as error:
        load_config("{}", env={"TOKEN_FILE": str(path)})
    assert (error.value.source, error.value.key) == (str(path), "line 1")


def test_token_files_are_utf8_whatever_the_locale(tmp_path: Path, ascii_locale: None) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{sha('a')} josé\n", encoding="utf-8")
    (token,) = load_config("{}", env={"TOKEN_FILE": str(path)}).tokens
    assert token.name == "josé"


@pytest.mark.parametrize("content", ["# only a comment\n", ""])
def test_token_file_without_tokens_is_an_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(content)
    with pytest.raises(ConfigError) as error:
        load_config("{}", env={"TOKEN_FILE": str(path)})
    assert str(error.value) == f"{path}: the token file holds no token"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "No such file or directory"),
        (b"\xff\xfe not text\n", "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
    ],
)
def test_unreadable_token_file(tmp_path: Path, content: bytes | None, problem: str) -> None:
    path = tmp_path / "tokens"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as error:
        load_config("{}", env={"TOKEN_FILE": str(path)})
    assert str(error.value) == f"{path}: cannot read token file: {problem}"


def test_no_token_means_open(make_client: ClientFactory) -> None:
    assert load_config("{}").tokens == ()


async def test_open_service_without_tokens(make_client: ClientFactory) -> None:
    client = await make_client("workflow:\n  echo: {tasks: [echo]}\n")
    response = await client.post("/workflow", json={"name": "echo", "elements": [1]})
    assert response.status == 200


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "challenge"),
    [
        ("POST", "/workflow", {}, 401, REALM),
        ("POST", "/workflow", {"Authorization": "Basic dXNlcjpwYXNz"}, 401, REALM),
        ("POST", "/workflow", {"Authorization": "Bearer"}, 400, f'{REALM}, error="invalid_request"'),
        ("POST", "/workflow", {"Authorization": "Bearer "}, 400, f'{REALM}, error="invalid_request"'),
        ("POST", "/workflow", {"Authorization": "Bearer a b"}, 400, f'{REALM}, error="invalid_request"'),
        ("POST", "/workflow", {"Authorization": "Bearer tok€n"}, 400, f'{REALM}, error="invalid_request"'),
        ("POST", "/workflow", {"Authorization": "Bearer wrong-token"}, 401, f'{REALM}, error="invalid_token"'),
        ("POST", "/workflow", {"Authorization": f"Bearer {TOKEN_HASH}"}, 401, f'{REALM}, error="invalid_token"'),
        ("POST", "/workflow", {"Authorization": f"Bearer {TOKEN}"}, 200, None),
        ("POST", "/workflow", {"Authorization": f"bearer {TOKEN}"}, 200, None),
        ("GET", "/nowhere", {}, 401, REALM),
        ("GET", "/nowhere", {"Authorization": f"Bearer {TOKEN}"}, 404, None),
        ("GET", "/health", {}, 200, None),
        ("GET", "/health", {"Authorization": "Bearer wrong"}, 200, None),
        ("POST", "/health", {}, 401, REALM),
    ],
)
async def test_authorization_answers(
    make_client: ClientFactory, method: str, path: str, headers: dict[str, str], status: int, challenge: str | None
) -> None:
    client = await make_client(CONFIG, env={"TOKEN": TOKEN_HASH})
    body = {"name": "echo", "elements": ["x"]} if method == "POST" else None
    response = await client.request(method, path, json=body, headers=headers)
    assert response.status == status
    assert response.headers.get("WWW-Authenticate") == challenge
    payload = await response.json()
    assert ("error" in payload) == (status >= 400)


# Tokens as txtai takes them: any visible ASCII character (0x21-0x7E), not only RFC 6750's
# b64token ones. Each is the token of a configured hash: a wrong one would be 401, not 200.
VISIBLE_TOKENS = [
    "p@ss!w#rd",
    "!",
    "~",
    'a"b\\c',
    "a,b;c=d",
    "<>?[]{}|^`'%$&*()",
    "".join(map(chr, range(0x21, 0x7F))),  # every one of them
]


@pytest.mark.parametrize("token", VISIBLE_TOKENS)
async def test_any_visible_ascii_token_is_accepted(make_client: ClientFactory, token: str) -> None:
    client = await make_client(CONFIG, env={"TOKEN": sha(token)})
    body = {"name": "echo", "elements": ["x"]}
    response = await client.post("/workflow", json=body, headers={"Authorization": f"Bearer {token}"})
    assert response.status == 200, await response.text()
    # One character off is an unknown token (401), never a malformed header (400).
    response = await client.post("/workflow", json=body, headers={"Authorization": f"Bearer {token}x"})
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == f'{REALM}, error="invalid_token"'


# What is not one visible-ASCII token is malformed (400 invalid_request), even when the hash of
# exactly those characters is configured: white space inside, non-ASCII, several credentials.
MALFORMED_TOKENS = ["a\tb", "tok\x80n", "tokén", "a b", "a, Bearer b"]


@pytest.mark.parametrize("token", MALFORMED_TOKENS)
async def test_a_token_of_other_characters_is_malformed(make_client: ClientFactory, token: str) -> None:
    client = await make_client(CONFIG, env={"TOKEN": sha(token)})
    body = {"name": "echo", "elements": ["x"]}
    response = await client.post("/workflow", json=body, headers={"Authorization": f"Bearer {token}"})
    assert response.status == 400, await response.text()
    assert response.headers["WWW-Authenticate"] == f'{REALM}, error="invalid_request"'


# Control characters and DEL: aiohttp's C parser refuses them before any middleware (its own
# 400), its pure-Python one (AIOHTTP_NO_EXTENSIONS) may not: the middleware refuses them itself.
@pytest.mark.parametrize("token", ["a\x00b", "a\x01b", "a\x1fb", "a\x7fb", "\x7f", "a\x85b", "a\xa0b"])
async def test_a_token_with_control_characters_is_malformed(token: str) -> None:
    middleware = auth_middleware(TokenStore([Token("t", hashlib.sha256(token.encode()).digest())]), FailureThrottle())

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="reached")

    request = make_mocked_request("POST", "/workflow", headers={"Authorization": f"Bearer {token}"})
    with pytest.raises(web.HTTPBadRequest) as refused:
        await middleware(request, handler)
    assert refused.value.headers["WWW-Authenticate"] == f'{REALM}, error="invalid_request"'


async def test_two_authorization_headers_are_malformed(make_client: ClientFactory) -> None:
    client = await make_client(CONFIG, env={"TOKEN": TOKEN_HASH})
    headers = [("Authorization", f"Bearer {TOKEN}"), ("Authorization", f"Bearer {TOKEN}")]
    response = await client.post("/workflow", json={"name": "echo", "elements": []}, headers=headers)
    assert response.status == 400
    assert response.headers["WWW-Authenticate"].endswith('error="invalid_request"')


@pytest.mark.parametrize(
    ("workflow", "status"),
    [("echo", 200), ("upper", 403), ("missing", 403)],
)
async def test_scoped_token(make_client: ClientFactory, workflow: str, status: int) -> None:
    client = await make_client(CONFIG, env={"TOKEN": TOKEN_HASH})
    headers = {"Authorization": "Bearer reader-token"}
    response = await client.post("/workflow", json={"name": workflow, "elements": ["a"]}, headers=headers)
    assert response.status == status
    if status == 403:
        assert response.headers["WWW-Authenticate"] == f'{REALM}, error="insufficient_scope"'
        assert (await response.json())["error"] == f"this token may not run {workflow!r}"
    # The unscoped TOKEN runs everything that exists.
    response = await client.post(
        "/workflow", json={"name": workflow, "elements": ["a"]}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status == (404 if workflow == "missing" else 200)


async def test_a_refused_workflow_name_is_cut_short(make_client: ClientFactory) -> None:
    client = await make_client(CONFIG, env={"TOKEN": TOKEN_HASH})
    headers = {"Authorization": "Bearer reader-token"}
    response = await client.post("/workflow", json={"name": "x" * 5000, "elements": []}, headers=headers)
    assert response.status == 403
    assert (await response.json())["error"] == "this token may not run '" + "x" * 100 + "'"


def scope_app(scope: list[str] | None) -> web.Application:
    """A tiny app behind the auth middleware, with one token of that scope."""

    async def handler(request: web.Request) -> web.Response:
        return web.json_response("ok")

    store = TokenStore(
        [Token("t", hashlib.sha256(TOKEN.encode()).digest(), None if scope is None else frozenset(scope))]
    )
    app = web.Application(middlewares=[auth_middleware(store, FailureThrottle())])
    app.router.add_get("/health", handler)
    app.router.add_post("/workflow", handler)
    app.router.add_get("/stats", handler)
    app.router.add_route("*", r"/items/{id:\d+}", handler)
    return app


# (the token's list or None, method, path, may call)
SCOPE_CASES = [
    (None, "POST", "/workflow", True),
    (None, "GET", "/stats", True),
    (None, "GET", "/nowhere", True),  # on to its 404
    (["shout"], "GET", "/health", True),  # open to all
    (["shout"], "POST", "/workflow", True),  # the handler checks the workflow's name
    (["shout"], "GET", "/stats", False),
    (["shout"], "GET", "/items/7", False),
    (["shout"], "GET", "/workflow", False),  # no route (405): nothing revealed
    (["shout"], "GET", "/nowhere", False),  # no route (404): nothing revealed
    ([], "POST", "/workflow", True),  # and then may run no workflow
    ([], "GET", "/stats", False),
    (["shout", "/stats"], "GET", "/stats", True),
    (["shout", "/stats"], "POST", "/stats", False),  # no POST route there (405)
    (["shout", "/stats"], "GET", "/stats/", False),
    (["shout", "/stats"], "GET", "/items/7", False),
    (["/items/{id}"], "GET", "/items/7", True),  # the path as registered, without its regex
    (["/items/{id}"], "DELETE", "/items/7", True),  # every method of the path
    (["/items/{id}"], "GET", "/items/x", False),
    (["/items/7"], "GET", "/items/7", False),  # a concrete path is not the route's
    (["stats"], "GET", "/stats", False),  # a workflow name, not a path
    (["/workflow"], "POST", "/workflow", True),
]


@pytest.mark.parametrize(("scope", "method", "path", "allowed"), SCOPE_CASES)
async def test_scope_rule(aiohttp_client, scope: list[str] | None, method: str, path: str, allowed: bool) -> None:  # type: ignore[no-untyped-def]
    client = await aiohttp_client(scope_app(scope))
    response = await client.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"})
    if allowed:
        assert response.status != 403
    else:
        assert response.status == 403
        assert response.headers["WWW-Authenticate"] == f'{REALM}, error="insufficient_scope"'
        assert await response.json() == {"error": "this token may not call this route"}


def test_token_file_scopes_routes() -> None:
    (token,) = parse_token_file(f"{sha('ci')} ci shout,/stats,/items/{{id}}\n", "tokens")
    assert token.workflows == frozenset({"shout", "/stats", "/items/{id}"})
    assert token.may_run("shout") and not token.may_run("echo")


async def test_repeated_failures_are_throttled(make_client: ClientFactory) -> None:
    client = await make_client(CONFIG, env={"TOKEN": TOKEN_HASH})
    body = {"name": "echo", "elements": []}
    statuses = [
        (await client.post("/workflow", json=body, headers={"Authorization": f"Bearer bad{i}"})).status
        for i in range(12)
    ]
    assert statuses == [401] * 10 + [429] * 2
    # Even the right token waits now: a guesser cannot tell a hit from a miss.
    response = await client.post("/workflow", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 429
    assert 0 < int(response.headers["Retry-After"]) <= 60
    assert (await response.json())["error"] == "too many failed authorizations"
    # /health stays open.
    assert (await client.get("/health")).status == 200


async def test_a_success_does_not_reset_the_failures(make_client: ClientFactory) -> None:
    client = await make_client(CONFIG, env={"TOKEN": TOKEN_HASH})
    body = {"name": "echo", "elements": []}
    tokens = (["bad"] * 9 + [TOKEN]) * 2  # nine guesses and the right token, twice
    statuses = [
        (await client.post("/workflow", json=body, headers={"Authorization": f"Bearer {token}"})).status
        for token in tokens
    ]
    assert statuses == [401] * 9 + [200] + [401] + [429] * 9


# (failures as (count, time), time asked, seconds to wait): limit 10 in a 60 s window.
THROTTLE_CASES = [
    ([(9, 0)], 1, 0),
    ([(10, 0)], 0, 60),
    ([(10, 0)], 1, 59),
    ([(10, 0)], 59.5, 1),
    ([(10, 0)], 60, 0),  # the window has passed
    ([(10, 0)], 600, 0),
    ([(9, 0), (1, 59)], 59.5, 1),  # ten within the window
    ([(9, 0), (1, 60)], 60, 0),  # the tenth opened a new window
    ([(5, 0), (10, 61)], 62, 59),  # a window opened at 61 by the sixth-ever failure
    ([(10, 0), (10, 30)], 31, 29),  # failures while throttled do not extend the window
]


@pytest.mark.parametrize(("failures", "now", "wait"), THROTTLE_CASES)
def test_throttle_window(failures: list[tuple[int, float]], now: float, wait: int) -> None:
    throttle = FailureThrottle(limit=10, window=60)
    for count, when in failures:
        for _ in range(count):
            throttle.failed("1.2.3.4", now=when)
    assert throttle.retry_after("1.2.3.4", now=now) == wait
    assert throttle.retry_after("5.6.7.8", now=now) == 0  # others are not concerned


@pytest.mark.parametrize(
    ("when", "count", "wait"),
    [
        (61, 10, 59),  # ten in the window opened at 61, not fifteen in an old one
        (61, 9, 0),  # nine in the new window: not throttled yet
        (60, 10, 59),  # the old window ends at 60 exactly: the failure at 60 opens a new one
    ],
)
def test_a_window_ends_by_itself_while_another_is_open(when: float, count: int, wait: int) -> None:
    throttle = FailureThrottle(limit=10, window=60)
    for _ in range(5):
        throttle.failed("1.2.3.4", now=0)
    throttle.failed("5.6.7.8", now=31)  # a window open until 91
    for _ in range(count):
        throttle.failed("1.2.3.4", now=when)
    assert throttle.retry_after("1.2.3.4", now=when + 1) == wait


def test_an_ended_window_is_forgotten_when_asked_about() -> None:
    throttle = FailureThrottle(limit=10, window=60)
    for _ in range(10):
        throttle.failed("1.2.3.4", now=0)
    assert throttle.retry_after("1.2.3.4", now=60) == 0
    assert len(throttle) == 0


@pytest.mark.parametrize(
    ("window", "failures", "now", "active"),
    [
        (60, [], 0, False),
        (60, [0], 59.9, True),
        (60, [0], 60, False),
        (60, [0, 50], 109, True),
        (60, [0, 50], 110, False),
        (0.5, [0], 0.4, True),
        (0.5, [0], 0.5, False),  # a short window ends as soon
    ],
)
def test_throttle_is_active_while_a_window_is_open(
    window: float, failures: list[float], now: float, active: bool
) -> None:
    throttle = FailureThrottle(limit=10, window=window)
    for i, when in enumerate(failures):
        throttle.failed(f"10.0.0.{i}", now=when)
    assert throttle.active(now=now) is active


def test_throttle_memory_is_bounded() -> None:
    throttle = FailureThrottle(limit=3, window=10, max_clients=100)
    for i in range(10_000):  # an attacker cycling addresses
        throttle.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", now=30)
    assert len(throttle) == 100
    throttle.failed("1.2.3.4", now=40)  # every window has ended: the old entries go
    assert len(throttle) == 1


def test_throttle_forgets_the_least_recently_failing_first() -> None:
    throttle = FailureThrottle(limit=3, window=60, max_clients=2)
    for client in ("10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.3"):  # .2 is now the least recent
        for _ in range(3):
            throttle.failed(client, now=0)
    assert [throttle.retry_after(c, now=1) for c in ("10.0.0.1", "10.0.0.2", "10.0.0.3")] == [59, 0, 59]


def test_throttle_holds_ten_thousand_clients_by_default() -> None:
    throttle = FailureThrottle()
    for i in range(10_001):
        throttle.failed(f"10.0.{i // 256}.{i % 256}", now=0)
    assert len(throttle) == 10_000
    assert throttle.retry_after("10.0.0.0", now=1) == 0 and throttle.retry_after("10.0.0.1", now=1) == 0


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        (None, "-"),
    ],
)
def test_throttle_keys_ipv6_by_64(address: str | None, key: str) -> None:
    assert FailureThrottle.client_key(address) == key


def test_store_matches_in_constant_time_over_all_hashes() -> None:
    tokens = [Token(f"t{i}", hashlib.sha256(f"v{i}".encode()).digest()) for i in range(5)]
    store = TokenStore(tokens)
    assert store.match("v3") is tokens[3]
    assert store.match("v9") is None


@pytest.mark.parametrize("position", [0, 3, 4, 16, 31])
def test_every_byte_of_the_hash_counts(position: int) -> None:
    # A hash equal to the token's but for one byte: a comparison of part of the digest (its
    # first bytes, say) would take it.
    digest = bytearray(hashlib.sha256(TOKEN.encode()).digest())
    digest[position] ^= 0x01
    assert TokenStore([Token("near", bytes(digest))]).match(TOKEN) is None
    assert TokenStore([Token("near", bytes(digest)), Token("real", bytes.fromhex(TOKEN_HASH))]).match(TOKEN) == Token(
        "real", bytes.fromhex(TOKEN_HASH)
    )


async def test_a_near_hash_is_refused(make_client: ClientFactory) -> None:
    near = TOKEN_HASH[:-2] + format(int(TOKEN_HASH[-2:], 16) ^ 0xFF, "02x")
    client = await make_client(CONFIG, env={"TOKEN": near})
    response = await client.post(
        "/workflow", json={"name": "echo", "elements": []}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status == 401


async def test_identity_reaches_handlers(make_client: ClientFactory) -> None:
    client = await make_client(CONFIG + "extensions: [sample_plugins.add_whoami]\n", env={"TOKEN": TOKEN_HASH})
    response = await client.get("/whoami", headers={"Authorization": "Bearer reader-token"})
    assert await response.json() == {"name": "reader", "client_subject": None}


async def test_reload_reads_token_files_again(
    tmp_path: Path,
    aiohttp_client,
    caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{sha('old')} old\n")
    config = load_config("workflow:\n  echo: {tasks: [echo]}\n", env={"TOKEN_FILE": str(path)})
    app = create_app(config)
    client = await aiohttp_client(app)

    async def status(token: str) -> int:
        body = {"name": "echo", "elements": []}
        return (await client.post("/workflow", json=body, headers={"Authorization": f"Bearer {token}"})).status

    assert (await status("old"), await status("new")) == (200, 401)
    path.write_text(f"{sha('new')} new\n")
    await reload(app, config)
    assert (await status("old"), await status("new")) == (401, 200)

    # A reload that fails keeps the tokens in force and says why.
    path.write_text("garbage\n")
    with caplog.at_level(logging.ERROR):
        await reload(app, config)
    assert await status("new") == 200
    assert "token reload failed, keeping the 1 tokens in force" in caplog.text
