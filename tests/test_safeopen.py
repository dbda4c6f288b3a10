"""safeopen against real local servers: allowed when listed, refused otherwise, never contacted."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer

from aioserver import load_config
from aioserver.errors import ConfigError
from aioserver.workflow.safeopen import AddressRefused, SafeResolver, parse_safeopen

from conftest import Server, free_port

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
    assert body == {"error": "task workflow.w.tasks[1] (service) failed: the upstream answered HTTP 503"}


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
        self.closed = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
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
        status, body = await post(file_config(tmp_path), [path])
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
    yaml_text = file_config(inside)
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
        "./loop": "Symlink loop",
        "./a\x00b": "not a path",
    }
    with caplog.at_level(logging.WARNING, logger="aioserver.workflow.safeopen"):
        for element, reason in elements.items():
            caplog.clear()
            status, body = await post(yaml_text, [element])
            assert (status, body) == (400, {"error": f"refused {element[:200]!r}: not a file under safeopen.directory"})
            assert reason in caplog.text, (element, caplog.text)


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
