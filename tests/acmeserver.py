"""A real ACME server for the tests: Debian's ``pebble``, with ``pebble-challtestsrv`` as its DNS.

:class:`Pebble` runs both on 127.0.0.1, on free ports, in a folder of its own:

- ``pebble-challtestsrv`` with only its DNS server on, answering 127.0.0.1 for every name (and
  nothing for AAAA), so that pebble validates http-01 challenges of any test domain against
  ``http://<domain>:<http_port>/``: the port the test gives aioserver's ``--redirect-http``;
- ``pebble`` itself, its ACME and management endpoints served over HTTPS with a trustme
  certificate for 127.0.0.1 and localhost (``ca_file`` verifies it: aioserver's
  ``--acme-ca-certs``), without its random validation sleeps and nonce rejections, and with the
  certificates it issues valid for ``validity`` seconds when given (pebble's
  ``certificateValidityPeriod``; its default is five years).

Pebble keeps nothing between runs: a :meth:`Pebble.start` after :meth:`Pebble.stop` serves the
same ports with a new root (fetch it again, :meth:`Pebble.root_pem`), and knows no account.
:meth:`Pebble.served_certificate` does what a browser does: a TLS handshake with SNI, the
chain the server sends verified against pebble's root, the name checked.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import random
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

PEBBLE = "/usr/bin/pebble"  # Debian's package (.ci/run installs it)
CHALLTESTSRV = "/usr/bin/pebble-challtestsrv"
START_TIMEOUT = 30.0  # seconds for a program to answer, on a loaded two-core machine


@dataclass(frozen=True)
class Leaf:
    """What a certificate says about itself, as the tests compare it."""

    serial: int
    names: tuple[str, ...]  # its DNS subject alternative names
    not_before: datetime.datetime
    not_after: datetime.datetime
    der: bytes

    @classmethod
    def from_der(cls, der: bytes) -> Leaf:
        certificate = x509.load_der_x509_certificate(der)
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return cls(
            serial=certificate.serial_number,
            names=tuple(names.get_values_for_type(x509.DNSName)),
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            der=der,
        )

    @classmethod
    def from_pem(cls, pem: str | bytes) -> Leaf:
        """The first certificate of a PEM chain (a fullchain.pem's leaf)."""
        text = pem.decode() if isinstance(pem, bytes) else pem
        return cls.from_der(x509.load_pem_x509_certificate(text.encode()).public_bytes(serialization.Encoding.DER))

    @property
    def lifetime(self) -> datetime.timedelta:
        return self.not_after - self.not_before


def new_key_pem() -> bytes:
    """A new ECDSA P-256 private key, PKCS#8 PEM, unencrypted (as ACME clients make them)."""
    key = ec.generate_private_key(ec.SECP256R1())
    encoding, private = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(encoding, private, serialization.NoEncryption())


# Below Linux's ephemeral range (32768-60999): a port pebble lets go of while it restarts is
# not handed to another process binding port 0 (a server of another test, under xdist).
PORTS = range(20000, 32768)


def free_ports(count: int) -> list[int]:
    """``count`` different ports free on 127.0.0.1 just now, for TCP and UDP (a DNS server takes both)."""
    held: list[socket.socket] = []
    try:
        while len(held) < 2 * count:
            tcp = socket.socket()
            try:
                tcp.bind(("127.0.0.1", random.choice(PORTS)))
            except OSError:  # taken
                tcp.close()
                continue
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                udp.bind(tcp.getsockname())
            except OSError:
                tcp.close()
                udp.close()
                continue
            held += (tcp, udp)
        return [sock.getsockname()[1] for sock in held[::2]]
    finally:
        for sock in held:
            sock.close()


class Pebble:
    """pebble and its DNS server, running until :meth:`close` (or the ``with`` block's end)."""

    def __init__(self, folder: Path, http_port: int | None = None, validity: int | None = None) -> None:
        for program in (PEBBLE, CHALLTESTSRV):
            if not os.access(program, os.X_OK):
                raise AssertionError(f"{program} is missing: apt-get install pebble (as .ci/run does)")
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        ports = free_ports(6)
        self.http_port = http_port or ports[0]  # where pebble validates http-01 challenges
        self.validity = validity
        self.dns_port, self.dns_management_port, self.port, self.management_port, self._tls_port = ports[1:]
        self.directory = f"https://127.0.0.1:{self.port}/dir"

        authority = trustme.CA()
        self.ca_file = folder / "pebble-ca.pem"  # verifies pebble's own HTTPS endpoints
        authority.cert_pem.write_to_path(self.ca_file)
        endpoint = authority.issue_cert("127.0.0.1", "localhost")
        self._cert, self._key = folder / "pebble-cert.pem", folder / "pebble-key.pem"
        endpoint.private_key_pem.write_to_path(self._key)
        for blob in endpoint.cert_chain_pems:
            blob.write_to_path(self._cert, append=True)
        self._context = ssl.create_default_context(cafile=str(self.ca_file))
        self.config = folder / "pebble-config.json"
        self.config.write_text(json.dumps({"pebble": self._settings()}, indent=2))

        self.log = folder / "pebble.log"
        self._log: IO[bytes] | None = None
        self._dns: subprocess.Popen[bytes] | None = None
        self._pebble: subprocess.Popen[bytes] | None = None

    def _settings(self) -> dict[str, object]:
        settings: dict[str, object] = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(self._cert),
            "privateKey": str(self._key),
            "httpPort": self.http_port,
            "tlsPort": self._tls_port,  # tls-alpn-01: no one answers there, so it never validates
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if self.validity is not None:
            settings["certificateValidityPeriod"] = self.validity
        return settings

    # -- running

    def __enter__(self) -> Pebble:
        try:
            self._start_dns()
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _start_dns(self) -> None:
        self._log = open(self.log, "ab")  # both programs, each run of pebble after the other
        command = [
            CHALLTESTSRV,
            "-dns01", f"127.0.0.1:{self.dns_port}",
            "-http01", "", "-https01", "", "-tlsalpn01", "",
            "-management", f"127.0.0.1:{self.dns_management_port}",
            "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
        ]  # fmt: skip
        self._dns = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait(self._dns, "pebble-challtestsrv", lambda: _accepts(self.dns_management_port))

    def start(self) -> None:
        """Start pebble (again, after :meth:`stop`: same ports, new root, no accounts); wait for its directory."""
        assert self._pebble is None, "pebble is running already"
        assert self._log is not None, "start() after stop(), inside the with block"
        self._pebble = subprocess.Popen(
            [PEBBLE, "-config", str(self.config), "-dnsserver", f"127.0.0.1:{self.dns_port}"],
            env={**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait(self._pebble, "pebble", lambda: self._answers(self.directory))

    def stop(self) -> None:
        """Stop pebble (its DNS server keeps running): its ports refuse connections until :meth:`start`."""
        if self._pebble is not None:
            _end(self._pebble)
            self._pebble = None

    def close(self) -> None:
        self.stop()
        if self._dns is not None:
            _end(self._dns)
            self._dns = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def _wait(self, process: subprocess.Popen[bytes], name: str, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name} did not start (exit status {process.poll()}):\n{self.log_text()}")
            time.sleep(0.05)

    def _answers(self, url: str) -> bool:
        try:
            self._get(url)
        except (OSError, urllib.error.URLError):
            return False
        return True

    def _get(self, url: str) -> bytes:
        with urllib.request.urlopen(url, context=self._context, timeout=10) as response:
            body: bytes = response.read()
            return body

    def unresolvable(self, host: str) -> None:
        """Have the DNS server fail every query for ``host`` (SERVFAIL): pebble cannot validate it,
        as a name whose DNS does not point at the server yet."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.dns_management_port}/set-servfail",
            data=json.dumps({"host": host}).encode(),
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200, response.status

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    # -- what it issued

    def root_pem(self) -> str:
        """The root this run of pebble issues under (every start makes a new one)."""
        return self._get(f"https://127.0.0.1:{self.management_port}/roots/0").decode()

    def served_certificate(self, port: int, domain: str, root: str | None = None) -> Leaf:
        """The leaf a TLS server on 127.0.0.1:port serves for SNI ``domain``, verified as a browser would.

        The chain it sends must lead to ``root`` (by default this run's), and the leaf must
        name ``domain``; else ssl.SSLCertVerificationError.
        """
        context = ssl.create_default_context(cadata=root or self.root_pem())
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname=domain) as tls:
                der = tls.getpeercert(binary_form=True)
        assert der is not None
        return Leaf.from_der(der)

    def connect(self, port: int, domain: str, root: str | None = None) -> http.client.HTTPSConnection:
        """An HTTPS connection to 127.0.0.1:port as to ``domain`` (SNI, Host), verified against the root, open."""
        context = ssl.create_default_context(cadata=root or self.root_pem())
        connection = http.client.HTTPSConnection(domain, port, context=context, timeout=10)
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)  # no DNS for the test domain
        connection.sock = context.wrap_socket(raw, server_hostname=domain)
        return connection


def peer_leaf(connection: http.client.HTTPSConnection) -> Leaf:
    """The leaf certificate an open connection (from :meth:`Pebble.connect`) was handshaken with."""
    assert isinstance(connection.sock, ssl.SSLSocket)
    der = connection.sock.getpeercert(binary_form=True)
    assert der is not None
    return Leaf.from_der(der)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _end(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()
