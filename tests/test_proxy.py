"""Behind a TLS proxy: forwarded headers believed from trusted peers only; a real nginx in front."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from aioserver import create_app, load_config
from aioserver.cli import main
from aioserver.errors import ConfigError
from aioserver.proxy import TrustedProxies, forwarded_address, parse_trusted

from conftest import TESTS, TOKEN, TOKEN_HASH, ClientFactory, PemFiles, Server, free_port

CLIENT = "extensions: [sample_plugins.add_client]\nserver: {trusted_proxies: '%s'}\n"


@pytest.mark.parametrize(
    ("trusted", "headers", "seen"),
    [
        # From a trusted peer, the client and scheme it reports.
        ("127.0.0.1", {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}, ("203.0.113.7", "https")),
        ("127.0.0.0/8", {"X-Forwarded-For": "203.0.113.7"}, ("203.0.113.7", "http")),
        # A chain: the rightmost address that is not a trusted proxy is the client.
        ("127.0.0.1,10.0.0.0/8", {"X-Forwarded-For": "198.51.100.1, 203.0.113.7, 10.1.2.3"}, ("203.0.113.7", "http")),
        ("127.0.0.1", {"Forwarded": "for=203.0.113.7;proto=https"}, ("203.0.113.7", "https")),
        (
            "127.0.0.1,10.0.0.0/8",
            {"Forwarded": "for=198.51.100.1, for=203.0.113.7, for=10.1.2.3"},
            ("203.0.113.7", "http"),
        ),
        ("127.0.0.1", {}, ("127.0.0.1", "http")),
        # From anyone else, ignored.
        ("", {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}, ("127.0.0.1", "http")),
        ("10.0.0.0/8", {"X-Forwarded-For": "203.0.113.7"}, ("127.0.0.1", "http")),
        ("10.0.0.0/8", {"Forwarded": "for=203.0.113.7;proto=https"}, ("127.0.0.1", "http")),
    ],
)
async def test_forwarded_headers_believed_from_trusted_peers_only(
    make_client: ClientFactory, trusted: str, headers: dict[str, str], seen: tuple[str, str]
) -> None:
    client = await make_client(CLIENT % trusted)
    response = await client.get("/client", headers=headers)
    body = await response.json()
    assert (body["remote"], body["scheme"]) == seen


@pytest.mark.parametrize(
    ("trusted", "warned"),
    [
        ("", True),  # no trusted proxies: every peer is untrusted
        ("10.0.0.0/8", True),  # a proxy on 127.0.0.1 left out of the list
        ("127.0.0.1", False),  # believed: nothing to warn about
    ],
)
@pytest.mark.parametrize(
    "forwarded",
    [("X-Forwarded-For", "203.0.113.%d"), ("forwarded", "for=203.0.113.%d")],  # any case
    ids=["x-forwarded-for", "forwarded"],
)
async def test_forwarded_headers_from_an_untrusted_peer_are_warned_about_once(
    make_client: ClientFactory,
    caplog: pytest.LogCaptureFixture,
    trusted: str,
    warned: bool,
    forwarded: tuple[str, str],
) -> None:
    client = await make_client(CLIENT % trusted)
    assert (await client.get("/client")).status == 200
    assert "aioserver.proxy" not in caplog.text  # no forwarded headers, no warning
    name, value = forwarded
    for i in (7, 8):
        assert (await client.get("/client", headers={name: value % i})).status == 200
    warnings = [r.getMessage() for r in caplog.records if r.name == "aioserver.proxy"]
    assert len(warnings) == warned and all(w.startswith(f"127.0.0.1 {UNTRUSTED_LINE}") for w in warnings)
    assert "203.0.113" not in caplog.text  # the peer's address only, never what the headers say


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Forwarded-For": "not-an-address"},
        {"X-Forwarded-For": ["203.0.113.7", "203.0.113.8"]},  # two headers: which one is nginx's?
    ],
)
async def test_malformed_forwarded_headers_from_a_trusted_peer_are_400(
    make_client: ClientFactory, headers: dict[str, object]
) -> None:
    client = await make_client(CLIENT % "127.0.0.1")
    values = headers["X-Forwarded-For"]
    pairs = [("X-Forwarded-For", v) for v in (values if isinstance(values, list) else [values])]
    response = await client.get("/client", headers=pairs)
    assert response.status == 400
    assert response.content_type == "application/json"


@pytest.mark.parametrize(
    ("trusted", "headers", "seen"),
    [
        # RFC 7239 nodes: an IPv4 address or a bracketed IPv6 one, either with a port.
        ("127.0.0.1", {"Forwarded": 'for="203.0.113.7:4711"'}, ("203.0.113.7", "http")),
        ("127.0.0.1", {"Forwarded": 'for="[2001:db8::7]"'}, ("2001:db8::7", "http")),
        ("127.0.0.1", {"Forwarded": 'for="[2001:db8::7]:4711";proto=https'}, ("2001:db8::7", "https")),
        ("127.0.0.1", {"Forwarded": 'for="[::ffff:203.0.113.7]"'}, ("203.0.113.7", "http")),
        ("127.0.0.1", {"Forwarded": "for=203.0.113.7;proto=HTTPS"}, ("203.0.113.7", "https")),
        # A trusted proxy in the chain, written as a node with a port, is skipped like any other.
        ("127.0.0.1,::1", {"Forwarded": 'for=203.0.113.7, for="[::1]:1234"'}, ("203.0.113.7", "http")),
        # No address: unknown, obfuscated, or no node at all. The peer's address stays.
        ("127.0.0.1", {"Forwarded": "for=unknown"}, ("127.0.0.1", "http")),
        ("127.0.0.1", {"Forwarded": "for=_hidden;proto=https"}, ("127.0.0.1", "https")),
        ("127.0.0.1", {"Forwarded": 'for="_gazonk:_4711"'}, ("127.0.0.1", "http")),
        ("127.0.0.1", {"Forwarded": 'for="2001:db8::7"'}, ("127.0.0.1", "http")),  # IPv6 needs brackets
        ("127.0.0.1", {"Forwarded": 'for="[fe80::1%eth0]"'}, ("127.0.0.1", "http")),  # no zones
        ("127.0.0.1", {"Forwarded": 'for="203.0.113.7:http"'}, ("127.0.0.1", "http")),
        ("127.0.0.1", {"Forwarded": 'for="[2001:db8::7]x"'}, ("127.0.0.1", "http")),
        ("127.0.0.1", {"Forwarded": 'for="203.0.113.7 forged=1\tline"'}, ("127.0.0.1", "http")),
        ("127.0.0.1", {"Forwarded": 'for="<script>"'}, ("127.0.0.1", "http")),
        # A scheme is http or https, else the connection's own.
        ("127.0.0.1", {"Forwarded": "for=203.0.113.7;proto=javascript"}, ("203.0.113.7", "http")),
        ("127.0.0.1", {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "evil scheme"}, ("203.0.113.7", "http")),
        # aiohttp-remotes takes an IPv6 zone for part of an address: no zone's text is believed.
        ("127.0.0.1", {"X-Forwarded-For": "fe80::1%forged line"}, ("127.0.0.1", "http")),
    ],
)
async def test_forwarded_values_are_addresses_or_nothing(
    make_client: ClientFactory, trusted: str, headers: dict[str, str], seen: tuple[str, str]
) -> None:
    client = await make_client(CLIENT % trusted)
    response = await client.get("/client", headers=headers)
    body = await response.json()
    assert (body["remote"], body["scheme"]) == seen


async def test_a_scheme_put_right_keeps_the_rest(make_client: ClientFactory) -> None:
    client = await make_client(CLIENT % "127.0.0.1")
    headers = {"Forwarded": 'for="[2001:db8::7]:1";proto=gopher;host=api.example'}
    body = await (await client.get("/client", headers=headers)).json()
    assert body == {"remote": "2001:db8::7", "scheme": "http", "host": "api.example"}


async def test_auth_throttle_counts_no_address_as_the_peer(make_client: ClientFactory) -> None:
    """An obfuscated identifier per request cannot give each failure a throttle of its own."""
    client = await make_client(CLIENT % "127.0.0.1", env={"TOKEN": TOKEN_HASH})
    statuses = [
        (await client.get("/client", headers={"Authorization": "Bearer wrong", "Forwarded": f"for=_{n}"})).status
        for n in range(11)
    ]
    assert statuses == [401] * 10 + [429]


async def test_auth_throttle_keys_on_the_real_client(make_client: ClientFactory) -> None:
    client = await make_client(CLIENT % "127.0.0.1", env={"TOKEN": TOKEN_HASH})
    wrong = {"Authorization": "Bearer wrong", "X-Forwarded-For": "203.0.113.7"}
    statuses = [(await client.get("/client", headers=wrong)).status for _ in range(11)]
    assert statuses == [401] * 10 + [429]
    # Another client behind the same proxy is not locked out with the first.
    other = await client.get("/client", headers={"Authorization": f"Bearer {TOKEN}", "X-Forwarded-For": "203.0.113.8"})
    assert other.status == 200 and (await other.json())["remote"] == "203.0.113.8"


@pytest.mark.parametrize(
    ("server", "status"),
    [
        ("{host: 0.0.0.0}", "refused"),
        ("{host: 0.0.0.0, trusted_proxies: 10.0.0.5}", "ok"),  # the proxy terminates TLS
        ("{host: 0.0.0.0, uds: /run/aioserver.sock}", "ok"),  # only a local proxy reaches it
        ("{host: 0.0.0.0, allow_insecure_http: true}", "ok"),
    ],
)
def test_clear_text_guard_accepts_a_proxy_setup(server: str, status: str) -> None:
    text = f"server: {server}\n"
    if status == "refused":
        with pytest.raises(ConfigError, match="tokens would travel in clear text on 0.0.0.0"):
            load_config(text, env={"TOKEN": TOKEN_HASH})
    else:
        assert load_config(text, env={"TOKEN": TOKEN_HASH}).tokens


def test_trusted_proxies_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as error:
        load_config("server: {trusted_proxies: [127.0.0.1, 10.0.0.1/8]}")
    assert str(error.value) == (
        "<inline config>: server.trusted_proxies: expected an IP address or CIDR network, got '10.0.0.1/8'"
    )


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0.0.0.0/0", "0.0.0.0/0 is too wide to trust"),
        ("::/0", "::/0 is too wide to trust"),
        ("127.0.0.1, 0.0.0.0/1", "0.0.0.0/1 is too wide to trust"),
        ("64.0.0.0/7", "64.0.0.0/7 is too wide to trust"),
        ("2000::/3", "2000::/3 is too wide to trust"),
        ("::ffff:0.0.0.0/96", "0.0.0.0/0 is too wide to trust"),  # every IPv4 address, mapped
    ],
)
@pytest.mark.parametrize("channel", ["argv", "env", "file"])
def test_networks_too_wide_to_trust_are_refused(
    value: str, problem: str, channel: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Trusting them would let any peer choose its logged address, and pass for a TLS proxy."""
    argv, env = ["--host", "0.0.0.0", "--check"], {"TOKEN": TOKEN_HASH}
    where = {"argv": "command line: --trusted-proxies", "env": "environment: TRUSTED_PROXIES"}
    if channel == "argv":
        argv += ["--trusted-proxies", value]
    elif channel == "env":
        env["TRUSTED_PROXIES"] = value
    else:
        path = tmp_path / "config.yml"
        path.write_text(f"server: {{trusted_proxies: {json.dumps(value)}}}\n")
        argv += ["--config", str(path)]
        where["file"] = f"{path}: server.trusted_proxies"
    assert main(argv, env=env) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"aioserver: error: {where[channel]}: {problem}") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("value", "networks"),
    [
        ("10.0.0.0/8, 192.168.0.0/16", ("10.0.0.0/8", "192.168.0.0/16")),  # private, at most /8
        ("104.16.0.0/13, 2400:cb00::/32", ("104.16.0.0/13", "2400:cb00::/32")),  # a CDN's proxies
        ("fc00::/7, fe80::/10", ("fc00::/7", "fe80::/10")),  # private IPv6 holds no internet peer
        ("::ffff:10.0.0.0/104, ::ffff:127.0.0.1", ("10.0.0.0/8", "127.0.0.1/32")),  # mapped: as IPv4
    ],
)
def test_networks_trusted(value: str, networks: tuple[str, ...]) -> None:
    config = load_config(
        f"server: {{host: 0.0.0.0, trusted_proxies: {json.dumps(value)}}}\n", env={"TOKEN": TOKEN_HASH}
    )
    assert config.settings.trusted_proxies == networks


# -- the pieces, called directly (in-process, where a mutation tester sees them)


def test_parse_trusted_wants_text_or_a_list() -> None:
    with pytest.raises(ValueError) as error:
        parse_trusted(8080)
    assert str(error.value) == "expected addresses or CIDRs, comma-separated"


@pytest.mark.parametrize(
    ("value", "networks"),
    [
        ("10.0.0.1,, ,10.0.0.2", ("10.0.0.1/32", "10.0.0.2/32")),  # an empty item is skipped, not the end
        (["", "::1", " 10.0.0.0/8 "], ("::1/128", "10.0.0.0/8")),
        ("", ()),
    ],
)
def test_parse_trusted_skips_empty_items(value: object, networks: tuple[str, ...]) -> None:
    assert parse_trusted(value) == networks


def test_parse_trusted_says_what_to_list_instead() -> None:
    with pytest.raises(ValueError) as error:
        parse_trusted("127.0.0.1, 10.0.0.0/7")
    assert str(error.value) == (
        "10.0.0.0/7 is too wide to trust: any client in it could pose as a proxy;"
        " list the proxies' own addresses or networks, /8 at the widest for IPv4, /16 for IPv6"
    )


@pytest.mark.parametrize(
    ("node", "address"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("203.0.113.7:4711", "203.0.113.7"),
        ("[2001:db8::7]", "2001:db8::7"),
        ("[2001:db8::7]:_port", "2001:db8::7"),
        ("[::ffff:203.0.113.7]", "203.0.113.7"),
        ("[2001:db8::7", None),  # no closing bracket
        ("[fe80::1%eth0]", None),  # ipaddress takes zones; RFC 7239 nodes have none
        ("[fe80::1%25eth0]:80", None),
        ("[203.0.113.7]", None),  # brackets are for IPv6
        ("2001:db8::7", None),
        ("unknown", None),
        ("_hidden", None),
        ("", None),
        (None, None),
    ],
)
def test_forwarded_address(node: str | None, address: str | None) -> None:
    assert forwarded_address(node) == address


@pytest.mark.parametrize(
    ("address", "trusted"),
    [
        ("10.1.2.3", True),
        ("::ffff:10.1.2.3", True),  # IPv4-mapped: matched as the IPv4 address it is
        ("::1", True),
        ("::ffff:11.1.2.3", False),
        ("11.1.2.3", False),
        ("::2", False),
        ("unknown", False),
        ("", False),
        (None, False),
    ],
)
def test_trusts_address(address: str | None, trusted: bool) -> None:
    assert TrustedProxies(parse_trusted("10.0.0.0/8, ::1")).trusts_address(address) is trusted


class Transport:
    """A connection's transport as the loops give it: its socket's family, its peer's name."""

    def __init__(self, family: socket.AddressFamily | None, peername: object) -> None:
        self.extra = {"peername": peername, "socket": SimpleNamespace(family=family) if family else None}

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.extra.get(name, default)


@pytest.mark.parametrize(
    ("family", "peername", "trusted"),
    [
        (socket.AF_UNIX, "", True),  # a local proxy: the socket file's permissions decide
        (socket.AF_INET, ("10.1.2.3", 4711), True),
        (socket.AF_INET, ("11.1.2.3", 4711), False),
        (socket.AF_INET6, ("::1", 4711, 0, 0), True),
        (socket.AF_INET6, ("::ffff:10.1.2.3", 4711, 0, 0), True),
        (socket.AF_INET6, ("2001:db8::1", 4711, 0, 0), False),
        (None, ("10.1.2.3", 4711), True),  # a transport that does not give its socket
        (None, ("11.1.2.3", 4711), False),
    ],
)
def test_trusts_peer(family: socket.AddressFamily | None, peername: object, trusted: bool) -> None:
    request = make_mocked_request("GET", "/", transport=Transport(family, peername))
    assert TrustedProxies(parse_trusted("10.0.0.0/8, ::1")).trusts_peer(request) is trusted
    if family == socket.AF_UNIX:  # a Unix socket's peer, whatever networks are listed
        assert TrustedProxies(()).trusts_peer(request)


def test_trusts_no_peer_once_the_connection_is_gone() -> None:
    protocol = mock.Mock(transport=None, peername=None)
    request = make_mocked_request("GET", "/", protocol=protocol, transport=None)
    assert request.transport is None
    assert not TrustedProxies(parse_trusted("10.0.0.0/8")).trusts_peer(request)


class Chain(Sequence[Mapping[str, str]]):
    """Forwarded elements that count how often they are read: a chain is walked once."""

    def __init__(self, *nodes: str) -> None:
        self.elements = [{"for": node} for node in nodes]
        self.reads = 0

    def __len__(self) -> int:
        return len(self.elements)

    def __getitem__(self, index: int) -> Mapping[str, str]:  # type: ignore[override]
        self.reads += 1
        assert self.reads <= 2 * len(self.elements), "the chain is walked again and again"
        return self.elements[index]


@pytest.mark.parametrize(
    ("nodes", "client"),
    [
        (("203.0.113.7",), "203.0.113.7"),
        (("198.51.100.1", "203.0.113.7", "10.0.0.2"), "203.0.113.7"),
        (("10.0.0.1", "10.0.0.2"), "10.0.0.1"),  # every one a trusted proxy: the first names the client
        (("10.0.0.1", "10.0.0.2", "[::1]:80"), "10.0.0.1"),
        (("203.0.113.7", "unknown"), "unknown"),  # no address: not skipped as a trusted proxy
    ],
)
def test_forwarded_client_is_the_first_untrusted_from_the_right(nodes: tuple[str, ...], client: str) -> None:
    proxies = TrustedProxies(parse_trusted("10.0.0.0/8, ::1"))
    assert proxies._forwarded_client(Chain(*nodes))["for"] == client


async def test_forwarded_chain_of_trusted_proxies_only(make_client: ClientFactory) -> None:
    client = await make_client(CLIENT % "127.0.0.1,10.0.0.0/8")
    body = await (await client.get("/client", headers={"Forwarded": "for=10.0.0.1, for=10.0.0.2"})).json()
    assert body["remote"] == "10.0.0.1"


@pytest.mark.parametrize("trusted", ["", "10.0.0.0/8"])
async def test_a_unix_socket_peer_is_a_trusted_proxy(trusted: str, tmp_path: Path) -> None:
    """In-process, on a real Unix socket: whatever the networks, its forwarding headers are believed."""
    path = str(tmp_path / "aioserver.sock")
    config = "extensions: [sample_plugins.add_client]\nserver: {uds: '%s', trusted_proxies: '%s'}\n"
    runner = web.AppRunner(create_app(load_config(config % (path, trusted))))
    await runner.setup()
    await web.UnixSite(runner, path).start()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path)) as session:
            seen = []
            for headers in (
                {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"},
                {"Forwarded": "for=203.0.113.8;proto=https"},
                {},
            ):
                async with session.get("http://localhost/client", headers=headers) as response:
                    body = await response.json()
                    seen.append((body["remote"], body["scheme"]))
    finally:
        await runner.cleanup()
    assert seen == [("203.0.113.7", "https"), ("203.0.113.8", "https"), ("", "http")]


# -- a real nginx in front of a real aioserver


def nginx_config(
    prefix: Path, port: int, upstream: str, pem_files: PemFiles, master: bool = False, **changed: str
) -> Path:
    """conf/nginx.conf as shipped, with only places, ports and files changed for a test (and
    ``changed`` directives, ``proxy_read_timeout="1s"`` say). ``master``: nginx's master
    process runs (as installed: root, its workers as the conf's user), else a single process."""
    text = (TESTS.parent / "conf" / "nginx.conf").read_text()
    changes = {
        "worker_processes auto;": "worker_processes 1;\ndaemon off;" + ("" if master else "\nmaster_process off;"),
        "pid /run/nginx.pid;": f"pid {prefix}/nginx.pid;",
        "error_log /var/log/nginx/error.log;": "error_log stderr;",
        "access_log /var/log/nginx/access.log;": f"access_log {prefix}/access.log;\n"
        + "".join(
            f"    {kind}_temp_path {prefix}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        ),
        "server unix:/run/aioserver/aioserver.sock;": f"server {upstream};",
        "listen 80;": f"listen 127.0.0.1:{free_port()};",
        "listen [::]:80;": "",
        "listen 443 ssl http2;": f"listen 127.0.0.1:{port} ssl http2;",
        "listen [::]:443 ssl http2;": "",
        "/etc/ssl/aioserver/fullchain.pem": str(pem_files.cert),
        "/etc/ssl/aioserver/privkey.pem": str(pem_files.key),
    }
    for old, new in changes.items():
        assert old in text, old
        text = text.replace(old, new)
    for directive, value in changed.items():
        text, count = re.subn(rf"\b{directive} [^;]+;", f"{directive} {value};", text)
        assert count == 1, directive
    path = prefix / "nginx.conf"
    path.write_text(text)
    return path


@pytest.fixture
def nginx(tmp_path: Path, pem_files: PemFiles) -> Iterator[tuple[Path, int]]:
    """Start nginx with ``start(upstream)``; yields the prefix and its HTTPS port."""
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    port = free_port()
    processes: list[subprocess.Popen[bytes]] = []

    def start(upstream: str) -> None:
        config = nginx_config(prefix, port, upstream, pem_files)
        processes.append(subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(config), "-e", "stderr"]))
        deadline = time.monotonic() + 10
        while not (prefix / "nginx.pid").exists():
            assert time.monotonic() < deadline and processes[0].poll() is None, "nginx did not start"
            time.sleep(0.05)

    yield start, port  # type: ignore[misc]
    for process in processes:
        process.send_signal(signal.SIGQUIT)  # nginx's graceful stop
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def request(
    port: int, path: str, *, source: str, headers: dict[str, str], context: ssl.SSLContext | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request from the loopback address ``source`` (a client other than the proxy)."""
    if context:
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            "localhost", port, context=context, timeout=10, source_address=(source, 0)
        )
    else:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        body = json.dumps({"name": "echo", "elements": ["hi"]}) if path == "/workflow" else None
        if body:
            headers = {**headers, "Content-Type": "application/json"}
        connection.request("POST" if body else "GET", path, body, headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def wait_for_line(server: Server, pattern: str) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in server.log:
            if re.search(pattern, line):
                return line
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} in:\n" + "".join(server.log))


@pytest.mark.parametrize("upstream", ["uds", "loopback"])
def test_through_nginx(upstream: str, nginx, tmp_path: Path, client_ssl_ctx: ssl.SSLContext) -> None:  # type: ignore[no-untyped-def]
    start_nginx, port = nginx
    env = {"TOKEN": TOKEN_HASH}
    if upstream == "uds":
        uds = tmp_path / "aioserver.sock"
        server = Server("--uds", str(uds), env=env, pattern=r"serving on http\+unix://")
        target = f"unix:{uds}"
    else:
        server = Server("--trusted-proxies", "127.0.0.1", env=env)
        target = f"127.0.0.1:{server.port}"
    with server:
        start_nginx(target)
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        status, headers, body = request(port, "/workflow", source="127.0.0.2", headers=bearer, context=client_ssl_ctx)
        assert (status, body) == (200, b'["hi"]')
        assert headers["strict-transport-security"] == "max-age=63072000"  # nginx's
        # aioserver's access log names the real client (not nginx's 127.0.0.1) and https.
        assert (
            wait_for_line(server, r'"POST /workflow HTTP/1.1" 200')
            .split(" INFO aiohttp.access: ")[1]
            .startswith('127.0.0.2 https "POST /workflow HTTP/1.1" 200')
        )
        # A client's own X-Forwarded-For through nginx changes nothing: nginx states what it saw.
        spoof = {**bearer, "X-Forwarded-For": "203.0.113.9", "Forwarded": "for=203.0.113.9"}
        status, _, _ = request(port, "/health", source="127.0.0.3", headers=spoof, context=client_ssl_ctx)
        assert status == 200
        wait_for_line(server, r'127\.0\.0\.3 https "GET /health')
        # The throttle counts failures per real client, not per proxy.
        wrong = {"Authorization": "Bearer wrong"}
        statuses = [
            request(port, "/workflow", source="127.0.0.4", headers=wrong, context=client_ssl_ctx)[0] for _ in range(11)
        ]
        assert statuses == [401] * 10 + [429]
        assert request(port, "/workflow", source="127.0.0.5", headers=bearer, context=client_ssl_ctx)[0] == 200
        if upstream == "loopback":
            # Straight to aioserver, not through nginx: the spoofed headers are not believed.
            status, _, _ = request(server.port, "/health", source="127.0.0.6", headers=spoof)
            assert status == 200
            wait_for_line(server, r'127\.0\.0\.6 http "GET /health')
        server.process.terminate()
        assert server.process.wait(timeout=10) == 0
    log = "".join(server.log)
    assert "203.0.113.9" not in log
    # A peer that is not a trusted proxy sending forwarded headers: said once (the spoof above).
    assert log.count(UNTRUSTED_LINE) == (upstream == "loopback")
    if upstream == "uds":
        assert not os.path.exists(tmp_path / "aioserver.sock")  # removed on exit


UNTRUSTED_LINE = "sends forwarded headers but is not a trusted proxy"


def test_a_proxy_left_out_of_trusted_proxies_is_warned_about_once(nginx, client_ssl_ctx: ssl.SSLContext) -> None:  # type: ignore[no-untyped-def]
    # Behind nginx without --trusted-proxies, every client has nginx's address: in the access
    # log, and in the auth throttle, where ten failures from any client lock all of them out.
    start_nginx, port = nginx
    with Server(env={"TOKEN": TOKEN_HASH}) as server:
        assert request(server.port, "/health", source="127.0.0.2", headers={})[0] == 200  # direct, no headers
        start_nginx(f"127.0.0.1:{server.port}")
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        for source in ("127.0.0.3", "127.0.0.4", "127.0.0.3"):
            status, _, _ = request(port, "/workflow", source=source, headers=bearer, context=client_ssl_ctx)
            assert status == 200
        line = wait_for_line(server, UNTRUSTED_LINE)
        server.process.terminate()
        assert server.process.wait(timeout=10) == 0
    assert line.split(" WARNING aioserver.proxy: ")[1].startswith(f"127.0.0.1 {UNTRUSTED_LINE}")
    assert "--trusted-proxies" in line
    log = "".join(server.log)
    assert log.count(UNTRUSTED_LINE) == 1  # once per process, however many requests follow
    assert "127.0.0.2" not in line  # the direct client sent none
