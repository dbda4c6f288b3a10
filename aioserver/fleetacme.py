"""ACME across a fleet (``--redis`` with ``--acme-domain``): one order at a time, one certificate everywhere.

Each host keeps its state directory and its lead process (autocert.py: the one holding the
directory's lock); with ``--redis`` that lead also shares, through the fleet's Redis, under
``aioserver:acme:<names>:`` (``--acme-domain``'s names, in order, joined by commas: hosts
given other names, though the first be the same, have certificates of their own, or each would
replace the other's in Redis at each look, for ever):

- ``lock``: the order lock, a random value set NX with an expiry, extended while the order
  runs, deleted only by its holder (compare and delete, in one script): whoever takes it first
  orders (or renews), the others load the result;
- ``certificate``: a hash of the last certificate obtained (``chain``, ``key``, ``directory``,
  ``not_after``, ``fingerprint``), expiring with the certificate; replaced only by one that
  lives longer (one script), so that the fleet settles on the newest, whoever stored it;
- ``failures`` and ``backoff``: after a failed order, the whole fleet waits (15 s, then three
  times longer each time, as one host would) before the next: the CA counts failed validations
  per name, not per host;

and ``aioserver:acme:account`` (the account key: one account for the service) and
``aioserver:acme:challenge:<token>`` (an http-01 answer, for as long as an order may last): the
CA's validation request may reach any host of the fleet, through the balancer.

What comes from Redis is checked as what comes from the CA is: a certificate must name every
domain, match its key, not have expired and load; an answer must be its token's key
authorization. Keys are never logged; anyone who can read the Redis database can read them
(README: "the fleet's trust model").

Redis away: nothing is ordered (the lock is what keeps each host from ordering its own), the
certificate held serves on, and the order comes once Redis is back; only a certificate in the
last tenth of its life is renewed by a host on its own, as a duplicate beats an expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .fleet import Fleet, Refused, Unavailable, key
from .logtext import loggable

if TYPE_CHECKING:
    from .autocert import AcmeSettings, StateDirectory

logger = logging.getLogger("aioserver.acme")
T = TypeVar("T")

LOCK_TTL = 60.0  # seconds: a lead that dies mid-order holds the fleet up this long at most
LOCK_EXTEND = LOCK_TTL / 3  # how often the holder extends it while its order runs
CHALLENGE_TTL = 600  # seconds: no order lasts longer (autocert.STALE_CHALLENGE)
FAILURES_TTL = 2 * 86400  # seconds: the fleet's count of failed orders is forgotten after this
CALL_TIMEOUT = 5.0  # seconds for a call made from the order's thread (each Redis call is bounded)
# Redis back (after a restart, empty perhaps): no order this long after, while the hosts that
# hold the certificate store it again (each notices within a second: fleet.PROBE_AWAY).
SETTLE = 10.0
NOT_A_HASH = b"(not a hash)"  # in place of the fingerprint of a certificate key of another type
TOO_LARGE = b"(too large)"  # in place of a fingerprint longer than any is

# KEYS[1] the lock, KEYS[2] the backoff; ARGV[1] the holder's value, ARGV[2] the expiry (ms).
# 1: taken; 0: another holds it; negative: the fleet waits after a failure, this many ms; 2:
# another holds it without an expiry or with a longer one than the fleet gives (never one of
# the fleet's: a SET by hand, or a writer's), which would hold every host up for ever: it is
# given the fleet's expiry.
TAKE = """
local wait = redis.call('PTTL', KEYS[2])
if wait > 0 then return -wait end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
local left = redis.call('PTTL', KEYS[1])
if left == -1 or left > tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 2
end
return 0
"""
# The holder alone extends (ARGV[2] ms) or deletes (ARGV[2] empty) the lock.
EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS[1] the certificate hash; ARGV not_after, fingerprint, chain, key, directory, and "1" to
# replace one found unusable (of another type even: HGET would fail on it). Else stored only if
# it lives longer than the one there: concurrent stores settle on the newest.
STORE = """
if ARGV[6] ~= '1' then
  local current = tonumber(redis.call('HGET', KEYS[1], 'not_after'))
  if current and current >= tonumber(ARGV[1]) then return 0 end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'not_after', ARGV[1], 'fingerprint', ARGV[2], 'chain', ARGV[3], 'key', ARGV[4],
  'directory', ARGV[5])
redis.call('EXPIREAT', KEYS[1], ARGV[1])
return 1
"""
# Reads of what anyone who writes in the database may have made huge (a string is up to 512 MB):
# KEYS[1] a hash, ARGV[1] a length, ARGV[2...] fields: their values, or 0 if one is longer (then
# nothing is sent); the fields asked for only (another could be huge too).
FIELDS = """
for i = 2, #ARGV do
  if redis.call('HSTRLEN', KEYS[1], ARGV[i]) > tonumber(ARGV[1]) then return 0 end
end
return redis.call('HMGET', KEYS[1], unpack(ARGV, 2))
"""
# KEYS[1] a string, ARGV[1] a length: its value, or 0 if it is longer.
BOUNDED = """
if redis.call('STRLEN', KEYS[1]) > tonumber(ARGV[1]) then return 0 end
return redis.call('GET', KEYS[1])
"""
CERTIFICATE_FIELDS = ("chain", "key", "directory", "fingerprint")
FINGERPRINT_LIMIT = 64  # a SHA-256, in hex
ANSWER_LIMIT = 1024  # a key authorization: a token (256 at most), a dot and a thumbprint (512)
# Lookups of an answer in Redis at once, per process: each waiting one holds a connection of the
# client's pool, and anyone can send the plain listener requests for made-up tokens (a flood of
# them opened a hundred connections per process, Redis's maxclients being the fleet's). The CA
# sends a handful; a lookup takes well under a millisecond, so a queue drains fast.
CHALLENGE_LOOKUPS = 8

# KEYS[1] the failures count: one more, forgotten FAILURES_TTL after the last.
FAILED = """
local count = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return count
"""


class NotWritten(Exception):
    """The fleet's certificate could not be checked or written in the state directory (the reason, logged)."""


@dataclass(frozen=True, slots=True)
class Shared:
    """A certificate with its key, as stored in Redis or on disk, usable for the domains."""

    chain: bytes
    key: bytes
    not_after: datetime.datetime

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.chain).hexdigest()


class FleetCertificates:
    """One host lead's side of the fleet's ACME state (its methods run on the event loop, but
    :meth:`challenges`' object, made for the order's thread)."""

    def __init__(self, fleet: Fleet, settings: AcmeSettings, state: StateDirectory) -> None:
        self.fleet = fleet
        self.settings = settings
        self.state = state
        prefix = ("acme", ",".join(settings.domains))  # no name holds a comma, nor a colon
        self.lock_key = key(*prefix, "lock")
        self.certificate_key = key(*prefix, "certificate")
        self.failures_key = key(*prefix, "failures")
        self.backoff_key = key(*prefix, "backoff")
        self.account_key = key("acme", "account")
        self._holder: str | None = None  # the lock's value while this process holds it
        self._seen: bytes | None = None  # the fingerprint in Redis when last looked at whole
        self._refused: bytes | None = None  # one found unusable: said once
        self._unwritten = False  # the state directory refused it: said once
        self._back = asyncio.Event()  # set when Redis comes back: look at it at once
        self._back_at = -SETTLE
        self._lookups = asyncio.Semaphore(CHALLENGE_LOOKUPS)  # the challenge route's Redis lookups
        fleet.changed.append(self._changed)

    def _changed(self, up: bool) -> None:
        if up:
            self._back_at = time.monotonic()
            self._seen = None  # what Redis holds now is to be looked at whole
            self._back.set()

    async def pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if Redis comes back meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._back.wait(), seconds)
        self._back.clear()

    def settling(self) -> float:
        """Seconds left before an order, Redis having come back lately (0: none)."""
        return max(0.0, self._back_at + SETTLE - time.monotonic())

    # -- the certificate

    async def sync(self, in_thread: Callable[..., Any]) -> bool:
        """Load a newer certificate from Redis to disk (True), or store ours if it is newer.

        Unavailable when Redis does not answer; NotWritten when the state directory cannot take
        it (no order then: the fleet has a certificate). One small read when nothing changed.
        """
        from .autocert import STATE_FILE_LIMIT

        problem: str | None = None  # why what Redis holds is not even read
        try:
            found = await self._fields(FINGERPRINT_LIMIT, "fingerprint")
            fingerprint = TOO_LARGE if found is None else _bytes(found[0])
        except Refused:  # not a hash (WRONGTYPE): whoever wrote it, it is replaced as an unusable one is
            fingerprint, problem = NOT_A_HASH, "is not a hash of the fleet's"
        if fingerprint is not None and fingerprint == self._seen:
            return False
        local: Shared | None = await in_thread(self._local)
        remote: Shared | None = None
        if fingerprint == TOO_LARGE:
            problem = "is too large"
        elif fingerprint is not None and problem is None:
            values = await self._fields(STATE_FILE_LIMIT, *CERTIFICATE_FIELDS)
            if values is None:
                problem = "is too large"  # the state directory's files are read up to this size
            else:
                fields = zip(CERTIFICATE_FIELDS, values, strict=True)
                stored = {name.encode(): value for name, value in fields if value is not None}
                try:  # checked by loading it, from a scratch copy in the state directory
                    remote = await in_thread(self._usable, stored)
                except OSError as exc:
                    raise self._cannot_write(exc) from None
        if problem is not None:
            self._refuse(fingerprint, problem)
        self._seen = fingerprint
        if remote is not None and (local is None or remote.not_after > local.not_after):
            try:
                await in_thread(self._write, remote)
            except OSError as exc:
                raise self._cannot_write(exc) from None
            self._unwritten = False
            logger.info(
                "acme: loaded the fleet's certificate for %s from redis, valid until %s",
                self.settings.name,
                _iso(remote.not_after),
            )
            return True
        if local is not None and (remote is None or local.not_after > remote.not_after):
            # What is there now, unusable here (damaged, for other names or another CA), is replaced.
            await self.store(local, replace=fingerprint is not None and remote is None)
        return False

    async def _fields(self, limit: int, *fields: str) -> list[Any] | None:
        """The certificate hash's ``fields`` (None each if missing), or None if one is longer than ``limit``."""
        args = (str(limit), *fields)
        found = await self.fleet.call(lambda client: client.eval(FIELDS, 1, self.certificate_key, *args))
        return found if isinstance(found, list) else None

    def _cannot_write(self, exc: OSError) -> NotWritten:
        """A full disk, say: the certificate held serves on, and the next look tries again (said once)."""
        self._seen = None
        where = f"{exc.filename}: " if exc.filename else ""
        reason = f"{where}{exc.strerror or exc}"
        if not self._unwritten:
            self._unwritten = True
            logger.error(
                "acme: cannot write the fleet's certificate for %s in the state directory: %s; trying again",
                self.settings.name,
                reason,
            )
        return NotWritten(reason)

    async def store_held(self, in_thread: Callable[..., Any]) -> None:
        """Store the certificate on disk (just obtained) for the fleet; Unavailable if Redis is away."""
        local = await in_thread(self._local)
        if local is not None:  # the newest there is, whatever Redis holds now
            await self.store(local, replace=True)

    async def store(self, shared: Shared, replace: bool = False) -> None:
        fingerprint = shared.fingerprint
        not_after = str(int(shared.not_after.timestamp()))
        args = (not_after, fingerprint, shared.chain, shared.key, self.settings.directory, "1" if replace else "0")
        if await self.fleet.call(lambda client: client.eval(STORE, 1, self.certificate_key, *args)):
            logger.info("acme: stored the certificate for %s in redis, for the fleet", self.settings.name)
            self._seen = fingerprint.encode()

    def _local(self) -> Shared | None:
        """The certificate on disk, if it serves the domains now and comes from our CA (blocking)."""
        from .autocert import Unusable, examine

        chain, key_pem = self.state.read(self.state.chain_file), self.state.read(self.state.key_file)
        origin = self.state.read(self.state.directory_file)
        if chain is None or key_pem is None:
            return None
        if origin is not None and origin.decode("utf-8", "replace").strip() != self.settings.directory:
            return None
        examined = examine(chain, key_pem, self.settings.domains)
        return None if isinstance(examined, Unusable) else Shared(chain, key_pem, examined[1])

    def _usable(self, stored: dict[bytes, bytes]) -> Shared | None:
        """The certificate in Redis's hash if it can serve here, checked as the CA's is (blocking)."""
        from .autocert import STATE_FILE_LIMIT, Unusable, _unloadable, examine

        chain, key_pem = stored.get(b"chain"), stored.get(b"key")
        fingerprint: bytes | None = stored.get(b"fingerprint")
        if stored.get(b"directory", b"").decode("utf-8", "replace") != self.settings.directory:
            return None  # another CA's (staging, say): this host orders from its own
        problem: str | None = None
        if chain is None or key_pem is None:
            problem = "is incomplete"
        elif len(chain) > STATE_FILE_LIMIT or len(key_pem) > STATE_FILE_LIMIT:
            problem = "is too large"  # the state directory's files are read up to this size
        else:
            examined = examine(chain, key_pem, self.settings.domains)
            if isinstance(examined, Unusable):
                problem = examined.reason
            else:
                problem = _unloadable(self.state.certificate_dir, chain, key_pem)
                if problem is None:
                    return Shared(chain, key_pem, examined[1])
                problem = f"cannot be served: {problem}"
        self._refuse(fingerprint, problem)
        return None

    def _refuse(self, fingerprint: bytes | None, problem: str) -> None:
        """Say why the certificate in Redis is not loaded, once for each one stored there."""
        if fingerprint != self._refused:
            self._refused = fingerprint
            logger.warning(
                "acme: the certificate in redis for %s %s: not loaded", self.settings.name, loggable(problem)
            )

    def _write(self, shared: Shared) -> None:
        """Put the fleet's certificate in the state directory (the key first, as an order does)."""
        self.state.write(self.state.key_file, shared.key)
        self.state.write(self.state.chain_file, shared.chain)
        self.state.write(self.state.directory_file, self.settings.directory.encode() + b"\n")

    # -- the order lock

    async def take(self) -> float | None:
        """Take the fleet's order lock: None once taken, else how long to wait (seconds) before
        trying again: another process orders, or the fleet waits after a failed order.
        Unavailable when Redis does not answer."""
        holder = secrets.token_hex(16)
        args = (holder, str(int(LOCK_TTL * 1000)))
        taken = await self.fleet.call(lambda client: client.eval(TAKE, 2, self.lock_key, self.backoff_key, *args))
        if taken == 1:
            self._holder = holder
            return None
        if taken == 2:
            logger.warning(
                "acme: the fleet's order lock for %s had no expiry or a longer one (not set by aioserver):"
                " it expires in %gs",
                self.settings.name,
                LOCK_TTL,
            )
            return 0.0
        return -int(taken) / 1000 if int(taken) < 0 else 0.0

    async def keep(self) -> None:
        """Extend the lock for as long as the order runs (cancelled after it)."""
        while True:
            await asyncio.sleep(LOCK_EXTEND)
            if self._holder is None:
                return
            try:
                kept = await self._extend(self._holder)
            except Unavailable:
                continue  # tried again; the order goes on (what it gets is stored if Redis is back)
            if not kept:
                logger.warning(
                    "acme: lost the fleet's order lock for %s (redis restarted?): finishing this order",
                    self.settings.name,
                )
                return

    async def _extend(self, holder: str) -> bool:
        args = (holder, str(int(LOCK_TTL * 1000)))
        return bool(await self.fleet.call(lambda client: client.eval(EXTEND, 1, self.lock_key, *args)))

    async def release(self) -> None:
        holder, self._holder = self._holder, None
        if holder is None:
            return
        try:
            await self.fleet.call(lambda client: client.eval(RELEASE, 1, self.lock_key, holder))
        except Unavailable:
            pass  # it expires

    async def succeeded(self) -> None:
        try:
            await self.fleet.call(lambda client: client.delete(self.failures_key, self.backoff_key))
        except Unavailable:
            pass

    async def failed(self) -> int:
        """Count a failed order for the fleet: the number of failures in a row (Unavailable if away)."""
        count = await self.fleet.call(lambda client: client.eval(FAILED, 1, self.failures_key, str(FAILURES_TTL)))
        return int(count)

    async def wait_after_failure(self, delay: float) -> None:
        """Have the whole fleet wait ``delay`` seconds before the next order."""
        await self.fleet.call(lambda client: client.set(self.backoff_key, b"1", px=max(1, int(delay * 1000))))

    # -- the account

    async def share_account(self, in_thread: Callable[..., Any]) -> None:
        """One account for the fleet: the key in Redis if there is one (written to disk), else ours, stored."""
        from .autocert import STATE_FILE_LIMIT

        try:
            stored = _bounded(
                await self.fleet.call(lambda client: client.eval(BOUNDED, 1, self.account_key, STATE_FILE_LIMIT))
            )
        except Refused:  # not a string (WRONGTYPE): unreadable, replaced
            stored = b""
        if stored is not None:
            if await in_thread(self._adopt_account, stored):
                return
            logger.warning("acme: the account key in redis is unreadable: replacing it with this host's")
        from .autocert import _account_key

        await in_thread(_account_key, self.state)  # made if there is none yet
        local = await in_thread(self.state.read, self.state.account_key_file)
        if local is None:
            return  # the order says why
        if stored is None:
            if not await self.fleet.call(lambda client: client.set(self.account_key, local, nx=True)):
                await self.share_account(in_thread)  # another host stored one meanwhile: that one
        else:
            await self.fleet.call(lambda client: client.set(self.account_key, local))

    def _adopt_account(self, pem: bytes) -> bool:
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        try:
            account = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):  # TypeError: encrypted with a password
            return False
        if not isinstance(account, ec.EllipticCurvePrivateKey):
            return False
        if self.state.read(self.state.account_key_file) != pem:
            self.state.write(self.state.account_key_file, pem)
        return True

    # -- the http-01 answers

    def challenges(self, loop: asyncio.AbstractEventLoop) -> FleetChallenges:
        return FleetChallenges(self, loop)

    async def challenge(self, token: str) -> bytes | None:
        """The answer stored in Redis for ``token``, if it is that token's key authorization."""
        from .autocert import KEY_AUTHORIZATION, TOKEN

        if not TOKEN.fullmatch(token):
            return None
        try:
            async with self._lookups:  # waits its turn: a flood queues here, not in Redis's connections
                answer = await self.fleet.call(
                    lambda client: client.eval(BOUNDED, 1, challenge_key(token), ANSWER_LIMIT)
                )
        except Unavailable:
            return None
        if not isinstance(answer, bytes):
            return None
        found = KEY_AUTHORIZATION.fullmatch(answer)
        return answer if found and found.group(1) == token.encode("ascii") else None


def challenge_key(token: str) -> str:
    return key("acme", "challenge", token)


class FleetChallenges:
    """The order's http-01 answers, in the state directory and in Redis (called from the order's thread)."""

    def __init__(self, shared: FleetCertificates, loop: asyncio.AbstractEventLoop) -> None:
        self.shared = shared
        self.loop = loop

    def put_challenge(self, token: str, answer: str) -> None:
        from .autocert import OrderFailed

        self.shared.state.put_challenge(token, answer)
        value = answer.encode("ascii")
        try:
            self._call(lambda client: client.set(challenge_key(token), value, ex=CHALLENGE_TTL))
        except Unavailable as exc:
            raise OrderFailed(f"cannot give the fleet the challenge's answer: {exc}") from None

    def drop_challenge(self, token: str) -> None:
        self.shared.state.drop_challenge(token)
        try:
            self._call(lambda client: client.delete(challenge_key(token)))
        except Unavailable:
            pass  # it expires

    def _call(self, command: Callable[[Any], Any]) -> Any:
        future = asyncio.run_coroutine_threadsafe(self.shared.fleet.call(command), self.loop)
        try:
            return future.result(timeout=CALL_TIMEOUT)
        except TimeoutError:
            future.cancel()
            raise Unavailable("no answer in time") from None


def _bounded(value: object) -> bytes | None:
    """BOUNDED's reply: the value, None if there is none, b"" (unreadable) if it was too long."""
    return b"" if value == 0 else _bytes(value)


def _bytes(value: object) -> bytes | None:
    """A reply as bytes (the client does not decode them), None for anything else."""
    return value if isinstance(value, bytes) else None


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
