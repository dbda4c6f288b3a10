"""ACME across a fleet (issue 15): ``--redis`` with ``--acme-domain``, black-box.

Several ``python -m aioserver`` instances, each with a state directory of its own (as hosts
have), share one real redis-server (redisserver.RedisServer) and get their certificate from a
real pebble (acmeserver.Pebble): one order for the fleet, the same certificate on every host,
the http-01 challenge answered by a host other than the one ordering, and Redis killed while
they serve. Orders are counted twice: the instances' "ordering" log lines, and pebble's own
log ("Issued certificate serial S for order O", one per certificate it issues).

These need the ``acme`` and ``redis`` extras, which the test venv holds: the tests choose their
loops (``--loop``), so conftest runs them there.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import http.client
import re
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trustme
from aiohttp.test_utils import TestClient, TestServer
from redisserver import PASSWORD, RedisServer

from aioserver.autocert import AcmeSettings, StateDirectory
from aioserver.fleet import Fleet, parse_redis_url
from aioserver.fleetacme import FleetCertificates
from aioserver.server import create_redirect_app

from acmeserver import Leaf, Pebble, new_key_pem
from conftest import TOKEN_HASH, Server, free_port
from test_acme import DOMAIN, HTTPS, OBTAINED, ORDERING, eventually, fill, log_of, request, small_disk, wait_for_log

T = TypeVar("T")
LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
LOCK = f"aioserver:acme:{DOMAIN}:lock"
CERTIFICATE = f"aioserver:acme:{DOMAIN}:certificate"
WAITING = rf"acme: another process of the fleet orders the certificate for {re.escape(DOMAIN)}: waiting for it"
LOADED = rf"acme: loaded the fleet's certificate for {re.escape(DOMAIN)} from redis"
ISSUED = r"Issued certificate serial ([0-9a-f]+) for order"
CHALLENGE = r'"GET /\.well-known/acme-challenge/[A-Za-z0-9_-]+ HTTP/1\.1" 200 '


class Host:
    """One instance of the fleet: its HTTPS port, its plain port (--redirect-http), its state directory."""

    def __init__(self, name: str, tmp_path: Path, redirect: int) -> None:
        self.name = name
        self.port = free_port()
        self.redirect = redirect
        self.state = tmp_path / name / "acme"

    def args(self, pebble: Pebble, redis_server: RedisServer, loop: str) -> tuple[str, ...]:
        return (
            "--loop", loop,
            "--port", str(self.port),
            "--redis", redis_server.url,
            "--acme-domain", DOMAIN,
            "--acme-email", "ops@aioserver.test",
            "--acme-directory", pebble.directory,
            "--acme-ca-certs", str(pebble.ca_file),
            "--acme-state-dir", str(self.state),
            "--redirect-http", str(self.redirect),
        )  # fmt: skip

    def chain(self) -> bytes:
        return (self.state / "certificates" / DOMAIN / "fullchain.pem").read_bytes()

    def key(self) -> bytes:
        return (self.state / "certificates" / DOMAIN / "key.pem").read_bytes()


def start(
    host: Host,
    pebble: Pebble,
    redis_server: RedisServer,
    loop: str,
    pattern: str,
    *extra: str,
    prefix: tuple[str, ...] = (),
) -> Server:
    """The host's instance (a token set: no Host guard), once its log matches ``pattern``."""
    args = (*host.args(pebble, redis_server, loop), *extra)
    return Server(*args, env={"TOKEN": TOKEN_HASH}, pattern=pattern, prefix=prefix)


def issued(pebble: Pebble) -> list[int]:
    """The serials of the certificates pebble issued, from its log."""
    return [int(serial, 16) for serial in re.findall(ISSUED, pebble.log_text())]


def serves(pebble: Pebble, host: Host) -> None:
    """A workflow runs over HTTPS, the certificate verified as a browser would."""
    connection = pebble.connect(host.port, DOMAIN)
    try:
        assert request(connection, "GET", "/health")[0] == 200
        assert request(connection, "POST", "/workflow", {"name": "shout", "elements": ["hi"]}) == (200, b'["HI!"]')
    finally:
        connection.close()


def plain_get(port: int, path: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers={"Host": DOMAIN})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@LOOPS
def test_three_instances_make_one_order_and_serve_one_certificate(
    loop: str, tmp_path: Path, pebble: Pebble, redis_server: RedisServer
) -> None:
    """The issue's test. The test holds the fleet's lock while the three start (all wait for
    it), then lets the first one have it while the other two are stopped (SIGSTOP): the first
    orders, and pebble validates the challenge on the plain port of the second (its answer in
    Redis), let go again (SIGCONT) meanwhile. Then Redis is killed: they serve on with the
    certificate held; it comes back empty: they store the certificate again, and a fourth
    instance with an empty state directory takes it from there, ordering nothing."""
    first = Host("first", tmp_path, free_port())  # --workers 2: its lead is one of them
    second = Host("second", tmp_path, pebble.http_port)  # where pebble validates
    third = Host("third", tmp_path, free_port())
    redis = redis_server.client()
    assert redis.set(LOCK, "held by the test", px=120_000)

    with (
        start(first, pebble, redis_server, loop, WAITING, "--workers", "2") as a,
        start(second, pebble, redis_server, loop, WAITING) as b,
        start(third, pebble, redis_server, loop, WAITING) as c,
    ):
        servers = (a, b, c)
        for server in (b, c):
            server.process.send_signal(signal.SIGSTOP)
        try:
            assert redis.get(LOCK) == "held by the test"  # nobody took it from the test, nobody ordered
            assert not any(re.search(ORDERING, log_of(server)) for server in servers)
            redis.delete(LOCK)
            wait_for_log(a, ORDERING, timeout=30)
        finally:
            for server in (b, c):
                server.process.send_signal(signal.SIGCONT)
        for server in servers:
            wait_for_log(server, HTTPS, timeout=60)

        # One order, by the first; one certificate issued; every host serves it.
        orders = [len(re.findall(ORDERING, log_of(server))) for server in servers]
        assert orders == [1, 0, 0], "\n".join(log_of(server) for server in servers)
        wait_for_log(a, OBTAINED)
        serials = issued(pebble)
        assert len(serials) == 1, pebble.log_text()
        served = [pebble.served_certificate(host.port, DOMAIN) for host in (first, second, third)]
        assert {leaf.serial for leaf in served} == set(serials)
        for _ in range(4):  # whichever of the first's workers accepts
            assert pebble.served_certificate(first.port, DOMAIN).serial == serials[0]
        for server in (b, c):
            wait_for_log(server, LOADED)
        # The challenge was answered by the second, from Redis; the first never saw it.
        assert re.search(CHALLENGE, log_of(b)), log_of(b)
        assert "acme-challenge" not in log_of(a)
        # The same key on every host, the certificate in Redis; the account once, in Redis.
        assert first.key() == second.key() == third.key()
        assert first.chain() == second.chain() == third.chain()
        assert redis.hget(CERTIFICATE, "fingerprint") == hashlib.sha256(first.chain()).hexdigest()
        assert redis.get("aioserver:acme:account") == (first.state / "account.key").read_text()
        # Released by its holder (or by the host that took it after, to find the certificate
        # there), not left to expire (60 s).
        eventually(lambda: not redis.exists(LOCK), timeout=10)
        assert not list(redis.scan_iter("aioserver:acme:challenge:*"))  # answers dropped after the order
        for host in (first, second, third):
            serves(pebble, host)

        # Redis killed: every host serves on, with the certificate it holds.
        redis_server.stop()
        for host in (first, second, third):
            serves(pebble, host)
        for server in servers:
            wait_for_log(server, r"redis at \S+ is away", timeout=30)
        for host in (first, second, third):
            serves(pebble, host)
            assert pebble.served_certificate(host.port, DOMAIN).serial == serials[0]
        assert plain_get(second.redirect, "/.well-known/acme-challenge/abc") == 404  # not a 500

        # Back, empty: the hosts store their certificate again (as soon as they see it back).
        redis_server.start()
        redis = redis_server.client()
        eventually(lambda: redis.hget(CERTIFICATE, "fingerprint") is not None, timeout=60)
        assert redis.hget(CERTIFICATE, "fingerprint") == hashlib.sha256(first.chain()).hexdigest()

        # A new host, an empty state directory: the fleet's certificate, no order.
        fourth = Host("fourth", tmp_path, free_port())
        with start(fourth, pebble, redis_server, loop, HTTPS) as d:
            assert pebble.served_certificate(fourth.port, DOMAIN).serial == serials[0]
            assert not re.search(ORDERING, log_of(d)) and re.search(LOADED, log_of(d))
            assert fourth.key() == first.key()
            logs = [log_of(server) for server in (*servers, d)]

    assert issued(pebble) == serials  # nothing more was ordered
    # For the issue's closing note (pytest -s): the counts this run saw.
    print(
        f"\nfleet acme [{loop}]: pebble issued {len(serials)} certificate(s), serial {serials[0]:x}, served by 4 hosts"
    )
    key_line = first.key().decode().splitlines()[1]
    for log in logs:
        assert PASSWORD not in log and key_line not in log
        assert "Traceback" not in log


@LOOPS
def test_whoever_renews_first_renews_for_the_fleet(loop: str, tmp_path: Path, redis_server: RedisServer) -> None:
    """Certificates of 60 s: both hosts are due about 40 s in, within a second or two of each
    other; one renews, the other loads its certificate: two certificates issued in all."""
    with Pebble(tmp_path / "pebble", validity=60) as pebble:
        hosts = Host("first", tmp_path, pebble.http_port), Host("second", tmp_path, free_port())
        with (
            start(hosts[0], pebble, redis_server, loop, HTTPS) as a,
            start(hosts[1], pebble, redis_server, loop, HTTPS) as b,
        ):
            first = issued(pebble)
            assert len(first) == 1, pebble.log_text()
            for host in hosts:
                assert pebble.served_certificate(host.port, DOMAIN).serial == first[0]
            eventually(lambda: len(issued(pebble)) == 2, timeout=90)
            renewed = issued(pebble)[1]
            for host in hosts:
                eventually(lambda host=host: pebble.served_certificate(host.port, DOMAIN).serial == renewed, timeout=30)
                serves(pebble, host)
            time.sleep(3)  # the other host's renewal time has come too, by now: it loaded, not ordered
            assert issued(pebble) == [*first, renewed], pebble.log_text()
            orders = [len(re.findall(ORDERING, log_of(server))) for server in (a, b)]
            assert sum(orders) == 2, orders
            assert hosts[0].chain() == hosts[1].chain()


@LOOPS
def test_no_order_while_redis_is_away(loop: str, tmp_path: Path, pebble: Pebble, redis_server: RedisServer) -> None:
    """Redis away at start-up: no host orders on its own (each would); the plain listener
    answers; once Redis is back, one order and HTTPS."""
    redis_server.stop()
    host = Host("first", tmp_path, pebble.http_port)
    away = rf"acme: a certificate for {re.escape(DOMAIN)} is due, but redis is away: ordering once it is back"
    with start(host, pebble, redis_server, loop, away) as server:
        time.sleep(3)
        assert not re.search(ORDERING, log_of(server)) and issued(pebble) == []
        assert plain_get(host.redirect, "/health") == 308
        redis_server.start()
        wait_for_log(server, HTTPS, timeout=60)
        assert len(re.findall(ORDERING, log_of(server))) == 1 and len(issued(pebble)) == 1
        serves(pebble, host)
        assert len(re.findall(away, log_of(server))) == 1  # said once


# -- in-process: the lock and the answers, against the real redis-server


@pytest.fixture
async def fleet(redis_server: RedisServer) -> AsyncIterator[Fleet]:
    link = Fleet(parse_redis_url(redis_server.url))
    yield link
    await link.close()


def shared_state(fleet: Fleet, tmp_path: Path) -> FleetCertificates:
    settings = AcmeSettings((DOMAIN,), None, "https://127.0.0.1:9/dir", None, str(tmp_path / "state"))
    state = StateDirectory(settings.state_dir, settings.name)
    state.prepare()
    return FleetCertificates(fleet, settings, state)


async def test_the_lock_is_taken_once_and_released_only_by_its_holder(
    tmp_path: Path, fleet: Fleet, redis_server: RedisServer
) -> None:
    one, other = shared_state(fleet, tmp_path / "one"), shared_state(fleet, tmp_path / "other")
    redis = redis_server.client()
    assert await one.take() is None  # taken
    assert 0 < redis.pttl(LOCK) <= 60_000  # it expires: a holder that dies holds nobody up for long
    assert await other.take() == 0.0  # another holds it
    await other.release()  # not its holder: nothing
    assert redis.exists(LOCK)
    redis.set(LOCK, "another holder since it expired")
    await one.release()  # compare and delete: not its lock any more
    assert redis.get(LOCK) == "another holder since it expired"
    redis.delete(LOCK)
    assert await other.take() is None
    await other.release()
    assert not redis.exists(LOCK)
    # After a failure, the whole fleet waits.
    assert await one.take() is None
    assert await one.failed() == 1
    await one.wait_after_failure(20)
    await one.release()
    assert 10 < (await other.take() or 0) <= 20


async def test_the_challenge_route_answers_from_redis_only_a_key_authorization(
    tmp_path: Path, fleet: Fleet, redis_server: RedisServer
) -> None:
    """Another host's order's answer is served; what is not its token's key authorization is
    not (whoever could write in Redis cannot make the plain listener serve anything)."""
    shared = shared_state(fleet, tmp_path)
    redis = redis_server.client()
    redis.set("aioserver:acme:challenge:tok-1", "tok-1.thumb")
    redis.set("aioserver:acme:challenge:tok-2", "tok-3.thumb")  # another token's
    redis.set("aioserver:acme:challenge:tok-4", "<script>alert(1)</script>")
    async with TestClient(TestServer(create_redirect_app(8443, shared.state, shared))) as client:
        answer = await client.get("/.well-known/acme-challenge/tok-1", headers={"Host": DOMAIN})
        assert (answer.status, await answer.read()) == (200, b"tok-1.thumb")
        for token in ("tok-2", "tok-4", "tok-5", "tok*"):
            refused = await client.get(f"/.well-known/acme-challenge/{token}", headers={"Host": DOMAIN})
            assert refused.status == 404, token
        redis_server.stop()  # away: no answer, no error
        away = await client.get("/.well-known/acme-challenge/tok-1", headers={"Host": DOMAIN})
        assert away.status == 404


async def test_a_certificate_in_redis_is_checked_before_it_is_loaded(
    tmp_path: Path, fleet: Fleet, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """One for another name, another CA's or whose key is not its own is not written to disk
    (and so not served); a good one is."""
    shared = shared_state(fleet, tmp_path)
    redis = redis_server.client()
    authority = trustme.CA()
    other_ca = "https://acme-staging.example/directory"
    cases = [(("other.aioserver.test",), None, None), ((DOMAIN,), new_key_pem(), None), ((DOMAIN,), None, other_ca)]
    for names, key, directory in [*cases, ((DOMAIN,), None, None)]:
        leaf = authority.issue_cert(*names)
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        redis.delete(CERTIFICATE)
        redis.hset(
            CERTIFICATE,
            mapping={
                "chain": chain,
                "key": key or leaf.private_key_pem.bytes(),
                "directory": directory or shared.settings.directory,
                "not_after": int(Leaf.from_pem(chain).not_after.timestamp()),
                "fingerprint": hashlib.sha256(chain).hexdigest(),
            },
        )
        loaded = await shared.sync(in_thread)
        if (names, key, directory) in cases:
            assert loaded is False and not Path(shared.state.chain_file).exists()
    assert loaded is True and Path(shared.state.chain_file).read_bytes() == chain
    assert Path(shared.state.key_file).read_bytes() == leaf.private_key_pem.bytes()
    assert f"does not name {DOMAIN}" in caplog.text and "does not match its key" in caplog.text
    assert "PRIVATE KEY" not in caplog.text


async def in_thread(function: Callable[..., T], *args: object) -> T:
    return await asyncio.to_thread(function, *args)


@LOOPS
def test_redis_away_a_certificate_about_to_expire_is_renewed_alone(
    loop: str, tmp_path: Path, redis_server: RedisServer
) -> None:
    """Certificates of 60 s, Redis killed: no renewal when a third of the life is left (40 s
    in), a renewal by the host alone in the last tenth (54 s in): a duplicate beats an expiry."""
    with Pebble(tmp_path / "pebble", validity=60) as pebble:
        host = Host("first", tmp_path, pebble.http_port)
        with start(host, pebble, redis_server, loop, HTTPS) as server:
            old = pebble.served_certificate(host.port, DOMAIN)
            redis_server.stop()
            away = wait_for_log(server, r"a certificate for \S+ is due, but redis is away", timeout=60)[0]
            alone = wait_for_log(server, r"redis is away and the certificate for \S+ expires at \S+", timeout=60)[0]
            assert away.start() < alone.start()
            wait_for_log(server, OBTAINED, count=2, timeout=60)
            eventually(lambda: pebble.served_certificate(host.port, DOMAIN).serial != old.serial, timeout=30)
            new = pebble.served_certificate(host.port, DOMAIN)
            # Renewed in the last tenth of the old one's life, not when it was due (40 s in). The
            # order starts 54 s in; on a loaded machine it was seen to end on the old one's last
            # second (certificate times have one-second resolution): a few seconds' slack after.
            last_tenth = old.not_after - old.lifetime / 10 - datetime.timedelta(seconds=2)
            assert last_tenth < new.not_before <= old.not_after + datetime.timedelta(seconds=5)
            assert issued(pebble) == [old.serial, new.serial]


@LOOPS
def test_a_full_state_directory_loads_the_fleets_certificate_once_there_is_room(
    loop: str, tmp_path: Path, pebble: Pebble, redis_server: RedisServer
) -> None:
    """A host whose disk is full when the fleet's certificate comes: the log says why (no
    traceback, no minute lost to a restart of the work), and room again, it is loaded."""
    first, second = Host("first", tmp_path, pebble.http_port), Host("second", tmp_path, free_port())
    with start(first, pebble, redis_server, loop, HTTPS):
        serial = pebble.served_certificate(first.port, DOMAIN).serial
        redis_server.stop()  # so that the second finds nothing at start-up, and its disk can be filled first
        away = rf"acme: a certificate for {re.escape(DOMAIN)} is due, but redis is away"
        with small_disk(second.state) as (prefix, seen):
            with start(second, pebble, redis_server, loop, away, prefix=prefix) as server:
                filler = fill(seen(server.process.pid))
                redis_server.start()  # empty: the first stores its certificate again
                wait_for_log(
                    server, r"acme: cannot write the fleet's certificate .*No space left on device", timeout=60
                )
                time.sleep(12)  # past the 10 s after Redis's return: the host would order, if it did
                assert not re.search(ORDERING, log_of(server))  # the fleet has a certificate
                assert len(re.findall("cannot write the fleet's certificate", log_of(server))) == 1  # said once
                filler.unlink()
                wait_for_log(server, HTTPS, timeout=30)
                assert pebble.served_certificate(second.port, DOMAIN).serial == serial
                assert "Traceback" not in log_of(server) and not re.search(ORDERING, log_of(server))
    assert len(issued(pebble)) == 1
