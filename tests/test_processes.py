"""The worker process pool: results and errors come back, a cancelled job's process is killed,
a dead worker fails its job, the size holds, close() leaves nothing behind; on both loops."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from aioserver.errors import InvalidElement
from aioserver.workflow.pipelines import _texts, summarize_all
from aioserver.workflow.processes import ProcessPool, RemoteTraceback, WorkerDied

import sample_actions

Runner = Callable[[Coroutine[Any, Any, None]], None]
LOOPS = pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not ended (a zombie has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def descendants(pid: int) -> set[int]:
    """The processes below ``pid``, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rpartition(")")[2].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def cpu_seconds(pids: set[int]) -> float:
    """User and system CPU time of the processes still there."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)
    return total / os.sysconf("SC_CLK_TCK")


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


@LOOPS
def test_results_and_errors_come_back(run: Runner) -> None:
    async def scenario() -> None:
        pool = ProcessPool(1)
        try:
            assert await pool.run(summarize_all, ["One fine day. Two."], 1) == ["One fine day."]
            assert await pool.run(os.getpid) != os.getpid()
            with pytest.raises(InvalidElement) as info:  # a 400 stays a 400
                await pool.run(_texts, "summary", [1])
            assert isinstance(info.value.__cause__, RemoteTraceback)
            assert "in _texts" in str(info.value.__cause__)  # the worker's traceback, for the log
            with pytest.raises(RuntimeError, match="secret-detail-42"):
                await pool.run(sample_actions.boom, [1])
            assert await pool.run(sum, [1, 2]) == 3  # the same worker goes on after a failure
        finally:
            await pool.close()

    run(scenario())


@LOOPS
def test_a_cancelled_job_has_its_process_killed(run: Runner) -> None:
    async def scenario() -> None:
        pool = ProcessPool(1)
        try:
            job = asyncio.ensure_future(pool.run(sample_actions.spin, ["x"], 60.0))
            await until(lambda: bool(pool.pids))
            (pid,) = pool.pids
            await asyncio.sleep(0.3)
            job.cancel()
            with pytest.raises(asyncio.CancelledError):
                await job
            await until(lambda: not alive(pid), 5)  # killed, and reaped: no zombie either
            assert await pool.run(os.getpid) != pid  # a fresh worker takes the next job
        finally:
            await pool.close()

    run(scenario())


@LOOPS
def test_a_worker_dying_mid_job_fails_that_job(run: Runner) -> None:
    async def scenario() -> None:
        pool = ProcessPool(1)
        try:
            with pytest.raises(WorkerDied, match="exit status 3"):
                await pool.run(os._exit, 3)
            assert await pool.run(sum, [2, 2]) == 4
        finally:
            await pool.close()

    run(scenario())


async def test_the_pool_size_holds_and_jobs_beyond_wait() -> None:
    pool = ProcessPool(2)
    seen: set[int] = set()
    most = 0
    try:
        jobs = asyncio.gather(*(pool.run(sample_actions.spin, [i], 0.5) for i in range(5)))
        while not jobs.done():
            most = max(most, len(pool.pids))
            seen.update(pool.pids)
            await asyncio.sleep(0.02)
        assert await jobs == [[i] for i in range(5)]
        assert most == 2 and len(seen) == 2  # two processes, reused
    finally:
        await pool.close()


async def test_close_kills_busy_and_idle_workers() -> None:
    pool = ProcessPool(2)
    job = asyncio.ensure_future(pool.run(sample_actions.spin, ["x"], 60.0))
    await until(lambda: bool(pool.pids))
    await pool.run(sum, [1])  # a second worker, left idle
    pids = pool.pids
    assert len(pids) == 2
    started = time.monotonic()
    await pool.close()
    assert time.monotonic() - started < 5
    assert not any(map(alive, pids))
    with pytest.raises(WorkerDied):
        await job
    with pytest.raises(RuntimeError, match="closed"):
        await pool.run(sum, [1])


class Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("no way back")
        self.lock = threading.Lock()  # a lock does not pickle


def unpicklable_error() -> None:  # run in a worker, which imports this module by name
    raise Unpicklable()


async def test_an_exception_that_does_not_pickle_still_tells_what_happened() -> None:
    pool = ProcessPool(1)
    try:
        with pytest.raises(RuntimeError, match="Unpicklable: no way back"):
            await pool.run(unpicklable_error)
    finally:
        await pool.close()
