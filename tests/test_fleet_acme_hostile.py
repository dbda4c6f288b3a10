"""ACME across a fleet, attacked: what a writer of the fleet's Redis (or a client of the plain
listener) can do to a host. The trust model (README) lets whoever writes in Redis keep the fleet
from renewing; none of it may stop a host's certificate work with a traceback, make it take
Redis for away, or keep it waiting for ever without a word.

In-process against the real redis-server (redisserver.RedisServer), and black-box with pebble
where the finding was a whole host's.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from redisserver import RedisServer

from aioserver.fleet import Fleet

from acmeserver import Pebble
from test_acme import DOMAIN, HTTPS, ORDERING, eventually, log_of
from test_fleet_acme import (  # noqa: F401 (fixtures)
    CERTIFICATE,
    LOCK,
    LOOPS,
    Host,
    fleet,
    in_thread,
    issued,
    pebble,
    redis_server,
    shared_state,
    start,
)

ACCOUNT = "aioserver:acme:account"


def duplicated_extension(chain: bytes) -> bytes:
    """``chain``'s leaf with its basicConstraints renamed subjectAltName: two SANs, which
    cryptography refuses with DuplicateExtension (not a ValueError). Its signature is broken
    too, which nothing checks: no host knows the ACME CA's root."""
    from cryptography import x509

    leaf = x509.load_pem_x509_certificate(chain)
    der = leaf.public_bytes(serialization.Encoding.DER)
    twice = der.replace(bytes.fromhex("0603551d13"), bytes.fromhex("0603551d11"), 1)
    assert twice != der
    return x509.load_der_x509_certificate(twice).public_bytes(serialization.Encoding.PEM)


def encrypted(key_pem: bytes) -> bytes:
    """``key_pem`` encrypted with a password: cryptography raises TypeError (not ValueError) on it."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    encryption = serialization.BestAvailableEncryption(b"a password the server does not have")
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


async def test_an_encrypted_key_in_redis_is_refused_not_raised(
    tmp_path: Path, fleet: Fleet, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A certificate whose key is encrypted, and an encrypted account key: unreadable, said
    once, replaced by the host's own; the certificate work goes on (a TypeError escaping it
    restarted the work every minute, with a traceback)."""
    caplog.set_level(logging.INFO, "aioserver.acme")
    shared = shared_state(fleet, tmp_path)
    redis = redis_server.client()
    leaf = trustme.CA().issue_cert(DOMAIN)
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    key = leaf.private_key_pem.bytes()
    mapping = {"chain": chain, "key": encrypted(key), "directory": shared.settings.directory}
    redis.hset(CERTIFICATE, mapping={**mapping, "not_after": 2_000_000_000, "fingerprint": "f"})
    assert await shared.sync(in_thread) is False
    assert not Path(shared.state.chain_file).exists()
    assert "the certificate in redis for" in caplog.text and "is unreadable: not loaded" in caplog.text
    caplog.clear()
    redis.hset(CERTIFICATE, mapping={"chain": duplicated_extension(chain), "key": key, "fingerprint": "g"})
    assert await shared.sync(in_thread) is False
    assert not Path(shared.state.chain_file).exists()
    assert "is unreadable: not loaded" in caplog.text

    account = encrypted(key)
    redis.set(ACCOUNT, account)
    await shared.share_account(in_thread)  # the order goes on with the host's own account key
    assert redis.get(ACCOUNT) == Path(shared.state.account_key_file).read_text()
    assert redis.get(ACCOUNT).encode() != account
    assert "the account key in redis is unreadable: replacing it" in caplog.text
    assert "PRIVATE KEY" not in caplog.text


@LOOPS
def test_keys_of_the_wrong_type_neither_stop_the_order_nor_take_redis_for_away(
    loop: str, tmp_path: Path, pebble: Pebble, redis_server: RedisServer
) -> None:
    """The certificate's key a string, the account's a hash, the failures' a list: a host still
    orders (once), stores its certificate over them, and never says Redis is away (a WRONGTYPE
    answer was taken for an outage: the host logged "away" and "back" each second and never
    ordered, its throttle counting alone meanwhile)."""
    redis = redis_server.client()
    redis.set(CERTIFICATE, "not a hash")
    redis.hset(ACCOUNT, "not", "a string")
    redis.rpush(f"aioserver:acme:{DOMAIN}:failures", "not", "a counter")
    host = Host("first", tmp_path, pebble.http_port)
    with start(host, pebble, redis_server, loop, HTTPS) as server:
        log = log_of(server)
        assert len(re.findall(ORDERING, log)) == 1 and len(issued(pebble)) == 1
        fingerprint = hashlib.sha256(host.chain()).hexdigest()
        eventually(lambda: redis.type(CERTIFICATE) == "hash" and redis.hget(CERTIFICATE, "fingerprint") == fingerprint)
        assert redis.get(ACCOUNT) == (host.state / "account.key").read_text()
        assert re.search(rf"the certificate in redis for {re.escape(DOMAIN)} is not a hash of the fleet's", log)
        assert "is away" not in log and "Traceback" not in log
