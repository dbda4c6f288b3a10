"""The ACME server of the tests (acmeserver.Pebble) proven with certbot's ``acme`` library alone.

An account, an order, its http-01 challenge answered on pebble's ``httpPort`` by a responder of
ours, the order finalized: the chain pebble issues, served by a plain TLS server, verifies
against pebble's root under the ordered name only, for ``certificateValidityPeriod`` seconds;
a restarted pebble has a new root, which the old chain does not verify against.
"""

from __future__ import annotations

import datetime
import http.server
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from acme import challenges, client, crypto_util, messages
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwa import ES256
from josepy.jwk import JWKEC

from acmeserver import Leaf, Pebble, new_key_pem, peer_leaf

DOMAIN = "pebble-selftest.aioserver.test"


@contextmanager
def http01_responder(port: int, answers: dict[str, bytes]) -> Iterator[None]:
    """Answer GET <path> with answers[path] on 127.0.0.1:port (404 otherwise), as a webroot does."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = answers.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def issue(pebble: Pebble, domain: str) -> tuple[str, bytes]:
    """A certificate for ``domain`` from pebble, by RFC 8555 over certbot's library: (fullchain PEM, key PEM)."""
    account_key = JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    # acme passes verify_ssl on to requests' verify=, which takes a CA bundle's path too.
    network = client.ClientNetwork(account_key, alg=ES256, verify_ssl=str(pebble.ca_file))  # type: ignore[arg-type]
    acme = client.ClientV2(client.ClientV2.get_directory(pebble.directory, network), network)
    acme.new_account(messages.NewRegistration.from_data(email="selftest@aioserver.test", terms_of_service_agreed=True))
    key_pem = new_key_pem()
    order = acme.new_order(crypto_util.make_csr(key_pem, [domain]))
    answers: dict[str, bytes] = {}
    with http01_responder(pebble.http_port, answers):
        for authorization in order.authorizations:
            if authorization.body.status == messages.STATUS_VALID:  # pebble reuses valid ones, sometimes
                continue
            challenge = next(c for c in authorization.body.challenges if isinstance(c.chall, challenges.HTTP01))
            response, validation = challenge.response_and_validation(account_key)
            answers[challenge.chall.path] = validation.encode()
            acme.answer_challenge(challenge, response)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=60)
        order = acme.poll_and_finalize(order, deadline)
    assert order.fullchain_pem is not None
    return order.fullchain_pem, key_pem


@contextmanager
def tls_server(folder: Path, fullchain: str, key: bytes) -> Iterator[int]:
    """A TLS server on 127.0.0.1 presenting ``fullchain``: each connection is handshaken, then closed."""
    (folder / "fullchain.pem").write_text(fullchain)
    (folder / "key.pem").write_bytes(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "fullchain.pem", folder / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                try:
                    with context.wrap_socket(connection, server_side=True) as tls:
                        tls.recv(1)  # until the client closes
                except (OSError, ssl.SSLError):
                    pass  # a client that refused our chain: what some tests want

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close() alone would not)
        listener.close()
        thread.join(timeout=10)


@pytest.mark.parametrize("validity", [None, 60])
def test_pebble_issues_certificates_that_verify_against_its_root(tmp_path: Path, validity: int | None) -> None:
    with Pebble(tmp_path / "pebble", validity=validity) as pebble:
        before = datetime.datetime.now(datetime.UTC)
        fullchain, key = issue(pebble, DOMAIN)
        after = datetime.datetime.now(datetime.UTC)
        with tls_server(tmp_path, fullchain, key) as port:
            served = pebble.served_certificate(port, DOMAIN)
            assert served == Leaf.from_pem(fullchain)
            assert served.names == (DOMAIN,)
            with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
                pebble.served_certificate(port, "other.aioserver.test")
            with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
                pebble.served_certificate(port, DOMAIN, root=pebble.ca_file.read_text())  # not pebble's root
    # Valid from its issuance (not backdated: a renewal's time follows from notBefore), for as long as asked.
    second = datetime.timedelta(seconds=1)
    assert before - second <= served.not_before <= after
    if validity is None:
        assert served.lifetime > datetime.timedelta(days=365)  # pebble's default: five years
    else:
        assert validity - 2 <= served.lifetime.total_seconds() <= validity  # pebble's notAfter is inclusive


def test_a_restarted_pebble_has_a_new_root_on_the_same_ports(tmp_path: Path) -> None:
    with Pebble(tmp_path / "pebble") as pebble:
        fullchain, key = issue(pebble, DOMAIN)
        old_root, directory = pebble.root_pem(), pebble.directory
        pebble.stop()
        with pytest.raises(OSError):
            pebble.root_pem()
        pebble.start()
        assert pebble.directory == directory and pebble.root_pem() != old_root
        with tls_server(tmp_path, fullchain, key) as port:
            assert pebble.served_certificate(port, DOMAIN, root=old_root).names == (DOMAIN,)
            with pytest.raises(ssl.SSLCertVerificationError):
                pebble.served_certificate(port, DOMAIN)  # the new root did not sign it
            connection = pebble.connect(port, DOMAIN, root=old_root)
            assert peer_leaf(connection) == Leaf.from_pem(fullchain)
            connection.close()
        issue(pebble, DOMAIN)  # a new account and order on the new run


def test_a_missing_program_fails_instead_of_skipping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import acmeserver

    monkeypatch.setattr(acmeserver, "PEBBLE", str(tmp_path / "no-pebble"))
    with pytest.raises(AssertionError, match="no-pebble is missing: apt-get install pebble"):
        Pebble(tmp_path / "pebble")
