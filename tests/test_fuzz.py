"""Fuzzing the request surface: whatever a client sends, the answer is JSON, a client mistake
is never a 500, and no secret is ever in the answer."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from aioserver.auth import FailureThrottle, Token, TokenStore, auth_middleware

from conftest import TOKEN, TOKEN_HASH, ClientFactory

CONFIG = """
workflow:
  echo: {tasks: [echo]}
  upper: {tasks: [upper]}
  shout: {tasks: [strip, upper, {action: template, args: {template: "{}!"}}]}
  inspect: {tasks: [{action: [upper, length]}]}
  greet: {tasks: [{action: template, args: {template: "Hello, {name}."}}]}
"""
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
header_values = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"), max_size=80
).map(str.strip)


def assert_clean(status: int, text: str, allowed: set[int]) -> Any:
    assert status in allowed, (status, text)
    payload = json.loads(text)
    assert TOKEN_HASH not in text
    if status >= 400:
        assert set(payload) == {"error"} and isinstance(payload["error"], str)
    return payload


async def _client(make_client: ClientFactory) -> TestClient:
    return await make_client(CONFIG, env={"TOKEN": TOKEN_HASH})


@FUZZ
@given(value=header_values)
async def test_authorization_header_values(value: str) -> None:
    # Straight through the middleware, with a fresh throttle each time so that every value
    # reaches the parser (over HTTP, the throttle would answer 429 after ten failures).
    store = TokenStore([Token("token", bytes.fromhex(TOKEN_HASH))])
    middleware = auth_middleware(store, FailureThrottle())
    request = make_mocked_request("POST", "/workflow", headers={"Authorization": value})

    async def handler(request: web.Request) -> web.Response:
        return web.json_response("ok")

    try:
        response = await middleware(request, handler)
        status = response.status
    except web.HTTPException as exc:
        status = exc.status
        assert exc.headers["WWW-Authenticate"].startswith('Bearer realm="aioserver"')
    valid = value[:7].lower() == "bearer " and value[7:].strip() == TOKEN
    assert status in ({200} if valid else {400, 401})


@FUZZ
@given(body=json_values)
async def test_any_json_body(make_client: ClientFactory, body: Any) -> None:
    client = await _client(make_client)
    # data, not json=: json=None would send no body at all.
    response = await client.post("/workflow", data=json.dumps(body), headers={**AUTH, **JSON})
    assert_clean(response.status, await response.text(), {200, 400, 404})


@FUZZ
@given(name=st.sampled_from(["echo", "upper", "shout", "inspect", "greet"]), elements=st.lists(json_values, max_size=8))
@example(name="echo", elements=[[None, []], ["id", [1, 2], None], [[1, 2]]])
async def test_any_elements(make_client: ClientFactory, name: str, elements: list[Any]) -> None:
    client = await _client(make_client)
    response = await client.post("/workflow", json={"name": name, "elements": elements}, headers=AUTH)
    payload = assert_clean(response.status, await response.text(), {200, 400})
    if response.status == 200:
        assert isinstance(payload, list) and len(payload) == _answers(name, elements)


def _answers(name: str, elements: list[Any]) -> int:
    """How many elements a built-in workflow answers: one per element, but echo gives back the
    data of an array [id, data, ...] that is a list as one element per item (txtai's one-to-many)."""
    if name != "echo":
        return len(elements)
    return sum(len(e[1]) if isinstance(e, list) and len(e) > 1 and isinstance(e[1], list) else 1 for e in elements)


@FUZZ
@given(raw=st.binary(max_size=200))
async def test_any_bytes_body(make_client: ClientFactory, raw: bytes) -> None:
    client = await _client(make_client)
    response = await client.post("/workflow", data=raw, headers={**AUTH, **JSON})
    assert_clean(response.status, await response.text(), {200, 400, 404})


@FUZZ
@given(name=st.text(max_size=300))
async def test_any_workflow_name(make_client: ClientFactory, name: str) -> None:
    client = await _client(make_client)
    response = await client.post("/workflow", json={"name": name, "elements": ["a"]}, headers=AUTH)
    assert_clean(response.status, await response.text(), {200, 400, 404})


@FUZZ
@given(path=st.text(max_size=60), method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
async def test_any_path(make_client: ClientFactory, path: str, method: str) -> None:
    client = await _client(make_client)
    url = "/" + quote(path.lstrip("/"), safe="/")  # "//x" would be a URL of another host
    for headers in (AUTH, {}):
        response = await client.request(method, url, headers={**headers, **JSON}, data=b"{}")
        text = await response.text()
        if headers is not AUTH and (url, method) != ("/health", "GET"):
            assert_clean(response.status, text, {401})  # decided before routing
        else:
            assert_clean(response.status, text, {200, 400, 404, 405})
