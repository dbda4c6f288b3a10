"""Token authorization (RFC 6750 bearer tokens checked against SHA-256 hashes).

Tokens come from ``TOKEN`` (one hash, as txtai), the config's ``auth.tokens``, a token file
(``TOKEN_FILE`` or the systemd credential ``token``) with one ``HASH [NAME [WORKFLOW,...]]``
per line. Only hashes are held; a presented token is hashed once and compared with every
known hash in constant time. Repeated failures from one client are throttled.

A token's list (``workflows``) scopes it: names of the workflows it may run through
``POST /workflow``, and paths (beginning with ``/``) of the other routes it may call, as the
routes are registered (``/stats``, ``/items/{id}``). A scoped token may call nothing else but
the open routes; an unscoped one calls everything.

A request without an ``Authorization`` header may be authorized by its TLS client certificate
instead, when the config has ``auth.clients`` (see clientcerts.py): the same scopes, answers,
throttle and access-log name. A request with one is judged by its token alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from .errors import Check, ConfigError, http_error
from .files import read_config_file

if TYPE_CHECKING:
    from .clientcerts import ClientStore
    from .jwtauth import JWTVerifier

REALM = 'Bearer realm="aioserver"'
OPEN_PATHS = frozenset({"/health", "/ready"})
# GET, and HEAD, which is GET without the body (RFC 9110 section 9.3.2): a balancer's probe.
OPEN_METHODS = frozenset({"GET", "HEAD"})
# Routes (method, path as registered) whose handler checks a scoped token itself:
# POST /workflow, against the workflow's name (check_scope).
SCOPED_BY_HANDLER = frozenset({("POST", "/workflow")})
HASH_HINT = (
    "expected the SHA-256 hex digest of the API token (64 hex characters), not the token itself;"
    " bin/aioserver-token makes a token and its hash"
)
_HASH = re.compile(r"[0-9a-fA-F]{64}")
# A token is one run of visible ASCII characters (0x21-0x7E), as txtai (FastAPI's HTTPBearer)
# takes any: RFC 6750's b64token is narrower, and tokens made for txtai ("p@ss!") must work
# here too. White space inside, control characters, DEL and non-ASCII make the header malformed.
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([\x21-\x7e]+) *")


class Identity(Protocol):
    """Who an authorized request is (a token, a client certificate): a name, and a scope."""

    kind: ClassVar[str]  # for the refusals: "this token may not ..."

    @property
    def name(self) -> str: ...

    @property
    def workflows(self) -> frozenset[str] | None: ...

    def may_run(self, workflow: str) -> bool: ...

    def may_call(self, request: web.Request) -> bool: ...


def route_in_scope(scope: frozenset[str] | None, request: web.Request) -> bool:
    """Whether the request's route is in ``scope`` (None: all); unknown paths and methods never are."""
    if scope is None:
        return True
    route = request.match_info.route
    if route.resource is None:  # aiohttp's 404/405: a scoped token learns no route exists
        return False
    path = route.resource.canonical
    return (route.method, path) in SCOPED_BY_HANDLER or path in scope


@dataclass(frozen=True, slots=True)
class Token:
    """A known token: its name, the SHA-256 digest of its value, the workflows it may run."""

    kind: ClassVar[str] = "token"

    name: str
    digest: bytes = field(repr=False)
    # Workflow names and route paths ("/stats"); None: every workflow and route.
    workflows: frozenset[str] | None = None

    def may_run(self, workflow: str) -> bool:
        return self.workflows is None or workflow in self.workflows

    def may_call(self, request: web.Request) -> bool:
        """Whether the request's route is in scope; unknown paths and methods never are."""
        if self.workflows is None:  # the usual token's: no call more on the hot path
            return True
        return route_in_scope(self.workflows, request)


def parse_hash(value: Any, source: str, key: str) -> bytes:
    """The digest of a 64-hex-character SHA-256 hash; the error never echoes the value."""
    if not isinstance(value, str) or not _HASH.fullmatch(value.strip()):
        raise ConfigError(source, key, HASH_HINT)
    return bytes.fromhex(value.strip())


def parse_token_file(text: str, source: str) -> list[Token]:
    """Tokens of a file of ``HASH [NAME [WORKFLOW,...]]`` lines, ``#`` starting a comment."""
    tokens = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 3:
            raise ConfigError(source, f"line {number}", "expected HASH [NAME [WORKFLOW,...]]")
        digest = parse_hash(fields[0], source, f"line {number}")
        name = fields[1] if len(fields) > 1 else f"{source}:{number}"
        workflows = frozenset(w for w in fields[2].split(",") if w) if len(fields) > 2 else None
        tokens.append(Token(name, digest, workflows))
    return tokens


def parse_config_tokens(entries: Any, source: str) -> list[Token]:
    """Tokens of the config's ``auth.tokens`` list of ``{name, sha256, workflows?}``."""
    if not isinstance(entries, list):
        raise ConfigError(source, "auth.tokens", "expected a list of {name, sha256, workflows}")
    tokens = []
    for i, entry in enumerate(entries):
        key = f"auth.tokens[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(source, key, "expected a mapping {name, sha256, workflows}")
        for unknown in entry.keys() - {"name", "sha256", "workflows"}:
            raise ConfigError(source, f"{key}.{unknown}", "unknown key; known: name, sha256, workflows")
        name, workflows = parse_name_and_scope(entry, source, key)
        digest = parse_hash(entry.get("sha256"), source, f"{key}.sha256")
        tokens.append(Token(name, digest, workflows))
    return tokens


def parse_name_and_scope(entry: Mapping[str, Any], source: str, key: str) -> tuple[str, frozenset[str] | None]:
    """An identity entry's ``name`` and ``workflows`` (None: every one), as tokens and clients have them."""
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(source, f"{key}.name", "expected a non-empty string")
    workflows = entry.get("workflows")
    if workflows is not None and not (isinstance(workflows, list) and all(isinstance(w, str) for w in workflows)):
        raise ConfigError(source, f"{key}.workflows", "expected a list of workflow names")
    return name, None if workflows is None else frozenset(workflows)


class TokenStore:
    """The tokens in force; :meth:`replace` swaps them all at once (SIGHUP)."""

    # The mutable holder lets a reload change the tokens under the running middleware.

    def __init__(self, tokens: Iterable[Token] = ()) -> None:
        self.tokens: tuple[Token, ...] = tuple(tokens)

    def replace(self, tokens: Iterable[Token]) -> None:
        self.tokens = tuple(tokens)

    def match(self, presented: str) -> Token | None:
        """The token whose hash is that of ``presented``; every hash is compared, in constant time."""
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for token in self.tokens:
            if hmac.compare_digest(digest, token.digest):
                found = token
        return found


# Who an authorized request is (its token, or its client certificate's entry), for handlers,
# dependencies and the access log.
IDENTITY: web.RequestKey[Identity] = web.RequestKey("identity")
# Why a request was refused, for the metrics: "missing" (no credential), the RFC 6750 error
# ("invalid_request", "invalid_token", "insufficient_scope"), "unknown_certificate" (a client
# certificate that no auth.clients entry names), or "throttled" (429).
AUTH_FAILURE = web.RequestKey("auth_failure", str)
AUTH_FAILURES = (
    "missing",
    "invalid_request",
    "invalid_token",
    "insufficient_scope",
    "unknown_certificate",
    "throttled",
)


class FailureThrottle:
    """Counts authorization failures per client; past ``limit`` in ``window`` seconds, 429.

    A client's window opens at its first failure and its count is forgotten only when the
    window ends: a success in between resets nothing, or nine guesses and one right token,
    repeated, would never be throttled. Memory is bounded: at most ``max_clients`` entries,
    the least recently failing evicted. IPv6 clients are counted per /64, the block one
    subscriber usually holds.
    """

    def __init__(self, limit: int = 10, window: float = 60.0, max_clients: int = 10_000) -> None:
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._quiet_from = 0.0  # when the last window open ends: from then on nobody is counted
        # Clients whose failure is being counted elsewhere (FleetThrottle: Redis's reply awaited):
        # their next requests wait for that count before a token is checked. Here always empty.
        self.pending: dict[str, asyncio.Future[None]] = {}

    @staticmethod
    def client_key(address: str | None) -> str:
        try:
            ip = ipaddress.ip_address(address or "")
        except ValueError:
            return address or "-"
        if ip.version == 6 and ip.ipv4_mapped is None:
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return str(ip.ipv4_mapped or ip) if ip.version == 6 else str(ip)

    def retry_after(self, client: str, now: float | None = None) -> int:
        """Seconds the client must wait, or 0 if it may try."""
        entry = self._failures.get(client)
        if entry is None:
            return 0
        count, started = entry
        remaining = started + self.window - (time.monotonic() if now is None else now)
        if remaining <= 0:
            del self._failures[client]
            return 0
        return math.ceil(remaining) if count >= self.limit else 0

    def failed(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now >= self._quiet_from:
            self._failures.clear()  # every window has ended: drop them all at once
        count, started = self._failures.pop(client, (0, now))
        if now - started >= self.window:
            count, started = 0, now
        self._failures[client] = (count + 1, started)
        self._quiet_from = max(self._quiet_from, started + self.window)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)

    async def count(self, client: str) -> int:
        """Count a failure of ``client``'s: seconds it must wait if this one is past the limit (429
        instead of the refusal), else 0. With --redis, fleetthrottle.FleetThrottle counts fleet-wide."""
        self.failed(client)
        return self._past(client)

    def _past(self, client: str) -> int:
        """Seconds left in ``client``'s window if its count is past the limit, else 0."""
        count, started = self._failures.get(client, (0, 0.0))
        return max(1, math.ceil(started + self.window - time.monotonic())) if count > self.limit else 0

    async def settled(self, client: str) -> None:
        """Return once no failure of ``client``'s is being counted (see ``pending``)."""
        while (counting := self.pending.get(client)) is not None:
            await asyncio.shield(counting)

    def active(self, now: float | None = None) -> bool:
        """Whether a window is open: until then, no request needs its address keyed."""
        return bool(self._failures) and (time.monotonic() if now is None else now) < self._quiet_from

    def __len__(self) -> int:
        return len(self._failures)

    def __bool__(self) -> bool:
        return self.active()


def _deny(
    request: web.Request, reason: str, cls: type[web.HTTPException], message: str, error: str | None
) -> web.HTTPException:
    """The refusal to raise, its reason noted on the request (see AUTH_FAILURE)."""
    request[AUTH_FAILURE] = reason
    value = f'{REALM}, error="{error}"' if error else REALM
    return http_error(cls, message, **{"WWW-Authenticate": value})


def authorizer(
    store: TokenStore,
    throttle: FailureThrottle,
    clients: ClientStore | None = None,
    jwt: JWTVerifier | None = None,
) -> Check:
    """The check of every request but ``GET /health`` and ``GET /ready`` (and HEAD) against ``store``,
    and, without an Authorization header, against ``clients`` (the config's ``auth.clients``).

    With ``jwt`` (``auth.jwt``), a bearer value shaped as a JWT is verified by it instead of
    ``store``. With no token in ``store``, no ``clients`` and no ``jwt`` the service is open, as
    txtai's is without ``TOKEN``. A plain function, run by error_middleware with the app's other
    checks: what must wait (a JWT's keys, a failure's count, fleet-wide with --redis) is returned
    as an awaitable; an admitted token awaits nothing.
    """

    def check(request: web.Request) -> Awaitable[None] | None:
        open_service = not store.tokens and clients is None and jwt is None
        if open_service or (request.path in OPEN_PATHS and request.method in OPEN_METHODS):
            return None
        # Keyed only while someone's window is open: parsing the address costs on every request.
        client = throttle.client_key(request.remote) if throttle.active() else None
        if client in throttle.pending:  # one of its failures is being counted: its count first
            return _after_settled(request, client)
        return judge(request, client)

    async def _after_settled(request: web.Request, client: str) -> None:
        await throttle.settled(client)
        pending = judge(request, client)
        if pending is not None:
            await pending

    def judge(request: web.Request, client: str | None) -> Awaitable[None] | None:
        """The check once the client's count is known: None when admitted, else what to await."""
        wait = throttle.retry_after(client) if client is not None else 0
        if wait:
            raise _throttled(request, wait)
        headers = request.headers.getall(hdrs.AUTHORIZATION, ())
        if not headers:
            if clients is None:
                raise _deny(request, "missing", web.HTTPUnauthorized, "authorization required", None)
            return _by_certificate(request, clients, throttle, client)
        value = _bearer(headers)
        if value is None:
            if len(headers) == 1 and headers[0].split(" ", 1)[0].lower() != "bearer":
                # Another scheme is no bearer credential at all (RFC 6750 section 3.1).
                raise _deny(request, "missing", web.HTTPUnauthorized, "authorization required: Bearer token", None)
            return _refused(request, client, "invalid_request", web.HTTPBadRequest, "malformed Authorization header")
        if jwt is not None and jwt.is_jwt(value):
            return _by_jwt(request, value, client)
        token = store.match(value)
        if token is None:
            return _refused(request, client, "invalid_token", web.HTTPUnauthorized, "invalid token")
        _admit(request, token)
        return None

    async def _refused(
        request: web.Request, client: str | None, reason: str, cls: type[web.HTTPException], message: str
    ) -> None:
        await _count_failure(request, throttle, client)  # 429 instead, past the limit
        raise _deny(request, reason, cls, message, reason)

    async def _by_jwt(request: web.Request, value: str, client: str | None) -> None:
        assert jwt is not None
        token = await jwt.verify(value)
        if token is None:
            await _refused(request, client, "invalid_token", web.HTTPUnauthorized, "invalid token")
        else:
            _admit(request, token)

    return check


def auth_middleware(
    store: TokenStore,
    throttle: FailureThrottle,
    clients: ClientStore | None = None,
    jwt: JWTVerifier | None = None,
) -> Any:
    """The :func:`authorizer` check as a middleware of its own (an app of a test's)."""
    check = authorizer(store, throttle, clients, jwt)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        pending = check(request)
        if pending is not None:
            await pending
        return await handler(request)

    return middleware


async def _count_failure(request: web.Request, throttle: FailureThrottle, client: str | None) -> None:
    """Count the request's failure; one past the limit (the fleet's, with --redis) is answered 429."""
    wait = await throttle.count(client or throttle.client_key(request.remote))
    if wait:
        raise _throttled(request, wait)


def _throttled(request: web.Request, wait: int) -> web.HTTPException:
    request[AUTH_FAILURE] = "throttled"
    return http_error(web.HTTPTooManyRequests, "too many failed authorizations", **{"Retry-After": str(wait)})


def _bearer(headers: list[str]) -> str | None:
    """The token of the one Authorization header, when it is a bearer credential (as _BEARER takes it)."""
    if len(headers) != 1:
        return None
    header = headers[0]
    value = header[7:]
    if header.startswith("Bearer ") and value and value.isascii() and value.isprintable() and " " not in value:
        return value  # as nearly every client sends it: the same verdict as _BEARER's, in C, without the pattern
    bearer = _BEARER.fullmatch(header)
    return bearer.group(1) if bearer is not None else None


def _admit(request: web.Request, token: Identity) -> None:
    """Let the bearer of ``token`` in, if its scope has the request's route."""
    # Known before its scope is judged: a refusal's access line names the token refused.
    request[IDENTITY] = token
    # Routing is done when middlewares run: judged here, every route (an extension's,
    # one added later) is in a scoped token's reach only if its list names it.
    if not token.may_call(request):
        raise _deny(
            request, "insufficient_scope", web.HTTPForbidden, "this token may not call this route", "insufficient_scope"
        )


async def _by_certificate(
    request: web.Request, clients: ClientStore, throttle: FailureThrottle, client: str | None
) -> None:
    """Authorize a request without an Authorization header by its TLS client certificate.

    No certificate (or one no longer trusted) is no credential: 401, as without a token. A
    verified one that no entry names is a failure: 403, counted by the throttle, whose
    challenge names the realm only (RFC 6750 section 3.1: no error code without a token).
    """
    identity = clients.identify(request)
    if isinstance(identity, str):  # why not: "missing" or "unknown_certificate"
        if identity == "missing":
            raise _deny(request, "missing", web.HTTPUnauthorized, "authorization required", None)
        await _count_failure(request, throttle, client)
        raise _deny(request, identity, web.HTTPForbidden, "this client certificate is not allowed", None)
    request[IDENTITY] = identity  # before the scope check: a refused identity is named in the access line too
    if not identity.may_call(request):  # as for a token (see _admit)
        raise _deny(
            request,
            "insufficient_scope",
            web.HTTPForbidden,
            f"this {identity.kind} may not call this route",
            "insufficient_scope",
        )


def check_scope(request: web.Request, workflow: str) -> None:
    """Deny (403 insufficient_scope) an identity that may not run ``workflow``."""
    try:  # not request.get(): that is Mapping.get, in Python, raising the KeyError itself
        identity = request[IDENTITY]
    except KeyError:
        return
    if not identity.may_run(workflow):
        raise _deny(
            request,
            "insufficient_scope",
            web.HTTPForbidden,
            f"this {identity.kind} may not run {workflow[:100]!r}",
            "insufficient_scope",
        )


@dataclass(frozen=True, slots=True)
class TokenSources:
    """Where tokens come from: ``TOKEN``, the config's ``auth.tokens`` and token files.

    At each load the files are read, and so is the config file's ``auth.tokens`` when the
    config is a file (``path``; inline YAML cannot be read again: ``configured`` stays).
    """

    fixed: tuple[Token, ...] = ()  # TOKEN's
    files: tuple[str, ...] = ()
    configured: tuple[Token, ...] = ()  # auth.tokens as at start-up
    path: str | None = None  # the config file

    @property
    def reloadable(self) -> bool:
        return bool(self.files or self.path)

    def load(self) -> list[Token]:
        """Every token, the files read now; raises ConfigError naming a file that fails.

        A config file left with no token when it had some is refused too: its tokens would be
        gone, and with no other credential the service would be open.
        """
        tokens = list(self.fixed)
        if self.path is None:
            tokens.extend(self.configured)
        else:
            auth = read_config_file(self.path).get("auth") or {}
            configured = parse_config_tokens(auth.get("tokens", []), self.path)
            if self.configured and not configured:
                raise ConfigError(self.path, "auth.tokens", "no token left (it had some): keeping those in force")
            tokens.extend(configured)
        for path in self.files:
            try:
                with open(path, encoding="utf-8") as file:
                    text = file.read()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(
                    path, None, f"cannot read token file: {getattr(exc, 'strerror', None) or exc}"
                ) from None
            found = parse_token_file(text, path)
            if not found:
                raise ConfigError(path, None, "the token file holds no token")
            tokens.extend(found)
        return tokens


def token_sources(section: Any, env: Mapping[str, str], source: str, path: str | None = None) -> TokenSources:
    """The token sources of the config's ``auth:`` section and the environment; ``path``: the config
    file the section came from (read again at each load), None for inline YAML."""
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise ConfigError(source, "auth", "expected a mapping with 'tokens', 'clients' or 'jwt'")
    for unknown in section.keys() - {"tokens", "clients", "jwt"}:  # clients: clientcerts.py; jwt: jwtauth.py
        raise ConfigError(source, f"auth.{unknown}", "unknown key; known: tokens, clients, jwt")
    configured = parse_config_tokens(section.get("tokens", []), source)
    fixed = [Token("token", parse_hash(env["TOKEN"], "environment", "TOKEN"))] if env.get("TOKEN") else []
    files = [env["TOKEN_FILE"]] if env.get("TOKEN_FILE") else []
    credential = os.path.join(env.get("CREDENTIALS_DIRECTORY", ""), "token")
    if env.get("CREDENTIALS_DIRECTORY") and os.path.exists(credential):
        files.append(credential)
    return TokenSources(tuple(fixed), tuple(files), tuple(configured), path)
