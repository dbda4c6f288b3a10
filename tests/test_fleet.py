"""--redis: a fleet of aioserver processes behind nginx, sharing the auth throttle through a real
redis-server (tests/redisserver.py), killed and restarted under load. Every server test here
takes a ``loop`` parameter: the redis extra is in the test venv only."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from redisserver import PASSWORD, RedisServer
from test_proxy import nginx_config

from aioserver.fleet import PREFIX, Fleet, RedisURL, Unavailable, parse_redis_url, redacted

from conftest import TOKEN, TOKEN_HASH, PemFiles, Server, free_port

LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
WRONG = "wrong-token-0cc175b9c0f1b6a8"
LIMIT = 10  # auth.FailureThrottle's: failures per client per window
WHERE = r"WARNING aioserver\.fleet: redis at redis://:\*\*\*@127\.0\.0\.1:\d+/0"
AWAY = WHERE + r" is away \("
BACK = WHERE + r" is back: the fleet shares its state again$"


def call(
    port: int,
    token: str | None,
    *,
    source: str = "127.0.0.1",
    client: str | None = None,
    context: ssl.SSLContext | None = None,
    path: str = "/workflow",
) -> tuple[int, dict[str, str], bytes]:
    """One request on a connection of its own from loopback address ``source``; ``client``: the
    address a trusted proxy (this test, from 127.0.0.1) says it forwards for."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if client is not None:
        headers["X-Forwarded-For"] = client
    if context is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    else:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=30, context=context, source_address=(source, 0)
        )
    try:
        body = json.dumps({"name": "echo", "elements": ["hi"]}) if path == "/workflow" else None
        connection.request("POST" if body else "GET", path, body, headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def wait_for(condition: Callable[[], object], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def listening(redis_server: RedisServer, processes: int, database: int = 0) -> None:
    """Wait until ``processes`` processes listen to the news of clients at the limit."""
    channel = f"{PREFIX}throttled:{database}"

    def subscribers() -> int:
        with redis_server.client() as client:
            return int(dict(client.pubsub_numsub(channel))[channel])

    # Generous: five processes starting at once on a loaded two-core machine (CI runs 4 tests at a time).
    wait_for(lambda: subscribers() == processes, f"{processes} processes listening", timeout=60)


def lines(servers: list[Server], pattern: str) -> list[str]:
    return [line for server in servers for line in server.log if re.search(pattern, line)]


@pytest.fixture
def nginx(tmp_path: Path, pem_files: PemFiles) -> Iterator[Callable[[list[int]], int]]:
    """``start(ports)``: conf/nginx.conf (one process) with an upstream of these aioserver ports
    (round-robin, nginx's default); returns its HTTPS port. Stopped gracefully at the end."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(ports: list[int]) -> int:
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        port = free_port()
        upstream = ";\n        server ".join(f"127.0.0.1:{each}" for each in ports)
        config = nginx_config(prefix, port, upstream, pem_files)
        processes.append(subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(config), "-e", "stderr"]))

        def answers() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                assert processes[0].poll() is None, "nginx exited"
                return False

        wait_for(answers, "nginx listening", 10)
        return port

    yield start
    for process in processes:
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the URL: parsed, and its password never shown


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1",
        "redis://:pw@db.example:6380/2",
        "rediss://user:pw@db.example/0",
        "unix:///run/redis/redis.sock",
        "unix:///run/redis/redis.sock?db=1&password=pw",
    ],
)
def test_redis_urls_that_parse(url: str) -> None:
    parsed = parse_redis_url(url)
    assert parsed == RedisURL(url) and parsed.url == url


@pytest.mark.parametrize(
    "url, problem",
    [
        ("", "expected a redis://, rediss:// or unix:// URL"),
        ("http://:s3cr3t-pw@db", "got a http one"),
        ("redis://:s3cr3t-pw@db:99999", "does not parse"),
        ("redis://:s3cr3t-pw@db:0", "a port from 1 to 65535"),
        ("redis://:s3cr3t-pw@db/zero", "with a database number"),
        ("redis://:s3cr3t-pw@", "no host"),
        ("unix://:s3cr3t-pw@", "expected unix:///path/to/redis.sock"),
    ],
)
def test_redis_urls_refused_without_their_password(url: str, problem: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_redis_url(url)
    assert problem in str(refused.value)
    assert "s3cr3t" not in str(refused.value)


@pytest.mark.parametrize(
    "url, shown",
    [
        ("redis://:s3cr3t-pw@db:6379/1", "redis://:***@db:6379/1"),
        ("rediss://admin:s3cr3t-pw@db/0", "rediss://admin:***@db/0"),
        ("unix:///run/redis.sock?db=2&password=s3cr3t-pw", "unix:///run/redis.sock?db=2&password=%2A%2A%2A"),
        ("redis://db:6379/0", "redis://db:6379/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
        ("redis://s3cr3t-pw@db:6379/0", "redis://***@db:6379/0"),  # a password without its colon
    ],
)
def test_a_redis_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert redacted(url) == str(RedisURL(url)) == shown
    assert "s3cr3t" not in repr(RedisURL(url))


# -- --check connects


def check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aioserver", "--check", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_check_says_redis_answers(redis_server: RedisServer) -> None:
    done = check("--redis", redis_server.url)
    assert done.returncode == 0, done.stderr
    assert re.search(
        rf"^  redis: redis://:\*\*\*@127\.0\.0\.1:{redis_server.port}/0 answers \(Redis 7\.0\.\d+\)\nOK$",
        done.stdout,
        re.M,
    ), done.stdout
    assert PASSWORD not in done.stdout + done.stderr


@pytest.mark.parametrize("given", ["option", "environment", "config"])
def test_check_fails_naming_the_key_when_redis_does_not_answer(
    given: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    redis_server.stop()
    url = redis_server.url
    if given == "option":
        done, where = check("--redis", url), "command line: --redis"
    elif given == "environment":
        done, where = check(env={"REDIS_URL": url}), "environment: REDIS_URL"
    else:
        config = tmp_path / "config.yml"
        config.write_text(f"server:\n  redis: {url}\n")
        done, where = check("--config", str(config)), f"{config}: server.redis"
    assert done.returncode == 2
    assert f"aioserver: error: {where}: no answer: redis://:***@127.0.0.1:{redis_server.port}/0: ConnectionError" in (
        done.stderr
    ), done.stderr
    assert "Traceback" not in done.stderr and PASSWORD not in done.stdout + done.stderr


def test_check_with_a_wrong_password_shows_neither(redis_server: RedisServer) -> None:
    url = redis_server.url.replace(PASSWORD, "not-the-password-77")
    done = check("--redis", url)
    assert done.returncode == 2
    assert "AuthenticationError" in done.stderr, done.stderr
    assert "not-the-password-77" not in done.stdout + done.stderr and PASSWORD not in done.stdout + done.stderr


# -- a Redis that answers PING but refuses the fleet's commands


FLEET_USER_PASSWORD = "fleet-user-pw-92eb5c1f"


def acl_user(redis_server: RedisServer, rules: str) -> str:
    """The URL of a new ACL user of ``redis_server`` with ``rules`` (ACL SETUSER's)."""
    with redis_server.client() as client:
        client.execute_command("ACL", "SETUSER", "fleet", "reset", "on", f">{FLEET_USER_PASSWORD}", *rules.split())
    return f"redis://fleet:{FLEET_USER_PASSWORD}@127.0.0.1:{redis_server.port}/0"


@LOOPS
@pytest.mark.parametrize(
    "rules",
    [
        "~aioserver:* +@all",  # Redis 7's acl-pubsub-default: no channel, so no news published
        "~* &* +@all -evalsha",  # no script
    ],
)
def test_a_redis_that_refuses_the_fleets_commands_is_away_and_stays_away(
    loop: str, rules: str, redis_server: RedisServer
) -> None:
    """A Redis that answers PING but refuses what the fleet asks of it (an ACL user short of a
    right; a read-only replica, a full memory under noeviction fail the same way) is away from
    the start, for --check and for the server: it used to be "back" at each probe's PING and
    "away" again at the next failure (a pair of lines every few seconds under attack, the gauge
    flapping, and each process's failures counted alone meanwhile)."""
    url = acl_user(redis_server, rules)
    done = check("--redis", url)
    assert done.returncode == 2, done.stdout
    assert re.search(r"--redis: .*redis://fleet:\*\*\*@127\.0\.0\.1:\d+/0: NoPermissionError: ", done.stderr), (
        done.stderr
    )
    assert FLEET_USER_PASSWORD not in done.stdout + done.stderr and "Traceback" not in done.stderr

    args = ("--redis", url, "--loop", loop, "--trusted-proxies", "127.0.0.1")
    with Server(*args, env={"TOKEN": TOKEN_HASH}) as server:
        for round in range(2):
            statuses = [call(server.port, WRONG, client=f"10.6.{round}.1")[0] for _ in range(LIMIT + 2)]
            assert statuses == [401] * LIMIT + [429] * 2  # counted by the process, as with Redis away
            assert call(server.port, TOKEN, client=f"10.6.{round}.2")[0] == 200
            time.sleep(6)  # more than a probe's interval while Redis is up (5 s)
    log = "".join(server.log)
    away, back = (pattern.replace("redis://:", "redis://fleet:") for pattern in (AWAY, BACK))
    assert len(lines([server], away)) == 1 and not lines([server], back), log
    assert re.search(away + r"NoPermissionError: ", log), log
    assert FLEET_USER_PASSWORD not in log and "Traceback" not in log


@LOOPS
def test_the_acl_the_readme_gives_serves_the_fleet(loop: str, redis_server: RedisServer) -> None:
    url = acl_user(redis_server, "~aioserver:* &aioserver:* +@all")  # README: A fleet through Redis
    done = check("--redis", url)
    assert done.returncode == 0 and " answers (Redis 7" in done.stdout, done.stderr
    args = ("--redis", url, "--loop", loop, "--trusted-proxies", "127.0.0.1")
    with Server(*args, env={"TOKEN": TOKEN_HASH}) as first, Server(*args, env={"TOKEN": TOKEN_HASH}) as second:
        listening(redis_server, 2)
        assert [call(first.port, WRONG, client="10.6.9.1")[0] for _ in range(LIMIT)] == [401] * LIMIT
        assert call(second.port, TOKEN, client="10.6.9.1")[0] == 429  # the news heard
        time.sleep(6)  # a probe at least
    assert not lines([first, second], "is away"), "".join(first.log + second.log)


@pytest.mark.parametrize("query", ["?foo=1", "?db=x", "?socket_timeout=soon"])
def test_a_redis_url_whose_query_redis_py_refuses_is_refused_at_start(query: str, redis_server: RedisServer) -> None:
    """Such a URL used to pass: --check printed a traceback, and a server served with it and
    answered every auth failure with 500 (the connection could not be made)."""
    url = redis_server.url + query
    done = check("--redis", url)
    assert done.returncode == 2
    assert "aioserver: error: command line: --redis: expected a redis://" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and PASSWORD not in done.stdout + done.stderr
    try:
        served = subprocess.run(
            [sys.executable, "-m", "aioserver", "--port", "0", "--redis", url],
            capture_output=True,
            text=True,
            timeout=20,
            env={"PATH": "/usr/bin:/bin", "TOKEN": TOKEN_HASH},
        )
    except subprocess.TimeoutExpired:
        pytest.fail("it served")
    assert served.returncode == 2 and "--redis: expected a redis://" in served.stderr, served.stderr
    assert "Traceback" not in served.stderr and PASSWORD not in served.stderr


@LOOPS
def test_a_flood_of_failures_from_many_clients_does_not_make_redis_away(loop: str, redis_server: RedisServer) -> None:
    """Hundreds of clients failing at once: each failure is a call to Redis, and each call in flight
    took a connection; past redis-py's pool (100 connections in redis-py 8; unbounded before, as
    many file descriptors and Redis clients as calls) a call failed, and the process took Redis
    for away: an attacker's throwaway addresses switched the fleet to counting per process, and
    wrote two log lines, at will. Calls now wait for a connection of the process's own few."""
    clients = 400
    args = ("--redis", redis_server.url, "--loop", loop, "--trusted-proxies", "127.0.0.1")
    with Server(*args, env={"TOKEN": TOKEN_HASH}) as server:
        body = json.dumps({"name": "echo", "elements": ["hi"]}).encode()
        connections = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(clients)]
        try:
            for i, connection in enumerate(connections):  # all sent before any answer is read
                head = (
                    f"POST /workflow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {WRONG}\r\n"
                    f"X-Forwarded-For: 10.7.{i // 250}.{i % 250 + 1}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                )
                connection.sendall(head.encode() + body)
            statuses = Counter()
            for connection in connections:
                answer = b""
                while chunk := connection.recv(65536):
                    answer += chunk
                statuses[answer.split(b" ", 2)[1]] += 1
        finally:
            for connection in connections:
                connection.close()
        assert statuses == {b"401": clients}
        with redis_server.client() as client:
            assert len(client.keys(f"{PREFIX}throttle:10.7.*")) == clients  # each counted in Redis
        time.sleep(1)  # a probe's time, had it been found away
    log = "".join(server.log)
    assert not lines([server], AWAY) and "Traceback" not in log, log


# -- one process: Redis away, and back


@LOOPS
def test_redis_away_and_back_is_logged_once_each_and_no_request_fails(loop: str, redis_server: RedisServer) -> None:
    args = ("--redis", redis_server.url, "--loop", loop, "--trusted-proxies", "127.0.0.1")
    with Server(*args, env={"TOKEN": TOKEN_HASH}) as server:
        assert call(server.port, WRONG, client="10.0.0.1")[0] == 401
        assert redis_server.client().get(f"{PREFIX}throttle:10.0.0.1") == "1"  # counted in Redis

        redis_server.stop()
        statuses = [call(server.port, WRONG, client="10.0.0.2")[0] for _ in range(12)]
        statuses += [call(server.port, TOKEN, client="10.0.0.3")[0] for _ in range(3)]
        # Counted by the process alone: its limit, as without --redis; the right token served.
        assert statuses == [401] * LIMIT + [429] * 2 + [200] * 3
        wait_for(lambda: lines([server], AWAY), "the away line")

        redis_server.start()
        wait_for(lambda: lines([server], BACK), "the back line")
        assert call(server.port, WRONG, client="10.0.0.4")[0] == 401
        assert redis_server.client().get(f"{PREFIX}throttle:10.0.0.4") == "1"  # counted in Redis again
        for _ in range(3):
            assert call(server.port, TOKEN, client="10.0.0.5")[0] == 200
    log = "".join(server.log)
    assert len(lines([server], AWAY)) == 1 and len(lines([server], BACK)) == 1, log
    assert re.search(AWAY + r"ConnectionError: .*\): auth failures are counted by each process", log), log
    assert PASSWORD not in log and "Traceback" not in log


@LOOPS
def test_redis_restarted_between_calls_is_away_and_back_once(loop: str, redis_server: RedisServer) -> None:
    """Restarted while no call was under way, Redis has closed every connection the process
    holds: the first call after finds it away, and once it is back, no other closed connection
    fails a call (each used to, logging it away again)."""
    args = ("--redis", redis_server.url, "--loop", loop, "--trusted-proxies", "127.0.0.1")

    def failures_at_once(clients: list[str]) -> None:
        threads = [threading.Thread(target=call, args=(server.port, WRONG), kwargs={"client": c}) for c in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    with Server(*args, env={"TOKEN": TOKEN_HASH}) as server:
        failures_at_once([f"10.3.0.{i}" for i in range(8)])  # as many connections, at most
        redis_server.stop()
        redis_server.start()
        assert call(server.port, WRONG, client="10.3.1.0")[0] == 401  # on a closed connection
        wait_for(lambda: lines([server], BACK), "the back line")
        failures_at_once([f"10.3.2.{i}" for i in range(8)])
        with redis_server.client() as client:
            assert sorted(client.keys(f"{PREFIX}throttle:10.3.2.*")) == [
                f"{PREFIX}throttle:10.3.2.{i}" for i in range(8)
            ]
    assert len(lines([server], AWAY)) == len(lines([server], BACK)) == 1, "".join(server.log)


# -- the throttle fleet-wide


@LOOPS
def test_the_fleet_counts_one_window_and_every_process_hears_the_limit(loop: str, redis_server: RedisServer) -> None:
    """Two processes: the failures one counts, the other knows; the tenth is news to every process."""
    args = ("--redis", redis_server.url, "--loop", loop, "--trusted-proxies", "127.0.0.1")
    env = {"TOKEN": TOKEN_HASH}
    with Server(*args, env=env) as first, Server(*args, env=env) as second:
        listening(redis_server, 2)
        assert [call(first.port, WRONG, client="10.1.0.1")[0] for _ in range(LIMIT - 1)] == [401] * (LIMIT - 1)
        assert redis_server.client().get(f"{PREFIX}throttle:10.1.0.1") == str(LIMIT - 1)
        assert 55_000 < redis_server.client().pttl(f"{PREFIX}throttle:10.1.0.1") <= 60_000
        assert call(second.port, TOKEN, client="10.1.0.1")[0] == 200  # nine: it may still try
        # The tenth failure, on the second: a 401, and the news of the limit reaches the first,
        # which had counted nine and now refuses the right token before checking it.
        assert call(second.port, WRONG, client="10.1.0.1")[0] == 401
        for server in (second, first):
            status, headers, body = call(server.port, TOKEN, client="10.1.0.1")
            assert status == 429 and json.loads(body) == {"error": "too many failed authorizations"}
            assert 40 <= int(headers["retry-after"]) <= 60  # the key's time left
        assert redis_server.client().get(f"{PREFIX}throttle:10.1.0.1") == str(LIMIT)  # no guess checked since


@LOOPS
def test_a_service_with_a_database_of_its_own_hears_only_its_own_news(loop: str, redis_server: RedisServer) -> None:
    """Two services on one Redis, databases 0 and 1: a client at the limit on one is not on the
    other (Redis's channels are the whole server's; the news goes on the database's)."""
    env = {"TOKEN": TOKEN_HASH}
    other = redis_server.url.removesuffix("/0") + "/1"
    with (
        Server("--redis", redis_server.url, "--loop", loop, "--trusted-proxies", "127.0.0.1", env=env) as first,
        Server("--redis", other, "--loop", loop, "--trusted-proxies", "127.0.0.1", env=env) as second,
    ):
        listening(redis_server, 1, 0)
        listening(redis_server, 1, 1)
        assert [call(first.port, WRONG, client="10.4.0.1")[0] for _ in range(LIMIT + 1)] == [401] * LIMIT + [429]
        time.sleep(0.5)  # news, if any, heard
        assert call(second.port, TOKEN, client="10.4.0.1")[0] == 200
        assert call(second.port, WRONG, client="10.4.0.1")[0] == 401
        with redis_server.client() as client:  # one connection: SELECT 1 then GET
            assert client.pipeline(transaction=False).select(1).get(f"{PREFIX}throttle:10.4.0.1").execute() == [
                True,
                "1",
            ]


@LOOPS
def test_a_failure_past_the_fleet_limit_is_429_and_a_process_counts_one_at_a_time(
    loop: str, redis_server: RedisServer
) -> None:
    """A process that has not heard of a client at the limit (its news missed: the key is set
    here) checks one more token: its failure, past the limit, is 429, not 401.

    A request of a client whose failure is being counted waits for that count before its token
    is checked: else a burst sent at once to a process that has not heard of the client would
    have every token checked before the first count came back (here: the right token passes).
    """
    args = ("--redis", redis_server.url, "--loop", loop, "--trusted-proxies", "127.0.0.1")
    with Server(*args, env={"TOKEN": TOKEN_HASH}) as server:
        redis_server.client().set(f"{PREFIX}throttle:10.1.0.2", LIMIT, px=59_000)
        status, headers, body = call(server.port, WRONG, client="10.1.0.2")
        assert status == 429 and json.loads(body) == {"error": "too many failed authorizations"}
        assert 50 <= int(headers["retry-after"]) <= 59, headers
        assert call(server.port, TOKEN, client="10.1.0.2")[0] == 429
        assert redis_server.client().get(f"{PREFIX}throttle:10.1.0.2") == str(LIMIT + 1)

        # The same while Redis is kept busy (a script spinning 0.6 s): the right tokens sent
        # while the failure is being counted wait for its count.
        redis_server.client().set(f"{PREFIX}throttle:10.1.0.3", LIMIT, px=59_000)
        busy = threading.Thread(target=spin, args=(redis_server, 0.6))
        busy.start()
        time.sleep(0.1)  # the script runs
        results: dict[str, int] = {}
        wrong = threading.Thread(target=lambda: results.update(wrong=call(server.port, WRONG, client="10.1.0.3")[0]))
        wrong.start()
        time.sleep(0.2)  # its failure is being counted
        rights = [call(server.port, TOKEN, client="10.1.0.3")[0] for _ in range(3)]
        wrong.join()
        busy.join()
        assert results == {"wrong": 429} and rights == [429] * 3
        assert redis_server.client().get(f"{PREFIX}throttle:10.1.0.3") == str(LIMIT + 1)

        # A key found with a longer life than the window (not ours) locks a client out one window only.
        redis_server.client().set(f"{PREFIX}throttle:10.1.0.4", 50, ex=86400)
        status, headers, _ = call(server.port, WRONG, client="10.1.0.4")
        assert status == 429 and 50 <= int(headers["retry-after"]) <= 60, headers
        assert 55_000 < redis_server.client().pttl(f"{PREFIX}throttle:10.1.0.4") <= 60_000


def spin(redis_server: RedisServer, seconds: float) -> None:
    """Keep Redis busy (single-threaded: every other command waits) for ``seconds``."""
    script = """
    local start = redis.call('TIME')
    local stop = start[1] * 1000000 + start[2] + tonumber(ARGV[1])
    repeat local now = redis.call('TIME') until now[1] * 1000000 + now[2] >= stop
    return 1
    """
    with redis_server.client() as client:
        client.eval(script, 0, int(seconds * 1_000_000))


@LOOPS
def test_a_fleet_behind_nginx_throttles_as_one_service(
    loop: str,
    redis_server: RedisServer,
    nginx: Callable[[list[int]], int],
    client_ssl_ctx: ssl.SSLContext,
) -> None:
    """Three aioserver hosts (two with --workers 2: five processes) behind an nginx upstream.

    The bound: once the fleet counts 10 failures, the script publishes the news and every
    process refuses the client, before checking any token; a process that has not heard yet
    checks one more token at most (whose failure, past the limit, is 429 and teaches it). So a
    client gets at most 10 + (5 - 1) = 14 guesses checked a minute, 10 in practice (the news
    travels as fast as the reply), against 10 x 5 = 50 with per-process counting.
    """
    processes = 5
    args = ("--redis", redis_server.url, "--loop", loop, "--trusted-proxies", "127.0.0.1")
    env = {"TOKEN": TOKEN_HASH}
    with (
        Server(*args, env=env) as single,
        Server(*args, "--workers", "2", env=env, listeners=2) as pair,
        Server(*args, "--workers", "2", env=env, listeners=2) as other_pair,
    ):
        servers = [single, pair, other_pair]
        port = nginx([server.port for server in servers])

        def through_nginx(token: str, source: str) -> int:
            return call(port, token, source=source, context=client_ssl_ctx)[0]

        assert through_nginx(TOKEN, "127.0.0.2") == 200
        listening(redis_server, processes)

        # 1. A client failing through nginx: 429 after exactly 10 failures in total.
        statuses: list[int] = []
        while 429 not in statuses and len(statuses) < 60:
            statuses.append(through_nginx(WRONG, "127.0.0.3"))
        assert statuses == [401] * LIMIT + [429], statuses
        first_failures = statuses.count(401)
        # The right token now, from the same client: every process has heard the news (the
        # script publishes it with the tenth count) and refuses it before checking any token.
        after: Counter[int] = Counter()

        def every_process_refuses() -> bool:
            after.clear()
            after.update(through_nginx(TOKEN, "127.0.0.3") for _ in range(9))  # three rounds of nginx's
            assert set(after) <= {200, 429}, after
            return after == {429: 9}

        wait_for(every_process_refuses, "every process refusing the client", timeout=10)
        assert call(single.port, TOKEN, client="127.0.0.3")[0] == 429
        # More guesses: all refused; the ones checked (counted in Redis) within the bound: the
        # limit, and those other processes check before the news reaches them (one each at most).
        assert {through_nginx(WRONG, "127.0.0.3") for _ in range(30)} == {429}
        checked = int(redis_server.client().get(f"{PREFIX}throttle:127.0.0.3") or 0)
        assert LIMIT <= checked <= LIMIT + processes - 1, checked

        # 2. Redis killed mid-run, then restarted: no request fails. Each round a right token and
        # a wrong one (nginx's round turns over the three hosts); while Redis is away every
        # other wrong one is a new client's, counted by each process alone.
        during: list[tuple[str, str, int]] = []

        def round_of_requests(phase: str, wrong_client: str = "127.0.0.5") -> None:
            during.append((phase, "right", through_nginx(TOKEN, "127.0.0.4")))
            during.append((phase, wrong_client, through_nginx(WRONG, wrong_client)))

        for _ in range(15):
            round_of_requests("before")
        redis_server.stop()
        for i in range(36):
            round_of_requests("away", "127.0.0.7" if i % 2 else "127.0.0.5")
            if i == 29:
                wait_for(lambda: len(lines(servers, AWAY)) == processes, "every process's away line")
        redis_server.start()
        wait_for(lambda: len(lines(servers, BACK)) == processes, "every process's back line")
        for _ in range(15):
            round_of_requests("back")
        rights = Counter((phase, status) for phase, kind, status in during if kind == "right")
        assert rights == {("before", 200): 15, ("away", 200): 36, ("back", 200): 15}, rights
        known = Counter((phase, status) for phase, kind, status in during if kind == "127.0.0.5")
        # The fleet's 10 before the kill, then 429; while Redis is away, each process keeps what it
        # knew: the single host (a third of the round) knew (it had one of the five past the
        # limit); a worker that never heard of the client would count it alone.
        assert (known[("before", 401)], known[("before", 429)]) == (LIMIT, 5), known
        assert known[("away", 429)] >= 6 and known[("back", 429)] >= 5, known
        assert set(status for _, status in known) == {401, 429}, known
        # A new client while Redis is away: each process counts alone, up to 10 (18 < 5 x 10).
        new = Counter(status for _, kind, status in during if kind == "127.0.0.7")
        assert new == {401: 18}, new

        # 3. Redis back (empty): the fleet counts again, for a new client, and every process
        # listens again (from a second after it found Redis back).
        listening(redis_server, processes)
        statuses = []
        while 429 not in statuses and len(statuses) < 60:
            statuses.append(through_nginx(WRONG, "127.0.0.6"))
        assert statuses == [401] * LIMIT + [429], statuses
        # Listening again: every process hears the news, a new subscription's.
        wait_for(lambda: {through_nginx(TOKEN, "127.0.0.6") for _ in range(9)} == {429}, "the news heard", 10)
        assert LIMIT <= int(redis_server.client().get(f"{PREFIX}throttle:127.0.0.6") or 0) <= LIMIT + processes - 1

        report = {
            "401s before the first 429": first_failures,
            "after the restart": statuses.count(401),
            "guesses checked in the window (bound 14)": checked,
            "right token after the 429": dict(after),
            "requests while Redis was away": sum(1 for phase, _, _ in during if phase == "away"),
            "failed requests": sum(1 for _, _, status in during if status not in (200, 401, 429)),
            "known client's": dict(known),
            "new client's while away": dict(new),
        }
        print(f"fleet counts ({loop}): {report}")
    log = "".join(line for server in servers for line in server.log)
    assert len(lines(servers, AWAY)) == len(lines(servers, BACK)) == processes, log
    assert PASSWORD not in log and "Traceback" not in log and " ERROR " not in log, log


# -- the metric


@pytest.mark.parametrize("loop, workers", [("asyncio", "1"), ("uvloop", "2")])
def test_the_redis_up_gauge_follows_redis(loop: str, workers: str, redis_server: RedisServer) -> None:
    args = ("--redis", redis_server.url, "--metrics", "--loop", loop, "--workers", workers)

    def redis_up() -> float:
        status, _, body = call(server.port, None, path="/metrics")
        assert status == 200, body
        found = [
            sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
            if sample.name == "aioserver_redis_up"
        ]
        assert len(found) == 1, body  # one series, whichever worker answers
        return found[0]

    with Server(*args) as server:
        assert redis_up() == 1, "".join(server.log)
        redis_server.stop()
        wait_for(lambda: redis_up() == 0, "aioserver_redis_up 0")
        redis_server.start()
        # Under --workers, the lowest of the workers': 1 once every one has found Redis back.
        wait_for(lambda: redis_up() == 1, "aioserver_redis_up 1")
    assert PASSWORD not in "".join(server.log)


@LOOPS
def test_failures_do_not_wait_for_a_redis_that_hangs(loop: str, redis_server: RedisServer) -> None:
    """Redis stopped (SIGSTOP: connections open, no answer) mid-run: the failures under way wait
    for the time limit (1 s), the others are counted locally at once until the probe finds it back."""
    args = ("--redis", redis_server.url, "--loop", loop, "--trusted-proxies", "127.0.0.1")
    with Server(*args, env={"TOKEN": TOKEN_HASH}) as server:
        assert call(server.port, WRONG, client="10.2.0.1")[0] == 401
        assert redis_server.process is not None
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            assert call(server.port, WRONG, client="10.2.0.2")[0] == 401  # waits for the time limit
            assert time.monotonic() - started < 5
            wait_for(lambda: lines([server], AWAY), "the away line")
            slowest = 0.0
            for i in range(24):  # over some 3 s: the probe tries (and waits) three times meanwhile
                started = time.monotonic()
                assert call(server.port, WRONG, client=f"10.2.1.{i}")[0] == 401
                slowest = max(slowest, time.monotonic() - started)
                time.sleep(0.1)
            assert call(server.port, TOKEN, client="10.2.0.3")[0] == 200
            # None waited for Redis's time limit (1 s): they did not ask it.
            assert slowest < 0.8, slowest
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        wait_for(lambda: lines([server], BACK), "the back line")
        assert call(server.port, WRONG, client="10.2.0.4")[0] == 401
        assert redis_server.client().get(f"{PREFIX}throttle:10.2.0.4") == "1"
    assert len(lines([server], AWAY)) == len(lines([server], BACK)) == 1, "".join(server.log)


STARTING_WORKER = """
import sys
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from aioserver.fleet import Fleet, parse_redis_url
from aioserver.metrics import Metrics, WorkerFiles

files = WorkerFiles()
WorkerFiles.serve_as(0)
fleet = Fleet(parse_redis_url(sys.argv[1]))
metrics = Metrics([], None, files.path, fleet)  # made, its app not started yet
text = generate_latest(metrics.store.registry).decode()  # as another worker's scrape reads the files
files.remove()
print([s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == "aioserver_redis_up"])
"""


def test_a_worker_still_starting_does_not_pull_the_gauge_down(redis_server: RedisServer) -> None:
    """Under --workers the gauge is the lowest of the workers' (livemin): a worker whose metrics
    are made but whose app has not started yet counts with its value, not a 0 (a scrape that
    the other worker answered then said Redis was away)."""
    done = subprocess.run(
        [sys.executable, "-c", STARTING_WORKER, redis_server.url], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[1.0]", done.stdout


async def test_a_call_cut_off_by_the_stop_says_nothing_of_redis(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The process's stop closes its link with a call in flight (the probe, every 5 s: aligned
    with the schedule ticks, it was often in flight at a stop right after a tick): that call
    used to log Redis away, after the "stopped" line."""
    assert redis_server.process is not None
    fleet = Fleet(parse_redis_url(redis_server.url))
    await fleet.probe()  # connected
    redis_server.process.send_signal(signal.SIGSTOP)  # the call in flight stays in flight
    try:
        probing = asyncio.create_task(fleet.probe())
        await asyncio.sleep(0.2)
        await fleet.close()
        with pytest.raises(Unavailable):
            await probing
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert "is away" not in caplog.text, caplog.text
