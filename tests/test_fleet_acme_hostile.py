"""ACME across a fleet, attacked: what a writer of the fleet's Redis (or a client of the plain
listener) can do to a host. The trust model (README) lets whoever writes in Redis keep the fleet
from renewing; none of it may stop a host's certificate work with a traceback, make it take
Redis for away, or keep it waiting for ever without a word.

In-process against the real redis-server (redisserver.RedisServer), and black-box with pebble
where the finding was a whole host's.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis as redis_client
import trustme
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from redisserver import RedisServer
from test_fleet_acme import CERTIFICATE, LOCK, LOOPS, Host, in_thread, issued, plain_get, start

from aioserver.autocert import AcmeSettings, StateDirectory
from aioserver.fleet import Fleet, parse_redis_url
from aioserver.fleetacme import FleetCertificates, Shared
from aioserver.server import create_redirect_app

from acmeserver import Pebble
from test_acme import DOMAIN, HTTPS, ORDERING, eventually, log_of

ACCOUNT = "aioserver:acme:account"
PROBE = "/.well-known/acme-challenge/no-such-token"


def shared_state(fleet: Fleet, tmp_path: Path, domains: tuple[str, ...] = (DOMAIN,)) -> FleetCertificates:
    """A host's side of the fleet for ``domains`` (test_fleet_acme's, with the names to choose)."""
    settings = AcmeSettings(domains, None, "https://127.0.0.1:9/dir", None, str(tmp_path / "state"))
    state = StateDirectory(settings.state_dir, settings.name)
    state.prepare()
    return FleetCertificates(fleet, settings, state)


@pytest.fixture
async def fleet(redis_server: RedisServer) -> AsyncIterator[Fleet]:
    link = Fleet(parse_redis_url(redis_server.url))
    yield link
    await link.close()


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


async def test_a_lock_set_without_expiry_expires_and_the_log_says_so(
    tmp_path: Path, fleet: Fleet, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The fleet's lock always has an expiry of 60 s at most: one without (a SET by hand, or a
    writer's), or one of a year, is no lock of the fleet's. It was waited for for ever (each host
    saying once that another process orders): it is given 60 s, and the log says why."""
    shared = shared_state(fleet, tmp_path)
    redis = redis_server.client()
    for expiry in (None, 365 * 86400):
        redis.set(LOCK, "set by hand", ex=expiry)
        assert await shared.take() == 0.0  # not taken now: its holder, if any, has 60 s
        assert 0 < redis.pttl(LOCK) <= 60_000
        assert redis.get(LOCK) == "set by hand"
    assert caplog.text.count(f"the fleet's order lock for {DOMAIN} had no expiry or a longer one") == 2
    redis.delete(LOCK)
    redis.hset(LOCK, "a", "hash")  # of another type: the same
    assert await shared.take() == 0.0 and 0 < redis.pttl(LOCK) <= 60_000
    redis.delete(LOCK)
    assert await shared.take() is None  # and then the fleet orders


def sent_by_redis(redis: redis_client.Redis) -> int:
    """The bytes Redis has sent its clients so far (INFO stats)."""
    return int(redis.info("stats")["total_net_output_bytes"])


async def test_huge_values_in_redis_are_not_fetched(
    tmp_path: Path, fleet: Fleet, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """What no certificate, account key or answer can be (many MiB) is refused by its length,
    without being read: every host fetched the whole hash (each time its fingerprint changed,
    a 500 MB one in 3 s and twice its size in memory), and the plain listener fetched a huge
    answer for each request for its token."""
    shared = shared_state(fleet, tmp_path)
    redis = redis_server.client()
    leaf = trustme.CA().issue_cert(DOMAIN)
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    huge = b"A" * (16 << 20)
    fields = {"chain": chain, "key": leaf.private_key_pem.bytes(), "directory": shared.settings.directory}
    cases = [
        {**fields, "chain": huge, "fingerprint": "a"},
        {**fields, "key": huge, "fingerprint": "b"},
        {**fields, "fingerprint": huge},
        {**fields, "directory": huge, "fingerprint": "c"},
        {**fields, "junk": huge, "fingerprint": "d"},  # a field of no use: never asked for
    ]
    for mapping in cases:
        redis.delete(CERTIFICATE)
        redis.hset(CERTIFICATE, mapping={**mapping, "not_after": 2_000_000_000})
        before = sent_by_redis(redis)
        loaded = await shared.sync(in_thread)
        assert sent_by_redis(redis) - before < 1 << 20, sorted(mapping)
        assert loaded is ("junk" in mapping)
    assert "is too large: not loaded" in caplog.text

    redis.set(ACCOUNT, huge)
    before = sent_by_redis(redis)
    await shared.share_account(in_thread)  # replaced by the host's own
    assert sent_by_redis(redis) - before < 1 << 20
    assert redis.get(ACCOUNT) == Path(shared.state.account_key_file).read_text()

    redis.set("aioserver:acme:challenge:tok-1", b"tok-1." + huge)
    async with TestClient(TestServer(create_redirect_app(8443, shared.state, shared))) as client:
        before = sent_by_redis(redis)
        for _ in range(3):
            answer = await client.get("/.well-known/acme-challenge/tok-1", headers={"Host": DOMAIN})
            assert answer.status == 404
        assert sent_by_redis(redis) - before < 1 << 20


@LOOPS
def test_a_flood_of_challenge_requests_opens_few_redis_connections(
    loop: str, tmp_path: Path, pebble: Pebble, redis_server: RedisServer
) -> None:
    """Each request for an answer this host does not hold asks Redis: 400 of them at once
    (wrk, 5 s) made the host open a connection to Redis for each one waiting (a hundred and
    more, kept after; Redis's maxclients is shared by the whole fleet). A few lookups at a time
    now; the plain listener answers on (404, quickly), the CA's own request among them."""
    host = Host("first", tmp_path, pebble.http_port)
    redis = redis_server.client()
    with start(host, pebble, redis_server, loop, HTTPS):
        flood = subprocess.run(
            ["wrk", "-t2", "-c400", "-d5s", "--timeout", "10s", f"http://127.0.0.1:{host.redirect}{PROBE}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert re.search(r"Non-2xx or 3xx responses: \d+", flood), flood
        clients = int(redis.info("clients")["connected_clients"])
        assert clients <= 30, clients
        started = time.monotonic()
        assert plain_get(host.redirect, PROBE) == 404
        assert time.monotonic() - started < 5  # it did not stall


async def test_hosts_with_other_names_first_the_same_do_not_replace_each_others_certificate(
    tmp_path: Path, fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    """Two services on one Redis database, "--acme-domain api,www" and "--acme-domain api" (or a
    fleet halfway through adding a name): their certificates differ. Keyed by the first name
    alone, each replaced the other's in Redis at each look (every 30 s, for ever: the one for
    both names, older, "unusable" for lacking www, over the newer one for api alone, and back)."""
    caplog.set_level(logging.INFO, "aioserver.acme")
    both = shared_state(fleet, tmp_path / "both", (DOMAIN, f"www.{DOMAIN}"))
    one = shared_state(fleet, tmp_path / "one")
    authority = trustme.CA()
    now = datetime.datetime.now(datetime.UTC)
    for shared, days in ((both, 60), (one, 90)):  # the one for api alone is newer
        leaf = authority.issue_cert(*shared.settings.domains, not_after=now + datetime.timedelta(days=days))
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        shared._write(Shared(chain, leaf.private_key_pem.bytes(), now))
    for _ in range(3):
        for shared in (both, one):
            await shared.sync(in_thread)
    assert caplog.text.count("stored the certificate for") == 2, caplog.text  # once each, not at each look


@LOOPS
def test_a_host_stopped_during_its_order_releases_the_fleets_lock(
    loop: str, tmp_path: Path, pebble: Pebble, redis_server: RedisServer
) -> None:
    """SIGTERM while the order waits for the CA (pebble stopped): the lock is released on the
    way out, not left to expire (a minute during which no host of the fleet orders: each host's
    restart, in a rolling one, held the others up so)."""
    redis = redis_server.client()
    host = Host("first", tmp_path, pebble.http_port)
    assert pebble._pebble is not None
    pebble._pebble.send_signal(signal.SIGSTOP)  # its answers never come: the order waits
    try:
        with start(host, pebble, redis_server, loop, ORDERING) as server:
            eventually(lambda: redis.exists(LOCK) == 1)
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(30) == 0, log_of(server)
            assert not redis.exists(LOCK), redis.pttl(LOCK)
            assert "Traceback" not in log_of(server)
    finally:
        pebble._pebble.send_signal(signal.SIGCONT)
