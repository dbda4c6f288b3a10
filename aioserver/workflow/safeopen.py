"""safeopen: what a workflow may open, so that a URL in a request cannot reach the inside.

    safeopen:
      allow: [10.0.0.0/8, "127.0.0.1:8081", search.internal]  # hosts, host:port, CIDRs
      directory: /srv/data       # files only under here (after symlinks and ``..``)
      max_bytes: 10485760        # largest answer read from a URL
      timeout: 30                # seconds for one fetch, redirects included
      max_redirects: 5

A URL must be http or https; every address its host resolves to must be public
(``ipaddress.is_global``) unless ``allow`` lists it. The check happens in the resolver that
the shared client session connects through, so the connection goes to the very address
that was checked (no DNS-rebinding window, see txtai issues #1074 and #1166); every
redirect hop is checked again. Refusals raise :class:`Refused` (HTTP 400) before any
request to the refused address is made.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from ..errors import ConfigError, InvalidElement, UpstreamError

KEYS = ("allow", "directory", "max_bytes", "timeout", "max_redirects")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
REDIRECTS = frozenset({301, 302, 303, 307, 308})
# 127.1, 2130706433, 0x7f000001, 0177.0.0.1: spellings getaddrinfo turns into an address.
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+))*\.?$", re.IGNORECASE)


class Refused(InvalidElement):
    """An element safeopen will not open: the client gets 400 naming the element and why."""

    def __init__(self, element: str, reason: str) -> None:
        super().__init__(f"refused {element[:200]!r}: {reason}")


@dataclass(frozen=True, slots=True)
class AllowRule:
    """One ``allow`` entry: a host name or a network, optionally on one port only."""

    host: str | None = None
    network: Network | None = None
    port: int | None = None

    def allows(self, host: str, address: Address | None, port: int) -> bool:
        """Whether this rule lets ``host`` (resolved to ``address``) be reached on ``port``."""
        if self.port is not None and self.port != port:
            return False
        if self.host is not None:
            return self.host == host.lower().rstrip(".")
        return address is not None and self.network is not None and address in self.network


@dataclass(frozen=True, slots=True)
class SafeOpen:
    """The resolved ``safeopen:`` section."""

    allow: tuple[AllowRule, ...] = ()
    directory: Path | None = None
    max_bytes: int = 10 * 1024 * 1024
    timeout: float = 30.0
    max_redirects: int = 5

    def permits(self, host: str, address: Address, port: int) -> bool:
        """Whether a connection to ``address`` (for ``host``) on ``port`` is allowed."""
        if any(rule.allows(host, address, port) for rule in self.allow):
            return True
        # An IPv4-mapped IPv6 address is judged as the IPv4 address it carries.
        mapped = getattr(address, "ipv4_mapped", None)
        return (mapped or address).is_global

    def check_url(self, url: str | URL) -> URL:
        """The parsed URL, or :class:`Refused` when it can never be opened (scheme, host spelling)."""
        text = str(url)
        try:
            parsed = URL(url) if isinstance(url, str) else url
        except ValueError:
            raise Refused(text, "not a valid URL") from None
        if parsed.scheme not in ("http", "https"):
            raise Refused(text, f"scheme {parsed.scheme or 'none'!r} is not allowed; only http and https")
        host = parsed.raw_host or ""
        if not host:
            raise Refused(text, "no host")
        port = parsed.port or 0
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            if _NUMERIC_HOST.match(host):
                raise Refused(text, f"{host!r} is not a canonical IP address") from None
            return parsed  # a name: the resolver checks each address it resolves to
        # The connector skips the resolver for IP literals, so they are checked here.
        if not self.permits(host, address, port):
            raise Refused(text, f"address {address} is not public and not in safeopen.allow")
        return parsed

    def check_file(self, element: str) -> Path:
        """The resolved path of a file under ``directory``, or :class:`Refused`."""
        if element.lower().startswith("file:"):
            raise Refused(element, "file: URLs are not allowed; give a path under safeopen.directory")
        if self.directory is None:
            raise Refused(element, "no safeopen.directory is configured, so no file may be opened")
        # resolve() follows symlinks and removes "..", so the test below sees the real target.
        path = (self.directory / os.path.expanduser(element)).resolve()
        if not path.is_relative_to(self.directory):
            raise Refused(element, "outside safeopen.directory")
        if not path.is_file():
            raise Refused(element, "no such file")
        return path


def is_url(element: Any) -> bool:
    """Whether an element is an http(s) URL (the ``url`` task kind's selection)."""
    return isinstance(element, str) and re.match(r"^https?://", element, re.IGNORECASE) is not None


def is_path(element: Any) -> bool:
    """Whether an element names a file: a ``file:`` URL or a path-shaped string.

    Shape, not existence, decides, so that a client cannot probe which files exist.
    """
    return isinstance(element, str) and (
        element.lower().startswith("file:") or element.startswith(("/", "./", "../", "~"))
    )


class AddressRefused(Exception):
    """Raised by the resolver; :func:`fetch` turns it into :class:`Refused` naming the URL."""


class SafeResolver(AbstractResolver):
    """Resolves names like getaddrinfo, then refuses the lot if any address is not permitted."""

    def __init__(self, policy: SafeOpen) -> None:
        self._policy = policy
        self._resolver = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        for result in results:
            address = ipaddress.ip_address(result["host"].split("%")[0])
            if not self._policy.permits(host, address, port):
                # Not an OSError, so that aiohttp does not wrap it and try another address.
                raise AddressRefused(f"{host!r} resolves to {address}, not public and not in safeopen.allow")
        return results

    async def close(self) -> None:
        await self._resolver.close()


def create_session(policy: SafeOpen) -> aiohttp.ClientSession:
    """The shared client session: every connection goes through the checking resolver."""
    connector = aiohttp.TCPConnector(resolver=SafeResolver(policy), use_dns_cache=False)
    # trust_env=False: a proxy from the environment would connect to addresses we never checked.
    return aiohttp.ClientSession(
        connector=connector,
        trust_env=False,
        timeout=aiohttp.ClientTimeout(total=policy.timeout),
        raise_for_status=False,
    )


async def fetch(
    session: aiohttp.ClientSession,
    policy: SafeOpen,
    url: str,
    *,
    method: str = "GET",
    who: str = "fetch",
    **kwargs: Any,
) -> tuple[bytes, str]:
    """The body and content type at ``url``, following redirects one checked hop at a time.

    Raises :class:`Refused` (400) for what safeopen refuses, :class:`UpstreamError` (502)
    for a failure or a non-2xx answer of the remote side; ``who`` names the task in errors.
    """
    target = policy.check_url(url)
    try:
        async with asyncio.timeout(policy.timeout):
            for _ in range(policy.max_redirects + 1):
                try:
                    response = await session.request(method, target, allow_redirects=False, **kwargs)
                except AddressRefused as exc:
                    raise Refused(
                        str(url) if target == URL(url) else f"{url} (redirected to {_safe(target)})", str(exc)
                    ) from None
                async with response:
                    if response.status in REDIRECTS and "Location" in response.headers:
                        try:
                            location = target.join(URL(response.headers["Location"]))
                        except ValueError:  # "http://x:abc/": the upstream's fault, not repeated
                            raise UpstreamError(f"{who}: {_safe(target)} redirected to an invalid URL") from None
                        target = policy.check_url(location)
                        if response.status == 303 or method == "POST" and response.status in (301, 302):
                            method, kwargs = "GET", {k: v for k, v in kwargs.items() if k not in ("json", "data")}
                        continue
                    if not 200 <= response.status < 300:
                        raise UpstreamError(f"{who}: {_safe(target)} answered HTTP {response.status}")
                    return await _read_bounded(response, policy.max_bytes, who, target), response.content_type
            raise UpstreamError(f"{who}: more than {policy.max_redirects} redirects from {_safe(url)}")
    except TimeoutError:
        raise UpstreamError(f"{who}: no complete answer from {_safe(target)} within {policy.timeout:g}s") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"{who}: cannot fetch {_safe(target)}: {type(exc).__name__}") from None


async def _read_bounded(response: aiohttp.ClientResponse, limit: int, who: str, url: URL) -> bytes:
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body.extend(chunk)
        if len(body) > limit:
            raise UpstreamError(f"{who}: the answer from {_safe(url)} is over safeopen.max_bytes ({limit})")
    return bytes(body)


def _safe(url: str | URL) -> str:
    """A URL fit for an error message: without credentials or query (they may hold secrets)."""
    try:
        parsed = URL(url) if isinstance(url, str) else url
        return str(parsed.with_user(None).with_query(None).with_fragment(None))
    except (ValueError, TypeError):
        return "<invalid URL>"


def parse_safeopen(section: Any, source: str) -> SafeOpen:
    """Validate the ``safeopen:`` section; every problem is a ConfigError naming the key."""
    if section is None:
        return SafeOpen()
    if not isinstance(section, Mapping):
        raise ConfigError(source, "safeopen", f"expected a mapping with keys {', '.join(KEYS)}")
    for key in section:
        if key not in KEYS:
            raise ConfigError(source, f"safeopen.{key}", f"unknown key; known: {', '.join(KEYS)}")
    allow = section.get("allow") or []
    if isinstance(allow, str):
        allow = [allow]
    if not isinstance(allow, list):
        raise ConfigError(source, "safeopen.allow", "expected a list of hosts, host:port or CIDRs")
    rules = tuple(_rule(entry, source, f"safeopen.allow[{i}]") for i, entry in enumerate(allow))

    directory = section.get("directory")
    if directory is not None:
        if not isinstance(directory, str) or not os.path.isdir(directory):
            raise ConfigError(source, "safeopen.directory", f"not an existing directory: {directory!r}")
        directory = Path(directory).resolve()
    defaults = SafeOpen()
    return SafeOpen(
        allow=rules,
        directory=directory,
        max_bytes=_positive(section.get("max_bytes", defaults.max_bytes), int, source, "safeopen.max_bytes"),
        timeout=float(_positive(section.get("timeout", defaults.timeout), float, source, "safeopen.timeout")),
        max_redirects=_positive(
            section.get("max_redirects", defaults.max_redirects), int, source, "safeopen.max_redirects", zero=True
        ),
    )


def _rule(entry: Any, source: str, key: str) -> AllowRule:
    if not isinstance(entry, str) or not entry.strip():
        raise ConfigError(source, key, f"expected a host, host:port or CIDR, got {entry!r}")
    text, port = entry.strip().lower(), None
    match = re.fullmatch(r"\[(.+)\]:(\d+)|([^:]+):(\d+)", text)
    if match:
        text = match.group(1) or match.group(3)
        port = int(match.group(2) or match.group(4))
        if not 0 < port < 65536:
            raise ConfigError(source, key, f"port out of range in {entry!r}")
    text = text.strip("[]")
    try:
        return AllowRule(network=ipaddress.ip_network(text, strict=False), port=port)
    except ValueError:
        pass
    if _NUMERIC_HOST.match(text) or "/" in text or not re.fullmatch(r"[a-z0-9._-]+", text):
        raise ConfigError(source, key, f"not a host name, address or CIDR: {entry!r}")
    return AllowRule(host=text.rstrip("."), port=port)


def _positive(value: Any, kind: type, source: str, key: str, zero: bool = False) -> Any:
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
    if not ok or value < 0 or value == 0 and not zero:
        raise ConfigError(source, key, f"expected a {'non-negative' if zero else 'positive'} number, got {value!r}")
    return value
