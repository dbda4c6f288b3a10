"""The fleet's shared state, in Redis (``--redis``): many processes on many hosts, one service.

Without ``--redis`` each process keeps its own state (the embedded default, no Redis needed).
With it, three things are shared through one Redis (or Valkey) server:

- the auth-failure throttle's counts per client (auth.py),
- each schedule tick's lock, so that a tick runs on one process of the fleet (workflow/schedules.py),
- the ACME order lock, account, certificate and key, so that one process orders and every
  host serves the same certificate (autocert.py).

Redis helps; no request depends on it. Every call has a short time limit, and one that fails
raises :class:`Unavailable`, on which each caller has its fallback: local counting, a skipped
tick, the certificate already held. One log line when Redis goes away and one when it comes
back (:meth:`Fleet.watch` probes it meanwhile); while it is away, calls fail at once instead
of each waiting for its time limit.

Keys are all under :data:`PREFIX`; give each service its own database (the URL's ``/N``).
This module needs the ``redis`` extra (redis-py); config.py imports it only with ``--redis``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger("aioserver.fleet")

T = TypeVar("T")

PREFIX = "aioserver:"
SCHEMES = ("redis", "rediss", "unix")
# A call's time limit (connect, then each reply). Redis answers in well under a millisecond
# on a LAN; a second means it is gone, and a request on the failure path waits at most that.
TIMEOUT = 1.0
# While Redis is away: how often it is probed (and calls tried again); while it is up: how
# often it is pinged, so that its loss is logged (and the metric drops) without traffic.
PROBE_AWAY = 1.0
PROBE_UP = 5.0


@dataclass(frozen=True, slots=True)
class RedisURL:
    """``--redis``'s URL; printed and logged without its password (``str()``), used as ``.url``."""

    url: str

    def __str__(self) -> str:
        return redacted(self.url)

    def __repr__(self) -> str:
        return f"RedisURL({redacted(self.url)!r})"


def parse_redis_url(value: Any) -> RedisURL:
    """``--redis``'s parser: a ``redis://``, ``rediss://`` (TLS) or ``unix://`` URL.

    Its messages never repeat the value: it may hold a password.
    """
    if not isinstance(value, str) or not value:
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    try:
        parts = urllib.parse.urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError("expected a redis://, rediss:// or unix:// URL; this one does not parse") from None
    if parts.scheme not in SCHEMES:
        raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got a {parts.scheme or 'scheme-less'} one")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("expected unix:///path/to/redis.sock")
    else:
        if not parts.hostname:
            raise ValueError(f"expected {parts.scheme}://HOST[:PORT][/DB]: no host")
        if port == 0:
            raise ValueError("expected a port from 1 to 65535")
        database = parts.path.strip("/")
        if database and not database.isdigit():
            raise ValueError(f"expected {parts.scheme}://HOST[:PORT][/DB] with a database number")
    return RedisURL(value)


def redacted(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:
        return "(unparsable URL)"
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if any(key == "password" for key, _ in query):
        query = [(key, "***" if key == "password" else item) for key, item in query]
        parts = parts._replace(query=urllib.parse.urlencode(query))
    if password is not None:
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{user}:***@{host}")
    text = urllib.parse.urlunsplit(parts)
    if not parts.netloc and url.startswith(f"{parts.scheme}://"):  # urlunsplit makes unix:///p unix:/p
        text = f"{parts.scheme}://{text.removeprefix(parts.scheme + ':')}"
    return text


class Unavailable(Exception):
    """Redis did not answer (or answered with an error): the caller takes its fallback."""


class Refused(Unavailable):
    """Redis answered, with an error for this command (a key of the wrong type, say: whoever
    writes in the database may put one there): it is not away, and other calls go on."""


class Fleet:
    """This process's link to the fleet's Redis: :meth:`call` runs a command, or raises Unavailable."""

    def __init__(self, url: RedisURL, timeout: float = TIMEOUT) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.where = str(url)
        self.timeout = timeout
        # No retries of its own: a failed call is the caller's to fall back from, at once.
        self.client: Redis = Redis.from_url(
            url.url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
        )
        self._password = urllib.parse.urlsplit(url.url).password
        self.up = True  # until a call fails; then False until one succeeds again
        self._retry_at = 0.0  # while away: calls before this fail at once
        self.changed: list[Callable[[bool], None]] = []  # told of each change of `up` (the metric)

    async def call(self, command: Callable[[Redis], Awaitable[T]]) -> T:
        """``command(client)``'s result; Unavailable if Redis is away or fails it."""
        from redis.exceptions import OutOfMemoryError, ReadOnlyError, RedisError, ResponseError

        if not self.up and time.monotonic() < self._retry_at:
            raise Unavailable(f"{self.where} is away")
        try:
            # Belt and braces over the socket time limits: a connect and a reply at most.
            async with asyncio.timeout(2 * self.timeout):
                result = await command(self.client)
        except ResponseError as exc:
            # An answer (WRONGTYPE, say): Redis is there, only this command failed; taken for
            # away, a key of the wrong type made every process say so and drop its connections,
            # over and over. A full or read-only Redis (a replica) fails every write: away.
            if isinstance(exc, OutOfMemoryError | ReadOnlyError):
                self._away(exc)
                raise Unavailable(f"{self.where}: {self._reason(exc)}") from None
            self._back()
            raise Refused(f"{self.where}: {self._reason(exc)}") from None
        except (RedisError, OSError, TimeoutError) as exc:
            if self.up:
                # The idle connections are as dead as this one (a restarted Redis closed them
                # all): dropped now, else each would fail a call once it is back.
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await self.client.connection_pool.disconnect(inuse_connections=False)
            self._away(exc)
            raise Unavailable(f"{self.where}: {self._reason(exc)}") from None
        self._back()
        return result

    async def version(self) -> str:
        """The server's name and version, for ``--check``; Unavailable if it does not answer."""
        info = await self.call(lambda client: client.info("server"))
        if "valkey_version" in info:
            return f"Valkey {info['valkey_version']}"
        return f"Redis {info.get('redis_version', '(version unknown)')}"

    async def watch(self) -> None:
        """Probe Redis for as long as the process runs, so that its loss and return are logged."""
        while True:  # the first probe at once: a Redis away at start-up is said (and measured) then
            try:
                await self.call(lambda client: client.ping())
            except Unavailable:
                pass
            await asyncio.sleep(PROBE_UP if self.up else PROBE_AWAY)

    async def close(self) -> None:
        await self.client.aclose()

    def _away(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + PROBE_AWAY
        if not self.up:
            return
        self.up = False
        logger.warning(
            "redis at %s is away (%s): auth failures are counted by each process, schedule ticks are"
            " skipped, the certificate held is kept, until it is back",
            self.where,
            self._reason(exc),
        )
        for told in self.changed:
            told(False)

    def _back(self) -> None:
        if self.up:
            return
        self.up = True
        logger.warning("redis at %s is back: the fleet shares its state again", self.where)
        for told in self.changed:
            told(True)

    def _reason(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return text.replace(self._password, "***") if self._password else text


def check(url: RedisURL) -> str:
    """``--check``'s line on the fleet's Redis; Unavailable (with the reason) if it does not answer."""

    async def connect() -> str:
        fleet = Fleet(url)
        try:
            return await fleet.version()
        finally:
            await fleet.close()

    logging.getLogger("aioserver.fleet").disabled = True  # --check prints; it does not log
    try:
        return f"  redis: {url} answers ({asyncio.run(connect())})"
    finally:
        logging.getLogger("aioserver.fleet").disabled = False


def key(*parts: str) -> str:
    """A key of the fleet's: :data:`PREFIX` and ``parts`` joined by ``:``."""
    return PREFIX + ":".join(parts)
