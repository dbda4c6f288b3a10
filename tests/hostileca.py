"""A hostile ACME server for the tests of what aioserver does with what a CA sends.

pebble is a correct CA: it cannot send a chain for other names, a problem document with line
feeds in it, or a Retry-After of ten years. :class:`HostileCA` speaks just enough of RFC 8555
for certbot's ``acme`` client to go through a whole order (directory, nonces, account, an
order whose authorization is valid already, finalize, certificate), over HTTPS with a trustme
certificate for 127.0.0.1 (``ca_file``), in a thread of the test process; what it gets wrong
is chosen by its arguments. It verifies no signature: it only has to be believed.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import secrets
import ssl
import threading
from pathlib import Path
from typing import Any

import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from acmeserver import free_ports


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


DAY = datetime.timedelta(days=1)


class HostileCA:
    """An ACME server on 127.0.0.1 that issues, for the CSR's key, a certificate naming ``names``
    (default: the CSR's own), valid over ``valid`` (from, to: offsets from the time of issue);
    or that answers ``problem`` (a problem document) with ``status`` and ``retry_after`` to new
    orders instead. ``directory_padding`` bytes of white space lead its directory (JSON still),
    sent ``drip`` bytes a second if given. With ``window`` (from, to: offsets from now), it
    offers ACME Renewal Information (RFC 9773) suggesting that window for every certificate.
    Each attribute may change while it runs."""

    def __init__(
        self,
        folder: Path,
        names: tuple[str, ...] | None = None,
        valid: tuple[datetime.timedelta, datetime.timedelta] = (-datetime.timedelta(minutes=1), 90 * DAY),
        problem: dict[str, Any] | None = None,
        status: int = 400,
        retry_after: str | None = None,
        directory_padding: int = 0,
        drip: float | None = None,
        window: tuple[datetime.timedelta, datetime.timedelta] | None = None,
    ) -> None:
        self.window = window
        self.names = names
        self.valid = valid
        self.directory_padding = directory_padding
        self.drip = drip
        self.problem = problem
        self.status = status
        self.retry_after = retry_after
        self.port = free_ports(1)[0]
        self.directory = f"https://127.0.0.1:{self.port}/dir"
        authority = trustme.CA()
        folder.mkdir(parents=True, exist_ok=True)
        self.ca_file = folder / "hostile-ca.pem"  # verifies its own HTTPS: aioserver's --acme-ca-certs
        authority.cert_pem.write_to_path(self.ca_file)
        endpoint = authority.issue_cert("127.0.0.1")
        self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        endpoint.configure_cert(self._ssl)
        self._issuer_key = ec.generate_private_key(ec.SECP256R1())
        self._issuer_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Hostile Issuer")])
        self.orders = 0  # new orders received
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    # -- running

    def __enter__(self) -> HostileCA:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/dir", self._directory)
        app.router.add_route("HEAD", "/nonce", self._nonce)
        app.router.add_post("/account", self._account)
        app.router.add_post("/order", self._new_order)
        app.router.add_post("/order/1", self._order)
        app.router.add_post("/authz/1", self._authorization)
        app.router.add_post("/finalize/1", self._finalize)
        app.router.add_post("/certificate/1", self._certificate)
        app.router.add_get("/renewal-info/{certificate}", self._renewal_info)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self._ssl).start()

    # -- ACME, as far as certbot's client needs it

    def _url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def _json(self, body: object, status: int = 200, **headers: str) -> web.Response:
        headers["Replay-Nonce"] = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
        return web.json_response(body, status=status, headers=headers)

    async def _directory(self, request: web.Request) -> web.StreamResponse:
        directory = {
            "newNonce": self._url("/nonce"),
            "newAccount": self._url("/account"),
            "newOrder": self._url("/order"),
            "revokeCert": self._url("/revoke"),
            "keyChange": self._url("/key-change"),
        }
        if self.window is not None:
            directory["renewalInfo"] = self._url("/renewal-info")
        if not self.directory_padding and self.drip is None:
            return self._json(directory)
        answer = web.StreamResponse(headers={"Content-Type": "application/json"})
        await answer.prepare(request)
        if self.drip is not None:  # forever, unless the client gives up
            while True:
                await answer.write(b" ")
                await asyncio.sleep(1 / self.drip)
        for _ in range(self.directory_padding // 65536):
            await answer.write(b" " * 65536)
        await answer.write(json.dumps(directory).encode())
        await answer.write_eof()
        return answer

    async def _renewal_info(self, request: web.Request) -> web.Response:
        assert self.window is not None
        now = datetime.datetime.now(datetime.UTC)
        start, end = (now + offset for offset in self.window)
        iso = "%Y-%m-%dT%H:%M:%SZ"
        return self._json({"suggestedWindow": {"start": start.strftime(iso), "end": end.strftime(iso)}})

    async def _nonce(self, request: web.Request) -> web.Response:
        return self._json(None)

    async def _account(self, request: web.Request) -> web.Response:
        return self._json({"status": "valid"}, 201, Location=self._url("/account/1"))

    async def _new_order(self, request: web.Request) -> web.Response:
        self.orders += 1
        payload = json.loads(_b64decode((await request.json())["payload"]))
        self._identifiers = payload["identifiers"]
        if self.problem is not None:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            response = self._json(self.problem, self.status, **headers)
            response.content_type = "application/problem+json"
            return response
        return self._json(self._order_body("pending"), 201, Location=self._url("/order/1"))

    def _order_body(self, status: str) -> dict[str, Any]:
        body = {
            "status": status,
            "identifiers": self._identifiers,
            "authorizations": [self._url("/authz/1")],
            "finalize": self._url("/finalize/1"),
        }
        if status == "valid":
            body["certificate"] = self._url("/certificate/1")
        return body

    async def _order(self, request: web.Request) -> web.Response:
        return self._json(self._order_body("valid"), Location=self._url("/order/1"))

    async def _authorization(self, request: web.Request) -> web.Response:
        # Valid already ("validated lately"): no challenge to answer.
        identifier = self._identifiers[0]
        return self._json({"status": "valid", "identifier": identifier, "challenges": []})

    async def _finalize(self, request: web.Request) -> web.Response:
        payload = json.loads(_b64decode((await request.json())["payload"]))
        csr = x509.load_der_x509_csr(_b64decode(payload["csr"]))
        requested = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = self.names or tuple(requested.get_values_for_type(x509.DNSName))
        now = datetime.datetime.now(datetime.UTC)
        not_before, not_after = now + self.valid[0], now + self.valid[1]
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self._issuer_name)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._issuer_key.public_key()), critical=False
            )
            .sign(self._issuer_key, hashes.SHA256())
        )
        self._chain = leaf.public_bytes(serialization.Encoding.PEM).decode()
        return self._json(self._order_body("valid"), Location=self._url("/order/1"))

    async def _certificate(self, request: web.Request) -> web.Response:
        headers = {"Replay-Nonce": base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")}
        return web.Response(text=self._chain, content_type="application/pem-certificate-chain", headers=headers)
