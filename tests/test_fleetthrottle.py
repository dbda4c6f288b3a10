"""fleetthrottle.FleetThrottle in-process, against a real redis-server with a password (the
``redis_server`` fixture): the fleet's count, its script, the news on the channel, and the local
fallback while Redis is away. Each FleetThrottle has a Fleet of its own, as each process has.
tests/test_fleet.py drives the same through real server processes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web
from redisserver import PASSWORD, REDIS_SERVER, RedisServer

from aioserver.fleet import PREFIX, Fleet, parse_redis_url
from aioserver.fleetthrottle import FleetThrottle

CLIENT = "192.0.2.7"
KEY = f"{PREFIX}throttle:{CLIENT}"
CHANNEL = f"{PREFIX}throttled:0"


@contextlib.asynccontextmanager
async def processes(server: RedisServer, count: int, **options: float) -> AsyncIterator[list[FleetThrottle]]:
    """``count`` processes' throttles, each with its own link to the fleet's Redis (as app.py builds them)."""
    fleets = [Fleet(parse_redis_url(server.url)) for _ in range(count)]
    try:
        yield [FleetThrottle(fleet, **options) for fleet in fleets]  # type: ignore[arg-type]
    finally:
        for fleet in fleets:
            await fleet.close()


@contextlib.asynccontextmanager
async def listening(server: RedisServer, throttle: FleetThrottle) -> AsyncIterator[asyncio.Task[None]]:
    """``throttle`` listening to the news (its listen()), subscribed once this is entered."""
    task = asyncio.create_task(throttle.listen())
    try:
        await subscribed(server, 1)
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def eventually(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.02)


async def subscribed(server: RedisServer, count: int) -> None:
    def listeners() -> int:
        with server.client() as client:
            return int(dict(client.pubsub_numsub(CHANNEL))[CHANNEL])

    await eventually(lambda: listeners() == count, f"{count} listener(s) on {CHANNEL}")


def remaining(throttle: FleetThrottle, client: str = CLIENT) -> float:
    """Seconds left in ``client``'s window, as this process knows it."""
    count, started = throttle._failures[client]
    return started + throttle.window - time.monotonic()


def local_count(throttle: FleetThrottle, client: str = CLIENT) -> int:
    return throttle._failures[client][0]


# -- the fleet's count


async def test_two_processes_share_one_count_and_the_limit_is_the_fleets(redis_server: RedisServer) -> None:
    async with processes(redis_server, 2) as (a, b):
        assert (a.limit, a.window) == (10, 60.0)  # app.py's FleetThrottle(fleet): 10 a minute
        for n in range(9):
            assert await (a, b)[n % 2].count(CLIENT) == 0
        with redis_server.client() as client:
            assert client.get(KEY) == "9"
            assert 59_000 < client.pttl(KEY) <= 60_000
        assert a.retry_after(CLIENT) == b.retry_after(CLIENT) == 0  # 9: the next token is still checked
        assert local_count(a) == 9 and local_count(b) == 8  # each has the fleet's count of its last reply
        assert a.pending == b.pending == {}  # no request of the client's waits for a count any more
        assert await a.count(CLIENT) == 0  # the 10th failure: refused as any, not yet 429
        assert 59 <= a.retry_after(CLIENT) <= 60  # from now on 429 before any token is checked
        assert b.retry_after(CLIENT) == 0  # b has not heard (no listener here)
        wait = await b.count(CLIENT)  # b checked one more: its count, past the limit, tells it
        assert 59 <= wait <= 60 and 59 <= b.retry_after(CLIENT) <= 60
        with redis_server.client() as client:
            assert client.get(KEY) == "11"
        assert a.retry_after("192.0.2.8") == 0  # another client is not throttled
        assert await a.count("192.0.2.8") == 0
        with redis_server.client() as client:
            assert client.get(f"{PREFIX}throttle:192.0.2.8") == "1"


async def test_the_limit_given_is_the_one_counted(redis_server: RedisServer) -> None:
    async with processes(redis_server, 1, limit=3) as (a,):
        assert [await a.count(CLIENT) for _ in range(3)] == [0, 0, 0]
        assert a.retry_after(CLIENT) > 0
        assert await a.count(CLIENT) > 0


async def test_retry_after_is_the_keys_time_to_live(redis_server: RedisServer) -> None:
    """What a process knows of the window is the fleet's: the key's time to live, to the millisecond."""
    async with processes(redis_server, 1, window=600) as (a,):
        with redis_server.client() as client:
            client.set(KEY, 9, px=500_000)  # other processes counted 9 failures, 100 s ago
            assert await a.count(CLIENT) == 0
            ttl = client.pttl(KEY) / 1000
        assert abs(remaining(a) - ttl) < 0.2
        assert a.retry_after(CLIENT) in (500, 499)
        assert 499 <= await a.count(CLIENT) <= 500  # the 11th: 429, with the same wait


async def test_a_new_keys_time_to_live_is_the_window(redis_server: RedisServer) -> None:
    async with processes(redis_server, 1, window=600, limit=1) as (a,):
        assert await a.fleet.call(a._count(CLIENT)) == [1, 600_000]  # [count, ms left]: the script's reply
        with redis_server.client() as client:
            assert 599_000 < client.pttl(KEY) <= 600_000


@pytest.mark.parametrize("ttl", [None, 3_600_000], ids=["no-ttl", "longer-ttl"])
async def test_a_key_without_the_windows_time_to_live_is_capped_to_it(
    redis_server: RedisServer, ttl: int | None
) -> None:
    """Anyone who may write in Redis may leave a key without expiry (or with a long one): it never
    locks a client out for longer than a window."""
    async with processes(redis_server, 1, window=30) as (a,):
        with redis_server.client() as client:
            client.set(KEY, 20, px=ttl)
            wait = await a.count(CLIENT)
            assert 29 <= wait <= 30
            assert 29_000 < client.pttl(KEY) <= 30_000
            assert client.get(KEY) == "21"


async def test_the_window_ends_and_the_count_starts_again(redis_server: RedisServer) -> None:
    async with processes(redis_server, 2, window=1.0, limit=2) as (a, b):
        assert [await a.count(CLIENT), await a.count(CLIENT), await a.count(CLIENT)] == [0, 0, 1]
        assert a.retry_after(CLIENT) == 1
        with redis_server.client() as client:
            assert 0 < client.pttl(KEY) <= 1000
        await eventually(lambda: a.retry_after(CLIENT) == 0, "the window's end", timeout=5)
        with redis_server.client() as client:
            await eventually(lambda: client.get(KEY) is None, "the key's expiry", timeout=5)
        assert await b.count(CLIENT) == 0
        with redis_server.client() as client:
            assert client.get(KEY) == "1"


async def test_a_failure_being_counted_holds_the_clients_next_requests(redis_server: RedisServer) -> None:
    async with processes(redis_server, 1) as (a,):
        counting = asyncio.create_task(a.count(CLIENT))
        await asyncio.sleep(0)  # it has sent the script; Redis's reply is awaited
        assert CLIENT in a.pending and a.active()
        waiting = asyncio.create_task(a.settled(CLIENT))
        await asyncio.sleep(0)
        assert not waiting.done()  # the next request waits for the count
        assert await counting == 0
        assert a.pending == {}
        await asyncio.wait_for(waiting, 5)
        await asyncio.wait_for(a.settled(CLIENT), 5)  # nothing pending: at once


# -- the news of clients at the limit


async def test_the_news_of_a_client_at_the_limit_reaches_a_listening_process(redis_server: RedisServer) -> None:
    async with processes(redis_server, 2, window=600) as (a, b), listening(redis_server, b):
        for _ in range(9):
            await a.count(CLIENT)
        await asyncio.sleep(0.3)
        assert CLIENT not in b._failures  # no news before the limit
        await a.count(CLIENT)
        await eventually(lambda: b.retry_after(CLIENT) > 0, "b hears of the client at the limit")
        assert local_count(b) == 10
        assert abs(remaining(b) - remaining(a)) < 0.5  # the window's end, as the script told it
        assert b.retry_after(CLIENT) in (600, 599)


async def test_news_alone_opens_a_window_that_other_failures_keep(redis_server: RedisServer) -> None:
    """A process that has counted no failure of its own, told of a client at the limit, keys the
    requests (active) and keeps that client's refusal when another client fails."""
    async with processes(redis_server, 1, window=600) as (b,):
        assert not b.active()
        b._heard(f"{CLIENT} 300000".encode())
        assert b.active()  # else the authorizer would not key the client's requests: no 429
        await b.count("192.0.2.8")
        assert b.retry_after(CLIENT) in (300, 299)


async def test_an_idle_listener_waits_for_news_without_spinning(redis_server: RedisServer) -> None:
    async with processes(redis_server, 1) as (b,), listening(redis_server, b):
        spent = time.process_time()
        await asyncio.sleep(2)
        assert time.process_time() - spent < 0.5  # each wait has its time limit, not none


@contextlib.contextmanager
def redis_on_a_unix_socket() -> Iterator[str]:
    """A redis-server listening on a unix socket only (a short path: sockets' are bounded); its URL."""
    with tempfile.TemporaryDirectory(dir="/tmp") as directory:
        socket = Path(directory) / "redis.sock"
        command = [REDIS_SERVER, "--port", "0", "--unixsocket", str(socket), "--unixsocketperm", "700"]
        command += ["--save", "", "--appendonly", "no", "--dir", directory, "--requirepass", PASSWORD]
        with open(Path(directory) / "redis.log", "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while not socket.exists():
                assert process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
            yield f"unix://:{PASSWORD}@{socket}?db=0"
        finally:
            process.kill()
            process.wait()


async def test_the_news_reaches_a_listener_on_a_unix_socket() -> None:
    """The listener's own pool is made as the fleet's (its connection class: a unix socket here)."""
    with redis_on_a_unix_socket() as url:
        fleets = [Fleet(parse_redis_url(url)) for _ in range(2)]
        a, b = (FleetThrottle(fleet) for fleet in fleets)
        task = asyncio.create_task(b.listen())
        try:

            async def subscribers() -> int:
                return int(dict(await a.fleet.client.pubsub_numsub(CHANNEL))[CHANNEL.encode()])

            deadline = time.monotonic() + 10
            while await subscribers() != 1:
                assert time.monotonic() < deadline and not task.done(), "b never subscribed"
                await asyncio.sleep(0.05)
            for _ in range(10):
                await a.count(CLIENT)
            await eventually(lambda: b.retry_after(CLIENT) > 0, "b hears on the unix socket")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            for fleet in fleets:
                await fleet.close()


async def test_garbage_on_the_channel_is_ignored_and_the_listener_goes_on(redis_server: RedisServer) -> None:
    async with processes(redis_server, 1) as (b,), listening(redis_server, b) as task:
        with redis_server.client() as client:
            for garbage in ["no-number", " 30000", "\xff 30000", "192.0.2.9 ten", "", "192.0.2.9 1e3"]:
                client.publish(CHANNEL, garbage)
            client.publish(CHANNEL, "192.0.2.10 30000")
        await eventually(lambda: "192.0.2.10" in b._failures, "the good news after the garbage")
        assert not task.done()
        assert list(b._failures) == ["192.0.2.10"]
        assert b.retry_after("192.0.2.10") == 30


async def test_heard_takes_only_client_and_milliseconds(redis_server: RedisServer) -> None:
    async with processes(redis_server, 1, window=600) as (b,):
        for garbage in [None, 12, b"\xff\xfe 100", b"client", b" 100", b"client x", b"client 1.5"]:
            b._heard(garbage)
        assert len(b) == 0
        b._heard(b"2001:db8::/64 250000")  # the client's key holds no space; the last word is the time
        assert local_count(b, "2001:db8::/64") == b.limit
        assert 249 < remaining(b, "2001:db8::/64") <= 250
        b._heard(bytearray(b"a b 1000"))
        assert "a b" in b._failures


async def test_the_listener_listens_again_after_redis_restarts(redis_server: RedisServer) -> None:
    async with processes(redis_server, 1) as (b,), listening(redis_server, b) as task:
        redis_server.stop()
        redis_server.start()  # empty, on the same port
        await subscribed(redis_server, 1)  # a second after its connection failed
        assert not task.done()
        async with processes(redis_server, 1) as (a,):
            for _ in range(10):
                await a.count(CLIENT)
        await eventually(lambda: b.retry_after(CLIENT) > 0, "b hears after the restart")


async def test_the_listener_waits_while_redis_is_away(redis_server: RedisServer) -> None:
    async with processes(redis_server, 1) as (b,):
        b.fleet.up = False  # as the probe left it
        task = asyncio.create_task(b.listen())
        try:
            await asyncio.sleep(0.5)
            with redis_server.client() as client:
                assert dict(client.pubsub_numsub(CHANNEL))[CHANNEL] == 0
            b.fleet.up = True  # back
            await subscribed(redis_server, 1)
            b.fleet.up = False  # lost: the listener leaves the subscription within its time limit
            await subscribed(redis_server, 0)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_the_apps_cleanup_context_listens_while_the_app_runs(redis_server: RedisServer) -> None:
    async with processes(redis_server, 1) as (b,):
        context = b.listening(web.Application())
        await asyncio.wait_for(context.__anext__(), 5)
        await subscribed(redis_server, 1)
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(context.__anext__(), 5)  # the app's cleanup: the listener stops
        await subscribed(redis_server, 0)


# -- Redis away, or refusing


async def test_redis_known_away_counts_locally_and_calls_nothing(redis_server: RedisServer) -> None:
    assert redis_server.process is not None
    async with processes(redis_server, 1, limit=3) as (a,):
        a.fleet.up = False
        redis_server.process.send_signal(signal.SIGSTOP)  # a call would wait its time limit
        try:
            started = time.monotonic()
            waits = [await a.count(CLIENT) for _ in range(4)]
            assert time.monotonic() - started < a.fleet.timeout  # no call waited for Redis
            assert a.pending == {}
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        assert waits[:3] == [0, 0, 0] and 59 <= waits[3] <= 60  # the local count, as without --redis
        with redis_server.client() as client:
            assert client.get(KEY) is None


async def test_redis_killed_counts_locally_and_redis_is_away(redis_server: RedisServer) -> None:
    async with processes(redis_server, 1, limit=3) as (a,):
        assert await a.count(CLIENT) == 0  # connected
        redis_server.stop()
        assert await a.count(CLIENT) == 0
        assert a.fleet.up is False and a.pending == {}
        assert await a.count(CLIENT) == 0
        assert 59 <= await a.count(CLIENT) <= 60  # the 4th, counted here


async def test_a_key_of_the_wrong_type_counts_locally_and_redis_stays_up(redis_server: RedisServer) -> None:
    async with processes(redis_server, 1, limit=3) as (a,):
        with redis_server.client() as client:
            client.rpush(KEY, "not a count")  # WRONGTYPE for INCR: Refused
        waits = [await a.count(CLIENT) for _ in range(4)]
        assert waits[:3] == [0, 0, 0] and 59 <= waits[3] <= 60
        assert a.fleet.up is True and a.pending == {}
        assert await a.count("192.0.2.8") == 0  # other clients are still counted in Redis
        with redis_server.client() as client:
            assert client.get(f"{PREFIX}throttle:192.0.2.8") == "1"


async def test_the_processs_own_higher_count_wins(redis_server: RedisServer) -> None:
    """Failures counted while Redis was away (or before it restarted empty) are not forgotten."""
    async with processes(redis_server, 1) as (a,):
        a.fleet.up = False
        for _ in range(6):
            await a.count(CLIENT)
        await a.fleet.probe()  # back, empty
        assert a.fleet.up
        assert await a.count(CLIENT) == 0
        with redis_server.client() as client:
            assert client.get(KEY) == "1"
        assert local_count(a) == 7
        for _ in range(2):
            await a.count(CLIENT)
        assert a.retry_after(CLIENT) == 0  # 9 here
        await a.count(CLIENT)
        assert 59 <= a.retry_after(CLIENT) <= 60  # 10 here, 4 in Redis


async def test_the_fleets_higher_count_wins_and_its_window(redis_server: RedisServer) -> None:
    async with processes(redis_server, 1, window=600) as (a,):
        a.failed(CLIENT, now=time.monotonic() - 300)  # one of this process's, 300 s ago
        with redis_server.client() as client:
            client.set(KEY, 11, px=100_000)
        assert 99 <= await a.count(CLIENT) <= 100
        assert local_count(a) == 12


async def test_the_clients_known_are_bounded(redis_server: RedisServer) -> None:
    async with processes(redis_server, 1, window=600) as (a,):
        assert a.max_clients == 10_000  # app.py's
        for n in range(10_001):
            a._learn(f"client {n}", 1, 600)
        assert len(a) == 10_000 and "client 0" not in a._failures and "client 10000" in a._failures
    async with processes(redis_server, 1, window=600, max_clients=3) as (a,):
        for n in range(3):
            await a.count(f"192.0.2.{n}")
        a._heard(b"192.0.2.100 1000")  # the news too is bounded
        assert list(a._failures) == ["192.0.2.1", "192.0.2.2", "192.0.2.100"]
        assert await a.count("192.0.2.1") == 0  # counted again: now the most recent
        assert await a.count("192.0.2.3") == 0
        assert list(a._failures) == ["192.0.2.100", "192.0.2.1", "192.0.2.3"]
