"""The TLS context: Mozilla intermediate, key passwords, mTLS, errors, reload; HTTPS for real."""

from __future__ import annotations

import asyncio
import http.client
import os
import shutil
import socket
import ssl
import subprocess
import threading
import warnings
from pathlib import Path
from unittest import mock

import aiohttp
import pytest
import trustme
from aiohttp.test_utils import TestServer, make_mocked_request
from cryptography.hazmat.primitives import serialization

from aioserver import create_app, load_config, tls
from aioserver.errors import ConfigError
from aioserver.server import renew_session_keys
from aioserver.tls import Password, ReloadableContext, TLSError, TLSFiles, client_subject, create_ssl_context

from conftest import KEY_PASSWORD, TOKEN, TOKEN_HASH, PemFiles, Server

MOZILLA_INTERMEDIATE_TLS12 = {
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256",
    "DHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-CHACHA20-POLY1305",
}


async def https_client(aiohttp_client, app, context: ssl.SSLContext):  # type: ignore[no-untyped-def]
    """A test client of ``app`` served over real TLS with ``context``."""
    server = TestServer(app)
    await server.start_server(ssl=context)
    return await aiohttp_client(server)


CONFIG = "workflow:\n  echo: {tasks: [echo]}\nextensions: [sample_plugins.add_whoami]\n"


def test_context_follows_mozilla_intermediate(pem_files: PemFiles) -> None:
    context = create_ssl_context(TLSFiles(str(pem_files.cert), str(pem_files.key)))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.maximum_version == ssl.TLSVersion.MAXIMUM_SUPPORTED
    assert context.options & ssl.OP_NO_COMPRESSION and context.options & ssl.OP_NO_RENEGOTIATION
    assert context.verify_mode == ssl.CERT_NONE
    assert context.keylog_filename is None
    ciphers = context.get_ciphers()
    tls12 = {c["name"] for c in ciphers if c["protocol"] == "TLSv1.2"}
    assert tls12 and tls12 <= MOZILLA_INTERMEDIATE_TLS12
    assert {c["name"] for c in ciphers if c["protocol"] == "TLSv1.3"} >= {"TLS_AES_128_GCM_SHA256"}


def test_context_keeps_the_safe_defaults(pem_files: PemFiles) -> None:
    """Our options add to CPython's (no SSLv3, TLS 1.3 middlebox compatibility, ...), never replace them."""
    defaults = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).options
    context = create_ssl_context(TLSFiles(str(pem_files.cert), str(pem_files.key)))
    assert context.options & defaults == defaults
    assert context.options & ssl.OP_NO_SSLv3 and context.options & ssl.OP_ENABLE_MIDDLEBOX_COMPAT


@pytest.mark.parametrize("channel", ["password file", "environment", "config file", "credentials"])
def test_encrypted_key(pem_files: PemFiles, tmp_path: Path, channel: str) -> None:
    cli = {"ssl_certfile": str(pem_files.cert), "ssl_keyfile": str(pem_files.encrypted_key)}
    env: dict[str, str] = {}
    text = "{}"
    if channel == "password file":
        cli["ssl_keyfile_password_file"] = str(pem_files.password_file)
    elif channel == "environment":
        env["SSL_KEYFILE_PASSWORD"] = KEY_PASSWORD
    elif channel == "config file":
        text = f"server:\n  ssl:\n    keyfile_password_file: {pem_files.password_file}\n"
    else:  # systemd's LoadCredential=tls.key, password from the environment
        del cli["ssl_keyfile"]
        shutil.copy(pem_files.encrypted_key, tmp_path / "tls.key")
        env = {"CREDENTIALS_DIRECTORY": str(tmp_path), "SSL_KEYFILE_PASSWORD": KEY_PASSWORD}
    config = load_config(text, cli=cli, env=env)
    assert config.tls is not None
    assert KEY_PASSWORD not in repr(config) and KEY_PASSWORD not in repr(config.tls.files)


def _errors(pem: PemFiles, tmp: Path) -> list[tuple[dict[str, str], dict[str, str], str, str]]:
    """(command line, environment, the option at fault, the whole problem) of each bad TLS setting."""
    empty = tmp / "empty.pem"
    empty.write_text("")
    not_utf8 = tmp / "not-utf8"
    not_utf8.write_bytes(b"\xff\xfe\n")
    cert, key = str(pem.cert), str(pem.key)
    encrypted = "the private key is encrypted: give its password (ssl_keyfile_password_file or SSL_KEYFILE_PASSWORD)"
    no_file = "No such file or directory"
    return [
        (
            {"ssl_certfile": str(tmp / "missing.pem"), "ssl_keyfile": key},
            {},
            "--ssl-certfile",
            f"cannot read {tmp / 'missing.pem'}: {no_file}",
        ),
        ({"ssl_certfile": str(empty), "ssl_keyfile": key}, {}, "--ssl-certfile", f"{empty} holds no PEM certificate"),
        (
            {"ssl_certfile": cert, "ssl_keyfile": str(tmp / "nokey.pem")},
            {},
            "--ssl-keyfile",
            f"cannot read {tmp / 'nokey.pem'}: {no_file}",
        ),
        (
            {"ssl_certfile": cert, "ssl_keyfile": str(pem.other_key)},
            {},
            "--ssl-keyfile",
            "the private key does not match the certificate",
        ),
        ({"ssl_certfile": cert, "ssl_keyfile": str(pem.encrypted_key)}, {}, "--ssl-keyfile", encrypted),
        (
            {"ssl_certfile": cert, "ssl_keyfile": str(pem.encrypted_key)},
            {"SSL_KEYFILE_PASSWORD": "wrong-password-xyz"},
            "--ssl-keyfile",
            "cannot decrypt the private key: wrong password",
        ),
        (
            {"ssl_certfile": cert, "ssl_keyfile": key, "ssl_keyfile_password_file": str(tmp / "nopw")},
            {},
            "--ssl-keyfile-password-file",
            f"cannot read {tmp / 'nopw'}: {no_file}",
        ),
        (
            {"ssl_certfile": cert, "ssl_keyfile": key, "ssl_keyfile_password_file": str(not_utf8)},
            {},
            "--ssl-keyfile-password-file",
            f"cannot read {not_utf8}: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte",
        ),
        (
            {"ssl_certfile": cert, "ssl_keyfile": key, "ssl_ca_certs": str(tmp / "noca.pem")},
            {},
            "--ssl-ca-certs",
            f"cannot read {tmp / 'noca.pem'}: {no_file}",
        ),
        (
            {"ssl_certfile": cert, "ssl_keyfile": key, "ssl_ca_certs": str(empty)},
            {},
            "--ssl-ca-certs",
            f"{empty} holds no CA certificate: NO_CERTIFICATE_OR_CRL_FOUND",
        ),
        (
            {"ssl_certfile": cert, "ssl_keyfile": key, "ssl_ca_certs": key},
            {},
            "--ssl-ca-certs",
            f"{key} holds no CA certificate: NO_CERTIFICATE_OR_CRL_FOUND",
        ),
        (  # a server certificate, no CA's: nothing to verify clients against
            {"ssl_certfile": cert, "ssl_keyfile": key, "ssl_ca_certs": cert},
            {},
            "--ssl-ca-certs",
            f"{cert} holds no CA certificate",
        ),
        (
            {"ssl_certfile": cert, "ssl_keyfile": key, "ssl_cert_reqs": "required"},
            {},
            "--ssl-cert-reqs",
            "'required' needs ssl_ca_certs to verify client certificates against",
        ),
        ({"ssl_keyfile": key}, {}, "--ssl-keyfile", "needs ssl_certfile: it only applies to HTTPS"),
        ({"redirect_http": "8080"}, {}, "--redirect-http", "needs ssl_certfile: it only applies to HTTPS"),
    ]


ERROR_CASES = 15


@pytest.mark.parametrize("case", range(ERROR_CASES))
def test_tls_configuration_errors(pem_files: PemFiles, tmp_path: Path, case: int) -> None:
    cases = _errors(pem_files, tmp_path)
    assert len(cases) == ERROR_CASES
    cli, env, key, problem = cases[case]
    with pytest.raises(ConfigError) as error:
        load_config("{}", cli=cli, env=env)
    assert (error.value.source, error.value.key, error.value.problem) == ("command line", key, problem)
    assert "wrong-password-xyz" not in str(error.value) and KEY_PASSWORD not in str(error.value)


def _encrypted(key_pem: bytes, password: str) -> bytes:
    key = serialization.load_pem_private_key(key_pem, password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password.encode()),
    )


@pytest.mark.parametrize(
    ("content", "option", "problem"),
    [  # a certificate file holding the key too (no ssl_keyfile): the certificate's option is at fault
        ("other key", "ssl_certfile", "the private key does not match the certificate"),
        ("encrypted key", "ssl_certfile", "the private key is encrypted: give its password"),
        ("no key", "ssl_certfile", "cannot load the private key: [SSL] PEM lib"),
    ],
)
def test_errors_of_a_certificate_file_holding_its_key(
    tls_certificate: trustme.LeafCert, tmp_path: Path, content: str, option: str, problem: str
) -> None:
    key = {
        "other key": trustme.CA().issue_cert("localhost").private_key_pem.bytes(),
        "encrypted key": _encrypted(tls_certificate.private_key_pem.bytes(), KEY_PASSWORD),
        "no key": b"",
    }[content]
    path = tmp_path / "cert-and-key.pem"
    path.write_bytes(tls_certificate.cert_chain_pems[0].bytes() + key)
    with pytest.raises(TLSError) as error:
        create_ssl_context(TLSFiles(str(path)))
    assert error.value.option == option and str(error.value).startswith(problem)


def test_a_key_file_without_a_key(pem_files: PemFiles) -> None:
    with pytest.raises(TLSError) as error:
        create_ssl_context(TLSFiles(str(pem_files.cert), str(pem_files.cert)))
    assert error.value.option == "ssl_keyfile"
    assert str(error.value).startswith("cannot load the private key: [SSL] PEM lib")  # OpenSSL says no more


@pytest.mark.parametrize(
    ("password", "line_end"),
    [
        ("clé secrète\t ", "\n"),  # spaces at its end are the password's
        ("clé secrète X", "\r\n"),  # a file written on Windows
    ],
)
def test_password_file_is_read_as_written(
    tls_certificate: trustme.LeafCert, tmp_path: Path, ascii_locale: None, password: str, line_end: str
) -> None:
    key, password_file = tmp_path / "key.pem", tmp_path / "password"
    key.write_bytes(_encrypted(tls_certificate.private_key_pem.bytes(), password))
    password_file.write_bytes((password + line_end).encode())
    cert = tmp_path / "cert.pem"
    tls_certificate.cert_chain_pems[0].write_to_path(cert)
    create_ssl_context(TLSFiles(str(cert), str(key), password_file=str(password_file)))  # decrypted: no TLSError


def test_a_password_never_shows_itself() -> None:
    password = Password(KEY_PASSWORD)
    assert repr(password) == "'***'" and KEY_PASSWORD not in repr({"password": password})
    assert password == KEY_PASSWORD  # and is the password all the same


def test_tls_error_names_the_config_file_key(pem_files: PemFiles, tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_text(f"server:\n  ssl:\n    certfile: {pem_files.cert}\n    keyfile: {pem_files.other_key}\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert str(error.value) == f"{path}: server.ssl.keyfile: the private key does not match the certificate"


@pytest.mark.parametrize(
    ("host", "extra", "allowed"),
    [
        ("0.0.0.0", {}, False),
        ("192.0.2.1", {}, False),
        ("0.0.0.0", {"allow_insecure_http": True}, True),
        ("127.0.0.1", {}, True),
        ("localhost", {}, True),
        ("::1", {}, True),
    ],
)
def test_tokens_refused_over_clear_text(host: str, extra: dict[str, object], allowed: bool) -> None:
    cli = {"host": host, **extra}
    if allowed:
        assert load_config("{}", cli=cli, env={"TOKEN": TOKEN_HASH}).tokens
    else:
        with pytest.raises(ConfigError, match="tokens would travel in clear text") as error:
            load_config("{}", cli=cli, env={"TOKEN": TOKEN_HASH})
        assert error.value.key == "--host"
    assert load_config("{}", cli=cli).tokens == ()  # no token, nothing to protect


def test_https_with_tokens_on_any_address(pem_files: PemFiles) -> None:
    cli = {"host": "0.0.0.0", "ssl_certfile": str(pem_files.cert), "ssl_keyfile": str(pem_files.key)}
    assert load_config("{}", cli=cli, env={"TOKEN": TOKEN_HASH}).tls is not None


async def test_https_end_to_end_with_hsts(
    aiohttp_client,
    pem_files: PemFiles,
    client_ssl_ctx: ssl.SSLContext,  # type: ignore[no-untyped-def]
) -> None:
    config = load_config(
        CONFIG, cli={"ssl_certfile": str(pem_files.cert), "ssl_keyfile": str(pem_files.key)}, env={"TOKEN": TOKEN_HASH}
    )
    assert config.tls is not None
    client = await https_client(aiohttp_client, create_app(config), config.tls.current)
    assert client.make_url("/").scheme == "https"
    response = await client.post(
        "/workflow",
        json={"name": "echo", "elements": ["over TLS"]},
        headers={"Authorization": f"Bearer {TOKEN}"},
        ssl=client_ssl_ctx,
    )
    assert (response.status, await response.json()) == (200, ["over TLS"])
    assert response.headers["Strict-Transport-Security"] == "max-age=63072000"
    assert response.headers["Server"] == "aioserver"
    refused = await client.post("/workflow", json={}, ssl=client_ssl_ctx)
    assert refused.status == 401 and "Strict-Transport-Security" in refused.headers


async def test_plain_http_has_no_hsts(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    client = await aiohttp_client(create_app(load_config(CONFIG)))
    response = await client.get("/health")
    assert "Strict-Transport-Security" not in response.headers
    assert response.headers["Server"] == "aioserver"


@pytest.mark.parametrize("reqs", ["required", "optional"])
async def test_mutual_tls(
    aiohttp_client,
    pem_files: PemFiles,
    client_ssl_ctx: ssl.SSLContext,
    reqs: str,  # type: ignore[no-untyped-def]
) -> None:
    cli = {
        "ssl_certfile": str(pem_files.cert),
        "ssl_keyfile": str(pem_files.key),
        "ssl_ca_certs": str(pem_files.ca),
    }
    if reqs == "optional":
        cli["ssl_cert_reqs"] = "optional"
    config = load_config(CONFIG, cli=cli)
    assert config.tls is not None
    client = await https_client(aiohttp_client, create_app(config), config.tls.current)

    with_cert = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pem_files.ca))
    with_cert.load_cert_chain(str(pem_files.client))
    response = await client.get("/whoami", ssl=with_cert)
    assert (await response.json())["client_subject"]["commonName"] == "alice"

    if reqs == "required":
        # Refused in the handshake (TLS 1.2) or right after it (TLS 1.3): never an answer.
        with pytest.raises(aiohttp.ClientError):
            await client.get("/whoami", ssl=client_ssl_ctx)
    else:
        response = await client.get("/whoami", ssl=client_ssl_ctx)
        assert (await response.json())["client_subject"] is None


def _handshake(context: ssl.SSLContext, client: ssl.SSLContext) -> dict[str, str]:
    """The subject of the certificate a server with ``context`` presents, over a real socket pair."""
    server_sock, client_sock = socket.socketpair()
    with server_sock, client_sock:
        client_sock.settimeout(5)
        server_sock.settimeout(5)
        server = context.wrap_socket(server_sock, server_side=True, do_handshake_on_connect=False)
        tls_client = client.wrap_socket(client_sock, server_hostname="localhost", do_handshake_on_connect=False)
        with server, tls_client:
            worker = threading.Thread(target=server.do_handshake)
            worker.start()
            tls_client.do_handshake()
            worker.join()
            certificate = tls_client.getpeercert()
            return {name: value for rdn in certificate["subject"] for name, value in rdn}


def session_handshake(
    context: ssl.SSLContext, client: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[ssl.SSLSession, bool]:
    """A TLS connection to a server with ``context`` offering ``session``: its session and whether it resumed.

    A byte goes from server to client, so that the client reads TLS 1.3's tickets.
    """
    server_sock, client_sock = socket.socketpair()
    with server_sock, client_sock:
        client_sock.settimeout(5)
        server_sock.settimeout(5)
        server = context.wrap_socket(server_sock, server_side=True, do_handshake_on_connect=False)
        tls_client = client.wrap_socket(
            client_sock, server_hostname="localhost", do_handshake_on_connect=False, session=session
        )
        with server, tls_client:
            worker = threading.Thread(target=lambda: (server.do_handshake(), server.sendall(b"x")))
            worker.start()
            tls_client.do_handshake()
            assert tls_client.recv(1) == b"x"
            worker.join()
            assert tls_client.session is not None
            return tls_client.session, tls_client.session_reused


def _negotiates(context: ssl.SSLContext, client: ssl.SSLContext) -> bool:
    """Whether a client with ``client`` completes a handshake with a server with ``context``."""
    server_sock, client_sock = socket.socketpair()
    with server_sock, client_sock:
        client_sock.settimeout(5)
        server_sock.settimeout(5)
        server = context.wrap_socket(server_sock, server_side=True, do_handshake_on_connect=False)
        tls_client = client.wrap_socket(client_sock, server_hostname="localhost", do_handshake_on_connect=False)
        with server, tls_client:
            failed: list[BaseException] = []

            def handshake() -> None:
                try:
                    server.do_handshake()
                    server.sendall(b"x")
                except (ssl.SSLError, OSError) as exc:
                    failed.append(exc)

            worker = threading.Thread(target=handshake)
            worker.start()
            try:
                tls_client.do_handshake()
                received = tls_client.recv(1) == b"x"  # TLS 1.3: the server's verdict comes after
            except (ssl.SSLError, OSError):
                received = False
            worker.join()
            return received and not failed


@pytest.fixture(scope="module")
def rsa_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """CA, certificate and key, RSA: under TLS 1.2 the groups a client offers must also hold the
    curve of an ECDSA certificate, so with one only the key exchange is put to the test."""
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    leaf = ca.issue_cert("localhost", key_type=trustme.KeyType.RSA)
    folder = tmp_path_factory.mktemp("rsa")
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    ca.cert_pem.write_to_path(paths[0])
    leaf.cert_chain_pems[0].write_to_path(paths[1])
    leaf.private_key_pem.write_to_path(paths[2])
    return paths


def _client_offering(group: str, version: ssl.TLSVersion, ca: Path) -> ssl.SSLContext:
    client = ssl.create_default_context(cafile=str(ca))
    client.minimum_version = client.maximum_version = version
    client.set_ecdh_curve(group)  # OpenSSL 3: the only group the client offers
    return client


KEY_EXCHANGE = [("X25519", True), ("prime256v1", True), ("secp384r1", True), ("secp521r1", False), ("X448", False)]
VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]


@pytest.mark.parametrize("version", VERSIONS, ids=["TLSv1.2", "TLSv1.3"])
@pytest.mark.parametrize(("group", "accepted"), KEY_EXCHANGE)
def test_key_exchange_groups(
    rsa_files: tuple[Path, Path, Path], group: str, accepted: bool, version: ssl.TLSVersion
) -> None:
    ca, cert, key = rsa_files
    context = create_ssl_context(TLSFiles(str(cert), str(key)))
    assert _negotiates(context, _client_offering(group, version, ca)) is accepted


@pytest.mark.parametrize(("group", "accepted"), [("prime256v1", True), ("X25519", False), ("secp384r1", False)])
def test_key_exchange_falls_back_to_p256_only(
    rsa_files: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch, group: str, accepted: bool
) -> None:
    """Where OpenSSL's group list cannot be reached, P-256 only: never OpenSSL's longer default list."""

    def no_library(name: str) -> None:
        raise OSError(f"cannot load {name}")

    monkeypatch.setattr(tls.ctypes, "CDLL", no_library)
    ca, cert, key = rsa_files
    context = create_ssl_context(TLSFiles(str(cert), str(key)))
    assert _negotiates(context, _client_offering(group, ssl.TLSVersion.TLSv1_3, ca)) is accepted


class _GroupsSSL:
    """The ssl module of Python 3.15+, whose contexts have set_groups (recorded here)."""

    groups: list[str] = []

    def __getattr__(self, name: str) -> object:
        return getattr(ssl, name)

    class SSLContext(ssl.SSLContext):
        def set_groups(self, groups: str) -> None:
            _GroupsSSL.groups.append(groups)


def test_groups_set_through_set_groups_where_python_has_it(
    pem_files: PemFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tls, "ssl", _GroupsSSL())
    monkeypatch.setattr(_GroupsSSL, "groups", [])
    monkeypatch.setattr(tls.ctypes, "CDLL", None)  # not reached
    create_ssl_context(TLSFiles(str(pem_files.cert), str(pem_files.key)))
    assert _GroupsSSL.groups == ["X25519:prime256v1:secp384r1"]


def test_no_client_subject_once_the_connection_is_gone() -> None:
    request = make_mocked_request("GET", "/whoami", protocol=mock.Mock(), transport=None)
    assert request.transport is None
    assert client_subject(request) is None


def test_reload_starts_new_sessions(pem_files: PemFiles, client_ssl_ctx: ssl.SSLContext) -> None:
    tls = ReloadableContext(TLSFiles(str(pem_files.cert), str(pem_files.key)))
    session, reused = session_handshake(tls.current, client_ssl_ctx)
    assert not reused and session_handshake(tls.current, client_ssl_ctx, session)[1]
    tls.reload()
    assert not session_handshake(tls.current, client_ssl_ctx, session)[1]


async def test_session_keys_are_renewed_without_a_reload(pem_files: PemFiles, client_ssl_ctx: ssl.SSLContext) -> None:
    tls = ReloadableContext(TLSFiles(str(pem_files.cert), str(pem_files.key)))
    session, _ = session_handshake(tls.current, client_ssl_ctx)
    before = tls.current
    renewing = asyncio.create_task(renew_session_keys(tls, 0.2))  # SESSION_KEYS_LIFETIME, shortened
    try:
        async with asyncio.timeout(10):
            while tls.current is before:
                await asyncio.sleep(0.05)
    finally:
        renewing.cancel()
    assert not session_handshake(tls.current, client_ssl_ctx, session)[1]


def test_reload_swaps_the_certificate_for_new_handshakes(
    pem_files: PemFiles, tmp_path: Path, client_ssl_ctx: ssl.SSLContext
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(pem_files.cert, cert)
    shutil.copy(pem_files.key, key)
    context = ReloadableContext(TLSFiles(str(cert), str(key)))
    assert "commonName" not in _handshake(context.current, client_ssl_ctx)

    shutil.copy(pem_files.other_cert, cert)
    shutil.copy(pem_files.other_key, key)
    context.reload()
    assert _handshake(context.current, client_ssl_ctx)["commonName"] == "reloaded"

    cert.write_text("not a certificate")  # a broken reload keeps the current context
    with pytest.raises(TLSError):
        context.reload()
    assert _handshake(context.current, client_ssl_ctx)["commonName"] == "reloaded"


def test_a_context_not_loaded_yet_has_everything_to_load(pem_files: PemFiles, tmp_path: Path) -> None:
    """ACME's: made before its files exist, it serves nothing, and any file there is news."""
    cert, key = tmp_path / "fullchain.pem", tmp_path / "key.pem"
    context = ReloadableContext(TLSFiles(str(cert), str(key)), load=False)
    assert context.current is None and context.fingerprint == ()
    assert context.changed_on_disk()
    shutil.copy(pem_files.cert, cert)
    shutil.copy(pem_files.key, key)
    assert context.changed_on_disk()
    context.reload()
    assert context.current is not None and not context.changed_on_disk()


def test_the_fingerprint_covers_every_file_given(pem_files: PemFiles, tmp_path: Path) -> None:
    """The key in the certificate's file (no ssl_keyfile): the CA and password files still count."""
    combined, ca, password = tmp_path / "combined.pem", tmp_path / "ca.pem", tmp_path / "password"
    shutil.copy(pem_files.client, combined)  # a certificate and its key, in one file
    shutil.copy(pem_files.ca, ca)
    password.write_text("unused\n")
    files = TLSFiles(str(combined), ca_certs=str(ca), password_file=str(password))
    assert [(option, path) for option, path, _ in tls.fingerprint(files)] == [
        ("ssl_certfile", str(combined)),
        ("ssl_ca_certs", str(ca)),
        ("ssl_keyfile_password_file", str(password)),
    ]
    context = ReloadableContext(files)
    for path in (ca, password):
        before = path.read_bytes()
        path.write_bytes(before + b"\n")
        assert context.changed_on_disk(), path
        path.write_bytes(before)
        assert not context.changed_on_disk(), path


def test_files_that_cannot_be_read_differ_by_why(tmp_path: Path) -> None:
    path = tmp_path / "cert.pem"
    files = TLSFiles(str(path))
    gone = tls.fingerprint(files)
    path.mkdir()  # a directory where the file should be
    a_directory = tls.fingerprint(files)
    path.rmdir()
    path.write_bytes(b"")
    empty = tls.fingerprint(files)
    assert len({gone, a_directory, empty}) == 3


def test_sslkeylogfile_is_ignored(
    pem_files: PemFiles, tmp_path: Path, client_ssl_ctx: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    keylog = tmp_path / "keys.log"
    monkeypatch.setenv("SSLKEYLOGFILE", str(keylog))
    context = create_ssl_context(TLSFiles(str(pem_files.cert), str(pem_files.key)))
    _handshake(context, client_ssl_ctx)
    assert not keylog.exists()


# -- what the context must hold whatever the interpreter's and OpenSSL's defaults

PERMISSIVE_OPENSSL_CONF = """\
openssl_conf = default_conf
[default_conf]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
MinProtocol = TLSv1
CipherString = DEFAULT@SECLEVEL=0
"""


def test_tls11_refused_under_a_permissive_openssl_policy(pem_files: PemFiles, tmp_path: Path) -> None:
    """Debian's openssl.cnf forbids TLS 1.1 already: a system policy that allows it changes nothing."""
    conf = tmp_path / "openssl.cnf"
    conf.write_text(PERMISSIVE_OPENSSL_CONF)
    env = {"OPENSSL_CONF": str(conf)}
    args = ("--ssl-certfile", str(pem_files.cert), "--ssl-keyfile", str(pem_files.key))
    with Server(*args, env=env) as server:
        ca = str(pem_files.ca)
        command = ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", "-brief", "-CAfile", ca]
        run = {"input": "", "capture_output": True, "text": True, "timeout": 20, "env": {**os.environ, **env}}
        old = subprocess.run([*command, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"], **run)  # type: ignore[call-overload]
        assert old.returncode != 0 and "CONNECTION ESTABLISHED" not in old.stderr
        assert "Protocol version: TLSv1.2" in subprocess.run([*command, "-tls1_2"], **run).stderr  # type: ignore[call-overload]


class _LaxSSL:
    """The ssl module as tls.py sees it, but making contexts as some interpreters and systems do.

    CPython 3.10+ starts every context at TLS 1.2 (overriding OPENSSL_CONF) and only
    ``create_default_context`` reads SSLKEYLOGFILE, so here neither line of create_ssl_context
    shows. Elsewhere they do: CPython built with --with-ssl-default-suites=openssl follows the
    system's policy, which may allow TLS 1.0; a context made by create_default_context (or by an
    OpenSSL 3.5 built with keylog support) writes secrets to the SSLKEYLOGFILE.
    """

    def __getattr__(self, name: str) -> object:
        return getattr(ssl, name)

    @staticmethod
    def SSLContext(protocol: int) -> ssl.SSLContext:  # noqa: N802 (the name it stands in for)
        context = ssl.SSLContext(protocol)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        if os.environ.get("SSLKEYLOGFILE"):
            context.keylog_filename = os.environ["SSLKEYLOGFILE"]
        return context


def test_context_sets_its_floor_and_no_key_log_whatever_the_defaults(
    pem_files: PemFiles, tmp_path: Path, client_ssl_ctx: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    keylog = tmp_path / "keys.log"
    monkeypatch.setenv("SSLKEYLOGFILE", str(keylog))
    monkeypatch.setattr(tls, "ssl", _LaxSSL())
    assert _LaxSSL.SSLContext(ssl.PROTOCOL_TLS_SERVER).minimum_version != ssl.TLSVersion.TLSv1_2  # lax indeed
    context = create_ssl_context(TLSFiles(str(pem_files.cert), str(pem_files.key)))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.keylog_filename is None
    keylog.unlink()  # made by the lax context above
    _handshake(context, client_ssl_ctx)
    assert not keylog.exists()


def test_server_handshakes_never_reach_sslkeylogfile(
    pem_files: PemFiles, tmp_path: Path, client_ssl_ctx: ssl.SSLContext
) -> None:
    # aiohttp's own client contexts, made when it is imported, open the file (empty); the
    # server's handshakes must add nothing to it.
    keylog = tmp_path / "keys.log"
    args = ("--ssl-certfile", str(pem_files.cert), "--ssl-keyfile", str(pem_files.key))
    with Server(*args, env={"SSLKEYLOGFILE": str(keylog)}) as server:
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            client = ssl.create_default_context(cafile=str(pem_files.ca))
            client.maximum_version = version
            connection = http.client.HTTPSConnection("localhost", server.port, context=client, timeout=10)
            connection.request("GET", "/health")
            assert connection.getresponse().status == 200
            connection.close()
    secrets = [line for line in keylog.read_text().splitlines() if not line.startswith("#")] if keylog.exists() else []
    assert secrets == []
