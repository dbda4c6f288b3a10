"""Behind a TLS proxy: believe ``X-Forwarded-*`` and ``Forwarded`` from trusted peers only.

``X-Forwarded-*`` are parsed and the trusted hops skipped by aio-libs' aiohttp-remotes
(``XForwardedFiltered``); ``Forwarded`` (RFC 7239) is parsed by aiohttp and read here, since
aiohttp-remotes' ``ForwardedRelaxed`` takes ``for=`` as it comes. This module decides *whether*
a request came from a trusted peer, which aiohttp-remotes leaves to the deployment: its
filtered middleware would otherwise believe a client that talks to us directly. Trusted peers
are the ``trusted_proxies`` addresses/networks, and anyone on a Unix socket (a local proxy: the
socket file's permissions decide who may connect). What a trusted peer reports is believed
only as an IP address and an http/https scheme: the access log and the auth throttle get
nothing else.

A peer that sends forwarded headers without being trusted is most likely a proxy left out of
``trusted_proxies``: behind it every client has its address, in the access log and in the auth
throttle, where ten failures from any of them lock all of them out. The first such request
says so in the log, once per process; after that the check is a flag test.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from aiohttp_remotes import XForwardedFiltered

logger = logging.getLogger("aioserver.proxy")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The widest network believed: /8 holds 1/256 of IPv4, and a wider one (0.0.0.0/0 at worst)
# would let a good part of the internet choose the client address we log and throttle, and
# pass for the TLS proxy that lets tokens travel in clear text. The widest proxy ranges one
# may mean to trust, a CDN's, are /13 (IPv4) and /29 or /32 (IPv6). Private IPv6 networks
# may be as wide as they are: they hold no internet peer.
NARROWEST_PREFIX = {4: 8, 6: 16}
PRIVATE_IPV6 = (ipaddress.IPv6Network("fc00::/7"), ipaddress.IPv6Network("fe80::/10"))
IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
SCHEMES = frozenset({"http", "https"})
# RFC 7239 section 6: node = nodename [ ":" node-port ]; what follows an address.
_NODE_PORT = re.compile(r"(?::(?:[0-9]{1,5}|_[A-Za-z0-9._-]+))?", re.ASCII)


def parse_trusted(value: Any) -> tuple[str, ...]:
    """Addresses or CIDRs, comma-separated (or a YAML list), normalised to networks."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError("expected addresses or CIDRs, comma-separated")
    networks = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            network = ipaddress.ip_network(text)
        except ValueError:
            raise ValueError(f"expected an IP address or CIDR network, got {text!r}") from None
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(IPV4_MAPPED):
            # Peers are matched as IPv4 when they come IPv4-mapped: so are these networks.
            mapped = network.network_address.ipv4_mapped
            network = ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")
        if network.prefixlen < NARROWEST_PREFIX[network.version] and not (
            isinstance(network, ipaddress.IPv6Network) and any(network.subnet_of(p) for p in PRIVATE_IPV6)
        ):
            raise ValueError(
                f"{network} is too wide to trust: any client in it could pose as a proxy;"
                " list the proxies' own addresses or networks, /8 at the widest for IPv4, /16 for IPv6"
            )
        networks.append(str(network))
    return tuple(networks)


def forwarded_address(node: str | None) -> str | None:
    """The IP address of an RFC 7239 ``for=`` node, without its port; None when it has none.

    A node is an IPv4 address or a bracketed IPv6 one (no zone), each with an optional port.
    ``unknown``, obfuscated identifiers (``_hidden``) and anything that is not a node name no
    address: the caller then keeps the peer's (RFC 7239 section 6).
    """
    if not node:
        return None
    if node.startswith("["):
        text, bracket, port = node[1:].partition("]")
        version = 6 if bracket else 0
    else:
        text, colon, port = node.partition(":")
        version, port = 4, colon + port
    if not version or not _NODE_PORT.fullmatch(port) or "%" in text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if address.version != version:
        return None
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(mapped or address)  # ::ffff:192.0.2.1 is 192.0.2.1, as the peers are seen


class UntrustedForwarding:
    """Says once that a peer we do not trust sends forwarded headers (see the module's docstring)."""

    def __init__(self) -> None:
        self.warned = False

    def check(self, request: web.Request) -> None:
        """Warn if ``request`` carries forwarded headers; its peer is known not to be trusted."""
        headers = request.headers
        if hdrs.X_FORWARDED_FOR in headers or hdrs.FORWARDED in headers:  # istr: no case folding per request
            self.warned = True
            # The peer's address only: the headers' values are anyone's to write.
            logger.warning(
                "%s sends forwarded headers but is not a trusted proxy: they are ignored. If it is a"
                " proxy, list its address in --trusted-proxies (or serve it on --uds): until then every"
                " client behind it has its address, in the access log and in the auth throttle, where"
                " ten failures from any of them lock all of them out. Said once.",
                request.remote,
            )

    def __call__(self, request: web.Request) -> None:
        """The check of every request without trusted proxies: until it has warned, then a flag test."""
        if not self.warned:
            self.check(request)


class TrustedProxies:
    """The peers whose forwarding headers we believe."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in networks)
        self._x_forwarded = XForwardedFiltered(set(self.networks)) if self.networks else None
        self._untrusted = UntrustedForwarding()

    def trusts_address(self, address: str | None) -> bool:
        try:
            ip = ipaddress.ip_address(address or "")
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)

    def trusts_peer(self, request: web.Request) -> bool:
        """Whether the connection's other end is a trusted proxy (the headers are not looked at)."""
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None and sock.family == socket.AF_UNIX:
            return True
        return self.trusts_address(request.remote)

    def _forwarded_client(self, forwarded: Sequence[Mapping[str, str]]) -> Mapping[str, str]:
        # Skip the elements that trusted proxies in a chain wrote about each other; the first
        # one naming an untrusted address (or no address, or the first element) names the client.
        hops = 1
        while hops < len(forwarded) and self.trusts_address(forwarded_address(forwarded[-hops].get("for"))):
            hops += 1
        return forwarded[-hops]

    def _from_forwarded(self, request: web.Request) -> web.Request:
        """The request as the ``Forwarded`` element that names the client describes it."""
        client = self._forwarded_client(request.forwarded)
        overrides: dict[str, Any] = {}
        address = forwarded_address(client.get("for"))
        if address is not None:
            overrides["remote"] = address
        if "proto" in client:
            overrides["scheme"] = client["proto"].lower()  # checked in forward()
        if "host" in client:
            overrides["host"] = client["host"]
        return request.clone(**overrides)

    async def forward(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Call ``handler`` with the request as the trusted proxy describes it: the real client for
        the handlers, the auth throttle and the access log (error_middleware's ``forward``)."""
        if not self.trusts_peer(request):
            if not self._untrusted.warned:
                self._untrusted.check(request)
            return await handler(request)  # headers from anyone else are ignored
        seen: list[web.Request] = []

        async def forward(clone: web.Request) -> web.StreamResponse:
            # A scheme is http or https, else the connection's own. aiohttp-remotes checks
            # X-Forwarded-For's addresses but keeps an IPv6 zone's text ("fe80::1%anything"):
            # then the peer's address (Forwarded's arrive checked, without zones).
            remote, scheme = clone.remote or "", clone.scheme
            if scheme not in SCHEMES or "%" in remote:
                # Every value again: a clone of a clone keeps none of the first one's.
                clone = clone.clone(
                    remote=(request.remote or "") if "%" in remote else remote,  # "": a Unix socket peer
                    scheme=scheme if scheme in SCHEMES else request.scheme,
                    host=clone.host,
                )
            seen.append(clone)
            return await handler(clone)

        try:
            # X-Forwarded-For is what nginx sends; Forwarded (RFC 7239) only when it is absent.
            if "X-Forwarded-For" in request.headers and self._x_forwarded is not None:
                return await self._x_forwarded.middleware(request, forward)
            if "X-Forwarded-For" in request.headers:  # a Unix-socket peer, no networks given
                return await XForwardedFiltered(set()).middleware(request, forward)
            if request.forwarded:
                return await forward(self._from_forwarded(request))
            return await handler(request)
        finally:
            # aiohttp's access log gets the request it made, not the clone the handlers saw:
            # hand the real client and what the handlers learnt (the identity) back to it.
            if seen:
                request[REAL_CLIENT] = (seen[0].remote, seen[0].scheme)
                for key, value in seen[0].items():
                    request[key] = value


# The client address and scheme the proxy reported, for the access log (see forward()).
REAL_CLIENT = web.RequestKey("real_client", tuple)
