"""Shared fixtures: configs built from inline YAML and clients driving create_app."""

from __future__ import annotations

import asyncio
import hashlib
import locale
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization

from aioserver import create_app, load_config

TESTS = Path(__file__).parent
PYTHON = sys.executable

ClientFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def make_client(aiohttp_client) -> ClientFactory:  # type: ignore[no-untyped-def]
    """Start the whole service on a config given as inline YAML (and an environment)."""

    async def factory(yaml_text: str, env: dict[str, str] | None = None) -> TestClient:
        return await aiohttp_client(create_app(load_config(yaml_text, env=env)))

    return factory


# -- the real thing: ``python -m aioserver`` as a user starts it


class Server:
    """A running ``python -m aioserver``, its port read from its own log line."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        listeners: int = 1,
        pattern: str = r"serving on https?://127\.0\.0\.1:(\d+)",  # a group: the port, if any
    ) -> None:
        environment = {**os.environ, "PYTHONPATH": str(TESTS), **(env or {})}
        self.listeners = listeners
        self.pattern = pattern
        self.ports: list[int] = []
        self.process = subprocess.Popen(
            [PYTHON, "-m", "aioserver", "--port", "0", *args],
            env=environment,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self.port = self._wait_for_port()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self._drainer.is_alive():
            self._drainer.join()
        assert self.process.stderr is not None
        self.process.stderr.close()

    def _wait_for_port(self, timeout: float = 30) -> int:
        assert self.process.stderr is not None
        # A server that never says it serves is killed, so that the test fails instead of hanging.
        watchdog = threading.Timer(timeout, self.process.kill)
        watchdog.start()
        try:
            return self._read_ports()
        finally:
            watchdog.cancel()

    def _read_ports(self) -> int:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            found = re.search(self.pattern, line)
            if found:
                self.ports.append(int(found.group(1)) if found.groups() else 0)
            if len(self.ports) == self.listeners:
                self._drainer.start()
                return self.ports[0]
        self.__exit__()
        raise AssertionError("server exited or hung before serving:\n" + "".join(self.log))

    def _drain(self) -> None:
        assert self.process.stderr is not None
        self.log.extend(self.process.stderr)

    def post(self, body: bytes, token: str | None = None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/workflow", data=body, method="POST", headers=headers
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()


@pytest.fixture
def ascii_locale() -> Iterator[None]:
    """LC_CTYPE=C for the test: open() without an encoding then reads ASCII only.

    As a service started under a non-UTF-8 locale would; a file read as UTF-8 must not care.
    """
    previous = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        assert locale.getpreferredencoding(False) != "UTF-8"
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, previous)


async def exchange(port: int, data: bytes, wait: float = 5) -> bytes:
    """Send raw bytes to 127.0.0.1:port; return the server's first response (head and body), or all until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        async with asyncio.timeout(wait):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                None,
            )
            return head + (await reader.readexactly(length) if length is not None else await reader.read())
    except asyncio.IncompleteReadError as closed:
        return closed.partial
    finally:
        writer.close()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- TLS, for real: a CA of trustme's, certificates for this machine, files and contexts.

TOKEN = "test-token-d41d8cd98f00b204"
TOKEN_HASH = hashlib.sha256(TOKEN.encode()).hexdigest()
KEY_PASSWORD = "key-password-5f4dcc3b"


@dataclass(frozen=True)
class PemFiles:
    """Paths of the PEM files a server and its clients use."""

    ca: Path
    cert: Path
    key: Path
    encrypted_key: Path
    password_file: Path
    client: Path  # a client certificate and its key, for mTLS
    other_cert: Path  # a second server certificate and key (same names), for reloads
    other_key: Path


@pytest.fixture(scope="session")
def tls_certificate_authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_certificate(tls_certificate_authority: trustme.CA) -> trustme.LeafCert:
    return tls_certificate_authority.issue_cert("localhost", "127.0.0.1", "::1")


@pytest.fixture(scope="session")
def pem_files(
    tmp_path_factory: pytest.TempPathFactory, tls_certificate_authority: trustme.CA, tls_certificate: trustme.LeafCert
) -> PemFiles:
    folder = tmp_path_factory.mktemp("pem")
    files = PemFiles(
        *(
            folder / name
            for name in (
                "ca.pem",
                "cert.pem",
                "key.pem",
                "encrypted-key.pem",
                "password",
                "client.pem",
                "other-cert.pem",
                "other-key.pem",
            )
        )
    )
    tls_certificate_authority.cert_pem.write_to_path(files.ca)
    for blob in tls_certificate.cert_chain_pems:
        blob.write_to_path(files.cert, append=True)
    tls_certificate.private_key_pem.write_to_path(files.key)
    key = serialization.load_pem_private_key(tls_certificate.private_key_pem.bytes(), password=None)
    files.encrypted_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(KEY_PASSWORD.encode()),
        )
    )
    files.password_file.write_text(KEY_PASSWORD + "\n")
    tls_certificate_authority.issue_cert(common_name="alice").private_key_and_cert_chain_pem.write_to_path(files.client)
    other = tls_certificate_authority.issue_cert("localhost", "127.0.0.1", common_name="reloaded")
    other.cert_chain_pems[0].write_to_path(files.other_cert)
    other.private_key_pem.write_to_path(files.other_key)
    return files


@pytest.fixture(scope="session")
def client_ssl_ctx(tls_certificate_authority: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    tls_certificate_authority.configure_trust(context)
    return context
