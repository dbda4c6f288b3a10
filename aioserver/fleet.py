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
import math
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
# While Redis is away: how often it is probed (no other call is tried); while it is up: how
# often it is pinged, so that its loss is logged (and the metric drops) without traffic.
PROBE_AWAY = 1.0
PROBE_UP = 5.0
# Calls a process has at Redis at once, each on a connection of its own (the pool's size): a
# call beyond waits for one, a time limit at most, then is counted locally (Unavailable)
# without Redis being taken for away. Unbounded, a flood of failures from many clients (an
# attacker's throwaway addresses) opened as many connections; bounded by redis-py alone (its
# pool of 100 in redis-py 8), the calls beyond failed and the process took Redis for away:
# the fleet counting per process, at the attacker's will. 32 calls of well under a millisecond
# each are far more failures a second than a process answers.
CONNECTIONS = 32


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
    _connectable(value)
    return RedisURL(value)


def _connectable(url: str) -> None:
    """Raise ValueError unless redis-py makes a connection of ``url``: its query's parameters are
    its connections' (``?db=1``, ``?socket_timeout=2``...), read when a connection is made. Else
    the server would start and fail each call (an unknown parameter: every auth failure a 500).

    Without the redis extra nothing is checked: config.py says it is missing.
    """
    try:
        from redis.asyncio import ConnectionPool
        from redis.exceptions import RedisError
    except ImportError:
        return
    try:
        ConnectionPool.from_url(url).make_connection()  # type: ignore[no-untyped-call]  # made, not connected
    except (TypeError, ValueError, RedisError):  # their messages may repeat a value: not shown
        raise ValueError(
            "expected a redis://, rediss:// or unix:// URL whose query redis-py takes: one of its"
            " parameters is unknown, or its value does not parse"
        ) from None


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
    if "@" in parts.netloc:
        host = parts.netloc.rpartition("@")[2]
        # A user alone (redis://SECRET@host) is shown as *** too: it is often a password that
        # lacks its colon (redis-py then sends it as the user name, and the server refuses it).
        user = f"{parts.username or ''}:" if password is not None else ""
        parts = parts._replace(netloc=f"{user}***@{host}")
    text = urllib.parse.urlunsplit(parts)
    if not parts.netloc and url.startswith(f"{parts.scheme}://"):  # urlunsplit makes unix:///p unix:/p
        text = f"{parts.scheme}://{text.removeprefix(parts.scheme + ':')}"
    return text


# The probe: what the fleet's calls need, not a PING, which a Redis that refuses them answers
# (an ACL user short of EVALSHA, of the keys under aioserver: or of the news channel, as Redis
# 7's default `acl-pubsub-default resetchannels` leaves a new user; a read-only replica; memory
# full under `noeviction`): such a Redis is away until it serves, instead of "back" at each
# probe and "away" at the next call. A script (EVALSHA) writing a key of ours (SET), and the
# rights on the channel (KEYS[1]: the key; ARGV[1]: the channel; ARGV[2]: the key's life, ms).
# redis.acl_check_cmd is Redis 7's (Valkey's): an older server is not asked.
PROBE = """
if redis.acl_check_cmd and not (redis.acl_check_cmd('PUBLISH', ARGV[1], '')
        and redis.acl_check_cmd('SUBSCRIBE', ARGV[1])) then
    return redis.error_reply('NOPERM this user may not publish and subscribe on channel ' .. ARGV[1])
end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
return 1
"""


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
            max_connections=CONNECTIONS,
        )
        # The URL's ?max_connections= wins over ours: the calls are bounded by the pool's size.
        self._slots = asyncio.Semaphore(self.client.connection_pool.max_connections)
        given = urllib.parse.urlsplit(url.url)
        self._password = given.password or given.username  # a user alone may be a password without its colon
        # The news of clients at the limit (fleetthrottle.py): the database's channel, since
        # channels are the whole server's and keys a database's (see the README on two services).
        self.channel = key("throttled", str(self.client.connection_pool.connection_kwargs.get("db", 0)))
        self._probe = self.client.register_script(PROBE)
        self.up = True  # until a call fails; then False until a probe succeeds
        self._lost = asyncio.Event()  # set by a call that found Redis away: the probe looks at once
        self.changed: list[Callable[[bool], None]] = []  # told of each change of `up` (the metric)
        self._closing = False  # closed by the process's stop: a call then cut off says nothing of Redis

    async def call(self, command: Callable[[Redis], Awaitable[T]], probe: bool = False) -> T:
        """``command(client)``'s result; Unavailable if Redis is away or fails it.

        While Redis is away, only the probe (``probe``) is tried: the others fail at once, and
        only the probe says it is back. A call's success says little: a Redis that refuses the
        fleet some of its commands (see :data:`PROBE`) runs the others, and a call that began
        before Redis was found away may end after.
        """
        from redis.exceptions import NoPermissionError, OutOfMemoryError, ReadOnlyError, RedisError, ResponseError

        if not self.up and not probe:
            raise Unavailable(f"{self.where} is away")
        try:
            async with asyncio.timeout(self.timeout):  # waiting for a connection (CONNECTIONS) is no failure of Redis
                await self._slots.acquire()
        except TimeoutError:
            raise Unavailable(f"{self.where}: every connection busy") from None
        try:
            # Belt and braces over the socket time limits: a connect and a reply at most.
            async with asyncio.timeout(2 * self.timeout):
                result = await command(self.client)
        except ResponseError as exc:
            # An answer (WRONGTYPE, say): Redis is there, only this command failed; taken for
            # away, a key of the wrong type made every process say so and drop its connections,
            # over and over. A full or read-only Redis (a replica) fails every write, and one
            # that denies the fleet's user a command (NOPERM) fails it every time: away; so is
            # any error of the probe, which runs just what the fleet needs.
            if probe or isinstance(exc, OutOfMemoryError | ReadOnlyError | NoPermissionError):
                self._away(exc)
                raise Unavailable(f"{self.where}: {self._reason(exc)}") from None
            raise Refused(f"{self.where}: {self._reason(exc)}") from None
        except (RedisError, OSError, TimeoutError) as exc:
            if self._closing:  # a call (the probe) cut off by close(): no "away" line at the stop
                raise Unavailable(f"{self.where} is closed") from None
            if self.up:
                # The idle connections are as dead as this one (a restarted Redis closed them
                # all): dropped now, else each would fail a call once it is back.
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await self.client.connection_pool.disconnect(inuse_connections=False)
            self._away(exc)
            raise Unavailable(f"{self.where}: {self._reason(exc)}") from None
        finally:
            self._slots.release()
        if probe:
            self._back()
        return result

    async def version(self) -> str:
        """The server's name and version, for ``--check``; Unavailable if it does not answer."""
        info = await self.call(lambda client: client.info("server"), probe=True)
        if "valkey_version" in info:
            return f"Valkey {info['valkey_version']}"
        return f"Redis {info.get('redis_version', '(version unknown)')}"

    async def probe(self) -> None:
        """Whether Redis serves the fleet (see :data:`PROBE`): Unavailable if not."""
        keys, args = [key("probe")], [self.channel, str(math.ceil(2 * PROBE_UP * 1000))]
        await self.call(lambda client: self._probe(keys=keys, args=args, client=client), probe=True)

    async def watch(self) -> None:
        """Probe Redis for as long as the process runs, so that its loss and return are logged."""
        while True:  # the first probe at once: a Redis away at start-up is said (and measured) then
            try:
                await self.probe()
            except Unavailable:
                pass
            self._lost.clear()
            with contextlib.suppress(TimeoutError):  # the interval, or a call finding Redis away
                async with asyncio.timeout(PROBE_UP if self.up else PROBE_AWAY):
                    await self._lost.wait()

    async def close(self) -> None:
        self._closing = True
        await self.client.aclose()

    def _away(self, exc: BaseException) -> None:
        if not self.up:
            return
        self.up = False
        self._lost.set()
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
            version = await fleet.version()
            await fleet.probe()  # answering is not enough: it must take what the fleet asks
            return version
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
