"""DEPENDENCIES and EXTENSIONS: the user's own authorization code and routes."""

from __future__ import annotations

import logging

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
