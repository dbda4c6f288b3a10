"""Client certificates as identities (auth.clients): parsing, matching, trust after reloads, and
the real server over real TLS: answers, scopes, access log, throttle, revocation, --check."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from unittest import mock

import pytest
import trustme
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_server import sighup

from aioserver import clientcerts, create_app, load_config
from aioserver.cli import main
from aioserver.clientcerts import (
    NO_CERTIFICATE,
    UNKNOWN_CERTIFICATE,
    Client,
    ClientSources,
    ClientStore,
    PeerCertificate,
    client_sources,
    format_name,
    parse_clients,
    parse_name,
    parse_san,
)
from aioserver.errors import ConfigError
from aioserver.tls import ReloadableContext, TLSFiles

from conftest import TOKEN, TOKEN_HASH, PemFiles, Server, aioserver_command

REALM = 'Bearer realm="aioserver"'


# -- certificates: two trusted CAs (the session's, and a second), one that is not


@dataclass(frozen=True)
class Certs:
    """Client certificates (each a PEM file holding its key and chain) and the CAs."""

    ca: Path  # the session CA (it signed the server's certificate) and ca2, one file
    ca1_only: Path  # the session CA alone: ca2 taken away
    ci: Path  # O=Example, OU=CI, CN=ci; DNS:ci.example
    ops: Path  # O=Example, OU=Ops, CN=ops; email:ops@example.org
    pinned: Path  # O=Example, OU=CI, CN=pinned
    pinned_sha256: str  # its fingerprint, as openssl prints it (AB:CD:...)
    stranger: Path  # O=Example, OU=CI, CN=stranger; DNS:stranger.example
    wildcard: Path  # O=Example, OU=CI, CN=wild; DNS:*.example
    ci2: Path  # from ca2: O=Example, OU=CI, CN=ci2
    foreign: Path  # from a CA nobody trusts, the same names as ci


def _write(leaf: trustme.LeafCert, path: Path) -> Path:
    leaf.private_key_and_cert_chain_pem.write_to_path(path)
    return path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory, tls_certificate_authority: trustme.CA) -> Certs:
    folder = tmp_path_factory.mktemp("clients")
    ca1, ca2, foreign_ca = tls_certificate_authority, trustme.CA(), trustme.CA()

    leaves: dict[str, trustme.LeafCert] = {}

    def issue(ca: trustme.CA, name: str, *identities: str, unit: str = "CI") -> Path:
        leaf = ca.issue_cert(*identities, common_name=name, organization_name="Example", organization_unit_name=unit)
        leaves[name] = leaf
        return _write(leaf, folder / f"{name}-{id(ca)}.pem")

    pinned = issue(ca1, "pinned")
    der = ssl.PEM_cert_to_DER_cert(leaves["pinned"].cert_chain_pems[0].bytes().decode())
    fingerprint = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    bundle, ca1_only = folder / "ca.pem", folder / "ca1.pem"
    ca1.cert_pem.write_to_path(ca1_only)
    ca1.cert_pem.write_to_path(bundle)
    ca2.cert_pem.write_to_path(bundle, append=True)
    return Certs(
        ca=bundle,
        ca1_only=ca1_only,
        ci=issue(ca1, "ci", "ci.example"),
        ops=issue(ca1, "ops", "ops@example.org", unit="Ops"),
        pinned=pinned,
        pinned_sha256=fingerprint,
        stranger=issue(ca1, "stranger", "stranger.example"),
        wildcard=issue(ca1, "wild", "*.example"),
        ci2=issue(ca2, "ci2"),
        foreign=issue(foreign_ca, "ci", "ci.example"),
    )


def client_context(certs: Certs, cert: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    if cert is not None:
        context.load_cert_chain(str(cert))
    return context


# -- the parts: names, SANs, entries


@pytest.mark.parametrize(
    ("config", "same_as"),
    [
        ("cn=CI, ou=ci,  o=EXAMPLE", "CN=ci,OU=CI,O=Example"),  # case and spaces do not matter
        ("CN=ci,OU=CI,O=Example Org", "CN=ci,OU=CI,O=Example  org"),  # runs of spaces are one
        ("2.5.4.3=ci,2.5.4.11=CI,2.5.4.10=Example", "CN=ci,OU=CI,O=Example"),  # OIDs
        ("commonName=ci,organizationalUnitName=CI,organizationName=Example", "CN=ci,OU=CI,O=Example"),
        ("CN=a+UID=b,O=x", "UID=b+CN=a,O=x"),  # a multi-valued RDN is a set
        ("CN=a\\,b\\+c\\\\,O=x", "CN=a\\2Cb\\2Bc\\5C,O=x"),  # escapes, by character or hex
        ("CN=\\C3\\A9t\\C3\\A9", "CN=été"),  # UTF-8 in hex pairs
        ("CN=\\ a\\ ", "CN=a"),  # escaped spaces at the ends: folded away like the others
        ("E=ops@example.org", "emailAddress=ops@example.org"),
        ("CN = ci , O = x", "CN=ci,O=x"),
        ("CN=", "CN=  "),  # an empty value
    ],
)
def test_names_compare_canonically(config: str, same_as: str) -> None:
    assert parse_name(config) == parse_name(same_as)


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("CN=ci,O=Example", "O=Example,CN=ci"),  # the order of RDNs matters
        ("CN=ci,O=Example", "CN=ci"),  # every RDN
        ("CN=ci,O=Example", "CN=ci,O=Example,C=FR"),
        ("CN=a+O=b", "CN=a,O=b"),  # one RDN of two values is not two RDNs
        ("CN=ci", "CN=ci2"),
        ("CN=ci", "OU=ci"),  # the type matters
    ],
)
def test_different_names_differ(one: str, other: str) -> None:
    assert parse_name(one) != parse_name(other)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "no TYPE=value"),
        ("CN", "no TYPE=value"),
        ("CN=a,", "no TYPE=value"),
        ("=a", "attribute type is missing"),
        ("XYZ=1", "unknown attribute type 'XYZ'"),
        ("CN=#616263", "hex (#...) values are not supported"),
        ("CN=  #616263", "hex (#...) values are not supported"),
        ("CN=a;b", "';' must be escaped"),
        ('CN="a"', "'\"' must be escaped"),
        ("CN=a<b", "'<' must be escaped"),
        ("CN=a\\zb", "\\z is no RFC 4514 escape"),
        ("CN=a\\", "is no RFC 4514 escape"),
        ("CN=\\ff", "not UTF-8"),
        ("/O=Example/CN=ci", "that is OpenSSL's /O=.../CN=... form"),
    ],
)
def test_bad_names(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_name(text)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("DNS:CI.Example.", ("DNS", "ci.example")),
        ("dns:ci.example", ("DNS", "ci.example")),
        ("email:Ops@EXAMPLE.org", ("email", "Ops@example.org")),  # the local part keeps its case
        ('email:"a@B"@Example.org', ("email", '"a@B"@example.org')),  # the domain follows the last @
        ("URI:spiffe://example.org/ci", ("URI", "spiffe://example.org/ci")),
        ("IP:2001:DB8::0:1", ("IP", "2001:db8::1")),
        ("ip:10.0.0.7", ("IP", "10.0.0.7")),
    ],
)
def test_sans(text: str, canonical: tuple[str, str]) -> None:
    assert parse_san(text) == canonical


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("ci.example", "expected KIND:VALUE"),
        ("X400:ci", "expected KIND:VALUE"),
        ("DNS:*.example", "a wildcard is no pattern here"),
        ("DNS:ci..example", "not a valid DNS name"),
        ("DNS:", "not a valid DNS name"),
        ("DNS:été.example", "not a valid DNS name"),
        ("email:ops", "not a valid email name"),
        ("email:@example.org", "not a valid email name"),
        ("IP:10.0.0.256", "not a valid IP name"),
        ("URI:", "not a valid URI name"),
        ("URI:a b", "not a valid URI name"),
    ],
)
def test_bad_sans(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_san(text)


@pytest.mark.parametrize(
    ("entries", "key", "problem"),
    [
        ({"name": "x"}, None, "expected a list"),
        (["x"], "auth.clients[0]", "expected a mapping"),
        (
            [{"name": "x", "subject": "CN=x", "role": "admin"}],
            "auth.clients[0].role",
            "unknown key; known: name, subject, san, sha256, workflows",
        ),
        ([{"subject": "CN=x"}], "auth.clients[0].name", "non-empty string"),
        ([{"name": "", "subject": "CN=x"}], "auth.clients[0].name", "non-empty string"),
        ([{"name": "x"}], "auth.clients[0]", "needs subject, san or sha256"),
        ([{"name": "x", "subject": None}], "auth.clients[0]", "needs subject, san or sha256"),
        ([{"name": "x", "subject": ["CN=x"]}], "auth.clients[0].subject", "expected a string"),
        ([{"name": "x", "subject": "CN=x;"}], "auth.clients[0].subject", "must be escaped"),
        ([{"name": "x", "san": "DNS:*.x"}], "auth.clients[0].san", "wildcard"),
        (
            [{"name": "x", "sha256": "ab" * 31}],
            "auth.clients[0].sha256",
            "expected the certificate's SHA-256 fingerprint, 64 hex digits (colons allowed), as"
            " `openssl x509 -noout -fingerprint -sha256 -in client.pem` prints it",
        ),
        ([{"name": "x", "sha256": "zz" * 32}], "auth.clients[0].sha256", "64 hex digits"),
        ([{"name": "x", "sha256": "ab" * 32, "workflows": "echo"}], "auth.clients[0].workflows", "list of workflow"),
        ([{"name": "x", "sha256": "ab" * 32}, {"name": "y"}], "auth.clients[1]", "needs subject"),
    ],
)
def test_bad_entries(entries: object, key: str | None, problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_clients(entries, "config.yml")
    assert (error.value.source, error.value.key) == ("config.yml", key or "auth.clients")
    assert problem in error.value.problem


def test_an_entry_keeps_what_it_was_given() -> None:
    (entry,) = parse_clients(
        [{"name": "ci", "subject": "CN=ci", "san": "DNS:ci.example", "sha256": "AB:" * 31 + "AB", "workflows": ["e"]}],
        "config.yml",
    )
    assert entry == Client(
        "ci",
        frozenset({"e"}),
        parse_name("CN=ci"),
        ("DNS", "ci.example"),
        bytes.fromhex("ab" * 32),
        f"subject CN=ci; san DNS:ci.example; sha256 {'AB:' * 31}AB",
    )
    assert entry.may_run("e") and not entry.may_run("f")


# -- real handshakes, in memory: what the server's side of a connection knows


def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A TLS connection between the two contexts over memory BIOs: (server's side, client's side).

    A byte goes from server to client, so that the client holds TLS 1.3's session ticket.
    Raises ssl.SSLError if the server refuses the client's certificate.
    """
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    ours = server.wrap_bio(server_in, server_out, server_side=True)
    theirs = client.wrap_bio(client_in, client_out, server_hostname="localhost", session=session)
    done: set[int] = set()
    for _ in range(10):
        for side in (theirs, ours):
            if id(side) not in done:
                try:
                    side.do_handshake()
                    done.add(id(side))
                except ssl.SSLWantReadError:
                    pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
    assert len(done) == 2, "the handshake did not finish"
    ours.write(b"x")
    client_in.write(server_out.read())
    assert theirs.read(1) == b"x"
    return ours, theirs


def request_on(connection: ssl.SSLObject | None) -> types.SimpleNamespace:
    """What ClientStore.identify reads of a request: its transport's ``ssl_object``."""
    extra = {"ssl_object": connection} if connection is not None else {}
    return types.SimpleNamespace(transport=types.SimpleNamespace(get_extra_info=extra.get))


@pytest.fixture
def server_tls(tmp_path: Path, pem_files: PemFiles, certs: Certs) -> Iterator[tuple[ReloadableContext, Path]]:
    """The server's TLS, clients optional, its CA file a copy that a test may change."""
    ca = tmp_path / "ca.pem"
    ca.write_bytes(certs.ca.read_bytes())
    yield ReloadableContext(TLSFiles(str(pem_files.cert), str(pem_files.key), None, str(ca), "optional")), ca


def peer(server_tls: tuple[ReloadableContext, Path], certs: Certs, cert: Path) -> PeerCertificate:
    ours, _ = handshake(server_tls[0].current, client_context(certs, cert))  # type: ignore[arg-type]
    der = ours.getpeercert(binary_form=True)
    assert der is not None
    return PeerCertificate.of(der, ours.getpeercert())


@pytest.mark.parametrize(
    ("entry", "cert", "matches"),
    [
        ({"subject": "CN=ci,OU=CI,O=Example"}, "ci", True),
        ({"subject": "cn=CI , ou=ci, o=EXAMPLE"}, "ci", True),
        ({"subject": "CN=ci,OU=CI,O=Example"}, "ci2", False),
        ({"subject": "CN=ci,O=Example"}, "ci", False),  # OU=CI left out: another name
        ({"subject": "O=Example,OU=CI,CN=ci"}, "ci", False),  # the certificate's order, not RFC 4514's
        ({"san": "DNS:ci.example"}, "ci", True),
        ({"san": "DNS:CI.EXAMPLE."}, "ci", True),
        ({"san": "DNS:ci.example"}, "stranger", False),
        ({"san": "DNS:ci.example"}, "wildcard", False),  # *.example is no pattern for an entry either
        ({"san": "email:ops@example.org"}, "ops", True),
        ({"san": "email:ops@EXAMPLE.ORG"}, "ops", True),
        ({"san": "email:OPS@example.org"}, "ops", False),  # the local part is case-sensitive
        ({"san": "URI:ops@example.org"}, "ops", False),  # the kind matters
        ({"sha256": "pinned"}, "pinned", True),
        ({"sha256": "pinned"}, "ci", False),
        # Every criterion given must hold.
        ({"subject": "CN=ci,OU=CI,O=Example", "san": "DNS:ci.example"}, "ci", True),
        ({"subject": "CN=ci,OU=CI,O=Example", "san": "DNS:other.example"}, "ci", False),
        ({"subject": "CN=other,OU=CI,O=Example", "san": "DNS:ci.example"}, "ci", False),
        ({"subject": "CN=pinned,OU=CI,O=Example", "sha256": "pinned"}, "pinned", True),
        ({"subject": "CN=pinned,OU=CI,O=Example", "sha256": "ab" * 32}, "pinned", False),
        ({"san": "DNS:ci.example", "sha256": "pinned"}, "ci", False),
    ],
)
def test_matching(
    server_tls: tuple[ReloadableContext, Path], certs: Certs, entry: dict[str, str], cert: str, matches: bool
) -> None:
    if entry.get("sha256") == "pinned":
        entry = {**entry, "sha256": certs.pinned_sha256}
    (client,) = parse_clients([{"name": "x", **entry}], "config.yml")
    assert client.matches(peer(server_tls, certs, getattr(certs, cert))) is matches


def test_a_peer_certificate_as_logged(server_tls: tuple[ReloadableContext, Path], certs: Certs) -> None:
    seen = peer(server_tls, certs, certs.ops)
    assert seen.shown.startswith("subject 'CN=ops,OU=Ops,O=Example', SAN email:ops@example.org, sha256 ")
    assert seen.sans == {("email", "ops@example.org")}
    assert ", SAN none, sha256 " in peer(server_tls, certs, certs.ci2).shown
    assert format_name(((("commonName", "a,b"),), (("organizationName", " #x "),))) == "O=\\ #x\\ ,CN=a\\,b"
    assert (
        format_name(((("organizationalUnitName", "#1"), ("serialNumber", "a\\ ")),)) == "OU=\\#1+serialNumber=a\\\\\\ "
    )
    assert format_name(((("1.2.3.4", " "),), (("userId", "u "),))) == "UID=u\\ ,1.2.3.4=\\ "


# -- trust: what a connection's certificate counts for after reloads


def entries(*names: str) -> tuple[Client, ...]:
    return parse_clients([{"name": n, "subject": f"CN={n},OU=CI,O=Example"} for n in names], "config.yml")


def test_verdicts_follow_the_entries_and_the_ca(
    server_tls: tuple[ReloadableContext, Path], certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls, ca = server_tls
    store = ClientStore(entries("ci", "ci2", "stranger2"), tls)
    assert tls.current is not None
    as_ci = client_context(certs, certs.ci)
    ci, ci_side = handshake(tls.current, as_ci)
    resumed, resumed_side = handshake(tls.current, as_ci, ci_side.session)
    assert resumed_side.session_reused
    ci2, _ = handshake(tls.current, client_context(certs, certs.ci2))
    stranger, _ = handshake(tls.current, client_context(certs, certs.stranger))
    anonymous, _ = handshake(tls.current, client_context(certs, None))

    def names() -> list[str]:
        found = [store.identify(request_on(c)) for c in (ci, resumed, ci2, stranger, anonymous)]  # type: ignore[arg-type]
        return [f.name if isinstance(f, Client) else f for f in found]

    assert names() == ["ci", "ci", "ci2", UNKNOWN_CERTIFICATE, NO_CERTIFICATE]
    assert store.identify(request_on(None)) == NO_CERTIFICATE  # type: ignore[arg-type]

    store.replace(entries("ci2"))  # ci's entry revoked: on every open connection, resumed or not
    assert names() == [UNKNOWN_CERTIFICATE, UNKNOWN_CERTIFICATE, "ci2", UNKNOWN_CERTIFICATE, NO_CERTIFICATE]
    store.replace(entries("ci", "ci2"))
    tls.reload()  # the same CA: what the connections made before verified still counts
    assert names() == ["ci", "ci", "ci2", UNKNOWN_CERTIFICATE, NO_CERTIFICATE]

    ca.write_bytes(certs.ca1_only.read_bytes())  # ca2 taken away
    tls.reload()
    # ci's full handshake verified a chain to the CA still trusted; ci2's to the one taken away.
    # A resumed session's chain is not known: its certificate counts no more.
    assert names() == ["ci", NO_CERTIFICATE, NO_CERTIFICATE, UNKNOWN_CERTIFICATE, NO_CERTIFICATE]
    # New connections: ci2's handshake fails; ci resumes no session of the earlier context.
    with pytest.raises(ssl.SSLError):
        handshake(tls.current, client_context(certs, certs.ci2))
    again, again_side = handshake(tls.current, as_ci, ci_side.session)
    assert not again_side.session_reused and store.identify(request_on(again)).name == "ci"  # type: ignore[arg-type, union-attr]

    ca.write_bytes(certs.ca.read_bytes())  # back: all trusted again (a resumed one too)
    tls.reload()
    assert names() == ["ci", "ci", "ci2", UNKNOWN_CERTIFICATE, NO_CERTIFICATE]

    # A certificate that expires while its connection is open counts no more from then on.
    later = time.time() + 2000 * 365 * 86400
    monkeypatch.setattr(clientcerts.time, "time", lambda: later)
    assert names() == [NO_CERTIFICATE] * 4 + [NO_CERTIFICATE]


def test_a_verdict_costs_a_lookup_until_something_changes(
    server_tls: tuple[ReloadableContext, Path], certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls, ca = server_tls
    store = ClientStore(entries("ci"), tls)
    connections = [
        handshake(tls.current, client_context(certs, cert))[0]  # type: ignore[arg-type]
        for cert in (certs.ci, certs.stranger, None, certs.ci2)
    ]
    judged: list[object] = []
    judge = store._judge
    monkeypatch.setattr(store, "_judge", lambda obj: judged.append(obj) or judge(obj))

    def three_times() -> None:
        for _ in range(3):
            found = [store.identify(request_on(c)) for c in connections]  # type: ignore[arg-type]
            assert [f.name if isinstance(f, Client) else f for f in found] == expected

    expected = ["ci", UNKNOWN_CERTIFICATE, NO_CERTIFICATE, UNKNOWN_CERTIFICATE]
    three_times()
    assert len(judged) == 4  # once per connection, whatever its verdict
    store.replace(store.clients + entries("other"))  # new entries: judged again, once
    three_times()
    assert len(judged) == 8
    tls.reload()  # a new context (SIGHUP, the hourly renewal): judged again, once
    three_times()
    assert len(judged) == 12
    ca.write_bytes(certs.ca1_only.read_bytes())  # ci2's CA away: no certificate, judged once
    tls.reload()
    expected[3] = NO_CERTIFICATE
    three_times()
    assert len(judged) == 16


def test_a_store_holding_a_pinned_leaf_drops_older_connections(
    server_tls: tuple[ReloadableContext, Path], certs: Certs, tmp_path: Path
) -> None:
    """A self-signed leaf in the CA file is trusted by OpenSSL but not listed by get_ca_certs:
    what a context trusts is then not known, and only connections made with it count."""
    tls, ca = server_tls
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pinned-leaf")])
    now = datetime.now(UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = leaf.public_bytes(serialization.Encoding.PEM)
    ca.write_bytes(certs.ca.read_bytes() + pem)
    tls.reload()
    own = tmp_path / "leaf.pem"
    own.write_bytes(
        pem
        + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    store = ClientStore(
        parse_clients([{"name": "leaf", "subject": "CN=pinned-leaf"}, {"name": "ci", "san": "DNS:ci.example"}], "c"),
        tls,
    )
    pinned, _ = handshake(tls.current, client_context(certs, own))  # type: ignore[arg-type]
    ci, _ = handshake(tls.current, client_context(certs, certs.ci))  # type: ignore[arg-type]
    assert [store.identify(request_on(c)).name for c in (pinned, ci)] == ["leaf", "ci"]  # type: ignore[arg-type, union-attr]
    tls.reload()
    assert [store.identify(request_on(c)) for c in (pinned, ci)] == [NO_CERTIFICATE, NO_CERTIFICATE]  # type: ignore[arg-type]


# -- the config file's auth.clients, read again


def test_sources_read_the_config_file_again(tmp_path: Path) -> None:
    config = tmp_path / "config.yml"
    config.write_text("auth:\n  clients:\n    - {name: ci, san: 'DNS:ci.example'}\n")
    sources = ClientSources((), str(config))
    assert [c.name for c in sources.load()] == ["ci"]
    config.write_text("auth:\n  tokens: []\n")  # the section emptied: nobody, never everybody
    assert sources.load() == ()
    config.write_text("workflow: {}\n")
    assert sources.load() == ()
    for text, message in [
        ("auth:\n  clients:\n    - {name: ci}\n", "auth.clients[0]: needs subject, san or sha256"),
        ("auth:\n  clients: {name: ci}\n", "auth.clients: expected a list of {name, subject, san, sha256, workflows}"),
        ("auth: [\n", "invalid YAML: expected the node content, but found '<stream end>'"),
        ("auth: 3\n", "auth: expected a mapping"),
        ("- auth\n", "expected a mapping of sections at the top level"),
    ]:
        config.write_text(text)
        with pytest.raises(ConfigError) as error:
            sources.load()
        assert str(error.value).startswith(f"{config}: {message}"), error.value
    config.unlink()
    with pytest.raises(ConfigError) as error:
        sources.load()
    assert str(error.value) == f"{config}: cannot read config: No such file or directory"
    fixed = entries("ci")
    assert ClientSources(fixed, None).load() is fixed


def test_sources_of_the_config(tmp_path: Path) -> None:
    assert client_sources(None, "c.yml", "c.yml") is None
    assert client_sources({"tokens": []}, "c.yml", "c.yml") is None
    assert client_sources({"clients": None}, "c.yml", "c.yml") == ClientSources((), "c.yml")  # on, nobody in
    given = client_sources({"clients": [{"name": "ci", "san": "DNS:ci.example"}]}, "<inline config>", None)
    assert given == ClientSources(parse_clients([{"name": "ci", "san": "DNS:ci.example"}], "c"), None)
    config = tmp_path / "config.yml"
    config.write_text("")  # emptied: nobody
    assert ClientSources(entries("ci"), str(config)).load() == ()


def _signed_by(ca: trustme.CA, folder: Path, name: str, sans: list[x509.GeneralName], chain: bool = True) -> Path:
    """A client certificate of ``ca`` with exactly these SANs, and its key, in one PEM file
    (with ``ca``'s own certificate after it when ``chain``: an intermediate sent along)."""
    issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    signer = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    leaf = builder.sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    path = folder / f"{name}.pem"
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        + leaf.public_bytes(serialization.Encoding.PEM)
        + (ca.cert_pem.bytes() if chain else b"")
    )
    return path


def test_only_the_kinds_an_entry_names_match(
    server_tls: tuple[ReloadableContext, Path], certs: Certs, tmp_path: Path, tls_certificate_authority: trustme.CA
) -> None:
    """A registeredID that reads as an IPv4 address, a directoryName: no entry's IP: or DNS:."""
    odd = _signed_by(
        tls_certificate_authority,
        tmp_path,
        "odd",
        [
            x509.RegisteredID(x509.ObjectIdentifier("1.2.3.4")),
            x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ci.example")])),
            x509.UniformResourceIdentifier("spiffe://example.org/ci"),
            x509.IPAddress(ipaddress.ip_address("2001:db8::7")),
        ],
        chain=False,
    )
    seen = peer(server_tls, certs, odd)
    assert seen.sans == {("URI", "spiffe://example.org/ci"), ("IP", "2001:db8::7")}
    (by_ip,) = parse_clients([{"name": "x", "san": "IP:1.2.3.4"}], "c")
    assert not by_ip.matches(seen)
    (by_uri,) = parse_clients([{"name": "x", "san": "URI:spiffe://example.org/ci"}], "c")
    assert by_uri.matches(seen)
    (by_ip,) = parse_clients([{"name": "x", "san": "IP:2001:DB8:0::7"}], "c")
    assert by_ip.matches(seen)


def test_a_chain_through_an_intermediate_after_a_reload(
    tmp_path: Path, pem_files: PemFiles, tls_certificate_authority: trustme.CA
) -> None:
    """After a reload that takes a CA away, an open connection's certificate still counts if its
    verified chain ends at a CA still trusted, through CAs trusted or sent by the client, as a
    new handshake would verify it."""
    root = tls_certificate_authority
    intermediate = root.create_child_ca()
    sends_it = _signed_by(intermediate, tmp_path, "sends-it", [x509.DNSName("ci.example")])
    leaf_only = _signed_by(intermediate, tmp_path, "leaf-only", [x509.DNSName("ci.example")], chain=False)
    other = trustme.CA()
    ca = tmp_path / "ca.pem"
    ca.write_bytes(root.cert_pem.bytes() + intermediate.cert_pem.bytes() + other.cert_pem.bytes())
    tls = ReloadableContext(TLSFiles(str(pem_files.cert), str(pem_files.key), None, str(ca), "optional"))
    store = ClientStore(parse_clients([{"name": "ci", "san": "DNS:ci.example"}], "c"), tls)
    client = ssl.create_default_context(cafile=str(pem_files.ca))
    connections = []
    for pem in (sends_it, leaf_only):
        context = ssl.create_default_context(cafile=str(pem_files.ca))
        context.load_cert_chain(str(pem))
        connections.append(handshake(tls.current, context)[0])  # type: ignore[arg-type]

    def names() -> list[str]:
        found = [store.identify(request_on(c)) for c in connections]  # type: ignore[arg-type]
        return [f.name if isinstance(f, Client) else f for f in found]

    assert names() == ["ci", "ci"]
    ca.write_bytes(root.cert_pem.bytes() + intermediate.cert_pem.bytes())  # other's CA away
    tls.reload()
    assert names() == ["ci", "ci"]
    ca.write_bytes(root.cert_pem.bytes())  # the intermediate away: only the one sending it verifies
    tls.reload()
    assert names() == ["ci", NO_CERTIFICATE]
    ca.write_bytes(other.cert_pem.bytes())  # the root away
    tls.reload()
    assert names() == [NO_CERTIFICATE, NO_CERTIFICATE]
    del client


def test_what_counts_as_no_certificate(
    server_tls: tuple[ReloadableContext, Path], certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    tls, ca = server_tls
    store = ClientStore(entries("ci"), tls)
    ci, _ = handshake(tls.current, client_context(certs, certs.ci))  # type: ignore[arg-type]
    assert store.identify(types.SimpleNamespace(transport=None)) == NO_CERTIFICATE  # type: ignore[arg-type]

    # A context that verifies nothing would give the DER but no decoded certificate.
    class Unverified:
        context = tls.current

        def getpeercert(self, binary_form: bool = False) -> object:
            return b"der" if binary_form else {}

    unverified = Unverified()
    assert store.identify(request_on(unverified)) == NO_CERTIFICATE  # type: ignore[arg-type]
    # No context in force (ACME's certificate not there yet): nothing verified counts.
    current, tls.current = tls.current, None
    with caplog.at_level(logging.INFO, logger="aioserver.auth"):
        assert store.identify(request_on(ci)) == NO_CERTIFICATE  # type: ignore[arg-type]
    assert caplog.messages == [
        "client certificate no longer trusted since a reload (subject 'CN=ci,OU=CI,O=Example',"
        f" SAN DNS:ci.example, sha256 {hashlib.sha256(ci.getpeercert(True)).hexdigest()}): counted as none"  # type: ignore[arg-type]
    ]
    tls.current = current
    caplog.clear()
    stranger, _ = handshake(tls.current, client_context(certs, certs.stranger))  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="aioserver.auth"):
        assert store.identify(request_on(stranger)) == UNKNOWN_CERTIFICATE  # type: ignore[arg-type]
        assert store.identify(request_on(stranger)) == UNKNOWN_CERTIFICATE  # type: ignore[arg-type]
    assert caplog.messages == [  # once per connection
        "client certificate matches no auth.clients entry: subject 'CN=stranger,OU=CI,O=Example',"
        f" SAN DNS:stranger.example, sha256 {hashlib.sha256(stranger.getpeercert(True)).hexdigest()}"  # type: ignore[arg-type]
    ]


def test_until_the_certificate_expires(
    server_tls: tuple[ReloadableContext, Path], certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls, _ = server_tls
    store = ClientStore(entries("ci"), tls)
    ci, _ = handshake(tls.current, client_context(certs, certs.ci))  # type: ignore[arg-type]
    not_after = ssl.cert_time_to_seconds(ci.getpeercert()["notAfter"])  # type: ignore[index]
    monkeypatch.setattr(clientcerts.time, "time", lambda: not_after)  # RFC 5280: valid through notAfter
    assert store.identify(request_on(ci)).name == "ci"  # type: ignore[arg-type, union-attr]
    monkeypatch.setattr(clientcerts.time, "time", lambda: not_after + 1)
    assert store.identify(request_on(ci)) == NO_CERTIFICATE  # type: ignore[arg-type]


def test_chains_as_python_gives_them() -> None:
    """Python 3.13 made get_verified_chain public (DER bytes); before, _ssl's returns certificates."""
    certificate = types.SimpleNamespace(public_bytes=lambda encoding: b"der-%d" % encoding)
    public = types.SimpleNamespace(get_verified_chain=lambda: [b"a", b"b"], get_unverified_chain=lambda: [b"a"])
    private = types.SimpleNamespace(
        _sslobj=types.SimpleNamespace(get_verified_chain=lambda: [certificate], get_unverified_chain=lambda: None)
    )
    assert clientcerts._verified_chain(public) == [b"a", b"b"]  # type: ignore[arg-type]
    assert clientcerts._sent_chain(public) == [b"a"]  # type: ignore[arg-type]
    assert clientcerts._verified_chain(private) == [b"der-%d" % ssl._ssl.ENCODING_DER]  # type: ignore[arg-type, attr-defined]
    assert clientcerts._sent_chain(private) == []  # type: ignore[arg-type]
    assert clientcerts._verified_chain(types.SimpleNamespace()) == []  # type: ignore[arg-type]
    assert clientcerts._sent_chain(types.SimpleNamespace()) == []  # type: ignore[arg-type]


CLIENTS_APP = """
workflow:
  echo: {tasks: [echo]}
  other: {tasks: [echo]}
extensions: [sample_plugins.add_whoami, sample_plugins.AddRoutes]
auth:
  clients:
    - {name: ci, subject: "CN=ci,OU=CI,O=Example", workflows: [echo, /whoami]}
    - {name: ops, san: "email:ops@example.org"}
"""


async def test_the_middleware_in_process(aiohttp_client, pem_files: PemFiles, certs: Certs) -> None:  # type: ignore[no-untyped-def]
    cli = {"ssl_certfile": str(pem_files.cert), "ssl_keyfile": str(pem_files.key), "ssl_ca_certs": str(certs.ca)}
    config = load_config(CLIENTS_APP, cli={**cli, "ssl_cert_reqs": "optional"}, env={"TOKEN": TOKEN_HASH})
    assert config.tls is not None and config.tls.current is not None
    server = TestServer(create_app(config))
    await server.start_server(ssl=config.tls.current)
    client = await aiohttp_client(server)

    async def get(path: str, cert: Path | None, **headers: str) -> tuple[int, object, str | None]:
        response = await client.get(path, ssl=client_context(certs, cert), headers=headers)
        return response.status, await response.json(), response.headers.get("WWW-Authenticate")

    assert (await get("/whoami", certs.ci))[:2] == (200, {"name": "ci", "client_subject": mock.ANY})
    assert await get("/hello", certs.ci) == (
        403,
        {"error": "this client certificate may not call this route"},
        f'{REALM}, error="insufficient_scope"',
    )
    assert (await get("/nowhere", certs.ci))[0] == 403  # a scoped identity learns no route exists
    assert (await get("/hello", certs.ops))[:2] == (200, "hello")
    assert (await get("/nowhere", certs.ops))[0] == 404
    assert await get("/hello", certs.stranger) == (403, {"error": "this client certificate is not allowed"}, REALM)
    assert await get("/hello", None) == (401, {"error": "authorization required"}, REALM)
    assert (await get("/whoami", certs.stranger, Authorization=f"Bearer {TOKEN}"))[:2] == (
        200,
        {"name": "token", "client_subject": mock.ANY},
    )
    response = await client.post(
        "/workflow", json={"name": "other", "elements": [1]}, ssl=client_context(certs, certs.ci)
    )
    assert (response.status, await response.json()) == (403, {"error": "this client certificate may not run 'other'"})
    assert response.headers["WWW-Authenticate"] == f'{REALM}, error="insufficient_scope"'


async def test_failures_are_counted_and_throttled_in_process(  # type: ignore[no-untyped-def]
    aiohttp_client, pem_files: PemFiles, certs: Certs
) -> None:
    cli = {"ssl_certfile": str(pem_files.cert), "ssl_keyfile": str(pem_files.key), "ssl_ca_certs": str(certs.ca)}
    config = load_config(CLIENTS_APP, cli={**cli, "ssl_cert_reqs": "optional", "metrics": True})
    assert config.tls is not None and config.tls.current is not None
    server = TestServer(create_app(config))
    await server.start_server(ssl=config.tls.current)
    client = await aiohttp_client(server)

    async def status(cert: Path | None, workflow: str = "echo") -> int:
        body = {"name": workflow, "elements": [1]}
        return (await client.post("/workflow", json=body, ssl=client_context(certs, cert))).status

    assert [await status(certs.stranger), await status(certs.wildcard), await status(None)] == [403, 403, 401]
    # Authorization is on: the Host check of an open service on loopback (DNS rebinding) is off.
    response = await client.get("/whoami", ssl=client_context(certs, certs.ci), headers={"Host": "api.example"})
    assert response.status == 200
    assert await status(certs.ci, "other") == 403  # a workflow out of its scope
    assert (await client.get("/hello", ssl=client_context(certs, certs.ci))).status == 403  # a route
    response = await client.get("/metrics", ssl=client_context(certs, certs.ops))
    scraped = await response.text()
    for reason, count in [("unknown_certificate", 2), ("missing", 1), ("insufficient_scope", 2), ("invalid_token", 0)]:
        assert f'aioserver_auth_failures_total{{reason="{reason}"}} {count}.0' in scraped
    # Ten failures a minute from one address (scopes are none): then 429, a good certificate's too.
    assert [await status(certs.stranger) for _ in range(8)] == [403] * 8
    assert [await status(certs.stranger), await status(certs.ci), await status(None)] == [429, 429, 429]


# -- the real server, over real TLS


class Connection:
    """One keep-alive HTTPS connection to 127.0.0.1:port (its session kept, to resume)."""

    def __init__(self, port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.tls = context.wrap_socket(sock, server_hostname="localhost", session=session)
        self._buffer = b""

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.tls.close()

    def call(
        self, workflow: str = "echo", token: str | None = None, path: str = "/workflow"
    ) -> tuple[int, dict[str, str], object]:
        """POST a workflow's run (or GET ``path``): status, headers (lower-case names), JSON body."""
        body = json.dumps({"name": workflow, "elements": ["x"]}).encode() if path == "/workflow" else b""
        head = f"{'POST' if body else 'GET'} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n"
        head += "Content-Type: application/json\r\n"
        if token is not None:
            head += f"Authorization: Bearer {token}\r\n"
        self.tls.sendall(head.encode() + b"\r\n" + body)
        while b"\r\n\r\n" not in self._buffer:
            self._read()
        raw, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        lines = raw.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers["content-length"])
        while len(self._buffer) < length:
            self._read()
        answer, self._buffer = self._buffer[:length], self._buffer[length:]
        return int(lines[0].split()[1]), headers, json.loads(answer)

    def _read(self) -> None:
        data = self.tls.recv(65536)
        if not data:
            raise ConnectionResetError("closed by the server")
        self._buffer += data


def call(port: int, certs: Certs, cert: Path | None, workflow: str = "echo", token: str | None = None) -> tuple:  # type: ignore[type-arg]
    """One request on a connection of its own."""
    with Connection(port, client_context(certs, cert)) as connection:
        return connection.call(workflow, token)


def refused(port: int, certs: Certs, cert: Path | None) -> bool:
    """Whether the server refuses the client's certificate (or its lack) in the handshake, or
    right after it (TLS 1.3: the client finishes before the server has judged its certificate)."""
    try:
        call(port, certs, cert)
    except (ssl.SSLError, ConnectionError):
        return True
    return False


CONFIG = """
workflow:
  echo: {tasks: [echo]}
  other: {tasks: [echo]}
auth:
  clients:
    - {name: ci, subject: "cn=CI, ou=ci, o=EXAMPLE", workflows: [echo]}
    - {name: by-dns, san: "DNS:ci.example"}
    - {name: ops, san: "email:ops@EXAMPLE.org"}
    - {name: pinned, sha256: "%s"}
    - {name: half, subject: "CN=stranger,OU=CI,O=Example", san: "DNS:elsewhere.example"}
"""


def tls_args(pem_files: PemFiles, ca: Path, reqs: str = "optional") -> tuple[str, ...]:
    return (
        "--ssl-certfile", str(pem_files.cert), "--ssl-keyfile", str(pem_files.key),
        "--ssl-ca-certs", str(ca), "--ssl-cert-reqs", reqs,
    )  # fmt: skip


def access_lines(server: Server) -> list[str]:
    return [line.split("aiohttp.access: ", 1)[1].strip() for line in server.log if "aiohttp.access: " in line]


def wait_for_lines(server: Server, count: int) -> list[str]:
    """The access lines, once there are ``count`` (they come in batches, 0.1 s late)."""
    deadline = time.monotonic() + 10
    while len(lines := access_lines(server)) < count:
        assert time.monotonic() < deadline, "".join(server.log)
        time.sleep(0.05)
    return lines


def test_certificates_as_identities(tmp_path: Path, pem_files: PemFiles, certs: Certs) -> None:
    config = tmp_path / "config.yml"
    config.write_text(CONFIG % certs.pinned_sha256)
    with Server("--config", str(config), *tls_args(pem_files, certs.ca), env={"TOKEN": TOKEN_HASH}) as server:
        port = server.port
        # A certificate an entry names: that identity, no Authorization header needed.
        status, headers, body = call(port, certs, certs.ci)
        assert (status, body) == (200, ["x"]) and "www-authenticate" not in headers
        # Its scope: echo only; a refusal as for a token, RFC 6750's insufficient_scope.
        status, headers, body = call(port, certs, certs.ci, "other")
        assert (status, body) == (403, {"error": "this client certificate may not run 'other'"})
        assert headers["www-authenticate"] == f'{REALM}, error="insufficient_scope"'
        assert call(port, certs, certs.ops, "other")[::2] == (200, ["x"])  # by its email SAN
        assert call(port, certs, certs.pinned, "other")[::2] == (200, ["x"])  # by its fingerprint
        # A verified certificate that no entry names (half an entry is none; *.example is no
        # ci.example): 403, and only the realm in the challenge (no token, no error code).
        for cert in (certs.stranger, certs.wildcard, certs.ci2):
            status, headers, body = call(port, certs, cert)
            assert (status, body) == (403, {"error": "this client certificate is not allowed"})
            assert headers["www-authenticate"] == REALM
        # No certificate: 401, as without a token; a token still works (optional: some
        # clients by certificate, others by token), and decides when it is sent.
        status, headers, body = call(port, certs, None)
        assert (status, headers["www-authenticate"], body) == (401, REALM, {"error": "authorization required"})
        assert call(port, certs, None, "other", TOKEN)[::2] == (200, ["x"])
        assert call(port, certs, certs.stranger, "other", TOKEN)[::2] == (200, ["x"])
        status, headers, body = call(port, certs, certs.ci, token="wrong-token")
        assert (status, headers["www-authenticate"]) == (401, f'{REALM}, error="invalid_token"')
        # A certificate from a CA not trusted: refused in the handshake, whatever its names.
        assert refused(port, certs, certs.foreign)
        lines = wait_for_lines(server, 11)
    # The access log names each identity as it names a token (out of its scope too), "-" for none
    # (the third field from the end: the request id and the workflow follow).
    assert [(int(line.split('" ')[1].split()[0]), line.split()[-3]) for line in lines] == [
        (200, "ci"), (403, "ci"), (200, "ops"), (200, "pinned"), (403, "-"), (403, "-"), (403, "-"),
        (401, "-"), (200, "token"), (200, "token"), (401, "-"),
    ]  # fmt: skip
    # Why a certificate got 403 is in the log, with what an entry would need to name it.
    assert (
        "INFO aioserver.auth: client certificate matches no auth.clients entry:"
        " subject 'CN=stranger,OU=CI,O=Example', SAN DNS:stranger.example, sha256 "
    ) in "".join(server.log)


def test_required_certificates_and_the_throttle(pem_files: PemFiles, certs: Certs) -> None:
    config = "{workflow: {echo: {tasks: [echo]}}, auth: {clients: [{name: ci, san: 'DNS:ci.example'}]}}"
    with Server("--config", config, *tls_args(pem_files, certs.ca, "required")) as server:
        assert refused(server.port, certs, None)  # required: no certificate, no answer
        assert refused(server.port, certs, certs.foreign)
        assert call(server.port, certs, certs.ci)[::2] == (200, ["x"])
        # A certificate no entry names is a failure like a wrong token: ten a minute, then 429,
        # for whatever that address sends (its good certificate too) until the minute ends.
        for _ in range(10):
            assert call(server.port, certs, certs.stranger)[0] == 403
        status, headers, _ = call(server.port, certs, certs.stranger)
        assert status == 429 and 0 < int(headers["retry-after"]) <= 60
        assert call(server.port, certs, certs.ci)[0] == 429


@pytest.mark.workers
def test_revocation_by_reload_reaches_open_and_resumed_connections(
    tmp_path: Path, pem_files: PemFiles, certs: Certs
) -> None:
    config, ca = tmp_path / "config.yml", tmp_path / "ca.pem"
    ca.write_bytes(certs.ca.read_bytes())  # two CAs: ci's and ci2's
    ci2_only = "auth:\n  clients:\n    - {name: ci2, subject: 'CN=ci2,OU=CI,O=Example'}\n"
    both = ci2_only + "    - {name: ci, san: 'DNS:ci.example'}\n"
    workflow = "workflow:\n  echo: {tasks: [echo]}\n"
    config.write_text(workflow + both)
    as_ci = client_context(certs, certs.ci)
    with Server("--config", str(config), *tls_args(pem_files, ca)) as server:
        port = server.port
        with Connection(port, as_ci) as ci, Connection(port, client_context(certs, certs.ci2)) as ci2:
            assert ci.call()[::2] == (200, ["x"])  # the TLS 1.3 ticket comes with the first answer
            with Connection(port, as_ci, ci.tls.session) as resumed:
                assert resumed.tls.session_reused
                assert [c.call()[0] for c in (ci, resumed, ci2)] == [200, 200, 200]

                # An entry removed: refused at the next request of every connection, open or resumed.
                config.write_text(workflow + ci2_only)
                sighup(server, "reloaded auth.clients: 1 in force")
                assert [c.call()[0] for c in (ci, resumed, ci2)] == [403, 403, 200]
                with Connection(port, as_ci, ci.tls.session) as again:  # the session offered again
                    assert again.call()[0] == 403

                config.write_text(workflow + both)  # back: a reload of the same CA keeps what was verified
                sighup(server, "reloaded auth.clients: 2 in force")
                assert [c.call()[0] for c in (ci, resumed, ci2)] == [200, 200, 200]

                # A reload of an invalid auth.clients keeps the entries in force, and says why.
                config.write_text(workflow + both + "    - {name: nothing}\n")
                sighup(server, "auth.clients reload failed, keeping the 2 in force")
                assert f"{config}: auth.clients[2]: needs subject, san or sha256" in "".join(server.log)
                assert [c.call()[0] for c in (ci, resumed, ci2)] == [200, 200, 200]

                # ci2's CA removed: its open connection no longer counts as a certificate (401);
                # ci's verified chain ends at a CA still trusted, but a resumed session's chain
                # is unknown: it counts no more either, until a new handshake.
                ca.write_bytes(certs.ca1_only.read_bytes())
                sighup(server, "reloaded TLS certificate, key and CA")
                assert [c.call()[0] for c in (ci, resumed, ci2)] == [200, 401, 401]
        assert refused(port, certs, certs.ci2)
        with Connection(port, as_ci, ci.tls.session) as again:
            assert not again.tls.session_reused and again.call()[0] == 200


# -- the config: what auth.clients needs, and --check


ONE_CLIENT = "auth:\n  clients:\n    - {name: ci, san: 'DNS:ci.example'}\n"


@pytest.mark.parametrize(
    ("argv", "config", "message"),
    [
        ((), ONE_CLIENT, "{config}: auth.clients: client certificates need HTTPS served by aioserver itself"),
        (
            ("--ssl-certfile", "{cert}", "--ssl-keyfile", "{key}"),
            ONE_CLIENT,
            "{config}: auth.clients: needs ssl_ca_certs",
        ),
        (
            ("--ssl-certfile", "{cert}", "--ssl-keyfile", "{key}", "--ssl-ca-certs", "{ca}", "--ssl-cert-reqs", "none"),
            ONE_CLIENT,
            "command line: --ssl-cert-reqs: is none: auth.clients needs client certificates",
        ),
        (
            (
                "--ssl-certfile",
                "{cert}",
                "--ssl-keyfile",
                "{key}",
                "--ssl-ca-certs",
                "{ca}",
                "--trusted-proxies",
                "10.0.0.1",
            ),
            ONE_CLIENT,
            "{config}: auth.clients: client certificates cannot be used behind a TLS proxy",
        ),
        (
            ("--ssl-certfile", "{cert}", "--ssl-keyfile", "{key}", "--ssl-ca-certs", "{ca}", "--uds", "{tmp}/sock"),
            ONE_CLIENT,
            "{config}: auth.clients: client certificates cannot be used behind a TLS proxy",
        ),
        (
            ("--ssl-certfile", "{cert}", "--ssl-keyfile", "{key}", "--ssl-ca-certs", "{ca}"),
            "auth:\n  clients:\n    - {name: ci, subject: 'CN=ci;O=x'}\n",
            "{config}: auth.clients[0].subject: ';' must be escaped (\\;) in a value; expected an RFC 4514 name",
        ),
        (
            ("--ssl-certfile", "{cert}", "--ssl-keyfile", "{key}", "--ssl-ca-certs", "{ca}"),
            "auth:\n  clients: [{name: ci}]\n  oidc: {}\n",
            "{config}: auth.oidc: unknown key; known: tokens, clients, jwt",
        ),
    ],
    ids=["no-https", "no-ca", "reqs-none", "trusted-proxies", "uds", "bad-subject", "unknown-key"],
)
def test_config_errors(
    tmp_path: Path,
    pem_files: PemFiles,
    capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...],
    config: str,
    message: str,
) -> None:
    path = tmp_path / "config.yml"
    path.write_text(config)
    paths = {"cert": pem_files.cert, "key": pem_files.key, "ca": pem_files.ca, "tmp": tmp_path, "config": path}
    assert main(["--config", str(path), *(a.format(**paths) for a in argv), "--check"], env={}) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"aioserver: error: {message.format(**paths)}") and error.count("\n") == 1, error


def test_check_lists_the_clients(tmp_path: Path, pem_files: PemFiles, certs: Certs) -> None:
    config = tmp_path / "config.yml"
    config.write_text(CONFIG % certs.pinned_sha256)
    command = aioserver_command("--config", str(config), *tls_args(pem_files, certs.ca), "--check")
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "  tls = on, tokens = 0, clients = 5\n" in done.stdout
    assert (
        "  client ci: subject cn=CI, ou=ci, o=EXAMPLE; may call echo\n"
        "  client by-dns: san DNS:ci.example; may call everything\n"
        "  client ops: san email:ops@EXAMPLE.org; may call everything\n"
        f"  client pinned: sha256 {certs.pinned_sha256}; may call everything\n"
        "  client half: subject CN=stranger,OU=CI,O=Example; san DNS:elsewhere.example; may call everything\n"
    ) in done.stdout


def test_workers_started_after_a_reload_serve_its_entries(tmp_path: Path, pem_files: PemFiles, certs: Certs) -> None:
    """A worker that replaces one (it died, or was stuck) starts from the entries the last
    reload read, not from those the service started with: a revoked entry does not come back."""
    config = tmp_path / "config.yml"
    workflow = "workflow:\n  echo: {tasks: [echo]}\n"
    config.write_text(workflow + "auth:\n  clients:\n    - {name: ci, san: 'DNS:ci.example'}\n")
    with Server("--config", str(config), "--workers", "2", *tls_args(pem_files, certs.ca), listeners=2) as server:
        assert call(server.port, certs, certs.ci)[0] == 200
        config.write_text(workflow + "auth:\n  clients:\n    - {name: ops, san: 'email:ops@example.org'}\n")
        sighup(server, "reloaded auth.clients: 1 in force")
        for pid in re.findall(r"worker \d started, pid (\d+)", "".join(server.log)):
            os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while "".join(server.log).count("serving on") < 4:
            assert time.monotonic() < deadline, "".join(server.log)
            time.sleep(0.05)
        assert [call(server.port, certs, certs.ci)[0] for _ in range(4)] == [403] * 4
        assert call(server.port, certs, certs.ops)[0] == 200
