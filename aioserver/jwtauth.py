"""JWT access tokens from an identity provider (SPEC section 7, ``auth.jwt``).

A bearer value of three base64url parts is a JWT (RFC 7519): it is accepted when the key its
header's ``kid`` names in the provider's key set (JWKS, RFC 7517) verified its signature, with
an asymmetric algorithm allowed for that key, and when ``exp``, ``nbf``, ``iss``, ``aud`` and
``sub`` are there and right (``leeway`` seconds of clock skew allowed). Its identity is named by
``sub``; its ``scope`` claim (space-separated, RFC 8693 section 4.2) grants ``workflow:NAME``
or ``workflow:*``, and nothing else: a JWT runs workflows, other routes need a token.

HMAC and ``none`` are never accepted, whatever a token's header says: the algorithm is chosen
by the key, and a key set's symmetric keys are dropped, so that a public key can never be
used as an HMAC secret (key confusion).

The key set comes from a file, read at start and on SIGHUP, or from an https URL, fetched at
start, every hour, at most once a minute when a token names a key not in it (the provider
rotated its keys), and on SIGHUP: without blocking the event loop, at most 1 MiB in 10 s,
never following a redirect; a fetch that fails keeps the keys in force.

Only ``kid`` and ``alg`` of a token's header are read: a key it carries or points to (``jwk``,
``jku``, ``x5u``, ``x5c``) is never used, nor fetched.

A verified token is remembered, until it expires, by its exact text: verifying one costs twice
the rest of a request (an echo took 355 us of CPU with an ES256 verification, 110 us without),
and a client sends the same token for its lifetime. What is remembered is forgotten when the
keys change.

This module needs the ``jwt`` extra (PyJWT, cryptography): config.py imports it only when
``auth.jwt`` is configured, having checked that the extra is installed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from .auth import SCOPED_BY_HANDLER, Token
from .errors import ConfigError
from .files import read_small_file
from .logtext import loggable
from .watch import in_reload_thread

logger = logging.getLogger("aioserver.jwt")

# A compact JWS (RFC 7515 section 7.1): header.payload.signature, base64url without padding.
# The signature may be empty (an unsigned token), so that such a token is refused as a JWT.
JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

# The asymmetric algorithms (RFC 7518, RFC 8037) and the key types (kty, crv) they take.
ALGORITHMS: Mapping[str, tuple[str, frozenset[str | None]]] = {
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "RS256": ("RSA", frozenset({None})),
    "RS384": ("RSA", frozenset({None})),
    "RS512": ("RSA", frozenset({None})),
    "PS256": ("RSA", frozenset({None})),
    "PS384": ("RSA", frozenset({None})),
    "PS512": ("RSA", frozenset({None})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}
DEFAULT_ALGORITHMS = ("ES256", "RS256", "EdDSA")
DEFAULT_LEEWAY = 30.0
MAX_LEEWAY = 300.0  # five minutes: more would let an expired token live on noticeably
MIN_RSA_BITS = 2048
# What a token must hold: SPEC section 7's four and sub, the identity. RFC 9068 section 2.2
# does not require nbf of an access token, and Keycloak (10 and later) and Auth0 put none in
# theirs: without "nbf" here, a token lacking it is still checked when it has one.
REQUIRED_CLAIMS = ("exp", "nbf", "iss", "aud", "sub")
SCOPE_PREFIX = "workflow:"

JWKS_LIMIT = 1 << 20  # bytes: a provider's key set is a few KB
FETCH_TIMEOUT = 10.0  # seconds for a whole fetch: connect, TLS, the answer
REFRESH_EVERY = 3600.0  # seconds between fetches of a key set that is fine
UNKNOWN_KID_EVERY = 60.0  # seconds at least between fetches asked for by unknown key ids
RETRY_AFTER_FAILURE = 60.0  # seconds before the next try, after a failed scheduled fetch
REMEMBERED = 4096  # verified tokens remembered at most (the oldest forgotten first)
KEYS = ("issuer", "audience", "jwks", "algorithms", "leeway")
# A public JWK of each key type made a cryptography key (PyJWT's makers; static methods).
FROM_JWK: Mapping[str, Callable[[dict[str, Any]], Any]] = {
    "EC": ECAlgorithm.from_jwk,
    "RSA": RSAAlgorithm.from_jwk,
    "OKP": OKPAlgorithm.from_jwk,
}


class JWKSError(Exception):
    """A key set that cannot be read, fetched or used; the keys in force stay."""


@dataclass(frozen=True, slots=True)
class JWTIdentity(Token):
    """The identity of a verified JWT: named by ``sub``, it may run the workflows its scope names.

    Unlike a token's list, it names workflows only: no other route is in its reach.
    """

    every_workflow: bool = False  # workflow:*

    def may_run(self, workflow: str) -> bool:
        return self.every_workflow or workflow in (self.workflows or ())

    def may_call(self, request: web.Request) -> bool:
        if not (self.every_workflow or self.workflows):
            return False  # 403 before the body is read: it may run nothing
        route = request.match_info.route
        return route.resource is not None and (route.method, route.resource.canonical) in SCOPED_BY_HANDLER


@dataclass(frozen=True, slots=True)
class JWTSettings:
    """The ``auth.jwt`` section, checked."""

    issuer: str
    audience: tuple[str, ...]
    jwks: str  # an https URL, or the absolute path of a file
    algorithms: frozenset[str] = frozenset(DEFAULT_ALGORITHMS)
    leeway: float = DEFAULT_LEEWAY

    @property
    def fetched(self) -> bool:
        """Whether the key set comes from a URL (else a file)."""
        return self.jwks.startswith("https://")


@dataclass(frozen=True, slots=True)
class Key:
    """A verification key of the key set and the algorithms it may verify."""

    public: Any = field(compare=False, repr=False)  # a cryptography public key
    algorithms: frozenset[str]
    jwk: str  # its JWK as canonical JSON: two key sets are the same when these are


def parse_settings(section: Any, source: str) -> JWTSettings:
    """The settings of the config's ``auth.jwt`` mapping; ConfigError naming the key at fault."""
    if not isinstance(section, Mapping):
        raise ConfigError(source, "auth.jwt", f"expected a mapping with {', '.join(KEYS)}")
    for unknown in section.keys() - set(KEYS):
        raise ConfigError(source, f"auth.jwt.{unknown}", f"unknown key; known: {', '.join(KEYS)}")
    for name in ("issuer", "audience", "jwks"):
        if name not in section:
            raise ConfigError(source, f"auth.jwt.{name}", "required")
    issuer = section["issuer"]
    if not isinstance(issuer, str) or not issuer:
        raise ConfigError(source, "auth.jwt.issuer", "expected the provider's issuer URL (the tokens' iss claim)")
    audience = section["audience"]
    audiences = [audience] if isinstance(audience, str) else audience
    if not isinstance(audiences, list) or not audiences or not all(isinstance(a, str) and a for a in audiences):
        raise ConfigError(
            source, "auth.jwt.audience", "expected this API's name in the tokens' aud claim (a string, or a list)"
        )
    return JWTSettings(
        issuer=issuer,
        audience=tuple(audiences),
        jwks=_jwks_location(section["jwks"], source),
        algorithms=_algorithms(section.get("algorithms", list(DEFAULT_ALGORITHMS)), source),
        leeway=_leeway(section.get("leeway", DEFAULT_LEEWAY), source),
    )


def _jwks_location(value: Any, source: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(source, "auth.jwt.jwks", "expected the key set's https URL or a file path")
    scheme, separator, rest = value.partition("://")
    if not separator:
        return os.path.abspath(value)  # SIGHUP reads it again from the same place
    if scheme.lower() != "https":
        raise ConfigError(
            source,
            "auth.jwt.jwks",
            "expected an https URL: keys fetched over anything else could be replaced on the way",
        )
    if not rest or rest.startswith("/"):
        raise ConfigError(source, "auth.jwt.jwks", "expected an https URL with a host")
    return "https://" + rest


def _algorithms(value: Any, source: str) -> frozenset[str]:
    key = "auth.jwt.algorithms"
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise ConfigError(source, key, f"expected a list of algorithms among {', '.join(ALGORITHMS)}")
    for name in value:
        if name.lower() == "none":
            raise ConfigError(source, key, "'none' is refused: an unsigned token proves nothing")
        if name.upper().startswith("HS"):
            raise ConfigError(
                source,
                key,
                f"{name} is refused: HMAC takes a shared secret, and a public key of the key set"
                " could pass for one (key confusion); asymmetric algorithms only",
            )
        if name not in ALGORITHMS:
            raise ConfigError(source, key, f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}")
    return frozenset(value)


def _leeway(value: Any, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_LEEWAY:
        raise ConfigError(source, "auth.jwt.leeway", f"expected seconds of clock skew, 0 to {MAX_LEEWAY:g}")
    return float(value)


def parse_jwks(data: bytes, algorithms: frozenset[str]) -> tuple[dict[str, Key], list[str]]:
    """The usable keys of a JWKS document by kid, and why each other key was left out.

    Raises JWKSError when the document is not a key set or holds no usable key.
    """
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise JWKSError("not JSON") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise JWKSError('expected a JSON object with a "keys" list (RFC 7517 section 5)')
    keys: dict[str, Key] = {}
    notes: list[str] = []
    ambiguous: set[str] = set()
    for index, entry in enumerate(entries):
        kid = entry.get("kid") if isinstance(entry, dict) else None
        name = f"key {loggable(kid[:64])!r}" if isinstance(kid, str) and kid else f"key #{index}"
        if not isinstance(kid, str) or not kid:
            notes.append(f"{name} left out: no kid, by which tokens name their key")
            continue
        if kid in keys or kid in ambiguous:  # which one a token means cannot be known
            keys.pop(kid, None)
            ambiguous.add(kid)
            notes.append(f"{name} left out: more than one key has this kid")
            continue
        try:
            keys[kid] = _key(entry, algorithms)
        except JWKSError as exc:
            notes.append(f"{name} left out: {exc}")
    if not keys:
        raise JWKSError("no usable key" + (f" ({'; '.join(notes)})" if notes else ""))
    return keys, notes


def _key(jwk: dict[str, Any], algorithms: frozenset[str]) -> Key:
    """One JWK as a verification key; JWKSError saying why it is not one."""
    kty, crv, alg = jwk.get("kty"), jwk.get("crv"), jwk.get("alg")
    if not all(value is None or isinstance(value, str) for value in (kty, crv, alg)):
        raise JWKSError("its kty, crv or alg is not a string")
    if kty == "oct":
        raise JWKSError("a symmetric key (HMAC is never used)")
    if jwk.get("use", "sig") != "sig":
        raise JWKSError("not for signatures (use)")
    if "d" in jwk:  # a provider that publishes its private key: that key signs for anyone
        raise JWKSError("it holds a private key")
    usable = {
        name for name, (family, curves) in ALGORITHMS.items() if family == kty and crv in curves and name in algorithms
    }
    if alg is not None:  # the key's own algorithm, when it names one
        usable &= {alg}
    if not usable:
        said = f"kty {kty!r}" + (f", crv {crv!r}" if crv is not None else "") + (f", alg {alg!r}" if alg else "")
        raise JWKSError(f"{loggable(said[:100])} fits none of auth.jwt.algorithms")
    try:
        public = FROM_JWK[str(kty)](jwk)  # a kty some algorithm takes
    except (jwt.PyJWTError, ValueError, TypeError, KeyError):
        raise JWKSError(f"not a valid {kty} key") from None
    if isinstance(public, rsa.RSAPublicKey) and public.key_size < MIN_RSA_BITS:
        raise JWKSError(f"an RSA key of {public.key_size} bits (at least {MIN_RSA_BITS})")
    return Key(public, frozenset(usable), json.dumps(jwk, sort_keys=True))


def read_jwks(path: str, algorithms: frozenset[str]) -> tuple[dict[str, Key], list[str]]:
    """The keys of a JWKS file (blocking); JWKSError saying why there are none."""
    try:
        data = read_small_file(path, JWKS_LIMIT)
    except OSError as exc:
        raise JWKSError(f"cannot read: {exc.strerror or exc}") from None
    return parse_jwks(data, algorithms)


class Refused(Exception):
    """Why a token is not accepted, for the log (never the token)."""


class JWTVerifier:
    """The key set in force, and the verification of tokens against it.

    Made by the config (with the keys of a file); an app it serves keeps it fresh
    (:meth:`setup`). Like ``Config.tls``, it is the config's one piece of state that changes.
    """

    def __init__(
        self,
        settings: JWTSettings,
        keys: dict[str, Key] | None = None,
        notes: list[str] | None = None,
        refresh_every: float = REFRESH_EVERY,
        unknown_kid_every: float = UNKNOWN_KID_EVERY,
    ) -> None:
        self.settings = settings
        self.keys: dict[str, Key] = keys or {}
        self._notes = notes or []  # why keys were left out, said once serving
        self._refresh_every = refresh_every
        self._unknown_kid_every = unknown_kid_every
        self._unknown_kid_fetched = -math.inf  # when an unknown kid last had the keys fetched
        # Verified tokens: identity and the time.time() until which it holds.
        self._verified: dict[str, tuple[JWTIdentity, float]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._fetching: asyncio.Task[bool] | None = None

    @staticmethod
    def is_jwt(value: str) -> bool:
        """Whether a bearer value is to be verified as a JWT (else it is a token, its hash looked up)."""
        return JWT_SHAPE.fullmatch(value) is not None

    async def verify(self, value: str) -> JWTIdentity | None:
        """The identity of a valid token, else None (the reason logged)."""
        remembered = self._verified.get(value)
        if remembered is not None:
            if time.time() < remembered[1]:
                return remembered[0]
            del self._verified[value]
        try:
            identity, until = await self._verify(value)
        except Refused as exc:
            logger.info("JWT refused: %s", exc)
            return None
        if len(self._verified) >= REMEMBERED:
            del self._verified[next(iter(self._verified))]
        self._verified[value] = (identity, until)
        return identity

    async def _verify(self, value: str) -> tuple[JWTIdentity, float]:
        try:
            header = jwt.get_unverified_header(value)
        except jwt.PyJWTError as exc:
            raise Refused(f"malformed ({_said(exc)})") from None
        kid, alg = header.get("kid"), header.get("alg")
        if not isinstance(kid, str):
            raise Refused("no kid in its header: which key signed it is not said")
        key = await self._key(kid)
        if key is None:
            raise Refused(f"no key {loggable(kid[:64])!r} in the key set {self.settings.jwks}")
        # The allow-list: the key's algorithms, asymmetric and configured, never the header's
        # say alone (alg none, or HS256 with the public key as its secret, end here).
        if not isinstance(alg, str) or alg not in key.algorithms:
            said = loggable(alg[:32]) if isinstance(alg, str) else type(alg).__name__
            raise Refused(f"algorithm {said!r} is not allowed for key {loggable(kid[:64])!r}")
        try:
            claims = jwt.decode(
                value,
                key.public,
                algorithms=[alg],
                audience=self.settings.audience,
                issuer=self.settings.issuer,
                leeway=self.settings.leeway,
                options={"require": list(REQUIRED_CLAIMS)},
            )
        except (jwt.InvalidIssuerError, jwt.InvalidAudienceError) as exc:
            # Its signature held (PyJWT checks it first): what the provider put there, which an
            # operator needs to see (a final slash in an issuer, another API's audience).
            name = "iss" if isinstance(exc, jwt.InvalidIssuerError) else "aud"
            claim = jwt.decode(value, options={"verify_signature": False}).get(name)
            raise Refused(f"{_reason(exc)} {loggable(repr(claim))[:200]}") from None
        except jwt.PyJWTError as exc:
            raise Refused(_reason(exc)) from None
        return _identity(claims), int(claims["exp"]) + self.settings.leeway

    async def _key(self, kid: str) -> Key | None:
        """The key named ``kid``; an unknown one has the key set fetched, at most so often."""
        key = self.keys.get(kid)
        if key is not None or not self.settings.fetched or self._session is None:
            return key
        if self._fetching is None:
            now = time.monotonic()
            if now - self._unknown_kid_fetched < self._unknown_kid_every:
                return None
            self._unknown_kid_fetched = now
            self._start_fetch(f"a token names the unknown key {loggable(kid[:64])!r}")
        assert self._fetching is not None
        # Shielded: a client that goes away must not cancel the fetch the others wait for.
        await asyncio.shield(self._fetching)
        return self.keys.get(kid)

    def _start_fetch(self, why: str) -> asyncio.Task[bool]:
        if self._fetching is None:
            self._fetching = asyncio.create_task(self._fetch(why))
        return self._fetching

    async def _fetch(self, why: str) -> bool:
        """Fetch the key set and put it in force; a failure keeps the keys and says why."""
        try:
            logger.debug("fetching the JWT keys from %s: %s", self.settings.jwks, why)
            keys, notes = await self._download()
        except JWKSError as exc:
            logger.error(
                "JWT keys not fetched from %s, keeping the %d in force: %s", self.settings.jwks, len(self.keys), exc
            )
            return False
        except Exception:  # a bug must not fail the requests waiting, nor stop the hourly fetches
            logger.exception(
                "JWT keys not fetched from %s, keeping the %d in force", self.settings.jwks, len(self.keys)
            )
            return False
        finally:
            self._fetching = None
        if self._put_in_force(keys, notes):
            logger.info("JWT keys in force from %s: %s", self.settings.jwks, self._kids())
        return True

    async def _download(self) -> tuple[dict[str, Key], list[str]]:
        assert self._session is not None
        url = self.settings.jwks
        body = bytearray()
        try:
            # No redirect: it could lead to plain HTTP, where the keys could be replaced.
            async with self._session.get(url, allow_redirects=False, headers={"Accept": "application/json"}) as answer:
                if answer.status != 200:
                    raise JWKSError(f"answered {answer.status} {loggable(answer.reason or '')[:100]}")
                if (answer.content_length or 0) > JWKS_LIMIT:  # said at once: not even read
                    raise JWKSError(f"{answer.content_length} bytes announced, more than {JWKS_LIMIT}")
                async for chunk in answer.content.iter_any():
                    body += chunk
                    if len(body) > JWKS_LIMIT:
                        raise JWKSError(f"larger than {JWKS_LIMIT} bytes")
        except TimeoutError:  # first: an OSError too, as some of aiohttp's ClientErrors are
            raise JWKSError(f"no whole answer within {FETCH_TIMEOUT:g}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise JWKSError(loggable(str(exc) or type(exc).__name__)[:300]) from None
        # Hundreds of keys take milliseconds to make: off the loop.
        return await in_reload_thread(lambda: parse_jwks(bytes(body), self.settings.algorithms))

    def _put_in_force(self, keys: dict[str, Key], notes: list[str]) -> bool:
        """Put ``keys`` in force; whether they differ from those in force until now."""
        if keys == self.keys:
            return False
        self.keys = keys
        # A key taken out (revoked) takes the tokens it verified with it.
        self._verified.clear()
        for note in notes:
            logger.warning("JWT keys from %s: %s", self.settings.jwks, note)
        return True

    def _kids(self) -> str:
        return ", ".join(loggable(kid[:64]) for kid in self.keys)

    def reread_file(self) -> bool:
        """Read the key set's file again and put it in force (blocking): whether the keys changed.

        Raises ConfigError naming the file, as a token file's would, the keys in force kept.
        """
        try:
            keys, notes = read_jwks(self.settings.jwks, self.settings.algorithms)
        except JWKSError as exc:
            raise ConfigError(self.settings.jwks, None, str(exc)) from None
        return self._put_in_force(keys, notes)

    async def reload(self) -> None:
        """SIGHUP: the file read again, or the URL fetched again; a failure keeps the keys."""
        if self.settings.fetched:
            if self._session is not None:
                await asyncio.shield(self._start_fetch("reload"))
            return
        try:
            changed = await in_reload_thread(self.reread_file)
        except ConfigError as exc:
            logger.error("JWT key reload failed, keeping the %d keys in force: %s", len(self.keys), exc)
            return
        logger.info("reloaded JWT keys%s: %s", "" if changed else " (unchanged)", self._kids())

    def setup(self, app: web.Application) -> None:
        """Keep the keys fresh while ``app`` runs: a URL's fetched at start and every hour."""
        app.cleanup_ctx.append(self._keep_fresh)

    async def _keep_fresh(self, app: web.Application) -> AsyncIterator[None]:
        origin = self.settings.jwks
        if not self.settings.fetched:
            logger.info("JWT access tokens from %s, keys from %s: %s", self.settings.issuer, origin, self._kids())
            for note in self._notes:
                logger.warning("JWT keys from %s: %s", origin, note)
            yield
            return
        # The system's trust store, or SSL_CERT_FILE / SSL_CERT_DIR: read from disk, off the loop.
        context = await in_reload_thread(ssl.create_default_context)
        connector = aiohttp.TCPConnector(ssl=context, limit=1)
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
            self._session = session
            logger.info("JWT access tokens from %s, keys fetched from %s", self.settings.issuer, origin)
            refreshing = asyncio.create_task(self._refresh_forever())
            try:
                yield
            finally:
                refreshing.cancel()
                fetching = self._fetching
                if fetching is not None:
                    fetching.cancel()
                await asyncio.gather(refreshing, *([fetching] if fetching else []), return_exceptions=True)
                self._session = None
                self._fetching = None

    async def _refresh_forever(self) -> None:
        """Fetch now, then every hour (a minute after a failure)."""
        while True:
            fetched = await asyncio.shield(self._start_fetch("scheduled"))
            await asyncio.sleep(self._refresh_every if fetched else min(RETRY_AFTER_FAILURE, self._refresh_every))

    def describe(self) -> str:
        """For --check: where the tokens and their keys come from."""
        s = self.settings
        keys = f"keys fetched from {s.jwks} at start" if s.fetched else f"keys {self._kids()} from {s.jwks}"
        return (
            f"jwt: issuer {s.issuer}, audience {', '.join(s.audience)}, algorithms {', '.join(sorted(s.algorithms))},"
            f" leeway {s.leeway:g}s, {keys}"
        )


def load_verifier(section: Any, source: str) -> JWTVerifier:
    """The verifier of the config's ``auth.jwt``, a key set file read now (blocking)."""
    settings = parse_settings(section, source)
    if settings.fetched:
        return JWTVerifier(settings)
    try:
        keys, notes = read_jwks(settings.jwks, settings.algorithms)
    except JWKSError as exc:
        raise ConfigError(source, "auth.jwt.jwks", f"{settings.jwks}: {exc}") from None
    return JWTVerifier(settings, keys, notes)


def _identity(claims: dict[str, Any]) -> JWTIdentity:
    subject, scope = claims["sub"], claims.get("scope", "")
    if not isinstance(subject, str) or not subject:
        raise Refused("its 'sub' claim is not a name")
    if not isinstance(scope, str):
        raise Refused("its 'scope' claim is not a space-separated string")
    workflows = {s[len(SCOPE_PREFIX) :] for s in scope.split(" ") if s.startswith(SCOPE_PREFIX)}
    every = "*" in workflows
    workflows.discard("*")
    workflows.discard("")
    # Shown by the access log: the provider's text, kept on one line.
    return JWTIdentity(loggable(subject), b"", frozenset(workflows), every_workflow=every)


def _reason(exc: jwt.PyJWTError) -> str:
    """Why PyJWT refused a token: in words of our own for the usual reasons, else its own
    message (which quotes no part of the token but a header's crit extension), cut short."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "not valid yet"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "wrong issuer"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "wrong audience"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"no {exc.claim!r} claim"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "bad signature"
    return f"invalid ({_said(exc)})"


def _said(exc: Exception) -> str:
    return f"{type(exc).__name__}: {loggable(str(exc))[:100]}"
