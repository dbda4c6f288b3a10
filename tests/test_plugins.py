"""DEPENDENCIES and EXTENSIONS: the user's own authorization code and routes."""

from __future__ import annotations

import logging
from hashlib import sha256

import pytest

from aioserver import load_config
from aioserver.errors import ConfigError

import sample_plugins
from conftest import TOKEN, TOKEN_HASH, ClientFactory

BASE = "workflow:\n  echo: {tasks: [echo]}\n"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEPENDENCIES = "sample_plugins.record_path,sample_plugins.deny_header, sample_plugins.RequireAgent"


@pytest.mark.parametrize(
    ("yaml_text", "env"),
    [
        (BASE, {"DEPENDENCIES": DEPENDENCIES}),
        (BASE + f"dependencies: [{DEPENDENCIES}]\n", {}),
        (BASE + "dependencies: [sample_plugins.crash]\n", {"DEPENDENCIES": DEPENDENCIES}),  # env wins
    ],
)
async def test_dependencies_run_after_the_token_check(
    make_client: ClientFactory, yaml_text: str, env: dict[str, str]
) -> None:
    client = await make_client(yaml_text, env={"TOKEN": TOKEN_HASH, **env})
    body = {"name": "echo", "elements": [1]}
    sample_plugins.SEEN.clear()

    assert (await client.post("/workflow", json=body)).status == 401
    assert sample_plugins.SEEN == []  # not reached without a valid token

    assert (await client.post("/workflow", json=body, headers=AUTH)).status == 200
    assert sample_plugins.SEEN == ["/workflow"]

    denied = await client.post("/workflow", json=body, headers={**AUTH, "X-Deny": "1"})
    assert denied.status == 403 and await denied.json() == {"error": "denied by policy"}

    denied = await client.post("/workflow", json=body, headers={**AUTH, "User-Agent": "evil/1"})
    assert denied.status == 403 and await denied.json() == {"error": "Forbidden"}

    assert (await client.get("/health")).status == 200
    assert sample_plugins.SEEN == ["/workflow"] * 3  # /health runs no dependency


async def test_failing_dependency_is_a_500_with_an_id(
    make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client(BASE, env={"DEPENDENCIES": "sample_plugins.crash"})
    with caplog.at_level(logging.ERROR):
        response = await client.post("/workflow", json={"name": "echo", "elements": []})
        text = await response.text()
    assert response.status == 500
    assert "secret-in-dependency" not in text and "Traceback" not in text
    assert (await response.json())["id"] in caplog.text
    assert (await client.get("/health")).status == 200


@pytest.mark.parametrize(
    ("yaml_text", "env"),
    [
        (BASE, {"EXTENSIONS": "sample_plugins.add_whoami,sample_plugins.AddRoutes"}),
        (BASE + "extensions: [sample_plugins.add_whoami, sample_plugins.AddRoutes]\n", {}),
    ],
)
async def test_extensions_add_routes_behind_authorization(
    make_client: ClientFactory, yaml_text: str, env: dict[str, str]
) -> None:
    client = await make_client(yaml_text, env={"TOKEN": TOKEN_HASH, **env})
    assert (await client.get("/hello")).status == 401
    response = await client.get("/hello", headers=AUTH)
    assert (response.status, await response.json()) == (200, "hello")
    response = await client.get("/whoami", headers=AUTH)
    assert await response.json() == {"name": "token", "client_subject": None}


SCOPED = (
    BASE
    + f"""auth:
  tokens:
    - {{name: ci, sha256: {sha256(b"ci-token").hexdigest()}, workflows: [echo, "/items/{{id}}"]}}
    - {{name: ops, sha256: {sha256(b"ops-token").hexdigest()}, workflows: [echo]}}
extensions: [sample_plugins.add_whoami, sample_plugins.add_items]
"""
)


@pytest.mark.parametrize(
    ("token", "method", "path", "status"),
    [
        ("ci-token", "GET", "/items/7", 200),
        ("ci-token", "PUT", "/items/7", 200),
        ("ci-token", "POST", "/workflow", 200),
        ("ci-token", "GET", "/whoami", 403),
        ("ci-token", "GET", "/stats", 403),
        ("ops-token", "GET", "/items/7", 403),
        ("ops-token", "GET", "/whoami", 403),
        ("ops-token", "POST", "/items/7", 403),
        ("ops-token", "GET", "/nowhere", 403),  # an unknown path reveals nothing to a scoped token
        ("ops-token", "GET", "/workflow", 403),
        ("ops-token", "POST", "/workflow", 200),
        ("ops-token", "GET", "/health", 200),
        (TOKEN, "GET", "/items/7", 200),
        (TOKEN, "GET", "/stats", 200),
        (TOKEN, "GET", "/whoami", 200),
        (TOKEN, "GET", "/nowhere", 404),
        (TOKEN, "GET", "/workflow", 405),
        (None, "GET", "/items/7", 401),
    ],
)
async def test_scopes_cover_extension_routes(
    make_client: ClientFactory, token: str | None, method: str, path: str, status: int
) -> None:
    client = await make_client(SCOPED, env={"TOKEN": TOKEN_HASH})
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"name": "echo", "elements": [1]}
    response = await client.request(method, path, json=body if method != "GET" else None, headers=headers)
    assert response.status == status
    if status == 403:
        assert response.headers["WWW-Authenticate"].endswith('error="insufficient_scope"')
        assert await response.json() == {"error": "this token may not call this route"}


@pytest.mark.parametrize(
    ("yaml_text", "env", "source", "key", "problem"),
    [
        ("{}", {"DEPENDENCIES": "nosuch.module"}, "environment", "DEPENDENCIES", "cannot load 'nosuch.module'"),
        ("{}", {"EXTENSIONS": "sample_plugins.SEEN"}, "environment", "EXTENSIONS", "is not callable"),
        ("dependencies: 3\n", {}, "<inline config>", "dependencies", "expected dotted paths"),
        ("extensions: [sample_plugins.nope]\n", {}, "<inline config>", "extensions", "AttributeError"),
    ],
)
def test_bad_plugins_are_config_errors(
    yaml_text: str, env: dict[str, str], source: str, key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(yaml_text, env=env)
    assert (error.value.source, error.value.key) == (source, key)
    assert problem in error.value.problem
