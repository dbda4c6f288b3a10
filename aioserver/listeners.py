"""Where the server listens: sockets passed by systemd, a Unix socket, or host and port.

The sockets are made before the application starts (blocking, at start-up), so that one
process can make them and several workers serve them.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from . import systemd
from .config import Config
from .errors import StartupError

MAIN, REDIRECT = "main", "redirect"
BACKLOG = 128  # aiohttp's default


@dataclass(frozen=True)
class Listener:
    """A listening socket and what it serves: the app (``main``) or the 308 redirect."""

    sock: socket.socket
    role: str = MAIN
    path: str | None = None  # the file of a Unix socket we bound, removed on close
    passed: bool = False  # by systemd, which keeps it listening when we stop

    @property
    def port(self) -> int | None:
        address = self.sock.getsockname()
        return address[1] if isinstance(address, tuple) else None


def open_listeners(config: Config) -> list[Listener]:
    """The activated sockets if systemd passed any, else newly bound ones; StartupError if not possible.

    An activated socket named ``redirect`` (``FileDescriptorName=redirect``) serves the 308
    redirect to HTTPS; every other one serves the app.
    """
    try:
        activated = systemd.listen_fds()
    except OSError as exc:
        raise StartupError(f"cannot use the sockets passed by systemd: {exc.strerror or exc}") from None
    if activated:
        return [
            Listener(a.sock, REDIRECT if a.name == systemd.REDIRECT_NAME and config.tls else MAIN, passed=True)
            for a in activated
        ]
    settings = config.settings
    listeners = [bind_unix(settings.uds)] if settings.uds else bind_tcp(settings.host, settings.port)
    if config.tls and settings.redirect_http is not None:
        listeners += bind_tcp(settings.host, settings.redirect_http, REDIRECT)
    return listeners


def bind_tcp(host: str, port: int, role: str = MAIN) -> list[Listener]:
    """Listening sockets on every address ``host`` resolves to (as asyncio's create_server)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    listeners: list[Listener] = []
    for family, kind, proto, _, address in dict.fromkeys(infos):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # the v4 address has its own
            if port == 0 and listeners:  # one ephemeral port for all of host's addresses
                address = (address[0], listeners[0].port, *address[2:])
            sock.bind(address)
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            close(listeners)
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        listeners.append(Listener(sock, role))
    return listeners


def bind_unix(path: str) -> Listener:
    """A listening Unix socket at ``path``, replacing a stale socket file (never another file)."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StartupError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from None
    return Listener(sock, MAIN, path)


def stop_listening(listeners: Iterable[Listener]) -> None:
    """Stop our sockets listening, in every process that holds them: new connections are refused.

    ``shutdown`` acts on the socket itself, which forked processes share (closing one process's
    descriptor would leave it listening in the others, its backlog filling with connections that
    are reset later). Connections already in a TCP backlog are reset; a Unix socket keeps them.
    A loop still reading the socket then sees accept() fail at every turn (EINVAL): have it
    stop reading in the same turn, or soon. Sockets passed by systemd go on listening: they are
    systemd's, which queues new connections for the next start.
    """
    for listener in listeners:
        if listener.passed:
            continue
        try:
            listener.sock.shutdown(socket.SHUT_RD)
        except OSError:  # closed already, or never listening
            pass


def close(listeners: Iterable[Listener]) -> None:
    """Close the sockets, removing the files of Unix sockets we bound."""
    for listener in listeners:
        listener.sock.close()
        if listener.path:
            try:
                os.unlink(listener.path)
            except FileNotFoundError:
                pass


def describe(sock: socket.socket, scheme: str) -> str:
    """``scheme://host:port`` or ``scheme+unix://path`` of a listening socket, for the log."""
    address = sock.getsockname()
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
    return f"{scheme}+unix://{address}"
