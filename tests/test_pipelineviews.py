"""txtai's pipeline routes (/textract, /segment, /summary and their batch forms), as deployed.

Each test runs ``python -m aioserver`` (both loops, see conftest) and asks it over real sockets.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from conftest import TOKEN, TOKEN_HASH, Server

SCOPED = "scoped-token-2f0c5e1a"  # may run echo and call /segment only
JSON = {"Content-Type": "application/json"}
ARTICLE = (
    "Solar power is growing fast across the world. Cheap solar panels have made solar power the cheapest "
    "electricity in many countries. My neighbour painted his fence blue. Storage batteries now let solar power "
    "reach homes at night. The weather was nice yesterday. Analysts expect solar power and batteries to keep growing."
)
BEST = "Cheap solar panels have made solar power the cheapest electricity in many countries."
HTML = "<html><head><title>News</title></head><body><nav>Menu</nav><p>First  paragraph.</p><p>Second.</p></body></html>"


def config(directory: Path, allow: str = "", sections: str | None = None, server: str = "") -> str:
    if sections is None:
        sections = "textractor: {paragraphs: true}\nsegmentation: {lines: true}\nsummary: {sentences: 1}\n"
    return f"""
{sections}
server: {{{server}}}
safeopen: {{directory: "{directory}", allow: [{allow}]}}
workflow:
  echo: {{tasks: [echo]}}
  nap: {{tasks: [{{action: sample_actions.async_sleepy, args: [30]}}]}}
auth:
  tokens:
    - {{name: admin, sha256: {TOKEN_HASH}}}
    - {{name: scoped, sha256: {hashlib.sha256(SCOPED.encode()).hexdigest()}, workflows: [echo, /segment]}}
"""


def serve(tmp_path: Path, *args: str, **kwargs: Any) -> Server:
    path = tmp_path / "config.yml"
    path.write_text(config(tmp_path, **kwargs))
    return Server("--config", str(path), *args)


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def call(
    port: int, method: str, path: str, body: Any = None, token: str | None = TOKEN, **params: str | int
) -> tuple[int, Any]:
    headers = {**(bearer(token) if token else {}), **(JSON if body is not None else {})}
    data = json.dumps(body) if body is not None else None
    async with aiohttp.ClientSession() as session:
        async with session.request(
            method, f"http://127.0.0.1:{port}{path}", params=params or None, data=data, headers=headers
        ) as response:
            assert response.content_type == "application/json", await response.text()
            return response.status, await response.json()


async def test_segment_and_batchsegment(tmp_path: Path) -> None:
    with serve(tmp_path) as server:
        port = server.port
        assert await call(port, "GET", "/segment", text="a  b\nc\n\nd") == (200, ["a b", "c", "d"])
        assert await call(port, "POST", "/batchsegment", ["a\nb", "c", ""]) == (200, [["a", "b"], ["c"], []])
        assert await call(port, "POST", "/batchsegment", []) == (200, [])


async def test_summary_and_batchsummary_take_txtais_lengths(tmp_path: Path) -> None:
    two = BEST + " Analysts expect solar power and batteries to keep growing."
    with serve(tmp_path) as server:
        port = server.port
        assert await call(port, "GET", "/summary", text=ARTICLE) == (200, BEST)
        assert await call(port, "GET", "/summary", text=ARTICLE, minlength=20) == (200, two)
        assert await call(port, "GET", "/summary", text=ARTICLE, maxlength=5) == (200, "Cheap solar panels have made")
        assert await call(port, "GET", "/summary", text=ARTICLE, minlength=0, maxlength=0) == (200, BEST)  # none
        body = {"texts": [ARTICLE, ARTICLE], "minlength": 20, "maxlength": None}
        assert await call(port, "POST", "/batchsummary", body) == (200, [two, two])
        assert await call(port, "POST", "/batchsummary", {"texts": [ARTICLE], "maxlength": 5}) == (
            200,
            ["Cheap solar panels have made"],
        )


@pytest.fixture
async def website() -> AsyncIterator[int]:
    """A web page on 127.0.0.1, which safeopen refuses unless its config allows it."""
    app = web.Application()

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=HTML, content_type="text/html")

    app.router.add_get("/page.html", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert runner.addresses
    yield runner.addresses[0][1]
    await runner.cleanup()


async def test_textract_goes_through_safeopen(tmp_path: Path, website: int) -> None:
    inside = tmp_path / "page.html"
    inside.write_text(HTML)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.html"
    outside.write_text(HTML)
    expected = ["News", "First paragraph.", "Second."]
    url = f"http://127.0.0.1:{website}/page.html"
    with serve(tmp_path) as server:
        port = server.port
        assert await call(port, "GET", "/textract", file=str(inside)) == (200, expected)
        assert await call(port, "GET", "/textract", file=HTML) == (200, expected)  # not a path: the HTML itself
        assert await call(port, "POST", "/batchtextract", [str(inside), HTML]) == (200, [expected, expected])
        for element in (str(outside), "/etc/hostname", f"{tmp_path}/../{outside.name}", "file:///etc/hostname"):
            status, answer = await call(port, "GET", "/textract", file=element)
            assert status == 400 and "safeopen" in answer["error"] or "file: URLs" in answer["error"], answer
        # A loopback URL is not public: refused, and no request made to it.
        status, answer = await call(port, "GET", "/textract", file=url)
        assert (status, answer) == (400, {"error": f"refused {url!r}: not allowed by safeopen"})
    with serve(tmp_path, allow=f'"127.0.0.1:{website}"') as server:
        assert await call(server.port, "GET", "/textract", file=url) == (200, expected)


async def test_routes_follow_the_sections(tmp_path: Path) -> None:
    with serve(tmp_path, sections="segmentation: {}\n") as server:
        port = server.port
        assert await call(port, "GET", "/segment", text="a  b") == (200, "a b")
        for method, path in (("GET", "/summary"), ("POST", "/batchsummary"), ("GET", "/textract")):
            assert (await call(port, method, path, [] if method == "POST" else None, text="x"))[0] == 404
            # Without a token, 401 before 404: nobody learns which pipelines are configured.
            assert (await call(port, method, path, [] if method == "POST" else None, token=None, text="x"))[0] == 401


async def test_authorization_of_pipeline_routes(tmp_path: Path) -> None:
    with serve(tmp_path) as server:
        port = server.port
        assert (await call(port, "GET", "/segment", token=None, text="a"))[0] == 401
        assert (await call(port, "GET", "/segment", token="wrong", text="a"))[0] == 401
        assert (await call(port, "GET", "/segment", token="p@ss!", text="a"))[0] == 401  # visible ASCII: a token
        # A token scoped to workflows calls a pipeline route only when its list names the path.
        assert await call(port, "GET", "/segment", token=SCOPED, text="a") == (200, ["a"])
        for method, path in (("POST", "/batchsegment"), ("GET", "/summary"), ("GET", "/textract")):
            body = ["a"] if method == "POST" else None
            status, answer = await call(port, method, path, body, token=SCOPED, text="a", file="a")
            assert (status, answer) == (403, {"error": "this token may not call this route"})


async def test_bad_requests_are_json_errors(tmp_path: Path) -> None:
    with serve(tmp_path, server="max_body_size: 4096") as server:
        port = server.port
        cases: list[tuple[str, str, Any, dict[str, Any], str]] = [
            ("GET", "/segment", None, {}, "missing query parameter 'text'"),
            ("GET", "/textract", None, {"text": "a"}, "missing query parameter 'file'"),
            (
                "GET",
                "/summary",
                None,
                {"text": "a", "minlength": "ten"},
                "query parameter 'minlength' must be a number of tokens",
            ),
            (
                "GET",
                "/summary",
                None,
                {"text": "a", "maxlength": "-1"},
                "query parameter 'maxlength' must be a number of tokens",
            ),
            (
                "GET",
                "/summary",
                None,
                {"text": "a", "maxlength": "9" * 10},
                "query parameter 'maxlength' must be a number of tokens",
            ),
            ("POST", "/batchsegment", {"texts": ["a"]}, {}, "body must be a JSON array of strings"),
            ("POST", "/batchsegment", ["a", 1], {}, "body must be a JSON array of strings"),
            ("POST", "/batchtextract", "a", {}, "body must be a JSON array of strings"),
            ("POST", "/batchsummary", ["a"], {}, 'body must be a JSON object {"texts"'),
            ("POST", "/batchsummary", {"text": ["a"]}, {}, "unknown key 'text'"),
            ("POST", "/batchsummary", {"minlength": 1}, {}, "'texts' is required"),
            ("POST", "/batchsummary", {"texts": "a"}, {}, "'texts' must be a list of strings"),
            ("POST", "/batchsummary", {"texts": ["a"], "minlength": "1"}, {}, "'minlength' must be a number"),
            ("POST", "/batchsummary", {"texts": ["a"], "maxlength": True}, {}, "'maxlength' must be a number"),
            ("POST", "/batchsummary", {"texts": ["a"], "maxlength": -2}, {}, "'maxlength' must be a number"),
        ]
        for method, path, body, params, error in cases:
            status, answer = await call(port, method, path, body, **params)
            assert status == 400 and answer["error"].startswith(error), (path, body, params, answer)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", headers=bearer()) as session:
            # Repeated parameters: which one would count? Neither.
            async with session.get("/segment?text=a&text=b") as response:
                assert response.status == 400
                assert await response.json() == {"error": "query parameter 'text' given 2 times; give it once"}
            async with session.post("/batchsegment", data="[]", headers={"Content-Type": "text/plain"}) as response:
                assert response.status == 415
            async with session.post("/batchsegment", data="[", headers=JSON) as response:
                assert (response.status, await response.json()) == (400, {"error": "body is not valid JSON"})
            async with session.post("/batchsegment", data=json.dumps(["a" * 5000]), headers=JSON) as response:
                assert response.status == 413
            async with session.head("/segment?text=a") as response:
                assert response.status == 405  # HEAD would run the pipeline to send nothing
            async with session.post("/segment", data="[]", headers=JSON) as response:
                assert response.status == 405


async def test_pipeline_routes_take_a_slot_and_keep_the_time_limit(tmp_path: Path) -> None:
    text = "A b. " * 2_000_000  # 10 MB, 2,000,000 sentences to rank: many seconds of work
    args = ("--limit-concurrency", "1", "--timeout-workflow", "3", "--max-body-size", str(16 * 1024 * 1024))
    with serve(tmp_path, *args) as server:
        port = server.port
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", headers=bearer()) as session:
            # A workflow holds the only slot: the pipeline routes wait for none, they get 503.
            for _ in range(10):
                nap = asyncio.create_task(session.post("/workflow", json={"name": "nap", "elements": [1]}))
                await asyncio.sleep(0.5)
                if not nap.done():  # it holds the slot (else it came as another request held it)
                    break
                (await nap).close()
            async with session.get("/segment", params={"text": "a"}) as response:
                assert response.status == 503 and response.headers["Retry-After"] == "1"
            async with session.post("/batchsegment", json=["a"]) as response:
                assert response.status == 503
            async with session.post("/batchsummary", json={"texts": ["a"]}) as response:
                assert response.status == 503
            async with await nap as response:
                assert response.status == 504
            # Past --timeout-workflow, 504; meanwhile /health answers, the work being elsewhere.
            body = io.BytesIO(json.dumps({"texts": [text]}).encode())  # as aiohttp wants a big body
            summary = asyncio.create_task(session.post("/batchsummary", data=body, headers=JSON))
            await asyncio.sleep(1)
            started = time.monotonic()
            async with session.get("/health") as response:
                assert response.status == 200
            assert time.monotonic() - started < 1.5
            async with await summary as response:
                assert response.status == 504
                assert await response.json() == {"error": "the workflow took longer than 3s"}
