"""safeopen against real local servers: allowed when listed, refused otherwise, never contacted."""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from aioserver import load_config
from aioserver.errors import ConfigError

PAGE = """<html><head><title>Owls</title><style>p {color: red}</style><script>var x = "SCRIPT";</script></head>
<body><nav><a href="/">Home</a> | <a href="/about">NAVIGATION</a></nav>
<p>Owls are birds of prey that hunt mostly at night.</p>
<p>They have large eyes and silent feathers.</p>
<footer>FOOTER copyright</footer></body></html>"""


class Upstream:
    """A real aiohttp server on 127.0.0.1 that counts the requests it gets."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.server: TestServer | None = None
        self.redirect_to = ""

    async def start(self) -> Upstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    @property
    def port(self) -> int:
        assert self.server is not None and self.server.port is not None
        return self.server.port

    def url(self, path: str = "/page.html") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path_qs)
        if request.path == "/redirect":
            raise web.HTTPFound(self.redirect_to)
        if request.path == "/fail":
            return web.json_response({"error": "no"}, status=503)
        if request.path == "/big":
            return web.Response(body=b"x" * 5000)
        if request.path == "/api":
            data = await request.json() if request.method == "POST" else request.query.getall("q")
            texts = data if isinstance(data, list) else [data]
            return web.json_response({"data": {"results": [str(t).upper() for t in texts]}})
        if request.path == "/one":
            return web.json_response({"result": request.query["q"][::-1]})
        return web.Response(text=PAGE, content_type="text/html")


@pytest.fixture
async def upstream() -> Upstream:  # type: ignore[misc]
    server = await Upstream().start()
    yield server
    assert server.server is not None
    await server.server.close()


def config(allow: list[str], tasks: str, extra: str = "") -> str:
    return f"safeopen:\n  allow: {json.dumps(allow)}\n  max_bytes: 1000\n{extra}workflow:\n  w:\n    tasks: {tasks}\n"


Post = Callable[[str, list], Awaitable[tuple[int, object]]]  # type: ignore[type-arg]


@pytest.fixture
def post(make_client):  # type: ignore[no-untyped-def]
    async def run(yaml_text: str, elements: list) -> tuple[int, object]:  # type: ignore[type-arg]
        client = await make_client(yaml_text)
        response = await client.post("/workflow", json={"name": "w", "elements": elements})
        return response.status, await response.json()

    return run


async def test_allowed_host_is_fetched(upstream: Upstream, post: Post) -> None:
    status, body = await post(config([f"127.0.0.1:{upstream.port}"], "[textractor]"), [upstream.url()])
    assert status == 200, body
    assert body == [
        "Owls\n\nOwls are birds of prey that hunt mostly at night.\n\nThey have large eyes and silent feathers."
    ]
    assert upstream.hits == ["/page.html"]


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:{port}",
        "localhost:{port}",
        "[::1]:{port}",
        "127.1:{port}",
        "2130706433:{port}",
        "0x7f000001:{port}",
        "0177.0.0.1:{port}",
        "[::ffff:127.0.0.1]:{port}",
        "127.0.0.2:{port}",
    ],
)
async def test_loopback_spellings_are_refused_without_a_request(upstream: Upstream, post: Post, host: str) -> None:
    url = "http://" + host.format(port=upstream.port) + "/page.html"
    status, body = await post(config([], "[textractor]"), [url])
    assert status == 400, body
    assert isinstance(body, dict) and body["error"].startswith("refused ") and url.split("/")[2] in body["error"]
    assert upstream.hits == []


async def test_allow_by_port_only_admits_that_port(upstream: Upstream, post: Post) -> None:
    status, body = await post(
        config([f"127.0.0.1:{upstream.port + 1 if upstream.port < 65535 else 1}"], "[textractor]"), [upstream.url()]
    )
    assert status == 400 and upstream.hits == []


async def test_allow_by_cidr(upstream: Upstream, post: Post) -> None:
    status, _ = await post(config(["127.0.0.0/8"], "[textractor]"), [upstream.url()])
    assert status == 200 and upstream.hits == ["/page.html"]


async def test_redirect_to_another_loopback_port_is_refused(upstream: Upstream, post: Post) -> None:
    other = await Upstream().start()
    try:
        upstream.redirect_to = other.url()
        status, body = await post(config([f"127.0.0.1:{upstream.port}"], "[textractor]"), [upstream.url("/redirect")])
        assert status == 400, body
        assert isinstance(body, dict) and "127.0.0.1" in body["error"] and "not in safeopen.allow" in body["error"]
        assert upstream.hits == ["/redirect"] and other.hits == []
        # Allowed once listed: redirects are followed, hop by hop.
        allow = [f"127.0.0.1:{upstream.port}", f"127.0.0.1:{other.port}"]
        status, body = await post(config(allow, "[textractor]"), [upstream.url("/redirect")])
        assert status == 200 and other.hits == ["/page.html"]
    finally:
        assert other.server is not None
        await other.server.close()


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1:70/"])
async def test_redirect_to_another_scheme_is_refused(upstream: Upstream, post: Post, target: str) -> None:
    upstream.redirect_to = target
    status, body = await post(
        config([f"127.0.0.1:{upstream.port}"], "[{task: url, action: textractor}]"), [upstream.url("/redirect")]
    )
    assert status == 400 and "is not allowed" in body["error"]  # type: ignore[index]


async def test_answer_over_max_bytes_is_a_bad_gateway(upstream: Upstream, post: Post) -> None:
    status, body = await post(config(["127.0.0.1"], "[textractor]"), [upstream.url("/big")])
    assert status == 502 and "max_bytes" in body["error"]  # type: ignore[index]


def file_config(directory: Path, kind: str = "file") -> str:
    return f"safeopen:\n  directory: {directory}\nworkflow:\n  w:\n    tasks: [{{task: {kind}, action: textractor}}]\n"


async def test_files_under_the_directory_only(tmp_path: Path, post: Post) -> None:
    inside = tmp_path / "data"
    inside.mkdir()
    (inside / "page.html").write_text(PAGE)
    (tmp_path / "secret.html").write_text("<p>SECRET</p>")
    os.symlink(tmp_path / "secret.html", inside / "link.html")
    yaml_text = file_config(inside)

    status, body = await post(yaml_text, [str(inside / "page.html"), "./page.html", "plain text"])
    assert status == 200, body
    assert body[0] == body[1] and "Owls are birds" in body[0] and body[2] == "plain text"  # type: ignore[index]

    for element in [
        "../secret.html",
        str(tmp_path / "secret.html"),
        "./link.html",
        "file://" + str(inside / "page.html"),
        "./missing.html",
        "/etc/passwd",
    ]:
        status, body = await post(yaml_text, [element])
        assert status == 400, (element, body)
        assert isinstance(body, dict) and "SECRET" not in body["error"] and body["error"].startswith("refused")


async def test_no_directory_no_files(post: Post) -> None:
    status, body = await post("workflow:\n  w: {tasks: [textractor]}\n", ["/etc/hostname"])
    assert status == 400 and "no safeopen.directory" in body["error"]  # type: ignore[index]


async def test_service_post_batch_and_extract(upstream: Upstream, post: Post) -> None:
    task = f"[{{task: service, url: '{upstream.url('/api')}', method: post, batch: true, extract: [data, results]}}]"
    status, body = await post(config([f"127.0.0.1:{upstream.port}"], task), ["a", "b"])
    assert (status, body) == (200, ["A", "B"])


async def test_service_get_per_element(upstream: Upstream, post: Post) -> None:
    task = f"[{{task: service, url: '{upstream.url('/one')}', method: get, params: {{q: null}}, batch: false, extract: result}}]"
    status, body = await post(config([f"127.0.0.1:{upstream.port}"], task), ["abc", "xy"])
    assert (status, body) == (200, ["cba", "yx"])
    assert sorted(upstream.hits) == ["/one?q=abc", "/one?q=xy"]


async def test_service_non_2xx_is_502_naming_the_task(upstream: Upstream, post: Post) -> None:
    task = f"[echo, {{task: service, url: '{upstream.url('/fail')}'}}]"
    status, body = await post(config([f"127.0.0.1:{upstream.port}"], task), ["a"])
    assert status == 502
    assert body == {"error": f"task workflow.w.tasks[1] (service): {upstream.url('/fail')} answered HTTP 503"}


async def test_service_endpoint_not_allowed_is_refused(upstream: Upstream, post: Post) -> None:
    status, body = await post(config([], f"[{{task: service, url: '{upstream.url('/api')}'}}]"), ["a"])
    assert status == 400 and upstream.hits == []


@pytest.mark.parametrize(("flatten", "relative"), [(True, "page.html"), (False, "127.0.0.1_{port}/docs/page.html")])
async def test_retrieve(upstream: Upstream, post: Post, tmp_path: Path, flatten: bool, relative: str) -> None:
    task = f"[{{task: retrieve, directory: '{tmp_path}', flatten: {str(flatten).lower()}}}]"
    status, body = await post(
        config([f"127.0.0.1:{upstream.port}"], task), [upstream.url("/docs/page.html"), "not a url"]
    )
    expected = tmp_path / relative.format(port=upstream.port)
    assert (status, body) == (200, [str(expected), "not a url"])
    assert expected.read_text() == PAGE


async def test_retrieve_refused(upstream: Upstream, post: Post, tmp_path: Path) -> None:
    status, body = await post(config([], f"[{{task: retrieve, directory: '{tmp_path}'}}]"), [upstream.url()])
    assert status == 400 and upstream.hits == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("safeopen: [x]", "safeopen"),
        ("safeopen: {allowed: []}", "safeopen.allowed"),
        ("safeopen: {allow: [1]}", "safeopen.allow[0]"),
        ("safeopen: {allow: ['a b']}", "safeopen.allow[0]"),
        ("safeopen: {allow: ['127.1']}", "safeopen.allow[0]"),
        ("safeopen: {allow: ['h:70000']}", "safeopen.allow[0]"),
        ("safeopen: {directory: /no/such/dir}", "safeopen.directory"),
        ("safeopen: {max_bytes: 0}", "safeopen.max_bytes"),
        ("safeopen: {timeout: x}", "safeopen.timeout"),
    ],
)
def test_bad_safeopen_sections(section: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(section + "\n")
    assert info.value.key == key
