"""A small identity provider for the tests of auth.jwt: signing keys, tokens, and a JWKS over HTTPS.

:class:`SigningKey` holds a private key made here (EC P-256, RSA, Ed25519) and mints tokens
with it, or forges the tokens an attacker would (unsigned, HMAC with the public key, a
payload swapped under a good signature). :class:`JWKSServer` serves a key set over HTTPS
with a trustme certificate for 127.0.0.1, in a thread of the test process, as a provider's
``jwks_uri`` would; what it publishes, and how it misbehaves, may change while it runs.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import trustme
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from conftest import TOKEN_HASH, free_port

ISSUER = "https://idp.example/realms/aioserver"
AUDIENCE = "aioserver-api"
INVALID = 'Bearer realm="aioserver", error="invalid_token"'
INSUFFICIENT = 'Bearer realm="aioserver", error="insufficient_scope"'
WORKFLOWS = """
workflow:
  echo: {tasks: [echo]}
  upper: {tasks: [upper]}
"""


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def b64json(value: Any) -> str:
    return b64(json.dumps(value).encode())


def claims(**changes: Any) -> dict[str, Any]:
    """A valid access token's claims, ``changes`` made (a value of None takes the claim out)."""
    now = int(time.time())
    values = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "exp": now + 600,
        "nbf": now - 5,
        "iat": now - 5,
        "scope": "openid workflow:echo",
    }
    values.update(changes)
    return {name: value for name, value in values.items() if value is not None}


class SigningKey:
    """A provider's signing key: ``kind`` is ES256 (P-256), RS256 (RSA 2048) or EdDSA (Ed25519)."""

    def __init__(self, kind: str, kid: str, bits: int = 2048) -> None:
        self.alg, self.kid = kind, kid
        self.private: Any
        if kind == "ES256":
            self.private = ec.generate_private_key(ec.SECP256R1())
            self._to_jwk: Any = ECAlgorithm.to_jwk
        elif kind == "RS256":
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
            self._to_jwk = RSAAlgorithm.to_jwk
        else:
            self.private = ed25519.Ed25519PrivateKey.generate()
            self._to_jwk = OKPAlgorithm.to_jwk

    def jwk(self, **extra: Any) -> dict[str, Any]:
        """Its public JWK, with its kid and ``extra`` members."""
        return {**self._to_jwk(self.private.public_key(), as_dict=True), "kid": self.kid, "use": "sig", **extra}

    def mint(self, header: dict[str, Any] | None = None, **changes: Any) -> str:
        """A token signed by this key: :func:`claims` with ``changes``; ``header`` overrides members."""
        headers = {"kid": self.kid, **(header or {})}
        return jwt.encode(claims(**changes), self.private, algorithm=self.alg, headers=headers)

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def unsigned(kid: str, **changes: Any) -> str:
    """``alg: none``: a token anyone can write (RFC 7519 section 6)."""
    return f"{b64json({'alg': 'none', 'kid': kid, 'typ': 'JWT'})}.{b64json(claims(**changes))}."


def hmac_with_public_key(key: SigningKey, **changes: Any) -> str:
    """HS256 whose secret is the RSA key's public PEM, which anyone can fetch: key confusion."""
    signing_input = f"{b64json({'alg': 'HS256', 'kid': key.kid, 'typ': 'JWT'})}.{b64json(claims(**changes))}"
    signature = hmac.new(key.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def with_header(token: str, **members: Any) -> str:
    """``token`` with its header's members changed (None: taken out), its signature kept."""
    header, payload, signature = token.split(".")
    decoded = {**json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4))), **members}
    return f"{b64json({k: v for k, v in decoded.items() if v is not None})}.{payload}.{signature}"


def tampered(token: str, **changes: Any) -> str:
    """``token`` with its payload rewritten (``changes`` made), its signature kept."""
    header, _, signature = token.split(".")
    return f"{header}.{b64json(claims(**changes))}.{signature}"


def config(jwks_location: str | Path, tokens: bool = True, **more: Any) -> str:
    """The workflows, a plain token named static (unless not ``tokens``), and auth.jwt with
    ``more`` settings (in JSON, which is YAML)."""
    settings = {"issuer": ISSUER, "audience": AUDIENCE, "jwks": str(jwks_location), **more}
    static = f"  tokens: [{{name: static, sha256: {TOKEN_HASH}}}]\n" if tokens else ""
    return f"{WORKFLOWS}auth:\n{static}  jwt: {json.dumps(settings)}\n"


@dataclass(frozen=True)
class Keys:
    """The provider's keys of the tests, each named by its kid."""

    es: SigningKey
    rs: SigningKey
    ed: SigningKey
    impostor: SigningKey  # not in the key set, though it says kid "es"


def make_keys() -> Keys:
    return Keys(
        SigningKey("ES256", "es"), SigningKey("RS256", "rs"), SigningKey("EdDSA", "ed"), SigningKey("ES256", "es")
    )


def jwks(*keys: SigningKey | dict[str, Any]) -> dict[str, Any]:
    return {"keys": [key.jwk() if isinstance(key, SigningKey) else key for key in keys]}


class JWKSServer:
    """A provider's ``jwks_uri`` on https://127.0.0.1:PORT/jwks, in a thread of the tests.

    ``document`` is what it serves (JSON); ``status`` another answer; ``redirect`` a 302 there;
    ``hang`` keeps every request waiting; ``padding`` bytes of white space lead the document,
    sent ``chunked`` (no Content-Length) if asked.
    ``fetches`` counts the requests for the key set, ``accept`` is the last one's Accept header.
    ``ca_file`` verifies its certificate.
    """

    def __init__(self, folder: Path, document: dict[str, Any]) -> None:
        self.document = document
        self.status = 200
        self.redirect: str | None = None
        self.hang = False
        self.padding = 0
        self.chunked = False
        self.fetches = 0
        self.accept: str | None = None  # the Accept header of the last request
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}/jwks"
        authority = trustme.CA()
        folder.mkdir(parents=True, exist_ok=True)
        self.ca_file = folder / "idp-ca.pem"
        authority.cert_pem.write_to_path(self.ca_file)
        self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        authority.issue_cert("127.0.0.1").configure_cert(self._ssl)
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> JWKSServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.hang = False
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._stop(self._runner), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/jwks", self._jwks)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self._ssl).start()

    @staticmethod
    async def _stop(runner: web.AppRunner) -> None:
        await runner.cleanup()
        await asyncio.sleep(0.1)  # the TLS connections it closed finish closing (close_notify)

    async def _jwks(self, request: web.Request) -> web.StreamResponse:
        self.fetches += 1
        self.accept = request.headers.get("Accept")
        while self.hang:
            await asyncio.sleep(0.05)
        if self.redirect is not None:
            raise web.HTTPFound(self.redirect)
        body = b" " * self.padding + json.dumps(self.document).encode()
        if not self.chunked:
            return web.Response(body=body, status=self.status, content_type="application/json")
        answer = web.StreamResponse(status=self.status, headers={"Content-Type": "application/json"})
        answer.enable_chunked_encoding()
        await answer.prepare(request)
        for start in range(0, len(body), 65536):
            await answer.write(body[start : start + 65536])
        await answer.write_eof()
        return answer
