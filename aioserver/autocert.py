"""Automatic certificates: obtained and renewed by ACME (RFC 8555), swapped in without a restart.

- :class:`AcmeSettings`: the resolved ``--acme-*`` options (config.py makes it).
- :class:`StateDirectory`: the account key, each certificate chain and its key, and the pending
  http-01 answers, in ``--acme-state-dir``; every file mode 0600, written atomically.
- :func:`order`: one whole order with certbot's ``acme`` library (blocking: run in a thread).
- :class:`CertificateManager`: in every serving process. The one that holds the state
  directory's lock orders and renews (one per host, whatever ``--workers``: the lock is
  taken by one worker, and another takes it when that one dies); the others follow the files.
- :func:`add_challenge_route`: the plain-HTTP listener answers
  ``/.well-known/acme-challenge/<token>`` from the state directory, so that any worker (or any
  process sharing the directory) answers the CA's validation.

With ``--redis``, fleetacme.py extends both across hosts: one order in the fleet at a time,
the certificate shared, the answers in Redis for any host to give.

The ``acme`` package is an extra (``pip install 'aioserver[acme]'``): it is imported only
here, and only once ACME is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import fcntl
import logging
import os
import random
import re
import ssl
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from aiohttp import web

from .errors import http_error
from .files import read_small_file
from .fleet import Unavailable
from .logtext import loggable
from .tls import ReloadableContext, TLSError, TLSFiles, create_ssl_context

if TYPE_CHECKING:
    from .fleet import Fleet
    from .fleetacme import FleetCertificates
    from .systemd import Notifier

logger = logging.getLogger("aioserver.acme")
ACME_THREAD = "aioserver-acme"  # the thread of the blocking ACME work (cli.run looks for it at exit)
T = TypeVar("T")

CHALLENGE_PATH = "/.well-known/acme-challenge/"
TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}", re.ASCII)  # base64url, RFC 8555 section 8.3
# What a challenge file may hold: its token's key authorization, "<token>.<base64url thumbprint>"
# (RFC 8555 section 8.1), and so nothing else that could be under that name.
KEY_AUTHORIZATION = re.compile(rb"([A-Za-z0-9_-]{1,256})\.[A-Za-z0-9_-]{1,512}", re.ASCII)
STATE_FILE_LIMIT = 1 << 20  # bytes: keys and chains are a few kilobytes
# Retries of a failed order: 15 s, then three times longer each time, up to a day (Let's
# Encrypt allows 5 failed validations per hostname an hour; this makes 4 in the first hour).
RETRY_FIRST = 15.0
RETRY_FACTOR = 3.0
RETRY_MAX = 86400.0
ORDER_DEADLINE = 90.0  # seconds for the CA to validate and issue, once the challenges are answered
# Each answer of the CA: this long at most for its body (each read is bounded by the network
# timeout, but a byte every few seconds would go on for ever), this large at most (an endless
# one would fill the memory). A directory, an order or a chain is a few kilobytes.
ANSWER_DEADLINE = 30.0
ANSWER_LIMIT = 1 << 20
NETWORK_TIMEOUT = 30  # seconds for a connection or a read (certbot's acme library: 45)
# A whole order, or a look for the CA's renewal window, given up after this long (the CA could
# send its headers a byte at a time): the thread is left to end, writing nothing.
ORDER_TIMEOUT = 600.0
STALE_CHALLENGE = 600.0  # an answer this old (seconds) belongs to no order under way
RESTART_AFTER = 60.0  # seconds before the certificate work starts again after an unexpected error
# A process that does not order looks at the files (and for the lock) this often.
FOLLOW_INTERVAL = 2.0
# With a fleet (--redis): how often a lead looks at Redis for a certificate another host
# stored while its own is not due (one small read: a renewal reaches every host within this),
# and how soon it tries again to order while Redis is away.
POLL = 30.0
FLEET_RETRY = 5.0
# Without a renewal window from the CA, renew when a third of the lifetime is left, a little
# earlier at random (up to a thirtieth of the lifetime) so that a fleet does not renew at once.
RENEW_WHEN_LEFT = 1 / 3
JITTER = 1 / 30
RECHECK = 6 * 3600.0  # ask again for the CA's renewal window (RFC 9773) at most this far apart
# The CA's renewal time is kept inside the certificate's life: not after a tenth of it is left
# (a window past the expiry would let it expire), not sooner than a tenth of it, an hour at
# most, from now (a window over already, for each new certificate too, would order for ever).
WINDOW_MARGIN = 1 / 10
WINDOW_SPACING = datetime.timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class AcmeSettings:
    domains: tuple[str, ...]  # the first names the certificate
    email: str | None
    directory: str
    ca_certs: str | None  # trusted for the ACME server's own HTTPS; None: the system's
    state_dir: str

    @property
    def name(self) -> str:
        return self.domains[0]


@dataclass(frozen=True, slots=True)
class Held:
    """A certificate in the state directory that serves ``domains``."""

    not_before: datetime.datetime
    not_after: datetime.datetime
    directory: str | None  # the ACME directory it came from, when known
    chain: bytes

    def renew_at(self) -> datetime.datetime:
        lifetime = self.not_after - self.not_before
        return self.not_after - lifetime * (RENEW_WHEN_LEFT + random.uniform(0, JITTER))

    def within_life(self, suggested: datetime.datetime, now: datetime.datetime) -> datetime.datetime:
        """The CA's suggested renewal time, bounded by WINDOW_MARGIN and WINDOW_SPACING."""
        lifetime = self.not_after - self.not_before
        earliest = now + min(lifetime * WINDOW_MARGIN, WINDOW_SPACING)
        return min(max(suggested, earliest), self.not_after - lifetime * WINDOW_MARGIN)


@dataclass(frozen=True, slots=True)
class _Plan:
    chain: bytes  # of the certificate it is for
    due: datetime.datetime  # its renewal
    recheck_at: datetime.datetime  # when to ask the CA for its renewal window again


class StateDirectory:
    """The files of ``--acme-state-dir``: created 0700, every file 0600, replaced atomically."""

    def __init__(self, path: str, name: str) -> None:
        self.path = path
        self.account_key_file = os.path.join(path, "account.key")
        self.certificate_dir = os.path.join(path, "certificates", name)
        self.chain_file = os.path.join(self.certificate_dir, "fullchain.pem")
        self.key_file = os.path.join(self.certificate_dir, "key.pem")
        self.directory_file = os.path.join(self.certificate_dir, "directory")
        self.challenge_dir = os.path.join(path, "challenges")
        # One lock per certificate, not per directory: services for other names may share the
        # directory (two copies of a unit share its StateDirectory=), each ordering its own.
        self.lock_file = os.path.join(self.certificate_dir, "lock")

    def prepare(self) -> None:
        """Make the directories (0700); raises OSError when they cannot be made or written, or
        when another user could change what is in them."""
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        _check_private(self.path)  # before anything is made in it
        for directory in (os.path.dirname(self.certificate_dir), self.certificate_dir, self.challenge_dir):
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory, mode=0o700)
            _check_private(directory)
        probe = tempfile.NamedTemporaryFile(dir=self.path, prefix=".probe-")  # noqa: SIM115
        probe.close()

    def files(self, ca_certs: str | None, cert_reqs: str | None) -> TLSFiles:
        return TLSFiles(self.chain_file, self.key_file, ca_certs=ca_certs, cert_reqs=cert_reqs)

    def write(self, path: str, data: bytes) -> None:
        """Replace ``path`` (one of the state directory's files) with ``data`` atomically (temp
        file, fsync, rename), mode 0600."""
        self.put_in_place(self.write_temporary(path, data), path)

    def write_temporary(self, path: str, data: bytes) -> str:
        """``data`` in a new file beside ``path`` (mode 0600, synced), to be put in place: its path."""
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):  # removed since start-up: made again, each 0700
            self.prepare()  # (os.makedirs would give the directories above the umask's mode)
        descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
        try:
            with os.fdopen(descriptor, "wb") as file:  # mkstemp makes it 0600
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        return temporary

    def put_in_place(self, temporary: str, path: str) -> None:
        try:
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        _fsync_directory(os.path.dirname(path))

    def read(self, path: str) -> bytes | None:
        try:
            return read_small_file(path, STATE_FILE_LIMIT)
        except OSError:  # missing, or a directory, a FIFO, a permission: made anew by the next order
            return None

    def unreadable(self, path: str) -> str | None:
        """Why ``path`` cannot be read, if it exists (blocking)."""
        try:
            read_small_file(path, STATE_FILE_LIMIT)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return exc.strerror or str(exc)
        return None

    # -- what the CA asks for at /.well-known/acme-challenge/<token>

    def put_challenge(self, token: str, answer: str) -> None:
        self.write(os.path.join(self.challenge_dir, token), answer.encode("ascii"))

    def drop_challenge(self, token: str) -> None:
        with contextlib.suppress(OSError):  # gone already; or not a file, and never served
            os.unlink(os.path.join(self.challenge_dir, token))

    def drop_stale_challenges(self) -> None:
        """Drop what a process stopped mid-order left: the answers, and its temporary files (a
        new key not put in place, say), those older than any order lasts.

        Fresher ones may be another certificate's, whose order is under way in another process.
        """
        stale = time.time() - STALE_CHALLENGE
        for directory, temporaries_only in ((self.challenge_dir, False), (self.certificate_dir, True)):
            try:
                entries = list(os.scandir(directory))
            except OSError:  # made again by the next file written
                continue
            for entry in entries:
                if temporaries_only and not entry.name.startswith("."):
                    continue
                with contextlib.suppress(OSError):
                    if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < stale:
                        os.unlink(entry.path)

    def challenge(self, token: str) -> bytes | None:
        """The answer to ``token``'s challenge, if one was put: on the event loop, so it must
        not block. A link (to a key, say), a FIFO or anything but a key authorization for this
        token is no answer."""
        if not TOKEN.fullmatch(token):
            return None
        try:
            answer = read_small_file(os.path.join(self.challenge_dir, token), 1024, follow_symlinks=False)
        except OSError:
            return None
        found = KEY_AUTHORIZATION.fullmatch(answer)
        return answer if found and found.group(1) == token.encode("ascii") else None


def _check_private(directory: str) -> None:
    """Raise OSError unless ``directory`` is a directory that only this user can change: its
    owner, or anyone who can write in it, could put there a link the challenge route follows,
    or a certificate and key of their own for the server to serve."""
    status = os.stat(directory)
    if not stat.S_ISDIR(status.st_mode):
        raise OSError(errno.ENOTDIR, f"{directory} is not a directory")
    if status.st_uid != os.geteuid():
        raise OSError(errno.EPERM, f"{directory} belongs to another user (uid {status.st_uid})")
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OSError(
            errno.EPERM,
            f"{directory} is writable by other users (mode {stat.S_IMODE(status.st_mode):04o}): chmod 700 it",
        )


def _fsync_directory(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# -- the certificate held, and one order (blocking: both run in the ACME thread)


def load_held(state: StateDirectory, domains: tuple[str, ...]) -> Held | None:
    """The certificate in ``state`` if it can serve ``domains`` now, else None (and why, logged).

    Usable: a chain whose leaf names every domain and has not expired, and the key that matches it.
    """
    chain, key = state.read(state.chain_file), state.read(state.key_file)
    if chain is None or key is None:
        problem = state.unreadable(state.chain_file) or state.unreadable(state.key_file)
        if problem:  # not merely missing: a directory in the way, a permission, a FIFO
            logger.warning("acme: cannot read the certificate or key in %s: %s", state.certificate_dir, problem)
        return None
    examined = examine(chain, key, domains)
    if isinstance(examined, Unusable):
        log = logger.warning if examined.damaged else logger.info
        log("acme: the certificate held in %s %s: ordering a new one", state.certificate_dir, examined.reason)
        return None
    origin = state.read(state.directory_file)
    return Held(examined[0], examined[1], origin.decode("utf-8", "replace").strip() if origin else None, chain)


@dataclass(frozen=True, slots=True)
class Unusable:
    """Why a certificate chain and key cannot serve: ``reason`` follows "the certificate"."""

    reason: str
    damaged: bool  # unreadable or mismatched, rather than for other names or expired


def examine(
    chain: bytes, key: bytes, domains: tuple[str, ...]
) -> tuple[datetime.datetime, datetime.datetime] | Unusable:
    """The leaf's (not before, not after) if ``chain`` and ``key`` can serve ``domains`` now."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        leaf = x509.load_pem_x509_certificate(chain)
        private = serialization.load_pem_private_key(key, password=None)
        try:
            alternative = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = set(alternative.get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            names = set()
        matches = private.public_key().public_bytes(*spki) == leaf.public_key().public_bytes(*spki)
    # ValueError: cryptography's word for bytes that are not what they should be; TypeError for
    # a key encrypted with a password (whoever writes the fleet's Redis may put one there), and
    # UnsupportedAlgorithm for a key or certificate of a kind it cannot use, DuplicateExtension
    # for a certificate with two SAN lists (none of them ValueErrors).
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        return Unusable("or its key is unreadable", damaged=True)
    if not matches:
        return Unusable("does not match its key", damaged=True)
    missing = [domain for domain in domains if domain not in names]
    if missing:
        return Unusable(f"does not name {', '.join(missing)}", damaged=False)
    if leaf.not_valid_after_utc <= datetime.datetime.now(datetime.UTC):
        return Unusable(f"expired at {_iso(leaf.not_valid_after_utc)}", damaged=False)
    return leaf.not_valid_before_utc, leaf.not_valid_after_utc


class Challenges(Protocol):
    """Where an order puts its http-01 answers (blocking): the state directory, or the fleet's Redis too."""

    def put_challenge(self, token: str, answer: str) -> None: ...

    def drop_challenge(self, token: str) -> None: ...


class OrderFailed(Exception):
    """An order that did not give a certificate: ``reason`` says why, ``retry_after`` when the CA asked."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def order(
    settings: AcmeSettings,
    state: StateDirectory,
    abandoned: threading.Event | None = None,
    answers: Challenges | None = None,
) -> Held:
    """Obtain a certificate for ``settings.domains`` and store it with its new key; raises OrderFailed.

    Account (its key made once, ECDSA P-256, terms of service agreed), order, http-01
    challenges answered from ``state`` (or ``answers``: the fleet's Redis too) by whichever
    process the CA reaches, finalize with a new ECDSA P-256 key, download the chain; the chain
    is checked before anything is replaced. Once ``abandoned`` is set (the order took too long),
    nothing is written.
    """
    import requests
    from acme import errors as acme_errors
    from acme import messages

    client: _Client | None = None
    try:
        client = _client(settings, state)
        return _order(client, settings, state, abandoned or threading.Event(), answers or state)
    except OrderFailed:
        raise
    except acme_errors.ValidationError as exc:
        raise OrderFailed(_validation_problems(exc)) from None
    except messages.Error as exc:
        raise OrderFailed(_problem(exc), client.net.retry_after if client else None) from None
    except acme_errors.TimeoutError:
        raise OrderFailed(f"the CA did not validate and issue within {ORDER_DEADLINE:g}s") from None
    except requests.RequestException as exc:
        raise OrderFailed(_network_problem(exc)) from None
    except (acme_errors.Error, ValueError) as exc:  # unexpected answers (jose's errors are ValueErrors)
        raise OrderFailed(f"{type(exc).__name__}: {loggable(str(exc))}") from None
    except OSError as exc:  # the state directory's (requests' errors, OSErrors too, are above)
        where = f"{exc.filename}: " if exc.filename else ""
        raise OrderFailed(f"cannot write in the state directory: {where}{exc.strerror or exc}") from None


class _Client:
    """certbot's ``acme`` client and its network, with the CA's last Retry-After kept."""

    def __init__(self, acme: Any, net: Any) -> None:
        self.acme = acme
        self.net = net


def _client(settings: AcmeSettings, state: StateDirectory, account: bool = True) -> _Client:
    """A client of the CA's directory; with ``account``, registered with the account key (once
    made, the same account is found again by its key)."""
    import josepy
    import requests
    from acme import client, messages
    from acme import errors as acme_errors

    class Network(client.ClientNetwork):
        retry_after: float | None = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            adapter = _bounded_adapter()
            self.session.mount("https://", adapter)
            self.session.mount("http://", adapter)

        def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
            response = super()._send_request(method, url, *args, **kwargs)
            if response.status_code >= 400:  # rateLimited and the like say when to come back
                self.retry_after = _seconds(response.headers.get("Retry-After"))
            return response

    from . import __version__

    key = josepy.jwk.JWKEC(key=_account_key(state))
    # requests takes a CA file for verify=, which the library passes through as it is.
    trust: Any = _trust(settings)
    net = Network(
        key, alg=josepy.jwa.ES256, verify_ssl=trust, user_agent=f"aioserver/{__version__}", timeout=NETWORK_TIMEOUT
    )
    try:
        directory = client.ClientV2.get_directory(settings.directory, net)
        acme = client.ClientV2(directory, net)
        if not account:
            return _Client(acme, net)
        registration = messages.NewRegistration.from_data(email=settings.email, terms_of_service_agreed=True)
        try:
            acme.new_account(registration)
        except acme_errors.ConflictError as exc:  # this key's account exists: RFC 8555 section 7.3.1
            net.account = messages.RegistrationResource(uri=exc.location, body=messages.Registration())
    except messages.Error as exc:
        raise OrderFailed(_problem(exc), net.retry_after) from None
    except requests.RequestException as exc:
        raise OrderFailed(_network_problem(exc)) from None
    except (acme_errors.Error, ValueError) as exc:
        raise OrderFailed(f"{type(exc).__name__}: {loggable(str(exc))}") from None
    return _Client(acme, net)


class _AnswerTooLarge(Exception):
    """An answer of the CA over ANSWER_LIMIT (raised as a requests error too, by _bounded_adapter)."""


def _bounded_adapter() -> Any:
    """requests' transport, reading each answer's body within ANSWER_DEADLINE and ANSWER_LIMIT."""
    import time

    import requests
    from requests.adapters import HTTPAdapter

    class TooLarge(_AnswerTooLarge, requests.RequestException):
        pass

    class BoundedAdapter(HTTPAdapter):
        def send(
            self,
            request: requests.PreparedRequest,
            stream: bool = False,
            timeout: Any = None,
            verify: bool | str = True,
            cert: Any = None,
            proxies: Any = None,
        ) -> requests.Response:
            response = super().send(request, True, timeout, verify, cert, proxies)
            if stream:
                return response
            deadline = time.monotonic() + ANSWER_DEADLINE
            chunks, size = [], 0
            try:
                while True:
                    if time.monotonic() > deadline:
                        raise requests.exceptions.ReadTimeout(f"no whole answer within {ANSWER_DEADLINE:g}s")
                    # At most one read of the socket (each bounded by NETWORK_TIMEOUT), decoded.
                    chunk = response.raw.read1(65536, decode_content=True)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > ANSWER_LIMIT:
                        raise TooLarge(f"the ACME server's answer is larger than {ANSWER_LIMIT} bytes")
                    chunks.append(chunk)
            except BaseException:
                response.close()
                raise
            # What requests itself does once it has read a body: the bytes kept, the connection
            # back to its pool.
            response._content = b"".join(chunks)
            response._content_consumed = True
            response.raw.release_conn()
            return response

    return BoundedAdapter()


def _order(
    client: _Client, settings: AcmeSettings, state: StateDirectory, abandoned: threading.Event, answers: Challenges
) -> Held:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # On disk before the CA is asked: a full or read-only state directory fails the order
    # now, not once a certificate is issued, only to be lost (and ordered again at each retry:
    # a CA counts duplicate certificates, Let's Encrypt allows 5 a week).
    key_temporary = state.write_temporary(state.key_file, key_pem)
    try:
        return _order_with_key(client, settings, state, abandoned, answers, key_pem, key_temporary)
    finally:
        with contextlib.suppress(FileNotFoundError):  # not put in place
            os.unlink(key_temporary)


def _order_with_key(
    client: _Client,
    settings: AcmeSettings,
    state: StateDirectory,
    abandoned: threading.Event,
    answers: Challenges,
    key_pem: bytes,
    key_temporary: str,
) -> Held:
    from acme import challenges, crypto_util, messages

    pending = client.acme.new_order(crypto_util.make_csr(key_pem, list(settings.domains)))
    answered: list[str] = []
    try:
        for authorization in pending.authorizations:
            if authorization.body.status == messages.STATUS_VALID:  # validated lately: reused
                continue
            challenge = next((c for c in authorization.body.challenges if isinstance(c.chall, challenges.HTTP01)), None)
            if challenge is None:
                name = loggable(str(authorization.body.identifier.value))
                raise OrderFailed(f"the CA offers no http-01 challenge for {name}")
            response, validation = challenge.response_and_validation(client.net.key)
            token = challenge.chall.encode("token")
            answers.put_challenge(token, validation)
            answered.append(token)
            client.acme.answer_challenge(challenge, response)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_DEADLINE)
        done = client.acme.poll_and_finalize(pending, deadline)
    finally:
        for token in answered:
            answers.drop_challenge(token)
    chain = done.fullchain_pem.encode("ascii")
    # Checked before it replaces anything: a chain for other names, expired, or that OpenSSL
    # cannot load would be served by the next reload (SIGHUP, the hourly one), and a restart
    # would find no certificate at all.
    examined = examine(chain, key_pem, settings.domains)
    if isinstance(examined, Unusable):
        raise OrderFailed(f"the CA's certificate {examined.reason}")
    problem = _unloadable(state.certificate_dir, chain, key_pem)
    if problem:
        raise OrderFailed(f"the CA's certificate chain cannot be served: {problem}")
    if abandoned.is_set():
        raise OrderFailed("abandoned: it took too long")
    # The key first: a process loading between the two sees a mismatched pair, keeps what it
    # serves and tries again; never a new certificate with no key.
    state.put_in_place(key_temporary, state.key_file)
    state.write(state.chain_file, chain)
    state.write(state.directory_file, settings.directory.encode() + b"\n")
    return Held(examined[0], examined[1], settings.directory, chain)


def _unloadable(directory: str, chain: bytes, key: bytes) -> str | None:
    """Why OpenSSL would not load ``chain`` with ``key``, or None (blocking: it loads copies of
    them, in a private scratch directory beside where they go)."""
    with tempfile.TemporaryDirectory(dir=directory, prefix=".check-") as scratch:  # mode 0700
        paths = os.path.join(scratch, "fullchain.pem"), os.path.join(scratch, "key.pem")
        for path, data in zip(paths, (chain, key), strict=True):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
                file.write(data)
        try:
            create_ssl_context(TLSFiles(*paths))
        except TLSError as exc:
            return str(exc).replace(scratch + os.sep, "")
    return None


def renewal_window(settings: AcmeSettings, state: StateDirectory, held: Held) -> datetime.datetime | None:
    """The CA's suggested renewal time (ACME Renewal Information, RFC 9773), when it offers one."""
    try:
        client = _client(settings, state, account=False)
        try:
            client.acme.directory["renewalInfo"]
        except KeyError:  # this CA offers none
            return None
        when, _ = client.acme.renewal_time(held.chain)
    except Exception as exc:  # any failure: the default rule stands
        logger.info(
            "acme: no renewal window from the CA (%s): renewing by the certificate's lifetime", loggable(str(exc))
        )
        return None
    if not isinstance(when, datetime.datetime):
        return None
    return when if when.tzinfo else when.astimezone(datetime.UTC)


def _account_key(state: StateDirectory) -> Any:
    """The account's key: made once (ECDSA P-256), made anew when its file is unreadable."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = state.read(state.account_key_file)
    if pem is not None:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
            if isinstance(key, ec.EllipticCurvePrivateKey):
                return key
        except ValueError:
            pass
        logger.warning("acme: %s is unreadable: making a new account key", state.account_key_file)
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    if pem is not None:  # unreadable: replaced
        state.write(state.account_key_file, key_pem)
        return key
    # None yet: made only if no other process (ordering another certificate of the directory)
    # made one meanwhile, else that one is the account's: a link fails where a rename replaces.
    temporary = state.write_temporary(state.account_key_file, key_pem)
    try:
        os.link(temporary, state.account_key_file)
    except FileExistsError:
        return _account_key(state)
    finally:
        os.unlink(temporary)
    _fsync_directory(state.path)
    return key


def _trust(settings: AcmeSettings) -> str | bool:
    """What verifies the ACME server: ``--acme-ca-certs``, else the system trust store (as
    OpenSSL finds it, ``SSL_CERT_FILE`` included), not the bundle that requests ships."""
    if settings.ca_certs:
        return settings.ca_certs
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.capath):
        if candidate and os.path.exists(candidate):
            return candidate
    return True


def _seconds(retry_after: str | None) -> float | None:
    if not retry_after:
        return None
    if retry_after.strip().isdigit():
        return float(retry_after.strip())
    try:
        from email.utils import parsedate_to_datetime

        return max(0.0, (parsedate_to_datetime(retry_after) - datetime.datetime.now(datetime.UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


def _problem(error: Any) -> str:
    """An RFC 7807 problem document as one line: its type and detail."""
    detail = f": {loggable(str(error.detail))}" if error.detail else ""
    return f"{loggable(str(error.typ))}{detail}"


def _validation_problems(exc: Any) -> str:
    problems = []
    for authorization in exc.failed_authzrs:
        for challenge in authorization.body.challenges:
            if challenge.error is not None:
                name = loggable(str(authorization.body.identifier.value))
                problems.append(f"{name}: {_problem(challenge.error)}")
    return "; ".join(problems) or "validation failed"


def _network_problem(exc: BaseException) -> str:
    """What went wrong reaching the CA, without the page of requests' and urllib3's reprs."""
    import requests

    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLError):
            # _ssl sets reason; urllib3's pyopenssl raises ssl.SSLError("read error: ...") without.
            detail = getattr(cause, "reason", None) or cause.strerror or (str(cause.args[0]) if cause.args else "")
            return f"TLS with the ACME server failed: {detail or type(cause).__name__}"
        if isinstance(cause, OSError) and cause.errno is not None:
            return f"cannot reach the ACME server: {cause.strerror or errno.errorcode.get(cause.errno)}"
        nested = [a for a in cause.args if isinstance(a, BaseException)]
        cause = (
            cause.__cause__ or cause.__context__ or getattr(cause, "reason", None) or (nested[0] if nested else None)
        )
        if not isinstance(cause, BaseException):
            cause = None
    if isinstance(exc, requests.Timeout):
        return "the ACME server did not answer in time"
    if isinstance(exc, _AnswerTooLarge):
        return str(exc)
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS with the ACME server failed"
    return f"cannot reach the ACME server ({type(exc).__name__})"


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- in every serving process


class CertificateManager:
    """Brings the certificate to ``tls``, then keeps it fresh, in every serving process.

    ``ready`` is set once ``tls`` serves a usable certificate. The process holding the state
    directory's lock (``fcntl.flock``, released by the kernel when it dies) orders and renews;
    the others load what it writes. With ``fleet`` (``--redis``), that process orders only
    while it holds the fleet's order lock too, and brings the certificate another host stored
    in Redis to the state directory (fleetacme.py).
    """

    def __init__(
        self,
        settings: AcmeSettings,
        tls: ReloadableContext,
        notifier: Notifier | None = None,
        fleet: Fleet | None = None,
    ) -> None:
        self.settings = settings
        self.state = StateDirectory(settings.state_dir, settings.name)
        self.tls = tls
        self.notifier = notifier
        self.ready = asyncio.Event()
        self._lock: int | None = None
        self._lock_failed = False  # said once, until the lock file opens again
        self.shared: FleetCertificates | None = None
        if fleet is not None:
            from .fleetacme import FleetCertificates

            self.shared = FleetCertificates(fleet, settings, self.state)
        self._said: str | None = None  # the fleet's last reason not to order now, said once

    async def run(self) -> None:
        """Follow the files until this process gets the lock, then order and renew; forever.

        An unexpected error is logged and the work starts again a minute later: the task
        must not end in silence, leaving the certificate to expire.
        """
        try:
            while True:
                try:
                    await self._run()
                except Exception:
                    logger.exception("acme: certificate work failed: starting again in %gs", RESTART_AFTER)
                    await asyncio.sleep(RESTART_AFTER)
        finally:
            if self._lock is not None:
                os.close(self._lock)  # and so the lock: another process may take it

    async def _run(self) -> None:
        following = False
        while not await self._in_thread(self._take_lock):
            if not following:
                await self._in_thread(self._follow)  # what is there already, at once
                if not self.ready.is_set():
                    logger.info("acme: another process orders the certificate: waiting for it")
                following = True
            await asyncio.sleep(FOLLOW_INTERVAL)
            await self._in_thread(self._follow)
        await self._lead()

    def _take_lock(self) -> bool:
        """Whether this process holds the lock of its certificate now (blocking)."""
        if self._lock is not None:  # taken before an error started the work again
            return True
        try:
            os.makedirs(self.state.certificate_dir, mode=0o700, exist_ok=True)  # removed to order anew, say
            descriptor = os.open(self.state.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            try:  # a read-only directory: flock needs no write access, ordering says what fails
                descriptor = os.open(self.state.lock_file, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                if not self._lock_failed:
                    logger.error("acme: cannot open %s: %s: trying again", self.state.lock_file, exc.strerror or exc)
                self._lock_failed = True
                return False
        self._lock_failed = False
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return False
        self._lock = descriptor
        return True

    def _follow(self) -> None:
        """Load the files when they changed and hold a certificate that serves now (blocking).

        Whether or not it names every domain, or comes from the directory given: a name just
        added (its DNS not ready, perhaps) or a move from staging to production orders a new
        one, and until it comes the names it has keep being served.
        """
        if self.tls.current is not None and not self.tls.changed_on_disk():
            # Loaded before this process began: a worker forked after its parent reread the
            # files (SIGHUP) starts with them. Held, it serves.
            if not self.ready.is_set() and load_held(self.state, ()) is not None:
                self.ready.set()
            return
        if load_held(self.state, ()) is not None:
            self._load()

    def _load(self) -> None:
        """Serve the files' certificate to new connections; the old one stays if they do not load."""
        try:
            self.tls.reload()
        except TLSError as exc:  # a pair half-replaced by another process: next time
            logger.info("acme: the certificate files do not load yet (%s): trying again", exc)
            return
        if not self.ready.is_set():
            self.ready.set()

    async def _lead(self) -> None:
        """Order when nothing usable is held, then renew when due; a failure keeps what is served."""
        name = self.settings.name
        failures = 0
        plan: _Plan | None = None  # when to renew the certificate held
        await self._in_thread(self.state.drop_stale_challenges)
        while True:
            await self._sync()  # the fleet's certificate to disk, if newer; ours to the fleet
            await self._in_thread(self._follow)  # what is on disk, if it changed and serves
            held = await self._in_thread(load_held, self.state, self.settings.domains)
            now = datetime.datetime.now(datetime.UTC)
            due = now
            if held is not None and held.directory in (None, self.settings.directory):
                if plan is None or plan.chain != held.chain or now >= plan.recheck_at:
                    try:
                        async with asyncio.timeout(ORDER_TIMEOUT):
                            window = await self._in_thread(renewal_window, self.settings, self.state, held)
                    except TimeoutError:
                        logger.info("acme: no renewal window from the CA (no answer): renewing by the lifetime")
                        window = None
                    fresh = plan is None or plan.chain != held.chain
                    due = held.within_life(window, now) if window else held.renew_at()
                    plan = _Plan(held.chain, due, now + datetime.timedelta(seconds=RECHECK))
                    if fresh:
                        logger.info(
                            "acme: certificate for %s valid until %s, renewal at %s%s",
                            name,
                            _iso(held.not_after),
                            _iso(plan.due),
                            " (the CA's renewal window)" if window else "",
                        )
                due = plan.due
            elif held is not None:
                logger.info(
                    "acme: the certificate held comes from %s: ordering one from %s",
                    held.directory,
                    self.settings.directory,
                )
            wait = (min(due, plan.recheck_at) if plan else due) - datetime.datetime.now(datetime.UTC)
            if wait.total_seconds() > 0:
                if self.shared is None:
                    await asyncio.sleep(wait.total_seconds())
                else:  # a look at Redis meanwhile (another host's renewal serves here too), and once it is back
                    await self.shared.pause(min(wait.total_seconds(), POLL))
                continue
            if due > datetime.datetime.now(datetime.UTC):
                continue  # time to ask the CA for its window again
            pause, alone = await self._fleet_turn(held)
            if pause is not None:
                await (self.shared.pause(pause) if self.shared else asyncio.sleep(pause))
                continue
            try:
                failures = await self._order(failures, alone)
            finally:
                if self.shared is not None:
                    await self.shared.release()

    async def _order(self, failures: int, alone: bool) -> int:
        """One order (and, after a failure, the wait before the next): the failures in a row since."""
        name = self.settings.name
        keeping: asyncio.Task[None] | None = None
        challenges: Challenges = self.state
        if self.shared is not None and not alone:
            keeping = asyncio.create_task(self.shared.keep())
            challenges = self.shared.challenges(asyncio.get_running_loop())
        try:
            logger.info(
                "acme: ordering a certificate for %s from %s", ", ".join(self.settings.domains), self.settings.directory
            )
            self._status(f"acme: ordering a certificate for {name}")
            abandoned = threading.Event()
            try:
                if self.shared is not None and not alone:
                    await self.shared.share_account(self._in_thread)  # one account for the fleet
                async with asyncio.timeout(ORDER_TIMEOUT):
                    held = await self._in_thread(order, self.settings, self.state, abandoned, challenges)
            except (OrderFailed, Unavailable, OSError) as exc:
                abandoned.set()  # an order still running in its thread writes nothing now
                if isinstance(exc, Unavailable):
                    failure = OrderFailed(f"redis did not answer ({exc})")
                elif isinstance(exc, TimeoutError):
                    failure = OrderFailed(f"not done within {ORDER_TIMEOUT:g}s")
                elif isinstance(exc, OSError):  # the fleet's account key, written before the order
                    where = f"{exc.filename}: " if exc.filename else ""
                    failure = OrderFailed(f"cannot write in the state directory: {where}{exc.strerror or exc}")
                else:
                    failure = exc
                if self.shared is not None and not alone:
                    with contextlib.suppress(Unavailable):  # counted for the whole fleet
                        failures = await self.shared.failed() - 1
                delay = min(RETRY_MAX, RETRY_FIRST * RETRY_FACTOR**failures) * random.uniform(1, 1.1)
                # The CA's Retry-After is respected up to the longest wait of our own: "ten
                # years" (a broken CA, or a hostile one) would leave the certificate to expire.
                delay = max(delay, min(failure.retry_after or 0, RETRY_MAX))
                failures += 1
                logger.error("acme: order for %s failed: %s; retrying in %ds", name, failure.reason, round(delay))
                self._status(f"acme: order for {name} failed, retrying in {round(delay)}s")
                if self.shared is not None and not alone:
                    with contextlib.suppress(Unavailable):  # no other host orders before then either
                        await self.shared.wait_after_failure(delay)
                    await self.shared.release()
                await asyncio.sleep(delay)
                return failures
            await self._in_thread(self._load)
            logger.info("acme: certificate for %s obtained, valid until %s", name, _iso(held.not_after))
            if self.shared is not None:
                try:
                    await self.shared.store_held(self._in_thread)
                    await self.shared.succeeded()
                except Unavailable:
                    pass  # stored by the next look, once Redis is back
            return 0
        finally:
            if keeping is not None:
                keeping.cancel()

    async def _sync(self) -> None:
        """With a fleet: a newer certificate from Redis to the state directory (and served), or
        ours to Redis; nothing when Redis is away."""
        if self.shared is None:
            return
        from .fleetacme import NotWritten

        with contextlib.suppress(Unavailable, NotWritten):  # logged; the certificate held serves on
            if await self.shared.sync(self._in_thread):
                await self._in_thread(self._load)

    async def _fleet_turn(self, held: Held | None) -> tuple[float | None, bool]:
        """Whether this process may order now: (None, alone) if so, else (seconds to wait, _).

        Without a fleet, always. With one, once it holds the fleet's order lock and Redis holds
        no newer certificate (one a host that held the lock before just stored); alone (without
        the lock) only when Redis is away and the certificate held is in the last tenth of its
        life: a duplicate order beats an expired certificate.
        """
        if self.shared is None:
            return None, False
        name = self.settings.name
        try:
            pause = await self.shared.take()
        except Unavailable:
            now = datetime.datetime.now(datetime.UTC)
            if held is not None and now >= held.not_after - (held.not_after - held.not_before) * WINDOW_MARGIN:
                self._say(
                    "alone",
                    logging.WARNING,
                    f"acme: redis is away and the certificate for {name} expires at {_iso(held.not_after)}:"
                    " ordering without the fleet's lock",
                )
                return None, True
            self._say(
                "away",
                logging.WARNING,
                f"acme: a certificate for {name} is due, but redis is away: ordering once it is back"
                + ("; the certificate held serves meanwhile" if held else ""),
            )
            return FLEET_RETRY, False
        if pause is not None:
            if pause > 0:
                self._say("backoff", logging.INFO, f"acme: the fleet's last order for {name} failed: waiting")
            else:
                self._say(
                    "other",
                    logging.INFO,
                    f"acme: another process of the fleet orders the certificate for {name}: waiting for it",
                )
            return max(FOLLOW_INTERVAL, min(pause, POLL)), False
        self._said = None
        settling = self.shared.settling()
        if settling > 0:
            # Redis just came back, empty perhaps (restarted): a moment for the hosts holding a
            # certificate to store it again, rather than an order of a certificate they have.
            await self.shared.release()
            return settling, False
        from .fleetacme import NotWritten

        try:
            if await self.shared.sync(self._in_thread):  # stored by the lock's last holder
                await self._in_thread(self._load)
                await self.shared.release()
                return 0.0, False
        except (Unavailable, NotWritten):  # the fleet has a certificate: not ordered again
            await self.shared.release()
            return FLEET_RETRY, False
        return None, False

    def _say(self, reason: str, level: int, text: str) -> None:
        """Log ``text`` once while ``reason`` stays the fleet's reason not to order."""
        if self._said != reason:
            self._said = reason
            logger.log(level, "%s", text)

    def extend_start_timeout(self, seconds: float) -> None:
        """Ask systemd (or a worker's parent) to wait this much longer for READY=1."""
        if self.notifier is not None:
            self.notifier.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def _status(self, text: str) -> None:
        if self.notifier is not None and not self.ready.is_set():
            self.notifier.status(text)

    async def _in_thread(self, function: Callable[..., T], *args: Any) -> T:
        """Run blocking ACME work in a daemon thread of its own, one call at a time (each is awaited).

        Not an executor's thread: the interpreter waits for those at exit, and an order
        waiting on a CA that does not answer would hold a stopping server for a minute.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if future.cancelled():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def work() -> None:
            try:
                outcome: tuple[Any, BaseException | None] = (function(*args), None)
            except BaseException as exc:  # given to the awaiting coroutine, raised there
                outcome = (None, exc)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(settle, *outcome)

        threading.Thread(target=work, name=ACME_THREAD, daemon=True).start()
        return await future


# -- the plain listener's part


def add_challenge_route(app: web.Application, state: StateDirectory, shared: FleetCertificates | None = None) -> None:
    """Answer the CA's http-01 requests (RFC 8555 section 8.3) on the plain-HTTP app; before its
    other routes. With ``shared`` (a fleet), the answers in Redis too: another host's order."""

    async def challenge(request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        answer = state.challenge(token)
        if answer is None and shared is not None:
            answer = await shared.challenge(token)
        if answer is None:
            raise http_error(web.HTTPNotFound, "no such ACME challenge")
        return web.Response(body=answer, content_type="application/octet-stream")

    app.router.add_get(CHALLENGE_PATH + "{token}", challenge, allow_head=False)
