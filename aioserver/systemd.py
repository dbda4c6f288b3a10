"""systemd integration, stdlib only: readiness notification, the watchdog, socket activation.

sd_notify(3): datagrams of ``KEY=value`` lines to the socket named by ``$NOTIFY_SOCKET``
(a path, or ``@name`` in the abstract namespace). Without that variable every call is a no-op,
so the server speaks the protocol unconditionally. sd_listen_fds(3): sockets passed from fd 3
on, their count in ``$LISTEN_FDS``, meant for the process ``$LISTEN_PID``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("aioserver.systemd")

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
# Ours, not systemd's (sd_notify(3) asks that other variables start with X_, and systemd
# ignores them): a stopping worker tells its parent that it accepts no more connections.
NOT_ACCEPTING = "X_ACCEPTING=0"
ACTIVATION_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
# The FileDescriptorName= of a passed socket that answers plain HTTP: 308 to HTTPS, and ACME's challenges.
REDIRECT_NAME = "redirect"


class Notifier:
    """Sends sd_notify messages to a datagram socket; without one, does nothing."""

    def __init__(self, address: str | None = None, sock: socket.socket | None = None) -> None:
        self.address = address
        self._sock = sock
        self._failing = False  # a failure is logged once, until a message goes through again

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """The notifier ``$NOTIFY_SOCKET`` names (a no-op one when unset)."""
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET") or None
        if address and address[0] not in "/@":
            logger.warning("ignoring NOTIFY_SOCKET %r: neither a path nor an abstract @name", address)
            address = None
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self.address is not None or self._sock is not None

    def notify(self, *lines: str) -> None:
        """Send one message; a failure is logged (once in a row), never raised: systemd, or a
        worker's parent, may be going away, and a worker pings its parent every second."""
        if not self.enabled:
            return
        message = "\n".join(lines).encode()
        try:
            if self._sock is not None:
                self._sock.send(message)
            else:
                assert self.address is not None
                # A leading "@" is the abstract namespace: a NUL byte in the kernel's address.
                target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                    sock.connect(target)
                    sock.sendall(message)
        except OSError as exc:
            if not self._failing:
                logger.warning("sd_notify %s failed: %s", lines[0] if lines else "", exc.strerror or exc)
            self._failing = True
        else:
            self._failing = False

    def ready(self, status: str = "serving") -> None:
        self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # Type=notify-reload (systemd 253) wants MONOTONIC_USEC with RELOADING=1.
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``$WATCHDOG_USEC``), or None when not asked for."""
    env = os.environ if env is None else env
    watched = env.get("WATCHDOG_PID")
    if watched and watched != str(os.getpid() if pid is None else pid):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2 / 1_000_000 if usec > 0 else None


async def run_watchdog(notifier: Notifier, interval: float) -> None:
    """Ping every ``interval`` seconds: a ping goes out only while the event loop turns."""
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


@dataclass(frozen=True)
class ActivatedSocket:
    """A listening socket passed by the service manager, and its name (``FileDescriptorName=``)."""

    sock: socket.socket
    name: str


def _activated_fds(env: Mapping[str, str]) -> list[tuple[int, str]]:
    if env.get("LISTEN_PID") != str(os.getpid()):
        return []  # not for us: inherited from a parent that was activated
    try:
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    return [
        (fd, names[i] if i < len(names) else "unknown")
        for i, fd in enumerate(range(LISTEN_FDS_START, LISTEN_FDS_START + max(count, 0)))
    ]


def activated_names(env: Mapping[str, str] | None = None) -> list[str]:
    """The names (``FileDescriptorName=``) of the sockets passed to us, ``unknown`` for one without."""
    return [name for _, name in _activated_fds(os.environ if env is None else env)]


def activated_addresses(env: Mapping[str, str] | None = None) -> list[tuple[int, Any]]:
    """``(family, address)`` of each socket passed to us, looked at without taking them."""
    env = os.environ if env is None else env
    found: list[tuple[int, Any]] = []
    for fd, _ in _activated_fds(env):
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue  # not a socket: listen_fds() will say so
        try:
            found.append((sock.family, sock.getsockname()))
        finally:
            sock.detach()  # the fd stays open for listen_fds()
    return found


def listen_fds(env: MutableMapping[str, str] | None = None) -> list[ActivatedSocket]:
    """Take the sockets passed by socket activation, then unset the variables (sd_listen_fds(1)).

    Unsetting them keeps children and actions from believing the sockets are theirs.
    """
    env = os.environ if env is None else env
    sockets = []
    for fd, name in _activated_fds(env):
        os.set_inheritable(fd, False)
        sockets.append(ActivatedSocket(socket.socket(fileno=fd), name))
    for variable in ACTIVATION_VARIABLES:
        env.pop(variable, None)
    return sockets
