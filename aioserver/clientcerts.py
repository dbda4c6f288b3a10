"""Client certificates as identities (SPEC section 7): ``auth.clients`` entries matched against
the certificate each request's TLS connection verified.

An entry ``{name, subject?, san?, sha256?, workflows?}`` names an identity and what it may
call, as a token does (see auth.py), and says which certificates are that identity: every
criterion given must hold (at least one is given). The subject is compared as X.500 compares
names: the same attribute types, by OID, in the same order, with values compared without
regard to case or to runs of spaces. A SAN is one of the certificate's subjectAltName entries.
The SHA-256 fingerprint is that of the certificate's DER encoding.

The certificate counts only while the TLS it came with would still verify it: a reload (SIGHUP,
a file changed on disk, the hourly renewal of session keys) makes a new context, and a
connection made with an earlier one keeps its certificate only if the new context trusts
what verified it (:meth:`ClientStore._still_trusted`). Each connection's verdict is kept
until the entries or the context change: a request costs a dictionary look-up, and revoking
an entry or a CA takes effect at the next request of every connection, open or resumed.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import re
import ssl
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from aiohttp import web

from .auth import parse_name_and_scope, route_in_scope
from .errors import ConfigError
from .files import read_config_file
from .logtext import loggable
from .tls import ReloadableContext

logger = logging.getLogger("aioserver.auth")

KEYS = ("name", "subject", "san", "sha256", "workflows")
SAN_KINDS = {"dns": "DNS", "email": "email", "uri": "URI", "ip": "IP"}
# How getpeercert() names the kinds of subjectAltName entries (CPython's _ssl.c).
_PEER_SAN_KINDS = {"DNS": "DNS", "email": "email", "URI": "URI", "IP Address": "IP"}
# RFC 4514 section 3's attribute type names, which OpenSSL spells otherwise or not at all.
_RFC4514_TYPES = {
    "CN": "2.5.4.3",
    "C": "2.5.4.6",
    "L": "2.5.4.7",
    "ST": "2.5.4.8",
    "STREET": "2.5.4.9",
    "O": "2.5.4.10",
    "OU": "2.5.4.11",
    "DC": "0.9.2342.19200300.100.1.25",
    "UID": "0.9.2342.19200300.100.1.1",
    "E": "1.2.840.113549.1.9.1",  # emailAddress, as Windows and many tools write it
}
_RFC4514_NAMES = {oid: name for name, oid in _RFC4514_TYPES.items() if name != "E"}  # emailAddress: OpenSSL's
_OID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))+", re.ASCII)
_HEX = re.compile(r"[0-9a-fA-F]{64}")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_DNS_NAME = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}", re.ASCII)
# RFC 4514 section 3: what an attribute value must escape, and what may be escaped.
_MUST_ESCAPE = frozenset('"+,;<>\\')
_ESCAPABLE = _MUST_ESCAPE | {" ", "#", "="}

# A distinguished name, canonical: its RDNs in the certificate's (DER) order, each a set of
# (attribute type OID, value folded).
Name = tuple[frozenset[tuple[str, str]], ...]


# What a connection's certificate makes of a request when it is no entry's: the refusal's
# reason (auth.AUTH_FAILURES). None sent, or one the TLS in force would not verify: no credential.
NO_CERTIFICATE: Final = "missing"
UNKNOWN_CERTIFICATE: Final = "unknown_certificate"  # verified, but no entry names it


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """What an entry is compared with, of a verified certificate."""

    sha256: bytes
    subject: Name
    sans: frozenset[tuple[str, str]]  # (kind, value canonical): ("DNS", "ci.example")
    not_after: float  # seconds since the epoch
    shown: str  # subject, SANs and fingerprint, for the log

    @classmethod
    def of(cls, der: bytes, decoded: Mapping[str, Any]) -> PeerCertificate:
        """From the DER and ``getpeercert()``'s decoding of one certificate."""
        subject = tuple(
            frozenset((_peer_attribute_oid(kind), _fold(value)) for kind, value in rdn)
            for rdn in decoded.get("subject", ())
        )
        sans = frozenset(
            canonical
            for kind, value in decoded.get("subjectAltName", ())
            if (canonical := _peer_san(kind, value)) is not None
        )
        sha256 = hashlib.sha256(der).digest()
        sent = decoded.get("subjectAltName", ())
        names = ", ".join(f"{kind}:{value}" for kind, value in sent if isinstance(value, str))
        shown = f"subject {format_name(decoded.get('subject', ()))!r}, SAN {names or 'none'}, sha256 {sha256.hex()}"
        return cls(sha256, subject, sans, ssl.cert_time_to_seconds(decoded["notAfter"]), loggable(shown))


@dataclass(frozen=True, slots=True)
class Client:
    """An ``auth.clients`` entry: an identity, its scope, and the certificates that are it."""

    kind: ClassVar[str] = "client certificate"

    name: str
    workflows: frozenset[str] | None = None  # as a token's (auth.Token); None: everything
    subject: Name | None = None
    san: tuple[str, str] | None = None
    sha256: bytes | None = None
    described: str = ""  # the criteria as configured, for --check

    def matches(self, peer: PeerCertificate) -> bool:
        """Whether ``peer`` meets every criterion of the entry."""
        return (
            (self.sha256 is None or self.sha256 == peer.sha256)
            and (self.subject is None or self.subject == peer.subject)
            and (self.san is None or self.san in peer.sans)
        )

    def may_run(self, workflow: str) -> bool:
        return self.workflows is None or workflow in self.workflows

    def may_call(self, request: web.Request) -> bool:
        return route_in_scope(self.workflows, request)


# -- the config: auth.clients


def parse_clients(entries: Any, source: str) -> tuple[Client, ...]:
    """The entries of ``auth.clients``; raises ConfigError naming the entry's key and the problem."""
    if not isinstance(entries, list):
        raise ConfigError(source, "auth.clients", "expected a list of {name, subject, san, sha256, workflows}")
    return tuple(_parse_client(entry, source, f"auth.clients[{i}]") for i, entry in enumerate(entries))


def _parse_client(entry: Any, source: str, key: str) -> Client:
    if not isinstance(entry, Mapping):
        raise ConfigError(source, key, "expected a mapping {name, subject, san, sha256, workflows}")
    for unknown in entry.keys() - set(KEYS):
        raise ConfigError(source, f"{key}.{unknown}", f"unknown key; known: {', '.join(KEYS)}")
    name, workflows = parse_name_and_scope(entry, source, key)
    given = {k: entry[k] for k in ("subject", "san", "sha256") if entry.get(k) is not None}
    if not given:
        raise ConfigError(source, key, "needs subject, san or sha256: which certificates are this client")
    for criterion, value in given.items():
        if not isinstance(value, str):
            raise ConfigError(source, f"{key}.{criterion}", "expected a string")
    try:
        subject = parse_name(given["subject"]) if "subject" in given else None
    except ValueError as exc:
        problem = f"{exc}; expected an RFC 4514 name such as CN=ci,O=Example"
        raise ConfigError(source, f"{key}.subject", problem) from None
    try:
        san = parse_san(given["san"]) if "san" in given else None
    except ValueError as exc:
        raise ConfigError(source, f"{key}.san", str(exc)) from None
    sha256 = None
    if "sha256" in given:
        digits = given["sha256"].strip().replace(":", "")
        if not _HEX.fullmatch(digits):
            raise ConfigError(
                source,
                f"{key}.sha256",
                "expected the certificate's SHA-256 fingerprint, 64 hex digits (colons allowed), as"
                " `openssl x509 -noout -fingerprint -sha256 -in client.pem` prints it",
            )
        sha256 = bytes.fromhex(digits)
    described = "; ".join(f"{criterion} {value.strip()}" for criterion, value in given.items())
    return Client(name, workflows, subject, san, sha256, described)


def parse_san(text: str) -> tuple[str, str]:
    """``DNS:ci.example``, ``email:ops@example.org``, ``URI:spiffe://...``, ``IP:10.0.0.7``, canonical."""
    kind, colon, value = text.strip().partition(":")
    if not colon or kind.lower() not in SAN_KINDS:
        raise ValueError("expected KIND:VALUE with KIND one of DNS, email, URI, IP (DNS:ci.example)")
    canonical = _san(SAN_KINDS[kind.lower()], value.strip())
    if canonical is None:
        raise ValueError(f"not a valid {SAN_KINDS[kind.lower()]} name")
    if canonical[0] == "DNS" and "*" in value:
        raise ValueError("a wildcard is no pattern here: give the exact name the certificate holds")
    return canonical


def _san(kind: str, value: str) -> tuple[str, str] | None:
    """A SAN canonical, as RFC 5280 section 7 compares them; None if it is not one."""
    if kind == "DNS":
        name = value.lower().removesuffix(".")
        # A certificate's own may hold a wildcard (never matched by an entry's, which may not).
        return ("DNS", name) if _DNS_NAME.fullmatch(name.removeprefix("*.")) else None
    if kind == "email":
        local, at, domain = value.rpartition("@")
        return ("email", f"{local}@{domain.lower()}") if local and at and domain else None  # local part: as it is
    if kind == "URI":
        return ("URI", value) if value and value.isprintable() and " " not in value else None
    if kind == "IP":
        try:
            return ("IP", str(ipaddress.ip_address(value)))
        except ValueError:
            return None
    return None


def _peer_san(kind: str, value: Any) -> tuple[str, str] | None:
    ours = _PEER_SAN_KINDS.get(kind)
    if ours is None or not isinstance(value, str):
        return None  # DirName, othername, Registered ID: no entry names them
    return _san(ours, value.strip())


def parse_name(text: str) -> Name:
    """An RFC 4514 string (``CN=ci,O=Example``), canonical; raises ValueError saying what is wrong.

    Spaces around ``,``, ``+`` and ``=`` are allowed (``CN=ci, O=Example``); values in ``#``
    hex (BER) are not.
    """
    if text.lstrip().startswith("/"):
        raise ValueError(
            "that is OpenSSL's /O=.../CN=... form: write it most specific first, as"
            " `openssl x509 -noout -subject -nameopt RFC2253` prints it"
        )
    rdns: list[frozenset[tuple[str, str]]] = []
    avas: list[tuple[str, str]] = []
    position = 0
    while True:
        equals = text.find("=", position)
        if equals < 0:
            raise ValueError(f"{text[position:].strip() or 'nothing'!r} is no TYPE=value pair")
        oid = _attribute_oid(text[position:equals].strip())
        value, position = _read_value(text, equals + 1)
        avas.append((oid, _fold(value)))
        if position == len(text) or text[position] == ",":
            rdns.append(frozenset(avas))
            avas = []
        if position == len(text):
            break
        position += 1  # past "," or "+"
    return tuple(reversed(rdns))  # RFC 4514 writes the last RDN first


def _read_value(text: str, position: int) -> tuple[str, int]:
    """An attribute value from ``position``, unescaped, and where it ends (at ``,``, ``+`` or the end)."""
    while position < len(text) and text[position] == " ":
        position += 1
    if text.startswith("#", position):
        raise ValueError("hex (#...) values are not supported: write the value as a string")
    value = bytearray()
    while position < len(text) and text[position] not in ",+":
        char = text[position]
        if char == "\\":
            pair = text[position + 1 : position + 3]
            if re.fullmatch(r"[0-9a-fA-F]{2}", pair):
                value.append(int(pair, 16))
                position += 3
                continue
            if pair[:1] not in _ESCAPABLE:
                raise ValueError(f"\\{pair[:1]} is no RFC 4514 escape")
            char = pair[0]
            position += 1
        elif char in _MUST_ESCAPE:
            raise ValueError(f"{char!r} must be escaped (\\{char}) in a value")
        value += char.encode()
        position += 1
    try:
        return value.decode("utf-8"), position
    except UnicodeDecodeError:
        raise ValueError("escaped bytes (\\XX) that are not UTF-8") from None


def _attribute_oid(name: str) -> str:
    """The OID of an attribute type named as RFC 4514 or OpenSSL names it, or given as an OID."""
    if not name:
        raise ValueError("an attribute type is missing before '='")
    if _OID.fullmatch(name):
        return name
    if name.upper() in _RFC4514_TYPES:
        return _RFC4514_TYPES[name.upper()]
    try:
        return ssl._ASN1Object.fromname(name).oid  # OpenSSL's names: serialNumber, SN, GN, title, ...
    except ValueError:
        raise ValueError(f"unknown attribute type {name!r}: give its OID (2.5.4.3 for CN)") from None


@functools.lru_cache(maxsize=256)
def _peer_attribute_oid(name: str) -> str:
    """The OID of an attribute as getpeercert() names it: OpenSSL's long name, or the OID."""
    if _OID.fullmatch(name):
        return name
    try:
        return ssl._ASN1Object.fromname(name).oid
    except ValueError:  # a name OpenSSL gave and cannot read back: compared as it is
        return name


def _fold(value: str) -> str:
    """A value as compared: case folded, runs of spaces as one, none at the ends (RFC 4518's gist)."""
    return " ".join(value.split()).casefold()


def format_name(rdns: Any) -> str:
    """getpeercert()'s subject as an RFC 4514 string (``CN=ci,O=Example``), for the log."""
    return ",".join(
        "+".join(f"{_short_name(kind)}={_escape(value)}" for kind, value in rdn) for rdn in reversed(tuple(rdns))
    )


def _short_name(name: str) -> str:
    oid = _peer_attribute_oid(name)
    if oid in _RFC4514_NAMES:
        return _RFC4514_NAMES[oid]
    try:
        return ssl._ASN1Object(oid).shortname
    except ValueError:
        return oid


def _escape(value: str) -> str:
    escaped = "".join(f"\\{c}" if c in _MUST_ESCAPE else c for c in value)
    if value.startswith((" ", "#")):
        escaped = "\\" + escaped
    if value.endswith(" ") and len(value) > 1:  # a lone space is escaped as the first already
        escaped = escaped[:-1] + "\\ "
    return escaped


# -- the config file's auth.clients, read again at each reload


@dataclass(frozen=True, slots=True)
class ClientSources:
    """Where the entries come from: the config file, read again on SIGHUP; or fixed ones
    (an inline config, which cannot be read again)."""

    fixed: tuple[Client, ...] = ()
    path: str | None = None

    def load(self) -> tuple[Client, ...]:
        """The entries in force (blocking: reads the config file); raises ConfigError naming what fails."""
        if self.path is None:
            return self.fixed
        auth = read_config_file(self.path).get("auth")
        # An auth section without clients (left out, or emptied) revokes them all: never opens up.
        return parse_clients((auth or {}).get("clients") or [], self.path)


def client_sources(section: Any, source: str, path: str | None) -> ClientSources | None:
    """The sources of the config's ``auth.clients``; None when it has none. ``path``: the
    config file it came from, None for inline YAML."""
    if not isinstance(section, Mapping) or "clients" not in section:
        return None
    clients = parse_clients(section["clients"] if section["clients"] is not None else [], source)
    return ClientSources(clients, path)


# -- requests: which entry is the certificate of this one's connection


@dataclass(frozen=True, slots=True)
class _Seen:
    """A connection's verdict, and what it was reached with: valid while both are in force."""

    clients: tuple[Client, ...]
    context: ssl.SSLContext | None
    verdict: Client | str  # the entry, or the refusal's reason
    until: float  # the certificate's notAfter: past it, no certificate


class ClientStore:
    """The entries in force, and the verdict of each open connection's certificate.

    :meth:`replace` swaps the entries (SIGHUP); the TLS context in force is ``tls.current``.
    """

    def __init__(self, clients: tuple[Client, ...], tls: ReloadableContext) -> None:
        self.clients = clients
        self.tls = tls
        # Per connection (its SSLObject, which lives as long as it): gone with it.
        self._seen: weakref.WeakKeyDictionary[ssl.SSLObject, _Seen] = weakref.WeakKeyDictionary()
        # Per context: the certificates its store trusts (None: not all are known).
        self._anchors: weakref.WeakKeyDictionary[ssl.SSLContext, frozenset[bytes] | None] = weakref.WeakKeyDictionary()

    def replace(self, clients: tuple[Client, ...]) -> None:
        self.clients = clients

    def identify(self, request: web.BaseRequest) -> Client | str:
        """The entry that the request's connection's certificate matches, or the reason there is none
        (NO_CERTIFICATE, UNKNOWN_CERTIFICATE)."""
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if ssl_object is None:
            return NO_CERTIFICATE
        seen = self._seen.get(ssl_object)
        if seen is None or seen.clients is not self.clients or seen.context is not self.tls.current:
            seen = self._judge(ssl_object)
            self._seen[ssl_object] = seen
        if seen.until < time.time():
            return NO_CERTIFICATE  # expired since the handshake: as a new one would be refused
        return seen.verdict

    def _judge(self, ssl_object: ssl.SSLObject) -> _Seen:
        clients, context = self.clients, self.tls.current
        der = ssl_object.getpeercert(binary_form=True)
        decoded = ssl_object.getpeercert()
        if der is None or not decoded:  # none sent (or none verified: a context without a CA)
            return _Seen(clients, context, NO_CERTIFICATE, float("inf"))
        peer = PeerCertificate.of(der, decoded)
        if not self._still_trusted(ssl_object, context):
            logger.info("client certificate no longer trusted since a reload (%s): counted as none", peer.shown)
            return _Seen(clients, context, NO_CERTIFICATE, peer.not_after)
        for client in clients:
            if client.matches(peer):
                return _Seen(clients, context, client, peer.not_after)
        logger.info("client certificate matches no auth.clients entry: %s", peer.shown)
        return _Seen(clients, context, UNKNOWN_CERTIFICATE, peer.not_after)

    def _still_trusted(self, ssl_object: ssl.SSLObject, current: ssl.SSLContext | None) -> bool:
        """Whether ``current`` would verify the certificate that ``ssl_object``'s handshake did.

        Made with ``current``: yes. With an earlier context: yes if ``current`` trusts every
        certificate it trusted (a reload of the same CA file, the hourly renewal); else, the
        chain verified must end at a CA ``current`` trusts, through CAs it trusts or the client
        sent. A resumed session has no chain (OpenSSL keeps the leaf only): after a reload that
        took a CA away, its certificate counts no more until a new handshake.
        """
        made_with = ssl_object.context
        if made_with is current:
            return True
        if current is None:
            return False
        trusted = self._trusted_by(current)
        if trusted is None:
            return False
        before = self._trusted_by(made_with)
        if before is not None and before <= trusted:
            return True
        chain = _verified_chain(ssl_object)
        if not chain:
            return False
        sent = set(_sent_chain(ssl_object))
        return chain[-1] in trusted and all(c in trusted or c in sent for c in chain[1:-1])

    def _trusted_by(self, context: ssl.SSLContext) -> frozenset[bytes] | None:
        """The DER of every certificate ``context`` trusts; None if some are not listed
        (get_ca_certs lists CA certificates only, and a store may hold a pinned leaf)."""
        if context in self._anchors:
            return self._anchors[context]
        stats = context.cert_store_stats()
        trusted = frozenset(context.get_ca_certs(binary_form=True)) if stats["x509"] == stats["x509_ca"] else None
        self._anchors[context] = trusted
        return trusted


def _verified_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The chain the handshake verified, leaf first, as DER; empty when unknown (a resumed session).

    Public from Python 3.13; in 3.10 to 3.12 it is _ssl's, not yet exposed.
    """
    method = getattr(ssl_object, "get_verified_chain", None) or getattr(
        getattr(ssl_object, "_sslobj", None), "get_verified_chain", None
    )
    return _der(method() if method is not None else None)


def _sent_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The certificates the client sent, as DER."""
    method = getattr(ssl_object, "get_unverified_chain", None) or getattr(
        getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None
    )
    return _der(method() if method is not None else None)


def _der(certificates: Any) -> list[bytes]:
    if not certificates:
        return []
    return [c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER) for c in certificates]  # type: ignore[attr-defined]


# The store of an app whose config has auth.clients (app.py), for reloads (server.py).
CLIENTS = web.AppKey("clients", ClientStore)
