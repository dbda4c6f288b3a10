"""Schedules across a fleet (``--redis``): each tick runs on one process of the fleet, as deployed.

Three ``python -m aioserver`` hosts on 127.0.0.1 (two of them with ``--workers 2``) share one
real redis-server (tests/redisserver.py). Their workflow ``tick`` runs ``sample_actions.stamp``
every second, which appends ``start PID TIME`` to one file for each run: the file is what the
whole fleet did. A run belongs to the tick of its start's whole second (ticks are whole seconds,
and a run starts within milliseconds of its tick).

Needs the ``redis`` extra: these tests choose their loop (``loop``), so they run in the test venv.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import re
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from redisserver import PASSWORD, RedisServer
from test_schedules import EVERY_SECOND, config, events, starts

from aioserver.fleet import Fleet, Unavailable, parse_redis_url
from aioserver.workflow import ticks as ticks_module
from aioserver.workflow.ticks import FleetTicks

from conftest import Server

LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
HOSTS = (1, 2, 2)  # --workers of each host
CONTENDS = "(each time by one process of the fleet: redis)"  # in the line of each scheduling process
AWAY = re.compile(r"redis at \S+ is away")
BACK = re.compile(r"redis at \S+ is back")


def host(text: str, loop: str, workers: int, url: str) -> Server:
    # The URL from the environment (REDIS_URL): its password stays off the command line.
    return Server(
        "--config", text, "--loop", loop, "--workers", str(workers), env={"REDIS_URL": url}, listeners=workers
    )


@contextmanager
def fleet(text: str, loop: str, url: str) -> Iterator[list[Server]]:
    """The three hosts, each once its scheduling process has said it contends for the ticks."""
    with ExitStack() as stack:
        hosts = [stack.enter_context(host(text, loop, workers, url)) for workers in HOSTS]
        for server in hosts:
            wait_for(lambda server=server: CONTENDS in log(server), 30, "its schedule", hosts)  # type: ignore[misc]
        yield hosts


def log(server: Server) -> str:
    return "".join(server.log)


def logs(hosts: list[Server]) -> str:
    return "\n".join(f"--- host {i} (pid {server.process.pid}):\n{log(server)}" for i, server in enumerate(hosts))


def wait_for(condition: Callable[[], bool], timeout: float, what: str, hosts: list[Server]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout}s:\n" + logs(hosts)
        time.sleep(0.05)


def scheduling_pid(server: Server) -> int:
    """The pid of the host's process that runs its schedules: the only one, or the worker of slot 0."""
    if server.workers == 1:
        return server.process.pid
    found = re.findall(r"worker 0 started, pid (\d+)", log(server))
    assert len(found) == 1, log(server)  # and never replaced: nothing in these tests kills it
    return int(found[0])


def stop_all(hosts: list[Server]) -> None:
    for server in hosts:
        server.process.send_signal(signal.SIGTERM)
    for server in hosts:
        assert server.process.wait(timeout=30) == 0, logs(hosts)


def healthy(server: Server) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=5) as response:
        return response.status == 200


def ticks(times: list[float]) -> collections.Counter[int]:
    """Runs per tick (whole second), from the runs' start times."""
    return collections.Counter(math.floor(when) for when in times)


def missed(counts: collections.Counter[int], first: int, last: int) -> list[int]:
    return [tick for tick in range(first, last + 1) if tick not in counts]


@LOOPS
def test_each_tick_runs_once_across_the_fleet_and_ticks_are_skipped_while_redis_is_away(
    tmp_path: Path, loop: str
) -> None:
    path = tmp_path / "runs"
    with RedisServer(tmp_path / "redis") as redis, fleet(config(path, EVERY_SECOND), loop, redis.url) as hosts:
        # Up: ten seconds of ticks once every host contends.
        since = time.time()
        wait_for(lambda: len([r for r in starts(path) if r.time >= since]) >= 10, 40, "ten runs", hosts)
        # Away: Redis killed (as a crash) for five seconds.
        redis.stop()
        killed = time.time()
        wait_for(lambda: time.time() >= killed + 5, 10, "the outage", hosts)
        assert all(server.process.poll() is None and healthy(server) for server in hosts), logs(hosts)
        restarting = time.time()
        redis.start()  # empty: every tick lock is gone with it
        # Back: ticks run again, once each.
        wait_for(lambda: len([r for r in starts(path) if r.time >= restarting]) >= 5, 40, "five runs after", hosts)
        for server in hosts:
            wait_for(lambda server=server: BACK.search(log(server)) is not None, 20, "word of it", hosts)  # type: ignore[misc]
        stop_all(hosts)
    runs = starts(path)
    counts = ticks([run.time for run in runs])
    twice = sorted(tick for tick, number in counts.items() if number > 1)
    up = [run for run in runs if since <= run.time < killed]
    # A claim answered just before the kill may start its run just after it.
    away = [run for run in runs if killed + 0.5 <= run.time < restarting]
    after = [run for run in runs if run.time >= restarting]
    first_after = math.floor(after[0].time)
    skipped = missed(counts, math.floor(killed) + 1, first_after - 1)
    missed_up = missed(counts, math.floor(up[0].time), math.floor(up[-1].time))
    missed_after = missed(counts, first_after, math.floor(after[-1].time))
    print(
        f"[{loop}] runs {len(runs)} over {len(counts)} ticks, twice {len(twice)}; while up: {len(up)} runs,"
        f" {len(missed_up)} ticks missed; while away ({restarting - killed:.1f}s): {len(away)} runs,"
        f" {len(skipped)} ticks skipped; after: {len(after)} runs, {len(missed_after)} ticks missed;"
        f" by process: {dict(collections.Counter(run.pid for run in runs))}"
    )
    everything = logs(hosts)
    assert twice == [], (twice, runs)  # no tick ran twice, before, during or after the outage
    assert missed_up == [] and missed_after == [], (missed_up, missed_after, runs)  # none missed while Redis is up
    assert away == [] and len(skipped) >= 4, (away, skipped, runs)  # none while it was away
    # Only each host's scheduling process runs ticks (slot 1 of a host with workers never does).
    assert {run.pid for run in runs} <= {scheduling_pid(server) for server in hosts}, everything
    # The outage is logged once by each process that noticed it, not once per tick; no crash.
    for server in hosts:
        assert 1 <= len(AWAY.findall(log(server))) <= server.workers, log(server)
        assert len(BACK.findall(log(server))) == len(AWAY.findall(log(server))), log(server)
        assert "skipped: redis is away" not in log(server) and "Traceback" not in log(server), log(server)
    assert PASSWORD not in everything


@LOOPS
def test_ticks_run_again_as_soon_as_a_stalled_redis_is_back(tmp_path: Path, loop: str) -> None:
    """Redis stopped (SIGSTOP) for 3 s: the claim on its way when it stopped is given up on (the
    tick skipped) but run by Redis when it goes on, taking the hold of a run that never came.
    The schedule used to stay held up for HOLD_SECONDS (15 s) after Redis was back."""
    path = tmp_path / "runs"
    with RedisServer(tmp_path / "redis") as redis, host(config(path), loop, 1, redis.url) as server:
        assert redis.process is not None
        wait_for(lambda: len(starts(path)) >= 2, 30, "two runs", [server])
        redis.process.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: AWAY.search(log(server)) is not None, 20, "the away line", [server])
            time.sleep(2)
        finally:
            redis.process.send_signal(signal.SIGCONT)
        wait_for(lambda: BACK.search(log(server)) is not None, 20, "the back line", [server])
        back = time.time()
        # A generous bound, for a loaded machine: ticks are every second; the hold was 15 s.
        wait_for(lambda: any(run.time > back for run in starts(path)), 8, "a run after", [server])
    assert "Traceback" not in log(server) and PASSWORD not in log(server)


@LOOPS
def test_iterations_count_across_the_fleet_even_with_redis_restarted_empty(tmp_path: Path, loop: str) -> None:
    path = tmp_path / "runs"
    redis = RedisServer(tmp_path / "redis")  # started once every host contends: all count from the first run
    with ExitStack() as stack:
        stack.callback(redis.close)
        hosts = stack.enter_context(fleet(config(path, iterations=6), loop, redis.url))
        redis.start()
        wait_for(lambda: len(starts(path)) >= 3, 30, "three runs", hosts)
        # Between two ticks (every process has claimed the last one and seen its count), Redis
        # is restarted empty: it has lost the count, which the fleet's processes hand back.
        wait_for(lambda: 0.4 < time.time() % 1 < 0.7, 5, "the middle of a second", hosts)
        redis.stop()
        redis.start()
        done = "workflow tick: schedule done after 6 runs across the fleet"
        for server in hosts:  # each scheduling process learns it at its next tick
            wait_for(lambda server=server: done in log(server), 30, "the schedule's end", hosts)  # type: ignore[misc]
        time.sleep(2.5)  # and then nothing more, on any host
        with redis.client() as client:
            count = client.get("aioserver:schedule:tick:runs")
        stop_all(hosts)
    runs = starts(path)
    print(f"[{loop}] iterations 6: {len(runs)} runs by {dict(collections.Counter(run.pid for run in runs))}")
    assert len(runs) == 6, (runs, logs(hosts))
    assert count == "6"
    for server in hosts:  # said once per host: by its scheduling process only
        assert log(server).count(done) == 1, log(server)


@LOOPS
def test_one_run_at_a_time_across_the_fleet(tmp_path: Path, loop: str) -> None:
    path = tmp_path / "runs"
    # Every second, each run taking 2.5 s: the ticks that pass while one runs are skipped by
    # every host, as by the one host that ran it, instead of run alongside it elsewhere.
    with (
        RedisServer(tmp_path / "redis") as redis,
        fleet(config(path, seconds=2.5, iterations=3), loop, redis.url) as hosts,
    ):
        for server in hosts:
            wait_for(lambda server=server: "schedule done after 3 runs" in log(server), 40, "three runs", hosts)  # type: ignore[misc]
        stop_all(hosts)
    found = events(path)
    print(f"[{loop}] one at a time: {[(event.kind, event.pid, round(event.time, 2)) for event in found]}")
    # start, end, start, end...: never a start while another run is still going.
    assert [event.kind for event in found] == ["start", "end"] * 3, found
    assert all(start.pid == end.pid for start, end in zip(found[::2], found[1::2], strict=True)), found
    assert "outlasted its interval" in logs(hosts)


@LOOPS
def test_a_process_killed_in_a_run_holds_the_schedule_up_for_a_while_only(tmp_path: Path, loop: str) -> None:
    path = tmp_path / "runs"
    # Runs that would last a minute: the first one's process is killed in it (SIGKILL).
    text = config(path, seconds=60, timeout_graceful_shutdown=1)
    with RedisServer(tmp_path / "redis") as redis, fleet(text, loop, redis.url) as hosts:
        wait_for(lambda: len(starts(path)) >= 1, 30, "a run", hosts)
        victim = starts(path)[0].pid
        killed = [server for server in hosts if server.process.pid == victim]  # a host of one process dies
        os.kill(victim, signal.SIGKILL)
        # Its hold on the schedule expires (ticks.HOLD_SECONDS): another process runs the next tick.
        wait_for(lambda: len(starts(path)) >= 2, 60, "a run after the kill", hosts)
        with redis.client() as client:
            holder = client.get("aioserver:schedule:tick:running")
        stop_all([server for server in hosts if server not in killed])
    runs = starts(path)
    print(f"[{loop}] killed in a run: next run {runs[1].time - runs[0].time:.1f}s after the first")
    assert runs[1].pid != victim and len(runs) == 2, runs  # and no second run while the new one went on
    assert holder is not None and f"pid {runs[1].pid} " in holder  # the new run's hold


# -- in-process: the claim script, on the same real redis-server


@contextlib.asynccontextmanager
async def processes(server: RedisServer, count: int) -> AsyncIterator[list[FleetTicks]]:
    """``count`` processes' links to the fleet's Redis, as each host's scheduling process has."""
    fleets = [Fleet(parse_redis_url(server.url)) for _ in range(count)]
    try:
        yield [FleetTicks(fleet) for fleet in fleets]
    finally:
        for fleet in fleets:
            await fleet.close()


async def test_a_tick_is_claimed_once_and_counted(redis_server: RedisServer) -> None:
    async with processes(redis_server, 3) as (a, b, c):
        due = math.floor(time.time()) + 1.0
        claims = await asyncio.gather(*(ticks.claim("odd:name", due, None, 0) for ticks in (a, b, c)))
        assert sorted(claim.ours for claim in claims) == [False, False, True]
        assert {claim.runs for claim in claims} == {1}  # the losers see the winner's count: it ran first
        with redis_server.client() as client:
            lock = "aioserver:schedule:odd%3Aname:tick:" + str(int(due))
            assert ticks_module.LOCK_SECONDS * 1000 - 5000 < client.pttl(lock) <= ticks_module.LOCK_SECONDS * 1000
            assert client.get("aioserver:schedule:odd%3Aname:runs") == "1"
        # The next tick, once the run has let go of its hold.
        winner = next(ticks for ticks, claim in zip((a, b, c), claims, strict=True) if claim.ours)
        # Two others: a process's own claim drops its own hold (it runs nothing of that schedule
        # when it claims: a hold of its own is one left by a claim whose answer was lost).
        other, third = (ticks for ticks in (a, b, c) if ticks is not winner)
        async with winner.holding("odd:name"):
            assert (await other.claim("odd:name", due + 1, None, 1)).ours is False  # during the run: skipped
        assert (await other.claim("odd:name", due + 1, None, 1)).ours is False  # and that tick stays taken
        assert await third.claim("odd:name", due + 2, None, 1) == ticks_module.Claim(True, 2)


async def test_iterations_stop_the_claims_and_a_lost_count_comes_back(redis_server: RedisServer) -> None:
    async with processes(redis_server, 2) as (a, b):
        due = math.floor(time.time()) + 1.0
        assert await a.claim("w", due, 2, 0) == ticks_module.Claim(True, 1)
        async with a.holding("w"):  # the run
            pass
        assert await b.claim("w", due + 1, 2, 1) == ticks_module.Claim(True, 2)
        async with b.holding("w"):
            pass
        assert await a.claim("w", due + 2, 2, 1) == ticks_module.Claim(False, 2)  # done
        with redis_server.client() as client:
            client.flushall()  # as a Redis restarted empty
            assert await a.claim("w", due + 3, 2, 2) == ticks_module.Claim(False, 2)  # the count handed back
            assert client.get("aioserver:schedule:w:runs") == "2"


async def test_a_hold_is_released_by_its_holder_only_and_expires(redis_server: RedisServer) -> None:
    async with processes(redis_server, 2) as (a, b):
        due = math.floor(time.time()) + 1.0
        assert (await a.claim("w", due, None, 0)).ours
        with redis_server.client() as client:
            assert 0 < client.pttl("aioserver:schedule:w:running") <= ticks_module.HOLD_SECONDS * 1000
            async with b.holding("w"):  # another process's release leaves a's hold alone
                pass
            assert client.get("aioserver:schedule:w:running") == a.claimant
            async with a.holding("w"):
                pass
            assert client.get("aioserver:schedule:w:running") is None


async def test_a_claim_with_redis_away_is_unavailable(redis_server: RedisServer) -> None:
    async with processes(redis_server, 1) as (a,):
        redis_server.stop()
        with pytest.raises(Unavailable):  # the scheduler's cue to skip the tick
            await a.claim("w", time.time(), None, 0)


async def test_a_claim_whose_answer_was_lost_does_not_hold_the_schedule_up(redis_server: RedisServer) -> None:
    """Redis stalled (SIGSTOP) with a claim on its way: the process gave up on it (Unavailable, the
    tick skipped), but Redis ran it once it went on, taking the hold of a run that never came.
    That hold kept every process of the fleet from running the schedule for HOLD_SECONDS (15 s)
    after Redis was back; the process's next claim drops it (claiming, it runs nothing of that
    schedule: a hold of its own is one it lost)."""
    assert redis_server.process is not None
    async with processes(redis_server, 1) as (a,):
        due = math.floor(time.time()) + 1.0
        await a.claim("other", due, None, 0)  # connected, the script loaded: the claim runs as sent
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(Unavailable):
                await a.claim("w", due, None, 0)
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        await a.fleet.probe()  # back (only the probe says so)
        with redis_server.client() as client:
            deadline = time.monotonic() + 10
            while client.get("aioserver:schedule:w:running") != a.claimant:  # Redis ran the lost claim
                assert time.monotonic() < deadline, "the claim sent to the stopped Redis never ran"
                await asyncio.sleep(0.05)
            assert (await a.claim("w", due + 1, None, 0)).ours  # not held up by the run that never came
            assert client.get("aioserver:schedule:w:running") == a.claimant  # the new run's hold
