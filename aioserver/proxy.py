"""Behind a TLS proxy: believe ``X-Forwarded-*`` and ``Forwarded`` from trusted peers only.

The headers are parsed and the trusted hops skipped by aio-libs' aiohttp-remotes
(``XForwardedFiltered``, ``ForwardedRelaxed``); this module only decides *whether* a request
came from a trusted peer, which aiohttp-remotes leaves to the deployment: its filtered
middleware would otherwise believe a client that talks to us directly. Trusted peers are the
``trusted_proxies`` addresses/networks, and anyone on a Unix socket (a local proxy: the
socket file's permissions decide who may connect).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp_remotes import ForwardedRelaxed, XForwardedFiltered

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


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
            networks.append(str(ipaddress.ip_network(text)))
        except ValueError:
            raise ValueError(f"expected an IP address or CIDR network, got {text!r}") from None
    return tuple(networks)


class TrustedProxies:
    """The peers whose forwarding headers we believe."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in networks)
        self._x_forwarded = XForwardedFiltered(set(self.networks)) if self.networks else None

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

    def _forwarded_hops(self, forwarded: Sequence[Any]) -> int:
        # Skip the elements that trusted proxies in a chain wrote about each other; the first
        # one naming an untrusted address (or the first element) names the client.
        hops = 1
        while hops < len(forwarded) and self.trusts_address(forwarded[-hops].get("for")):
            hops += 1
        return hops

    def middleware(self) -> Any:
        """The middleware that gives handlers, the auth throttle and the access log the real client."""

        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            if not self.trusts_peer(request):
                return await handler(request)  # headers from anyone else are ignored
            seen: list[web.Request] = []

            async def forward(clone: web.Request) -> web.StreamResponse:
                seen.append(clone)
                return await handler(clone)

            try:
                # X-Forwarded-For is what nginx sends; Forwarded (RFC 7239) only when it is absent.
                if "X-Forwarded-For" in request.headers and self._x_forwarded is not None:
                    return await self._x_forwarded.middleware(request, forward)
                if "X-Forwarded-For" in request.headers:  # a Unix-socket peer, no networks given
                    return await XForwardedFiltered(set()).middleware(request, forward)
                if request.forwarded:
                    return await ForwardedRelaxed(self._forwarded_hops(request.forwarded)).middleware(request, forward)
                return await handler(request)
            finally:
                # aiohttp's access log gets the request it made, not the clone the handlers saw:
                # hand the real client and what the handlers learnt (the identity) back to it.
                if seen:
                    request[REAL_CLIENT] = (seen[0].remote, seen[0].scheme)
                    for key, value in seen[0].items():
                        request[key] = value

        return middleware


# The client address and scheme the proxy reported, for the access log (see the middleware).
REAL_CLIENT = web.RequestKey("real_client", tuple)
