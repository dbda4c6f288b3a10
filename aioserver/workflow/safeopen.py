"""safeopen: what a workflow may open, so that a URL in a request cannot reach the inside.

    safeopen:
      allow: [10.0.0.0/8, "127.0.0.1:8081", search.internal]  # hosts, host:port, CIDRs
      directory: /srv/data       # files only under here (after symlinks and ``..``)
      max_bytes: 10485760        # largest answer read from a URL
      timeout: 30                # seconds for one fetch, redirects included
      max_redirects: 5

A URL must be http or https; every address its host resolves to must be public (see
:func:`is_public`) unless ``allow`` lists it. The check happens in the resolver that
the shared client session connects through, so the connection goes to the very address
that was checked (no DNS-rebinding window, see txtai issues #1074 and #1166); every
redirect hop is checked again. Refusals raise :class:`Refused` (HTTP 400) before any
request to the refused address is made.

What the client is told names nothing inside: no address a name resolves to, no hop a
redirect led to, no URL of the operator's (a ``service`` task's), no reason a path cannot be
read (so that a client cannot map the disk). The log gets all of it, at warning level, with
the client's text escaped.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from ..errors import ConfigError, InvalidElement, UpstreamError

logger = logging.getLogger("aioserver.workflow.safeopen")

KEYS = ("allow", "directory", "max_bytes", "timeout", "max_redirects")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
REDIRECTS = frozenset({301, 302, 303, 307, 308})
# 127.1, 2130706433, 0x7f000001, 0177.0.0.1: spellings getaddrinfo turns into an address.
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+))*\.?$", re.IGNORECASE)

# What ipaddress.is_global lets through but no workflow should reach. Python's tables change
# between patch releases (3.11.10 changed 192.0.0.0/24 and several IPv6 ranges): these hold on
# every version. Each range is refused whole, as it has no host a workflow could mean to fetch.
_NOT_PUBLIC_V4 = (
    ipaddress.IPv4Network("192.0.0.0/24"),  # IETF protocol assignments; .9 and .10 are anycast services
    ipaddress.IPv4Network("224.0.0.0/4"),  # multicast: no TCP peer, and is_global says True
)
_NOT_PUBLIC_V6 = (
    ipaddress.IPv6Network("2001::/32"),  # Teredo: NATed clients; the IPv4 inside is obfuscated
    ipaddress.IPv6Network("3fff::/20"),  # documentation (RFC 9637), newer than 3.11's tables
)
# The only IPv6 space allocated for global unicast (RFC 4291, IANA). Everything outside it is
# refused whole: IPv4-compatible ::/96 (deprecated; Linux's sit tunnels it to the IPv4 address
# inside), IPv4-translated ::ffff:0:0:0/96 (SIIT: meaningful only to a translator we cannot see),
# local-use NAT64 64:ff9b:1::/48 (RFC 8215: it may embed private IPv4, at an offset its operator
# chooses), discard 100::/64, site-local fec0::/10, unique-local, link-local and multicast.
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
# RFC 6052's well-known prefix: a NAT64 gateway connects to the IPv4 address in the last 32 bits,
# so that address is judged. DNS64 makes these for public IPv4-only hosts; RFC 6052 forbids the
# prefix for non-global IPv4, but a gateway need not enforce that.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


NOT_ALLOWED = "not allowed by safeopen"
NOT_A_FILE = "not a file under safeopen.directory"
OUTSIDE = "outside safeopen.directory"
# Linux's bound on a path given to a system call, its terminating NUL included.
PATH_MAX = 4096


class Refused(InvalidElement):
    """What safeopen will not open: the client gets 400 and a reason that reveals nothing inside.

    The message names the client's own element (truncated) or, for a URL of the operator's (a
    service task's), only the task; the log has the details.
    """


def _refused(element: str, reason: str, detail: str | None = None, *, url: bool = False) -> Refused:
    """A :class:`Refused` telling the client ``reason``, and the log ``detail`` (the precise why).

    A ``url`` is logged without credentials and query: secrets never reach the log.
    """
    logger.warning("safeopen refused %s: %s", _quoted(_safe(element) if url else element), detail or reason)
    return Refused(f"refused {_shown(element)}: {reason}")


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
        # allow is the operator's word, matched against the address as resolved: it may list
        # any range, the ones is_public refuses included.
        return any(rule.allows(host, address, port) for rule in self.allow) or is_public(address)

    def check_url(self, url: str | URL) -> URL:
        """The parsed URL, or :class:`Refused` when it can never be opened (scheme, host spelling)."""
        text = str(url)
        try:
            parsed = URL(url)  # a URL stays as it is
        except ValueError:
            raise _refused(text, "not a valid URL", url=True) from None
        if parsed.scheme not in ("http", "https"):
            raise _refused(text, f"scheme {parsed.scheme or 'none'!r} is not allowed; only http and https", url=True)
        host = parsed.raw_host or ""
        if not host:
            raise _refused(text, "no host", url=True)
        port = parsed.port or 0
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            if _NUMERIC_HOST.match(host):
                raise _refused(text, f"{host!r} is not a canonical IP address", url=True) from None
            return parsed  # a name: the resolver checks each address it resolves to
        # The connector skips the resolver for IP literals, so they are checked here.
        if not self.permits(host, address, port):
            detail = f"address {address} is not public and not in safeopen.allow"
            raise _refused(text, NOT_ALLOWED, detail, url=True)
        return parsed

    def check_file(self, element: str) -> Path:
        """The resolved path of a file under ``directory``, or :class:`Refused`."""
        if element.lower().startswith("file:"):
            raise _refused(element, "file: URLs are not allowed; give a path under safeopen.directory")
        if self.directory is None:
            raise _refused(element, "no safeopen.directory is configured, so no file may be opened")
        path, problem = self._locate(self.directory, element)
        if path is None:  # one answer for every reason, so that a client cannot probe the file system
            raise _refused(element, NOT_A_FILE, problem)
        return path

    def find_file(self, element: str) -> Path | None:
        """The resolved path of a file under ``directory``, or None for whatever :meth:`check_file`
        refuses (txtai's file task: a name that is no file passes through).

        Only a name leading outside ``directory`` is logged (at warning level): that one is a
        client reaching for what it may not have, where a missing name is ordinary text.
        """
        if self.directory is None or element.lower().startswith("file:"):
            return None
        path, problem = self._locate(self.directory, element)
        if path is None and problem.startswith(OUTSIDE):
            logger.warning("safeopen left %s as it is: %s", _quoted(element), problem)
        return path

    @staticmethod
    def _locate(directory: Path, element: str) -> tuple[Path | None, str]:
        """The resolved file ``element`` names under ``directory``; or None and why not (for the log).

        Blocking, and bounded: one stat, which the kernel bounds by PATH_MAX, decides whether
        the name leads anywhere; only then is it resolved component by component (resolve()
        stats every component, even past a missing one: 3 s for 100,000 of them).
        """
        if len(element) >= PATH_MAX:
            return None, "not a path (longer than PATH_MAX)"
        candidate = directory / element
        try:
            os.stat(str(candidate))  # (str: its errors quote the path as a string)
        except FileNotFoundError:
            return None, "no such file"
        except (OSError, ValueError) as exc:  # a name too long, a symlink loop, a NUL byte, a file as a folder
            return None, f"not a path ({exc})"
        # "~" is a name like any other: expanding ~user would tell a client which users exist.
        # resolve() follows symlinks and removes "..", so the tests below see the real target.
        try:
            path = candidate.resolve()
        except (OSError, RuntimeError) as exc:  # changed since the stat: a symlink loop
            return None, f"not a path ({exc})"
        if not path.is_relative_to(directory):
            return None, f"{OUTSIDE} (resolves to {_quoted(str(path))})"
        if not path.is_file():
            return None, "not a file"
        return path, ""


def is_public(address: Address) -> bool:
    """Whether ``address`` is on the public Internet: ``is_global``, less the ranges above.

    An IPv6 address that carries an IPv4 address the packet is delivered to (IPv4-mapped,
    NAT64's well-known prefix, 6to4) is judged as that IPv4 address.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public(embedded)
        if address not in _GLOBAL_UNICAST_V6 or any(address in network for network in _NOT_PUBLIC_V6):
            return False
    elif any(address in network for network in _NOT_PUBLIC_V4):
        return False
    return address.is_global


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
    """Raised by the resolver; :func:`fetch` logs it and raises a :class:`Refused` naming no address."""

    def __init__(self, host: str, address: Address, port: int) -> None:
        super().__init__(f"{host!r} resolves to {address}, not public and not in safeopen.allow (port {port})")
        self.host = host
        self.address = address
        self.port = port


class SafeResolver(AbstractResolver):
    """Resolves names like getaddrinfo, then refuses the lot if any address is not permitted.

    ``resolver`` does the resolving (tests give a stub); by default aiohttp's ThreadedResolver,
    which is getaddrinfo, so that /etc/hosts and the system's resolver order are honoured.
    """

    def __init__(self, policy: SafeOpen, resolver: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._resolver = resolver or aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        for result in results:
            address = ipaddress.ip_address(result["host"])  # a scope (fe80::1%eth0) is kept
            if not self._policy.permits(host, address, port):
                # Not an OSError, so that aiohttp does not wrap it and try another address.
                raise AddressRefused(host, address, port)
        return results

    async def close(self) -> None:
        await self._resolver.close()


def client_ssl_context() -> ssl.SSLContext:
    """Verifies servers against the system's CAs (or ``SSL_CERT_FILE``), and never logs secrets.

    aiohttp's default context comes from ``ssl.create_default_context``, which writes every
    session's secrets to the file ``SSLKEYLOGFILE`` names, when the environment has it.
    """
    context = ssl.create_default_context()
    context.keylog_filename = None  # type: ignore[assignment]
    return context


def create_session(policy: SafeOpen) -> aiohttp.ClientSession:
    """The shared client session: every connection goes through the checking resolver."""
    connector = aiohttp.TCPConnector(resolver=SafeResolver(policy), use_dns_cache=False, ssl=client_ssl_context())
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
    internal: bool = False,
    **kwargs: Any,
) -> tuple[bytes, str]:
    """The body and content type at ``url``, following redirects one checked hop at a time.

    Raises :class:`Refused` (400) for what safeopen refuses, :class:`UpstreamError` (502)
    for a failure or a non-2xx answer of the remote side; ``who`` names the task in errors.
    Errors name ``url`` only when the client sent it: ``internal`` (a service task's URL, the
    operator's) names "the upstream" instead; they never name a hop a redirect led to.
    """
    subject = "the upstream" if internal else _shown(_safe(url))
    try:
        target = policy.check_url(url)
    except Refused:
        if internal:  # check_url logged why
            raise Refused(f"{who} failed: its upstream is {NOT_ALLOWED}") from None
        raise
    start = target
    try:
        async with asyncio.timeout(policy.timeout):
            for _ in range(policy.max_redirects + 1):
                response = await session.request(method, target, allow_redirects=False, **kwargs)
                async with response:
                    if response.status in REDIRECTS and "Location" in response.headers:
                        try:
                            location = target.join(URL(response.headers["Location"]))
                        except ValueError:  # "http://x:abc/": the upstream's fault, not repeated
                            raise _failed(who, subject, "redirected to an invalid URL", target) from None
                        target = policy.check_url(location)
                        if response.status == 303 or method == "POST" and response.status in (301, 302):
                            method, kwargs = "GET", {k: v for k, v in kwargs.items() if k not in ("json", "data")}
                        continue
                    if not 200 <= response.status < 300:
                        raise _failed(who, subject, f"answered HTTP {response.status}", target)
                    body = await _read_bounded(response, policy.max_bytes, who, subject, target)
                    return body, response.content_type
            raise _failed(who, subject, f"sent more than {policy.max_redirects} redirects", target)
    except (AddressRefused, Refused) as exc:
        # A Refused here is check_url's of a redirect's Location, which it has logged.
        redirected = isinstance(exc, Refused) or target != start
        if isinstance(exc, AddressRefused):
            logger.warning("%s: safeopen refused %s: %s", who, _quoted(_safe(target)), exc)
        if redirected:
            logger.warning("%s: safeopen refused a redirect from %s", who, _quoted(_safe(url)))
        reason = NOT_ALLOWED + " (after a redirect)" if redirected else NOT_ALLOWED
        raise Refused(
            f"{who} failed: its upstream is {reason}" if internal else f"refused {_shown(url)}: {reason}"
        ) from None
    except TimeoutError:
        raise _failed(who, subject, f"sent no complete answer within {policy.timeout:g}s", target) from None
    except aiohttp.ClientError as exc:
        raise _failed(who, subject, "could not be fetched", target, f" ({type(exc).__name__})") from None
    except ValueError as exc:
        # What yarl parses but cannot be sent: a host the idna codec refuses (an empty label, one
        # over 63 characters: UnicodeError from getaddrinfo), credentials basic auth cannot encode
        # (UnicodeEncodeError). Only the type is logged: the message may quote the credentials.
        detail = f" ({type(exc).__name__})"
        if internal or target != start:  # the operator's URL, or a hop the upstream chose
            problem = "could not be fetched" if target == start else "redirected to an invalid URL"
            raise _failed(who, subject, problem, target, detail) from None
        raise _refused(url, "not a valid URL", "not a valid URL" + detail, url=True) from None


def _failed(who: str, subject: str, problem: str, target: URL, detail: str = "") -> UpstreamError:
    """An UpstreamError naming ``subject``; the log names the URL that really failed, and ``detail``."""
    logger.warning("%s: %s %s%s", who, _quoted(_safe(target)), problem, detail)
    return UpstreamError(f"{who} failed: {subject} {problem}")


async def _read_bounded(response: aiohttp.ClientResponse, limit: int, who: str, subject: str, url: URL) -> bytes:
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body.extend(chunk)
        if len(body) > limit:
            raise _failed(who, subject, f"sent an answer over safeopen.max_bytes ({limit})", url)
    return bytes(body)


def _shown(text: str) -> str:
    """Client text as an error message quotes it: truncated, control characters escaped."""
    return repr(text[:200])


def _quoted(text: str) -> str:
    """Text as the log quotes it: bounded, and escaped so that it cannot forge a log line."""
    return repr(text[:1000])


def _safe(url: str | URL) -> str:
    """A URL fit for an error message: without credentials or query (they may hold secrets)."""
    try:
        parsed = URL(url)  # a URL stays as it is
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
    if _NUMERIC_HOST.match(text) or not re.fullmatch(r"[a-z0-9._-]+", text):
        raise ConfigError(source, key, f"not a host name, address or CIDR: {entry!r}")
    return AllowRule(host=text.rstrip("."), port=port)


def _positive(value: Any, kind: type, source: str, key: str, zero: bool = False) -> Any:
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
    if not ok or value < 0 or value == 0 and not zero:
        raise ConfigError(source, key, f"expected a {'non-negative' if zero else 'positive'} number, got {value!r}")
    return value
