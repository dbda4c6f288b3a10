"""An upstream's redirect to a URL that cannot be parsed is a bad gateway (502), not our 500."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from conftest import ClientFactory

CANARY = "canary-b0a7"  # in the Location: the client must not see it
LOCATIONS = [f"http://{CANARY}:abc/", f"http://{CANARY}:99999/", f"http://[{CANARY}/", f"//{CANARY}:x/"]


@pytest.fixture
async def upstream() -> AsyncIterator[TestServer]:
    """A server on 127.0.0.1 whose /moved/N answers 302 with LOCATIONS[N], as is."""

    async def moved(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": LOCATIONS[int(request.match_info["n"])]})

    app = web.Application()
    app.router.add_route("*", "/moved/{n}", moved)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


@pytest.mark.parametrize("n", range(len(LOCATIONS)))
@pytest.mark.parametrize("task", ["url", "service"])
async def test_invalid_location_is_a_bad_gateway(
    make_client: ClientFactory, upstream: TestServer, n: int, task: str
) -> None:
    url = f"http://127.0.0.1:{upstream.port}/moved/{n}"
    tasks = "{task: url, action: textractor}" if task == "url" else f"{{task: service, url: '{url}'}}"
    config = f"safeopen: {{allow: ['127.0.0.1:{upstream.port}']}}\nworkflow:\n  w: {{tasks: [{tasks}]}}\n"
    client = await make_client(config)
    body = json.dumps({"name": "w", "elements": [url if task == "url" else "x"]})
    response = await client.post("/workflow", data=body, headers={"Content-Type": "application/json"})
    assert response.status == 502
    answer = await response.json()
    assert "redirected to an invalid URL" in answer["error"] and CANARY not in answer["error"]
