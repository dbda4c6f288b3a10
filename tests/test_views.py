"""The HTTP API through the aiohttp test client: results and every error status as JSON."""

from __future__ import annotations

import asyncio
import logging

import pytest

from conftest import ClientFactory

CONFIG = """
server:
  max_body_size: 2048
workflow:
  double: {tasks: [sample_actions.double]}
  shout: {tasks: [strip, upper]}
  boom: {tasks: [sample_actions.boom]}
  short: {tasks: [sample_actions.too_few]}
  object: {tasks: [sample_actions.not_json]}
  sleepy:
    tasks: [{action: sample_actions.sleepy, args: [1.0]}]
"""


async def test_health(make_client: ClientFactory) -> None:
    client = await make_client(CONFIG)
    response = await client.get("/health")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_run_workflow(make_client: ClientFactory) -> None:
    client = await make_client(CONFIG)
    response = await client.post("/workflow", json={"name": "double", "elements": [1, 2.5, "ab"]})
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == [2, 5.0, "abab"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        ("POST", "/workflow", b"{nope", 400, "body is not valid JSON"),
        ("POST", "/workflow", b"\xff\xfe", 400, "body is not valid JSON"),
        ("POST", "/workflow", b"", 400, "body is not valid JSON"),
        ("POST", "/workflow", b"[1]", 400, "body must be a JSON object"),
        ("POST", "/workflow", b'{"name": "double"}', 400, "'elements' must be a list"),
        ("POST", "/workflow", b'{"name": 1, "elements": []}', 400, "'name' must be a string"),
        ("POST", "/workflow", b'{"name": "double", "elements": {}}', 400, "'elements' must be a list"),
        ("POST", "/workflow", b'{"name": "double", "elements": [], "x": 1}', 400, "unknown key 'x'"),
        ("POST", "/workflow", b'{"name": "shout", "elements": [1]}', 400, "strip takes strings"),
        ("POST", "/workflow", b'{"name": "nope", "elements": []}', 404, "no workflow named 'nope'"),
        ("GET", "/nowhere", None, 404, "Not Found"),
        ("GET", "/workflow", None, 405, "Method Not Allowed"),
        ("POST", "/health", b"", 405, "Method Not Allowed"),
        ("POST", "/workflow", b'{"name": "double", "elements": ["' + b"x" * 4096 + b'"]}', 413, None),
    ],
)
async def test_errors_are_json(
    make_client: ClientFactory, method: str, path: str, body: bytes | None, status: int, error: str | None
) -> None:
    client = await make_client(CONFIG)
    response = await client.request(method, path, data=body, headers={"Content-Type": "application/json"})
    assert response.status == status
    assert response.content_type == "application/json"
    payload = await response.json()
    assert set(payload) == {"error"}
    if error:
        assert error in payload["error"]
    if status == 405:
        assert "Allow" in response.headers


@pytest.mark.parametrize(
    ("name", "logged"),
    [
        ("boom", "RuntimeError: the action broke: secret-detail-42"),
        ("short", "returned 1 results for 2 elements"),
        ("object", "not JSON-serializable"),
    ],
)
async def test_failures_are_500_with_an_id_in_the_log(
    make_client: ClientFactory, caplog: pytest.LogCaptureFixture, name: str, logged: str
) -> None:
    client = await make_client(CONFIG)
    with caplog.at_level(logging.ERROR, logger="aioserver.error"):
        response = await client.post("/workflow", json={"name": name, "elements": [1, 2]})
        text = await response.text()
    assert response.status == 500
    payload = await response.json()
    assert set(payload) == {"error", "id"} and payload["id"] in payload["error"]
    assert "Traceback" not in text and "secret-detail" not in text and "sample_actions" not in text
    record = next(r for r in caplog.records if payload["id"] in r.getMessage())
    assert record.exc_info is not None and logged in caplog.text

    # The server is still there for the next request.
    response = await client.post("/workflow", json={"name": "double", "elements": [1]})
    assert await response.json() == [2]


async def test_sync_action_does_not_block_health(make_client: ClientFactory) -> None:
    client = await make_client(CONFIG)
    slow = asyncio.ensure_future(client.post("/workflow", json={"name": "sleepy", "elements": ["z"]}))
    await asyncio.sleep(0.2)
    health = await client.get("/health")
    assert health.status == 200
    assert not slow.done()  # answered while the 1 s sync action still sleeps
    response = await slow
    assert await response.json() == ["z"]
