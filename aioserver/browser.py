"""Browsers cannot drive the service on a visitor's behalf (SPEC section 2).

A web page may send a "simple" cross-origin POST without asking first (no CORS preflight)
when its body is a form or text: so a POST must say its body is JSON, or it gets 415.
A page may also rebind its own host name to 127.0.0.1 (DNS rebinding) and then read our
answers as its own: so while the service is open (no token), reachable on loopback only and
behind no proxy, a request must name a loopback host, or one of ``--allowed-hosts``, or it
gets 400. Loopback hosts are ``localhost``, its subdomains (RFC 6761 section 6.3: resolvers
and browsers keep them on loopback), ``127.0.0.0/8`` and ``[::1]``, on any port.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any

from aiohttp import hdrs, web

from .errors import http_error

JSON = "application/json"
# RFC 9110 section 8.3.1 media type tokens; "+json" is RFC 6839's structured syntax suffix.
_TOKEN = r"[!#$%&'*+.^_`|~0-9a-z-]+"
_JSON_TYPE = re.compile(rf"application/json|{_TOKEN}/{_TOKEN}\+json")
ANY_HOST = "*"
_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_ENTRY = re.compile(rf"(\*\.|\.)?{_LABEL}(\.{_LABEL})*")
_PORT = re.compile(r"(:[0-9]*)?")
_CACHED_HOSTS = 1024  # Host values whose verdict is remembered; others are judged every time


def is_json(content_type: str | None) -> bool:
    """Whether a Content-Type names JSON: ``application/json`` or a ``+json`` type, any parameters."""
    if content_type == JSON:  # what nearly every client sends
        return True
    if content_type is None:
        return False
    return _JSON_TYPE.fullmatch(content_type.partition(";")[0].strip().lower()) is not None


def check_json_body(request: web.Request) -> None:
    """415 for a POST to a route whose body is not declared JSON (a check of error_middleware's).

    A POST that no route takes goes on to its 404 or 405: there is nothing to protect.
    """
    if (
        request.method == hdrs.METH_POST
        and not is_json(request.headers.get(hdrs.CONTENT_TYPE))
        and request.match_info.http_exception is None
    ):
        raise http_error(web.HTTPUnsupportedMediaType, "Content-Type must be application/json", **{hdrs.ACCEPT: JSON})


def parse_allowed_hosts(value: Any) -> tuple[str, ...]:
    """Host names, comma-separated (or a YAML list), normalised; ``.name``/``*.name`` for subdomains."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError("expected host names, comma-separated")
    hosts = []
    for item in items:
        text = str(item).strip().lower()
        if not text:
            continue
        host = text if text == ANY_HOST else _normal_entry(text)
        if host is None:
            raise ValueError(f"expected a host name without a port (any port is allowed), got {text!r}")
        hosts.append(host)
    return tuple(hosts)


def _normal_entry(text: str) -> str | None:
    address = _address(text[1:-1] if text.startswith("[") and text.endswith("]") else text)
    if address is not None:
        return address
    name = text.removesuffix(".")
    return name if _ENTRY.fullmatch(name) else None


def _address(text: str) -> str | None:
    """The normal form of an IP address, or None if ``text`` is not one."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def host_of(value: str) -> str | None:
    """The host of a Host header value, lower-case, without port or final dot; None if malformed."""
    value = value.lower()
    if value.startswith("["):  # an IPv6 literal (RFC 3986 section 3.2.2)
        host, bracket, port = value[1:].partition("]")
        if not bracket or ":" not in host:
            return None
        host = _address(host) or ""
    else:
        host, colon, port = value.partition(":")
        port = colon + port
        name = host.removesuffix(".")
        host = _address(host) or (name if _NAME.fullmatch(name) else "")
    return host if host and _PORT.fullmatch(port) else None


def is_loopback(host: str) -> bool:
    """Whether a host (as :func:`host_of` gives it) is a loopback name or address."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class HostGuard:
    """The Host check against DNS rebinding: loopback hosts, and the allowed ones."""

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        allowed = tuple(allowed)
        self.names = frozenset(h for h in allowed if not h.startswith((".", "*.")))
        # ".example.org" is the domain and its subdomains (as Django); "*.example.org" only these.
        self.domains = frozenset(h[1:] for h in allowed if h.startswith("."))
        self.suffixes = tuple(h.removeprefix("*") for h in allowed if h.startswith(("*.", ".")))
        self._verdicts: dict[str, bool] = {}

    def allows(self, value: str) -> bool:
        """Whether a Host header value names a host we serve."""
        host = host_of(value)
        if host is None:
            return False
        return is_loopback(host) or host in self.names or host in self.domains or host.endswith(self.suffixes)

    def check(self, request: web.Request) -> None:
        """400 for a request naming another host (a check of error_middleware's).

        A request without Host passes: aiohttp's parser answers 400 to HTTP/1.1 without one
        (RFC 9112 section 3.2), and no browser speaks HTTP/1.0 without one.
        """
        value = request.headers.get(hdrs.HOST)
        if value is None:
            return
        allowed = self._verdicts.get(value)
        if allowed is None:
            allowed = self.allows(value)
            if len(self._verdicts) < _CACHED_HOSTS:
                self._verdicts[value] = allowed
        if not allowed:
            # The value is not echoed: it is the attacker's, and nothing the client needs.
            raise http_error(
                web.HTTPBadRequest,
                "Host not allowed: use a loopback name or one of --allowed-hosts (behind a proxy: --trusted-proxies)",
            )
