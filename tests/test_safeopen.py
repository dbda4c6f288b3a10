"""safeopen against real local servers: allowed when listed, refused otherwise, never contacted."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer
from yarl import URL

from aioserver import load_config
from aioserver.errors import ConfigError, UpstreamError
from aioserver.workflow.safeopen import (
    AddressRefused,
    AllowRule,
    Refused,
    SafeOpen,
    SafeResolver,
    create_session,
    fetch,
    parse_safeopen,
)

from conftest import PemFiles, Server, free_port

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
        return await self.more(request, *request.path.strip("/").split("/", 1))

    async def more(self, request: web.Request, route: str, arg: str = "0") -> web.StreamResponse:
        """Routes with an argument, for fetch's edges: /bytes/N, /status/N, /chain/N and so on."""
        if route == "bytes":  # N bytes
            return web.Response(body=b"x" * int(arg))
        if route == "status":  # status N, no Location
            return web.Response(status=int(arg), text="status")
        if route == "chain":  # N redirects, then the page
            return web.Response(status=302, headers={"Location": f"/chain/{int(arg) - 1}"}) if int(arg) else self.page()
        if route == "slow":  # N redirects of 0.3 s each, then the page
            await asyncio.sleep(0.3)
            return web.Response(status=302, headers={"Location": f"/slow/{int(arg) - 1}"}) if int(arg) else self.page()
        if route == "sleep":  # N seconds, then the page
            await asyncio.sleep(float(arg))
        if route == "located":  # a 200 with a Location: not a redirect
            return web.Response(text="here", headers={"Location": "/page.html"})
        if route == "moved":  # a redirect with status N to /echo
            return web.Response(status=int(arg), headers={"Location": "/echo"})
        if route == "echo":  # how it was asked
            return web.json_response({"method": request.method, "body": await request.text()})
        return self.page()

    def page(self) -> web.Response:
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
        "[::7f00:1]:{port}",  # IPv4-compatible
        "[64:ff9b::7f00:1]:{port}",  # NAT64
        "[2002:7f00:1::1]:{port}",  # 6to4
        "[::ffff:0:7f00:1]:{port}",  # IPv4-translated
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


async def test_redirect_to_another_loopback_port_is_refused(
    upstream: Upstream, post: Post, caplog: pytest.LogCaptureFixture
) -> None:
    other = await Upstream().start()
    try:
        upstream.redirect_to = other.url()
        with caplog.at_level(logging.WARNING, logger="aioserver.workflow.safeopen"):
            status, body = await post(
                config([f"127.0.0.1:{upstream.port}"], "[textractor]"), [upstream.url("/redirect")]
            )
        assert status == 400, body
        # The client learns that its URL was refused, not where it led: that may be inside.
        assert body == {"error": f"refused {upstream.url('/redirect')!r}: not allowed by safeopen (after a redirect)"}
        assert upstream.hits == ["/redirect"] and other.hits == []
        assert other.url() in caplog.text and "127.0.0.1 is not public and not in safeopen.allow" in caplog.text
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
    assert (status, body) == (
        400,
        {"error": f"refused {upstream.url('/redirect')!r}: not allowed by safeopen (after a redirect)"},
    )


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

    page = str(inside / "page.html")
    status, body = await post(yaml_text, [page, "./page.html", "page.html", "file://" + page, "plain text"])
    assert status == 200, body
    assert isinstance(body, list) and body[-1] == "plain text"
    assert all("Owls are birds" in text for text in body[:-1]) and len(set(body[:-1])) == 1

    # What is no file under the directory is none to a file task, which passes it through (as
    # txtai passes a missing file), reading nothing of it.
    elsewhere = ["../secret.html", str(tmp_path / "secret.html"), "./link.html", "./missing.html", "/etc/passwd"]
    assert await post(yaml_text, elsewhere) == (200, elsewhere)
    # Given to a pipeline directly, each is refused: one answer for all.
    for element in [*elsewhere, "file://" + page]:
        status, body = await post(file_config(inside, "default"), [element])
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
    task = f"[{{task: service, url: '{upstream.url('/one')}', method: get, params: {{q: null}}, batch: false,"
    task += " extract: result}]"
    status, body = await post(config([f"127.0.0.1:{upstream.port}"], task), ["abc", "xy"])
    assert (status, body) == (200, ["cba", "yx"])
    assert sorted(upstream.hits) == ["/one?q=abc", "/one?q=xy"]


async def test_service_non_2xx_is_502_naming_the_task(upstream: Upstream, post: Post) -> None:
    task = f"[echo, {{task: service, url: '{upstream.url('/fail')}'}}]"
    status, body = await post(config([f"127.0.0.1:{upstream.port}"], task), ["a"])
    assert status == 502
    assert body == {"error": "task workflow.w.tasks[1] (service) failed: the upstream answered HTTP 503"}


async def test_service_endpoint_not_allowed_is_refused(upstream: Upstream, post: Post) -> None:
    status, body = await post(config([], f"[{{task: service, url: '{upstream.url('/api')}'}}]"), ["a"])
    assert status == 400 and upstream.hits == []


@pytest.mark.parametrize(("flatten", "relative"), [(True, "page.html"), (False, "docs/page.html")])
async def test_retrieve(upstream: Upstream, post: Post, tmp_path: Path, flatten: bool, relative: str) -> None:
    task = f"[{{task: retrieve, directory: '{tmp_path}', flatten: {str(flatten).lower()}}}]"
    yaml_text = config([f"127.0.0.1:{upstream.port}"], task)
    status, body = await post(yaml_text, [upstream.url("/docs/page.html")])
    expected = tmp_path / relative
    assert (status, body) == (200, [str(expected)])
    assert expected.read_text() == PAGE
    # Neither a URL nor a file under safeopen.directory (there is none): the client's error.
    status, body = await post(yaml_text, ["not a url"])
    assert status == 400 and body["error"].startswith("refused 'not a url'")  # type: ignore[index]


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


# -- which addresses are public: tables that pin the policy down, address by address

POLICY = parse_safeopen({}, "test")

REFUSED = [
    # IPv4: private, loopback, link-local (cloud metadata), and the special ranges is_private misses
    "127.0.0.1",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",  # shared address space (CGNAT): neither private nor global
    "100.127.255.254",
    "192.0.0.1",  # IETF protocol assignments: the whole /24, PCP and TURN anycast included
    "192.0.0.9",
    "192.0.0.10",
    "192.0.0.170",
    "198.18.0.1",  # benchmarking
    "198.19.255.254",
    "0.0.0.0",  # "this network": connecting to it reaches this host
    "0.1.2.3",
    "240.0.0.1",  # reserved
    "255.255.255.255",
    "224.0.0.1",  # multicast, which is_global calls global
    "239.255.255.250",
    "233.252.0.1",
    "192.0.2.1",  # documentation
    "198.51.100.1",
    "203.0.113.1",
    # IPv6
    "::",
    "::1",
    "::7f00:1",  # IPv4-compatible (deprecated): the whole ::/96 is refused
    "::808:808",
    "::ffff:127.0.0.1",  # IPv4-mapped: judged as the IPv4 address it carries
    "::ffff:10.0.0.1",
    "::ffff:100.64.0.1",
    "::ffff:0:7f00:1",  # IPv4-translated (SIIT): the whole ::ffff:0:0:0/96 is refused
    "::ffff:0:808:808",
    "64:ff9b::7f00:1",  # NAT64 well-known prefix: judged as the IPv4 address it carries
    "64:ff9b::a00:1",
    "64:ff9b::6440:1",
    "64:ff9b::a9fe:a9fe",
    "64:ff9b:1::a00:1",  # local-use NAT64: the whole /48 is refused
    "64:ff9b:1::808:808",
    "2002:7f00:1::1",  # 6to4: judged as the IPv4 address it carries
    "2002:a00:1::1",
    "2002:c0a8:101::1",
    "2001::1",  # Teredo: the whole 2001::/32 is refused
    "2001:0:808:808:8000:63bf:3fff:fdd2",
    "fec0::1",  # site-local (deprecated)
    "fc00::1",  # unique local
    "fd12:3456::1",
    "fe80::1",  # link-local
    "fe80::1%1",
    "100::1",  # discard
    "ff02::1",  # multicast, which is_global calls global
    "ff0e::1",
    "2001:db8::1",  # documentation
    "3fff::1",
    "5f00::1",  # SRv6 SIDs
]
PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.215.14",
    "2606:4700:4700::1111",
    "2a00:1450:4001:80b::200e",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",  # what DNS64 makes of a public IPv4 address
    "2002:808:808::1",
]


@pytest.mark.parametrize("address", REFUSED)
def test_permits_refuses_what_is_not_public(address: str) -> None:
    assert not POLICY.permits("host.example", ipaddress.ip_address(address), 80)


@pytest.mark.parametrize("address", PUBLIC)
def test_permits_public_addresses(address: str) -> None:
    assert POLICY.permits("host.example", ipaddress.ip_address(address), 80)


@pytest.mark.parametrize(
    ("rule", "address"),
    [
        ("10.0.0.0/8", "10.0.0.1"),
        ("100.64.0.0/10", "100.64.0.1"),
        ("64:ff9b:1::/48", "64:ff9b:1::a00:1"),
        ("fec0::/10", "fec0::1"),
        ("2002::/16", "2002:7f00:1::1"),
        ("64:ff9b::7f00:1", "64:ff9b::7f00:1"),
    ],
)
def test_allow_admits_what_it_lists_and_nothing_next_to_it(rule: str, address: str) -> None:
    listed = parse_safeopen({"allow": [rule]}, "test")
    assert listed.permits("host.example", ipaddress.ip_address(address), 80)
    assert not POLICY.permits("host.example", ipaddress.ip_address(address), 80)
    assert not listed.permits("host.example", ipaddress.ip_address("127.0.0.3"), 80)


def test_host_rule_admits_only_its_host_and_port() -> None:
    policy = parse_safeopen({"allow": ["good.example", "api.example:8080"]}, "test")
    inside = ipaddress.ip_address("10.0.0.1")
    assert policy.permits("good.example", inside, 80)
    assert policy.permits("GOOD.Example.", inside, 443)
    assert not policy.permits("evil.example", inside, 80)
    assert not policy.permits("good.example.evil.example", inside, 80)
    assert policy.permits("api.example", inside, 8080)
    assert not policy.permits("api.example", inside, 80)


class StubResolver(AbstractResolver):
    """What a DNS server says, table-driven: each name resolves to the addresses listed."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.calls: list[tuple[str, int, socket.AddressFamily]] = []
        self.closed = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.calls.append((host, port, family))
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self.names[host]
        ]

    async def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    "addresses",
    [
        ["93.184.215.14", "127.0.0.1"],
        ["127.0.0.1", "93.184.215.14"],
        ["93.184.215.14", "2606:4700::1", "fe80::1%2"],
        ["2606:4700::1", "64:ff9b::a00:1"],
    ],
)
async def test_resolver_refuses_a_name_if_any_address_is_refused(addresses: list[str]) -> None:
    resolver = SafeResolver(POLICY, StubResolver({"mixed.example": addresses}))
    with pytest.raises(AddressRefused) as info:
        await resolver.resolve("mixed.example", 80)
    assert info.value.host == "mixed.example" and info.value.port == 80
    assert not POLICY.permits("mixed.example", info.value.address, 80)


async def test_resolver_gives_back_every_public_address() -> None:
    addresses = ["93.184.215.14", "2606:4700::1", "1.1.1.1"]
    resolver = SafeResolver(POLICY, StubResolver({"public.example": addresses}))
    results = await resolver.resolve("public.example", 443)
    assert [r["host"] for r in results] == addresses
    await resolver.close()
    assert resolver._resolver.closed  # type: ignore[attr-defined]


async def test_resolver_host_rule_admits_only_its_host() -> None:
    policy = parse_safeopen({"allow": ["good.example"]}, "test")
    names = {"good.example": ["10.0.0.1", "127.0.0.1"], "evil.example": ["10.0.0.1"]}
    resolver = SafeResolver(policy, StubResolver(names))
    assert [r["host"] for r in await resolver.resolve("good.example", 80)] == ["10.0.0.1", "127.0.0.1"]
    with pytest.raises(AddressRefused):
        await resolver.resolve("evil.example", 80)


async def test_resolver_defaults_to_the_threaded_resolver() -> None:
    import aiohttp

    assert isinstance(SafeResolver(POLICY)._resolver, aiohttp.ThreadedResolver)


# -- what the client is told, and what the log keeps


async def test_refusal_by_name_does_not_say_where_the_name_leads(
    upstream: Upstream, post: Post, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://localhost:{upstream.port}/page.html"
    with caplog.at_level(logging.WARNING, logger="aioserver.workflow.safeopen"):
        status, body = await post(config([], "[textractor]"), [url])
    assert (status, body) == (400, {"error": f"refused {url!r}: not allowed by safeopen"})
    assert upstream.hits == []
    # The operator sees which address it was, and the name escaped.
    assert "'localhost' resolves to 127.0.0.1" in caplog.text or "'localhost' resolves to ::1" in caplog.text
    assert all(record.levelno == logging.WARNING for record in caplog.records if "safeopen" in record.name)


async def test_refusal_of_a_literal_is_generic_too(upstream: Upstream, post: Post) -> None:
    url = f"http://10.0.0.1:{upstream.port}/x"
    status, body = await post(config([], "[textractor]"), [url])
    assert (status, body) == (400, {"error": f"refused {url!r}: not allowed by safeopen"})


async def test_client_elements_are_truncated_in_errors_and_escaped_in_the_log(
    tmp_path: Path, post: Post, caplog: pytest.LogCaptureFixture
) -> None:
    url = "http://10.0.0.1/" + "a" * 500
    path = "./b\nWARNING forged line" + "b" * 500
    with caplog.at_level(logging.WARNING, logger="aioserver.workflow.safeopen"):
        status, body = await post(config([], "[{task: url, action: textractor}]"), [url])
        assert status == 400 and isinstance(body, dict) and body["error"].startswith("refused 'http://10.0.0.1/aaa")
        assert len(body["error"]) < 300
        status, body = await post(file_config(tmp_path, "default"), [path])
        assert status == 400 and isinstance(body, dict) and len(body["error"]) < 300
    assert "10.0.0.1 is not public" in caplog.text
    # One record per refusal, its client-supplied text escaped: no forged line in the log.
    assert "\\nWARNING forged line" in caplog.text and "\nWARNING forged" not in caplog.text


@pytest.mark.parametrize(
    "url",
    [
        "http://user:s3cret@10.0.0.1/?token=t0ken",
        "http://user:s3cret@localhost:1/?token=t0ken",
        "http://user:s3cret@127.1/?token=t0ken",
    ],
)
async def test_credentials_and_queries_never_reach_the_log(
    url: str, post: Post, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        status, _ = await post(config([], "[{task: url, action: textractor}]"), [url])
    assert status == 400 and "safeopen refused" in caplog.text
    assert "s3cret" not in caplog.text and "t0ken" not in caplog.text


async def test_service_errors_never_name_the_upstream(
    upstream: Upstream, post: Post, caplog: pytest.LogCaptureFixture
) -> None:
    port = str(upstream.port)
    with caplog.at_level(logging.WARNING, logger="aioserver.workflow.safeopen"):
        # Not allowed: refused before any request, without naming the URL.
        status, body = await post(config([], f"[{{task: service, url: '{upstream.url('/api')}'}}]"), ["a"])
        assert status == 400 and port not in json.dumps(body) and "127.0.0.1" not in json.dumps(body)
        assert body == {"error": "task workflow.w.tasks[0] (service) failed: its upstream is not allowed by safeopen"}
        # A redirect to somewhere not allowed.
        upstream.redirect_to = "http://10.0.0.1/inside"
        task = f"[{{task: service, url: '{upstream.url('/redirect')}'}}]"
        status, body = await post(config([f"127.0.0.1:{upstream.port}"], task), ["a"])
        assert status == 400 and port not in json.dumps(body) and "10.0.0.1" not in json.dumps(body)
        # A body over max_bytes, and a port where nothing listens.
        task = f"[{{task: service, url: '{upstream.url('/big')}'}}]"
        status, body = await post(config([f"127.0.0.1:{upstream.port}"], task), ["a"])
        assert status == 502 and port not in json.dumps(body) and "max_bytes" in json.dumps(body)
        closed = free_port()
        task = f"[{{task: service, url: 'http://127.0.0.1:{closed}/api'}}]"
        status, body = await post(config([f"127.0.0.1:{closed}"], task), ["a"])
        assert status == 502 and str(closed) not in json.dumps(body)
        assert body == {"error": "task workflow.w.tasks[0] (service) failed: the upstream could not be fetched"}
    # The log has it all: which URL, which address.
    assert upstream.url("/api") in caplog.text and "http://10.0.0.1/inside" in caplog.text
    assert upstream.url("/big") in caplog.text and f"http://127.0.0.1:{closed}/api" in caplog.text


async def test_retrieve_names_the_clients_url_not_where_it_led(upstream: Upstream, post: Post, tmp_path: Path) -> None:
    other = await Upstream().start()
    try:
        upstream.redirect_to = other.url("/fail")
        allow = [f"127.0.0.1:{upstream.port}", f"127.0.0.1:{other.port}"]
        task = f"[{{task: retrieve, directory: '{tmp_path}'}}]"
        status, body = await post(config(allow, task), [upstream.url("/redirect?k=secret")])
        assert status == 502 and other.hits == ["/fail"]
        assert body == {
            "error": f"task workflow.w.tasks[0] (retrieve) failed: {upstream.url('/redirect')!r} answered HTTP 503"
        }
    finally:
        assert other.server is not None
        await other.server.close()


# -- files: one answer for every path that cannot be read, so that no client maps the disk


async def test_file_refusals_all_look_alike(tmp_path: Path, post: Post, caplog: pytest.LogCaptureFixture) -> None:
    inside = tmp_path / "data"
    (inside / "folder").mkdir(parents=True)
    (tmp_path / "secret.html").write_text("<p>SECRET</p>")
    os.symlink(tmp_path / "secret.html", inside / "link.html")
    os.symlink("loop", inside / "loop")
    yaml_text = file_config(inside, "default")  # a pipeline given the path: no file task
    elements = {
        "~root/.profile": "no such file",  # with ~ expanded: "outside", so user root exists
        "./" + "c" * 300: "not a path",  # ENAMETOOLONG
        "~nosuchuser-3f9a/x": "no such file",
        "~": "no such file",
        "../secret.html": "outside",
        "./link.html": "outside",
        "/etc/passwd": "outside",
        "./missing.html": "no such file",
        "./folder": "not a file",
        "./loop": "Too many levels of symbolic links",
        "./a\x00b": "not a path",
    }
    with caplog.at_level(logging.WARNING, logger="aioserver.workflow.safeopen"):
        for element, reason in elements.items():
            caplog.clear()
            status, body = await post(yaml_text, [element])
            assert (status, body) == (400, {"error": f"refused {element[:200]!r}: not a file under safeopen.directory"})
            assert reason in caplog.text, (element, caplog.text)
    # A file task passes each through as it is; the log names those that lead outside.
    with caplog.at_level(logging.WARNING, logger="aioserver.workflow.safeopen"):
        for element, reason in elements.items():
            caplog.clear()
            assert await post(file_config(inside), [element]) == (200, [element])
            assert (reason in caplog.text) == (reason == "outside"), (element, caplog.text)


async def test_a_name_of_many_components_costs_one_stat(tmp_path: Path, post: Post) -> None:
    """resolve() stats every component of a name, even past a missing one: a name of 250,000
    held the event loop for many seconds (quadratic). One stat first says it leads nowhere."""
    yaml_text = (
        f"safeopen:\n  directory: {tmp_path}\nworkflow:\n  w: {{tasks: [{{task: file}}, {{task: retrieve, "
        f"directory: {tmp_path}}}]}}\n"
    )
    element = "./" + "x/" * 250_000
    async with asyncio.timeout(10):  # generous: it takes milliseconds
        status, body = await post(yaml_text, [element])
        assert status == 400 and body["error"].startswith("refused './x/x/x/")  # type: ignore[index]
        status, body = await post(file_config(tmp_path, "default"), [element])
        assert status == 400 and body["error"].startswith("refused './x/x/x/")  # type: ignore[index]


async def test_tilde_is_a_plain_name_under_the_directory(tmp_path: Path, post: Post) -> None:
    (tmp_path / "~notes.html").write_text(PAGE)
    (tmp_path / "~").mkdir()
    (tmp_path / "~" / "page.html").write_text(PAGE)
    status, body = await post(file_config(tmp_path), ["~notes.html", "~/page.html"])
    assert status == 200, body
    assert isinstance(body, list) and all("Owls are birds" in text for text in body)


# -- the real thing: python -m aioserver, its answers and its log


class FailingUpstream(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def failing_upstream() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FailingUpstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join()


def post_json(port: int, body: dict) -> tuple[int, dict]:  # type: ignore[type-arg]
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/workflow",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_for_log(server: Server, text: str) -> str:
    deadline = time.monotonic() + 5
    while text not in "".join(server.log) and time.monotonic() < deadline:
        time.sleep(0.05)
    return "".join(server.log)


def test_served_refusals_keep_internals_in_the_log(tmp_path: Path, failing_upstream: int) -> None:
    upstream = f"http://127.0.0.1:{failing_upstream}/internal-api"
    path = tmp_path / "config.yml"
    path.write_text(
        f"safeopen:\n  allow: ['127.0.0.1:{failing_upstream}']\n"
        "workflow:\n"
        "  fetch: {tasks: [textractor]}\n"
        f"  service: {{tasks: [{{task: service, url: '{upstream}'}}]}}\n"
    )
    with Server("--config", str(path)) as server:
        url = f"http://localhost:{free_port()}/"
        assert post_json(server.port, {"name": "fetch", "elements": [url]}) == (
            400,
            {"error": f"refused {url!r}: not allowed by safeopen"},
        )
        assert post_json(server.port, {"name": "service", "elements": ["a"]}) == (
            502,
            {"error": "task workflow.service.tasks[0] (service) failed: the upstream answered HTTP 500"},
        )
        log = wait_for_log(server, "internal-api")
    assert "WARNING aioserver.workflow.safeopen" in log
    assert "'localhost' resolves to" in log and f"{upstream!r} answered HTTP 500" in log


# -- the edges, one test per behaviour a mutant of safeopen.py once got past (tests/MUTANTS.md)


async def test_resolver_passes_host_port_and_family_on_and_checks_the_port() -> None:
    stub = StubResolver({"svc.example": ["10.0.0.1"], "scoped.example": ["fe80::1%2"]})
    policy = parse_safeopen({"allow": ["svc.example:8080", "fe80::/10"]}, "test")
    resolver = SafeResolver(policy, stub)
    assert [r["host"] for r in await resolver.resolve("svc.example", 8080, socket.AF_INET6)] == ["10.0.0.1"]
    assert stub.calls == [("svc.example", 8080, socket.AF_INET6)]
    with pytest.raises(AddressRefused) as info:
        await resolver.resolve("svc.example", 80)
    assert info.value.port == 80
    with pytest.raises(AddressRefused) as info:
        await resolver.resolve("svc.example")  # no port given: 0, which no port rule admits
    assert info.value.port == 0 and stub.calls[-1] == ("svc.example", 0, socket.AF_INET)
    assert [r["host"] for r in await resolver.resolve("scoped.example", 80)] == ["fe80::1%2"]


def test_allow_rules_as_parsed(tmp_path: Path) -> None:
    entries = ["[::1]:8080", "[::1]", "h:1", "h:65535", "Good.Example.", "10.0.0.1/8", "fd00::/8"]
    assert parse_safeopen({"allow": entries}, "test").allow == (
        AllowRule(network=ipaddress.ip_network("::1/128"), port=8080),
        AllowRule(network=ipaddress.ip_network("::1/128")),
        AllowRule(host="h", port=1),
        AllowRule(host="h", port=65535),
        AllowRule(host="good.example"),
        AllowRule(network=ipaddress.ip_network("10.0.0.0/8")),
        AllowRule(network=ipaddress.ip_network("fd00::/8")),
    )
    section = {"allow": "10.0.0.0/8", "directory": str(tmp_path), "max_bytes": 1, "timeout": 0.5, "max_redirects": 0}
    assert parse_safeopen(section, "test") == SafeOpen(
        allow=(AllowRule(network=ipaddress.ip_network("10.0.0.0/8")),),
        directory=tmp_path.resolve(),
        max_bytes=1,
        timeout=0.5,
        max_redirects=0,
    )
    assert parse_safeopen({"max_redirects": 2}, "test").max_redirects == 2
    assert parse_safeopen(None, "test") == SafeOpen() == parse_safeopen({}, "test")


KNOWN = "allow, directory, max_bytes, timeout, max_redirects"


@pytest.mark.parametrize(
    ("section", "key", "problem"),
    [
        (["x"], "safeopen", f"expected a mapping with keys {KNOWN}"),
        ({"allowed": []}, "safeopen.allowed", f"unknown key; known: {KNOWN}"),
        ({"allow": {"a": 1}}, "safeopen.allow", "expected a list of hosts, host:port or CIDRs"),
        ({"allow": [1]}, "safeopen.allow[0]", "expected a host, host:port or CIDR, got 1"),
        ({"allow": ["ok.example", " "]}, "safeopen.allow[1]", "expected a host, host:port or CIDR, got ' '"),
        ({"allow": ["h:0"]}, "safeopen.allow[0]", "port out of range in 'h:0'"),
        ({"allow": ["h:65536"]}, "safeopen.allow[0]", "port out of range in 'h:65536'"),
        ({"allow": ["a b"]}, "safeopen.allow[0]", "not a host name, address or CIDR: 'a b'"),
        ({"allow": ["host/8"]}, "safeopen.allow[0]", "not a host name, address or CIDR: 'host/8'"),
        ({"allow": ["127.1"]}, "safeopen.allow[0]", "not a host name, address or CIDR: '127.1'"),
        ({"directory": "/no/such/dir"}, "safeopen.directory", "not an existing directory: '/no/such/dir'"),
        ({"max_bytes": 0}, "safeopen.max_bytes", "expected a positive number, got 0"),
        ({"max_bytes": 1.5}, "safeopen.max_bytes", "expected a positive number, got 1.5"),
        ({"max_bytes": True}, "safeopen.max_bytes", "expected a positive number, got True"),
        ({"timeout": "x"}, "safeopen.timeout", "expected a positive number, got 'x'"),
        ({"timeout": 0}, "safeopen.timeout", "expected a positive number, got 0"),
        ({"max_redirects": -1}, "safeopen.max_redirects", "expected a non-negative number, got -1"),
        ({"max_redirects": 1.5}, "safeopen.max_redirects", "expected a non-negative number, got 1.5"),
    ],
)
def test_safeopen_section_errors_name_source_key_and_problem(section: object, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_safeopen(section, "test.yml")
    assert str(info.value) == f"test.yml: {key}: {problem}"


SECRETS = "user:s3cret@"


@pytest.mark.parametrize(
    ("url", "reason", "logged"),
    [
        (f"http://{SECRETS}[::1/?token=t0ken", "not a valid URL", "'<invalid URL>': not a valid URL"),
        (
            f"ftp://{SECRETS}x.example/?token=t0ken",
            "scheme 'ftp' is not allowed; only http and https",
            "'ftp://x.example/': scheme 'ftp' is not allowed; only http and https",
        ),
        (
            f"//{SECRETS}x.example/?token=t0ken",
            "scheme 'none' is not allowed; only http and https",
            "'//x.example/': scheme 'none' is not allowed; only http and https",
        ),
        ("http:///x?token=t0ken", "no host", "'<invalid URL>': no host"),
        (
            f"http://{SECRETS}127.1/?token=t0ken",
            "'127.1' is not a canonical IP address",
            "'http://127.1/': '127.1' is not a canonical IP address",
        ),
        (
            f"http://{SECRETS}10.0.0.1/?token=t0ken",
            "not allowed by safeopen",
            "'http://10.0.0.1/': address 10.0.0.1 is not public and not in safeopen.allow",
        ),
    ],
)
def test_check_url_tells_the_client_and_the_log_apart(
    url: str, reason: str, logged: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="aioserver.workflow.safeopen"):
        with pytest.raises(Refused) as info:
            POLICY.check_url(url)
    assert str(info.value) == f"refused {url!r}: {reason}"
    assert caplog.messages == [f"safeopen refused {logged}"]  # no credentials, no query


def test_check_url_literals_meet_host_and_port_rules() -> None:
    policy = parse_safeopen({"allow": ["good.example", "127.0.0.1:1"]}, "test")
    assert policy.check_url("http://good.example/") == URL("http://good.example/")
    assert policy.check_url("http://127.0.0.1:1/") == URL("http://127.0.0.1:1/")
    for url in ["http://10.0.0.1/", "http://127.0.0.1:0/", "http://127.0.0.1/"]:
        with pytest.raises(Refused):
            policy.check_url(url)


def test_check_file_tells_the_client_and_the_log_apart(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path.resolve() / "root"
    (root / "folder").mkdir(parents=True)
    (root.parent / "x").write_text("outside")
    policy = parse_safeopen({"directory": str(root)}, "test")
    file_url = "file: URLs are not allowed; give a path under safeopen.directory"
    long = "./" + "d" * 1500
    cases = [
        ("file:///etc/passwd", file_url, file_url),
        ("FILE:///etc/passwd", file_url, file_url),
        ("./missing?.html", NOT_A_FILE, "no such file"),
        ("../missing", NOT_A_FILE, "no such file"),
        ("./folder", NOT_A_FILE, "not a file"),
        ("../x", NOT_A_FILE, f"outside safeopen.directory (resolves to {str(root.parent / 'x')!r})"),
        (long, NOT_A_FILE, "not a path ([Errno 36] File name too long: " + repr(str(root / long[2:])) + ")"),
        ("x/" * 2048, NOT_A_FILE, "not a path (longer than PATH_MAX)"),
    ]
    with caplog.at_level(logging.WARNING, logger="aioserver.workflow.safeopen"):
        for element, reason, logged in cases:
            caplog.clear()
            with pytest.raises(Refused) as info:
                policy.check_file(element)
            assert str(info.value) == f"refused {element[:200]!r}: {reason}"
            assert caplog.messages == [f"safeopen refused {element[:1000]!r}: {logged}"]
        caplog.clear()
        with pytest.raises(Refused) as info:
            SafeOpen().check_file("./x")
    assert str(info.value) == "refused './x': no safeopen.directory is configured, so no file may be opened"
    assert caplog.messages == ["safeopen refused './x': no safeopen.directory is configured, so no file may be opened"]


NOT_A_FILE = "not a file under safeopen.directory"


@pytest.fixture
async def sessions() -> Iterator[Callable[[SafeOpen], aiohttp.ClientSession]]:  # type: ignore[misc]
    opened: list[aiohttp.ClientSession] = []

    def open_session(policy: SafeOpen) -> aiohttp.ClientSession:
        opened.append(create_session(policy))
        return opened[-1]

    yield open_session
    for session in opened:
        await session.close()


Sessions = Callable[[SafeOpen], aiohttp.ClientSession]


def local(upstream: Upstream, **settings: object) -> SafeOpen:
    return parse_safeopen({"allow": [f"127.0.0.1:{upstream.port}"], **settings}, "test")


async def test_fetch_follows_max_redirects_and_no_more(
    upstream: Upstream, sessions: Sessions, caplog: pytest.LogCaptureFixture
) -> None:
    policy = local(upstream, max_redirects=2)
    session = sessions(policy)
    body, content_type = await fetch(session, policy, upstream.url("/chain/2"))
    assert (body.decode(), content_type) == (PAGE, "text/html")
    with caplog.at_level(logging.WARNING, logger="aioserver.workflow.safeopen"):
        with pytest.raises(UpstreamError) as info:
            await fetch(session, policy, upstream.url("/chain/3?k=v"))
    assert str(info.value) == f"fetch failed: {upstream.url('/chain/3')!r} sent more than 2 redirects"
    assert caplog.messages == [f"fetch: {upstream.url('/chain/0')!r} sent more than 2 redirects"]


async def test_fetch_times_out_over_the_whole_chain(
    upstream: Upstream, sessions: Sessions, caplog: pytest.LogCaptureFixture
) -> None:
    policy = local(upstream, timeout=0.5)  # each hop takes 0.3 s, the three 0.9 s
    with caplog.at_level(logging.WARNING, logger="aioserver.workflow.safeopen"):
        with pytest.raises(UpstreamError) as info:
            await fetch(sessions(policy), policy, upstream.url("/slow/2"), who="textractor")
    assert str(info.value) == f"textractor failed: {upstream.url('/slow/2')!r} sent no complete answer within 0.5s"
    [message] = caplog.messages
    assert re.fullmatch(
        rf"textractor: 'http://127\.0\.0\.1:{upstream.port}/slow/\d' sent no complete answer within 0\.5s", message
    )


async def test_the_session_alone_times_out_and_ignores_proxy_settings(
    upstream: Upstream, sessions: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A plugin action may use runtime.session directly: the policy's timeout still holds, and
    # a proxy from the environment (which would connect to addresses never checked) is not used.
    proxy = await Upstream().start()
    try:
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.url(""))
        monkeypatch.setenv("http_proxy", proxy.url(""))
        session = sessions(local(upstream, timeout=0.5))
        async with session.get(upstream.url()) as response:
            assert response.status == 200
        with pytest.raises(TimeoutError):
            async with session.get(upstream.url("/sleep/3")):
                pass
        assert proxy.hits == [] and upstream.hits == ["/page.html", "/sleep/3"]
    finally:
        assert proxy.server is not None
        await proxy.server.close()


@pytest.mark.parametrize(("path", "status"), [("/status/300", 300), ("/status/302", 302), ("/status/503", 503)])
async def test_fetch_takes_2xx_only_and_redirects_only_with_location(
    upstream: Upstream, sessions: Sessions, caplog: pytest.LogCaptureFixture, path: str, status: int
) -> None:
    policy = local(upstream)
    session = sessions(policy)
    assert await fetch(session, policy, upstream.url("/located")) == (b"here", "text/plain")
    assert await fetch(session, policy, upstream.url("/status/299")) == (b"status", "text/plain")
    with caplog.at_level(logging.WARNING, logger="aioserver.workflow.safeopen"):
        with pytest.raises(UpstreamError) as info:
            await fetch(session, policy, upstream.url(path), who="w")
    assert str(info.value) == f"w failed: {upstream.url(path)!r} answered HTTP {status}"
    assert caplog.messages == [f"w: {upstream.url(path)!r} answered HTTP {status}"]


@pytest.mark.parametrize(
    ("status", "method", "body"),
    [(301, "GET", ""), (302, "GET", ""), (303, "GET", ""), (307, "POST", '{"a": 1}'), (308, "POST", '{"a": 1}')],
)
async def test_fetch_redirects_a_post_as_browsers_do(
    upstream: Upstream, sessions: Sessions, status: int, method: str, body: str
) -> None:
    policy = local(upstream)
    session = sessions(policy)
    answer, _ = await fetch(session, policy, upstream.url(f"/moved/{status}"), method="POST", json={"a": 1})
    assert json.loads(answer) == {"method": method, "body": body}
    answer, _ = await fetch(session, policy, upstream.url(f"/moved/{status}"), method="POST", data=b"raw")
    assert json.loads(answer) == {"method": method, "body": body and "raw"}
    answer, _ = await fetch(session, policy, upstream.url(f"/moved/{status}"))
    assert json.loads(answer) == {"method": "GET", "body": ""}


async def test_fetch_reads_max_bytes_and_not_one_more(
    upstream: Upstream, sessions: Sessions, caplog: pytest.LogCaptureFixture
) -> None:
    policy = local(upstream, max_bytes=1000)
    session = sessions(policy)
    assert await fetch(session, policy, upstream.url("/bytes/1000")) == (b"x" * 1000, "application/octet-stream")
    with caplog.at_level(logging.WARNING, logger="aioserver.workflow.safeopen"):
        with pytest.raises(UpstreamError) as info:
            await fetch(session, policy, upstream.url("/bytes/1001"), who="w", internal=True)
    assert str(info.value) == "w failed: the upstream sent an answer over safeopen.max_bytes (1000)"
    assert caplog.messages == [f"w: {upstream.url('/bytes/1001')!r} sent an answer over safeopen.max_bytes (1000)"]


async def test_fetch_names_a_connection_failure_in_the_log_only(
    sessions: Sessions, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    policy = parse_safeopen({"allow": [f"127.0.0.1:{port}"]}, "test")
    with caplog.at_level(logging.WARNING, logger="aioserver.workflow.safeopen"):
        with pytest.raises(UpstreamError) as info:
            await fetch(sessions(policy), policy, f"http://127.0.0.1:{port}/x", who="w")
    assert str(info.value) == f"w failed: 'http://127.0.0.1:{port}/x' could not be fetched"
    assert caplog.messages == [f"w: 'http://127.0.0.1:{port}/x' could not be fetched (ClientConnectorError)"]


def resolved(url: str, who: str = "fetch") -> str:
    """The log line of the resolver refusing the name in ``url`` (localhost: 127.0.0.1 or ::1)."""
    port = URL(url).port
    return (
        rf"{who}: safeopen refused {re.escape(repr(url))}: 'localhost' resolves to (127\.0\.0\.1|::1), "
        rf"not public and not in safeopen.allow \(port {port}\)"
    )


@pytest.mark.parametrize("internal", [False, True])
async def test_fetch_refusals_by_the_resolver_and_after_redirects(
    upstream: Upstream, sessions: Sessions, caplog: pytest.LogCaptureFixture, internal: bool
) -> None:
    policy = local(upstream)
    session = sessions(policy)
    named = f"http://localhost:{free_port()}/page.html"  # not the allowed port
    client = {
        False: f"refused {named!r}: not allowed by safeopen",
        True: "w failed: its upstream is not allowed by safeopen",
    }
    with caplog.at_level(logging.WARNING, logger="aioserver.workflow.safeopen"):
        with pytest.raises(Refused) as info:
            await fetch(session, policy, named, who="w", internal=internal)
        assert str(info.value) == client[internal]
        [message] = caplog.messages
        assert re.fullmatch(resolved(named, "w"), message)

        caplog.clear()
        upstream.redirect_to = named
        with pytest.raises(Refused) as info:
            await fetch(session, policy, upstream.url("/redirect?k=v"), who="w", internal=internal)
        first = {False: f"refused {upstream.url('/redirect?k=v')!r}", True: "w failed: its upstream is"}[internal]
        assert str(info.value) == f"{first}{':' if not internal else ''} not allowed by safeopen (after a redirect)"
        hop, redirect = caplog.messages
        assert re.fullmatch(resolved(named, "w"), hop)
        assert redirect == f"w: safeopen refused a redirect from {upstream.url('/redirect')!r}"

        caplog.clear()
        with pytest.raises(Refused) as info:
            await fetch(session, policy, "http://10.0.0.1/", who="w", internal=internal)
        assert (
            str(info.value)
            == {False: "refused 'http://10.0.0.1/': not allowed by safeopen", True: client[True]}[internal]
        )
    assert upstream.hits == ["/redirect?k=v"]


async def test_outgoing_https_never_writes_sslkeylogfile(pem_files: PemFiles, tmp_path: Path) -> None:
    # aiohttp's default client context honours SSLKEYLOGFILE (it is made with
    # ssl.create_default_context when aiohttp is imported): a workflow's HTTPS fetches would
    # write their session secrets there. The server's own client context must not.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pem_files.cert, pem_files.key)

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    app = web.Application()
    app.router.add_get("/page.html", page)
    upstream = TestServer(app, host="127.0.0.1")
    await upstream.start_server(ssl=context)
    keylog = tmp_path / "keys.log"
    config_file = tmp_path / "config.yml"
    config_file.write_text(
        f"safeopen: {{allow: ['127.0.0.1:{upstream.port}']}}\nworkflow:\n  fetch: {{tasks: [textractor]}}\n"
    )
    env = {"SSLKEYLOGFILE": str(keylog), "SSL_CERT_FILE": str(pem_files.ca)}
    try:
        with Server("--config", str(config_file), env=env) as server:
            body = json.dumps({"name": "fetch", "elements": [f"https://127.0.0.1:{upstream.port}/page.html"]})
            status, answer = await asyncio.to_thread(server.post, body.encode())
            assert status == 200 and b"Owls are birds of prey" in answer  # the fetch went over TLS
    finally:
        await upstream.close()
    secrets = [line for line in keylog.read_text().splitlines() if not line.startswith("#")] if keylog.exists() else []
    assert secrets == []


@pytest.mark.parametrize(
    "url",
    ["http://a..b/", "http://" + "a" * 70 + ".com/", "http://u:秘@example.com/", "http://秘:p@example.com/"],
    ids=["empty-label", "long-label", "password", "user"],
)
def test_urls_the_client_cannot_encode_are_a_clean_400(url: str) -> None:
    """A host IDNA cannot encode (getaddrinfo's UnicodeError) or credentials basic auth cannot
    (UnicodeEncodeError) is the client's invalid URL, as check_url's: 400, no traceback, no 500."""
    with Server() as server:
        status, answer = post_json(server.port, {"name": "sumtext", "elements": [url]})
        assert (status, answer) == (400, {"error": f"refused {url!r}: not a valid URL"})
        log = wait_for_log(server, "not a valid URL")
        server.process.terminate()
        server.process.wait(timeout=15)
    log = "".join(server.log)
    assert "Traceback" not in log and "ERROR" not in log, log
    assert "秘" not in log, log  # nor the credentials, which may be a secret


@pytest.mark.parametrize("internal", [False, True])
async def test_an_unencodable_redirect_or_operators_url_is_the_upstreams_fault(
    upstream: Upstream, sessions: Sessions, caplog: pytest.LogCaptureFixture, internal: bool
) -> None:
    """Such a URL from a redirect is the upstream's fault (502), and the operator's (a service
    task's) a failed upstream: the client's 400 is for the client's own URL only."""
    policy = local(upstream)
    upstream.redirect_to = "http://a..b/"
    with caplog.at_level(logging.WARNING, logger="aioserver.workflow.safeopen"):
        with pytest.raises(UpstreamError) as info:
            await fetch(sessions(policy), policy, upstream.url("/redirect"), who="w", internal=internal)
        subject = "the upstream" if internal else repr(upstream.url("/redirect"))
        assert str(info.value) == f"w failed: {subject} redirected to an invalid URL"
        with pytest.raises(UpstreamError) as info:
            await fetch(sessions(policy), policy, "http://u:秘@a..b/", who="w", internal=True)
        assert str(info.value) == "w failed: the upstream could not be fetched"
    assert "秘" not in caplog.text and "UnicodeError" in caplog.text


# -- retrieve on a real server: where downloads land, concurrently, and what a path cannot be

BIG = b"0123456789abcdef" * 65536  # 1 MiB: a write that a reader or another writer could cut


class PageUpstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(BIG)))
        self.end_headers()
        self.wfile.write(BIG)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def page_upstream() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), PageUpstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join()


def retrieving(tmp_path: Path, port: int) -> Server:
    directory = tmp_path / "downloads"
    directory.mkdir()
    path = tmp_path / "config.yml"
    path.write_text(
        f"safeopen:\n  allow: ['127.0.0.1:{port}']\n"
        f"workflow:\n  get: {{tasks: [{{task: retrieve, directory: '{directory}', flatten: false}}]}}\n"
    )
    return Server("--config", str(path))


def downloaded(tmp_path: Path) -> dict[str, bytes]:
    """Every file under the download directory (temporary ones included), by relative path."""
    root = tmp_path / "downloads"
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_retrieve_many_downloads_of_one_url_at_once(tmp_path: Path, page_upstream: int) -> None:
    """Each download has its own temporary file: 20 at once all succeed, and the file is whole."""
    url = f"http://127.0.0.1:{page_upstream}/same.txt"
    with retrieving(tmp_path, page_upstream) as server:
        answers: list[tuple[int, object]] = []
        threads = [
            threading.Thread(target=lambda: answers.append(post_json(server.port, {"name": "get", "elements": [url]})))
            for _ in range(20)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        expected = str(tmp_path / "downloads" / "same.txt")
        assert answers == [(200, [expected])] * 20
        assert downloaded(tmp_path) == {"same.txt": BIG}
    assert "ERROR" not in "".join(server.log)


@pytest.mark.parametrize("first", ["/x", "/x/y"])
def test_retrieve_paths_that_conflict_are_the_clients_error(tmp_path: Path, page_upstream: int, first: str) -> None:
    """With flatten: false, .../x and .../x/y cannot both be files: the second is a 400 naming
    its URL (not a 500), nothing half-written stays, and the first stays fetchable."""
    base = f"http://127.0.0.1:{page_upstream}"
    second = "/x/y" if first == "/x" else "/x"
    with retrieving(tmp_path, page_upstream) as server:
        assert post_json(server.port, {"name": "get", "elements": [base + first]})[0] == 200
        status, answer = post_json(server.port, {"name": "get", "elements": [base + second]})
        assert (status, answer) == (
            400,
            {
                "error": f"task workflow.get.tasks[0] (retrieve) failed: {base + second!r} cannot be"
                " stored: its path conflicts with another download's"
            },
        )
        assert post_json(server.port, {"name": "get", "elements": [base + first]})[0] == 200
        assert downloaded(tmp_path) == {first[1:]: BIG}
    log = "".join(server.log)
    assert "Traceback" not in log and "ERROR" not in log and str(tmp_path) not in log, log


def test_retrieve_a_path_too_long_is_the_clients_error(tmp_path: Path, page_upstream: int) -> None:
    url = f"http://127.0.0.1:{page_upstream}/" + "/".join(f"{i:02}" + "a" * 198 for i in range(25))
    with retrieving(tmp_path, page_upstream) as server:
        status, answer = post_json(server.port, {"name": "get", "elements": [url]})
        assert status == 400 and answer == {
            "error": f"task workflow.get.tasks[0] (retrieve) failed: {url[:200]!r} cannot be"
            " stored: its path is too long"
        }
        assert downloaded(tmp_path) == {}
    log = "".join(server.log)
    assert "Traceback" not in log and "ERROR" not in log, log
