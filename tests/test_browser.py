"""Browsers cannot drive the service: JSON bodies only (415), loopback Host names only (400)."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest

from aioserver import config as config_module
from aioserver import load_config
from aioserver.browser import HostGuard, is_json, parse_allowed_hosts

from conftest import TOKEN, TOKEN_HASH, ClientFactory, Server

CONFIG = "workflow:\n  echo: {tasks: [echo]}\n"
BODY = json.dumps({"name": "echo", "elements": [1]}).encode()


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("application/json;charset=UTF-8", True),
        ("Application/JSON", True),
        (" application/json ; charset=utf-8", True),
        ("application/vnd.api+json", True),
        ("application/problem+json; charset=utf-8", True),
        (None, False),
        ("", False),
        ("text/plain", False),
        ("text/plain; charset=utf-8", False),
        ("application/x-www-form-urlencoded", False),
        ("multipart/form-data; boundary=x", False),
        ("text/plain; type=application/json", False),
        ("text/plain, application/json", False),
        ("application/jsonp", False),
        ("application/json-seq", False),
        ("application/+json", False),
        ("+json", False),
        ("json", False),
        ("application/json x", False),
        ("application/x json+json", False),
    ],
)
def test_is_json(content_type: str | None, expected: bool) -> None:
    assert is_json(content_type) is expected


ALLOWED = ("example.org", ".corp.test", "*.dev.test", "192.0.2.7", "2001:db8::1")


@pytest.mark.parametrize(
    ("host", "loopback", "allowed"),
    [
        ("localhost", True, True),
        ("localhost:8000", True, True),
        ("LocalHost:8000", True, True),
        ("localhost.", True, True),
        ("localhost.:8000", True, True),
        ("localhost:", True, True),  # an empty port is valid (RFC 3986)
        ("api.localhost", True, True),  # RFC 6761: kept on loopback
        ("a.b.localhost:1", True, True),
        ("127.0.0.1", True, True),
        ("127.0.0.1:8000", True, True),
        ("127.9.8.7:1", True, True),
        ("[::1]", True, True),
        ("[::1]:8000", True, True),
        ("[0:0:0:0:0:0:0:1]:8000", True, True),
        ("[::ffff:127.0.0.1]:80", True, True),
        ("attacker.example", False, False),
        ("attacker.example:8000", False, False),
        ("localhost.attacker.example", False, False),
        ("attackerlocalhost", False, False),
        ("evil@localhost", False, False),
        ("local host", False, False),
        ("0.0.0.0", False, False),  # reaches us on Linux, but no loopback name: "0.0.0.0 day"
        ("0.0.0.0:8000", False, False),
        ("[::]:8000", False, False),
        ("::1", False, False),  # an IPv6 literal needs brackets
        ("[::1", False, False),
        ("[127.0.0.1]", False, False),
        ("127.0.0.1:80:80", False, False),
        ("localhost:http", False, False),
        ("", False, False),
        (":8000", False, False),
        ("2130706433", False, False),
        ("example.org", False, True),
        ("EXAMPLE.org:443", False, True),
        ("example.org.", False, True),
        ("xexample.org", False, False),
        ("www.example.org", False, False),
        ("example.org.attacker.example", False, False),
        ("corp.test", False, True),  # a leading dot: the domain and its subdomains
        ("a.b.corp.test", False, True),
        ("xcorp.test", False, False),
        ("dev.test", False, False),  # "*.": its subdomains only
        ("a.dev.test:8000", False, True),
        ("192.0.2.7:80", False, True),
        ("192.0.2.8", False, False),
        ("[2001:db8::1]:80", False, True),
        ("[2001:0db8:0:0::0001]", False, True),
    ],
)
def test_host_guard(host: str, loopback: bool, allowed: bool) -> None:
    assert HostGuard().allows(host) is loopback
    assert HostGuard(ALLOWED).allows(host) is allowed


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("Example.org, .Corp.test,*.dev.test", ("example.org", ".corp.test", "*.dev.test")),
        (["a.test", "b.test."], ("a.test", "b.test")),
        ("[2001:0db8::1], 192.0.2.7", ("2001:db8::1", "192.0.2.7")),
        ("2001:0db8::1", ("2001:db8::1",)),  # brackets or none: any port is allowed anyway
        ("a.test, , b.test,", ("a.test", "b.test")),  # empty items are skipped, not the end
        ("*", ("*",)),
        (" , ", ()),
    ],
)
def test_parse_allowed_hosts(value: Any, parsed: tuple[str, ...]) -> None:
    assert parse_allowed_hosts(value) == parsed


@pytest.mark.parametrize(
    "value",
    ["example.org:8000", "bad host", "*.", "a..b", "http://x", "-a.test", "*x.test", "[2001:db8::1", "2001:db8::1]"],
)
def test_bad_allowed_hosts(value: Any) -> None:
    with pytest.raises(ValueError) as error:
        parse_allowed_hosts(value)
    assert str(error.value) == (
        f"expected a host name without a port (any port is allowed), got {value.strip().lower()!r}"
    )


@pytest.mark.parametrize("value", [3, None, {"a.test": True}])
def test_allowed_hosts_must_be_names(value: Any) -> None:
    with pytest.raises(ValueError) as error:
        parse_allowed_hosts(value)
    assert str(error.value) == "expected host names, comma-separated"


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/json", 200),
        ("application/json; charset=utf-8", 200),
        ("APPLICATION/JSON", 200),
        ("application/vnd.aioserver+json", 200),
        ("text/plain", 415),
        ("text/plain;charset=UTF-8", 415),  # what fetch() sends for a string body
        ("application/x-www-form-urlencoded", 415),
        ("multipart/form-data; boundary=b", 415),
        ("application/octet-stream", 415),
        (None, 415),
    ],
)
async def test_post_bodies_must_be_json(make_client: ClientFactory, content_type: str | None, status: int) -> None:
    client = await make_client(CONFIG)
    headers = {"Origin": "http://attacker.example"}
    if content_type:
        headers["Content-Type"] = content_type
    response = await client.post(
        "/workflow", data=BODY, headers=headers, skip_auto_headers=() if content_type else ("Content-Type",)
    )
    assert response.status == status
    assert response.content_type == "application/json"
    if status == 415:
        assert await response.json() == {"error": "Content-Type must be application/json"}
        assert response.headers["Accept"] == "application/json"
    else:
        assert await response.json() == [1]


async def test_unsupported_media_type_comes_after_authorization(make_client: ClientFactory) -> None:
    client = await make_client(CONFIG, env={"TOKEN": TOKEN_HASH})
    headers = {"Content-Type": "text/plain"}
    assert (await client.post("/workflow", data=BODY, headers=headers)).status == 401
    headers["Authorization"] = f"Bearer {TOKEN}"
    assert (await client.post("/workflow", data=BODY, headers=headers)).status == 415


@pytest.mark.parametrize(
    ("path", "status"),
    [("/nowhere", 404), ("/health", 405)],  # no route takes it: nothing to protect
)
async def test_unrouted_posts_keep_their_status(make_client: ClientFactory, path: str, status: int) -> None:
    client = await make_client(CONFIG)
    response = await client.post(path, data=b"x", headers={"Content-Type": "text/plain"})
    assert response.status == status


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("127.0.0.1:8000", 200),
        ("localhost:8000", 200),
        ("api.localhost", 200),
        ("[::1]:8000", 200),
        ("attacker.example", 400),
        ("attacker.example:8000", 400),
        ("0.0.0.0:8000", 400),
    ],
)
@pytest.mark.parametrize(("method", "path"), [("GET", "/health"), ("POST", "/workflow")])
async def test_open_loopback_service_answers_loopback_hosts_only(
    make_client: ClientFactory, host: str, status: int, method: str, path: str
) -> None:
    client = await make_client(CONFIG)
    headers = {"Host": host, "Content-Type": "application/json"}
    response = await client.request(method, path, data=BODY if method == "POST" else None, headers=headers)
    assert response.status == status
    text = await response.text()
    if status == 400:
        assert json.loads(text) == {
            "error": "Host not allowed: use a loopback name or one of --allowed-hosts"
            " (behind a proxy: --trusted-proxies)"
        }
        assert "attacker" not in text


@pytest.mark.parametrize(
    ("yaml_text", "env", "status"),
    [
        ("", {}, 400),
        ("server: {allowed_hosts: [attacker.example]}\n", {}, 200),
        ("", {"ALLOWED_HOSTS": "other.example, .attacker.example"}, 200),
        ("", {"ALLOWED_HOSTS": "other.example"}, 400),
        ("", {"ALLOWED_HOSTS": "*"}, 200),
        ("", {"TOKEN": TOKEN_HASH}, 200),  # tokens guard it
        ("server: {trusted_proxies: 10.0.0.1}\n", {}, 200),  # a proxy in front names the hosts
        ("server: {host: 0.0.0.0}\n", {}, 200),  # not on loopback: the name is the user's
        ("server: {host: 127.0.0.2}\n", {}, 400),
        ("server: {host: localhost}\n", {}, 400),
    ],
)
async def test_when_the_host_check_applies(
    make_client: ClientFactory, yaml_text: str, env: dict[str, str], status: int
) -> None:
    client = await make_client(CONFIG + yaml_text, env=env)
    headers = {"Host": "attacker.example:8000", "Authorization": f"Bearer {TOKEN}"}
    response = await client.post("/workflow", json={"name": "echo", "elements": [1]}, headers=headers)
    assert response.status == status


async def exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes (one request, closing); return the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


def raw_post(host: str | None, content_type: str = "application/json", version: str = "1.1") -> bytes:
    head = f"POST /workflow HTTP/{version}\r\n"
    head += f"Host: {host}\r\n" if host is not None else ""
    head += f"Origin: http://attacker.example\r\nContent-Type: {content_type}\r\nConnection: close\r\n"
    return head.encode() + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY


async def test_missing_host(make_client: ClientFactory) -> None:
    client = await make_client(CONFIG)
    port = client.server.port
    assert port is not None
    assert b" 400 " in (await exchange(port, raw_post(None))).split(b"\r\n")[0]  # HTTP/1.1 needs one
    assert (await exchange(port, raw_post(None, version="1.0"))).startswith(b"HTTP/1.0 200 ")  # 1.0 does not


def test_loopback_only_is_decided_from_host() -> None:
    for host, loopback in [
        ("127.0.0.1", True),
        ("127.0.0.5", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.0.2.1", False),
    ]:
        assert load_config(f"server: {{host: '{host}'}}\n").loopback_only is loopback, host
    assert load_config("server: {uds: /run/a.sock}\n").loopback_only is False


@pytest.mark.parametrize(
    ("activated", "loopback"),
    [
        ([(socket.AF_INET, ("127.0.0.1", 8000))], True),
        ([(socket.AF_INET, ("127.0.0.1", 8000)), (socket.AF_INET6, ("::1", 8000, 0, 0))], True),
        ([(socket.AF_INET, ("127.0.0.1", 8000)), (socket.AF_INET6, ("::", 8000, 0, 0))], False),
        ([(socket.AF_INET, ("0.0.0.0", 8000))], False),
        ([(socket.AF_UNIX, "/run/a.sock")], False),
    ],
)
def test_loopback_only_judges_activated_sockets(
    monkeypatch: pytest.MonkeyPatch, activated: list[tuple[int, Any]], loopback: bool
) -> None:
    monkeypatch.setattr(config_module.systemd, "activated_addresses", lambda env: activated)
    # host says loopback, but the passed sockets are what serves.
    assert load_config("server: {host: 127.0.0.1}\n").loopback_only is loopback


async def test_a_web_page_cannot_drive_the_real_server() -> None:
    """Black-box: ``python -m aioserver`` as started by a developer, driven as a page would."""
    with Server() as server:
        port = server.port
        rebound = await exchange(port, raw_post(f"attacker.example:{port}"))
        assert rebound.startswith(b"HTTP/1.1 400 ")
        assert b'"error": "Host not allowed' in rebound and b"attacker" not in rebound.partition(b"\r\n\r\n")[2]
        assert b" 400 " in (await exchange(port, raw_post(None))).split(b"\r\n")[0]
        simple = await exchange(port, raw_post(f"127.0.0.1:{port}", "text/plain;charset=UTF-8"))
        assert simple.startswith(b"HTTP/1.1 415 ")
        assert b'{"error": "Content-Type must be application/json"}' in simple
        assert (await exchange(port, raw_post(f"localhost:{port}"))).startswith(b"HTTP/1.1 200 ")
    with Server("--allowed-hosts", "attacker.example") as server:
        port = server.port
        answer = await exchange(port, raw_post(f"attacker.example:{port}"))
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"[1]")
        assert (await exchange(port, raw_post(f"attacker.example:{port}", "text/plain"))).startswith(b"HTTP/1.1 415 ")
