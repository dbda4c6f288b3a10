"""The worker process pool: results and errors come back, a cancelled job's process is killed,
a dead worker fails its job, the size holds, close() leaves nothing behind; on both loops. Then as
deployed: one bound for all the workers of a server, no orphan, a 504 frees its slot."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from aioserver.errors import InvalidElement
from aioserver.workflow.pipelines import _texts, summarize_all
from aioserver.workflow.processes import ProcessPool, ProcessSlots, RemoteTraceback, WorkerDied, default_size

import sample_actions
from conftest import Server

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


HOLDER = """
import os, sys
from aioserver.workflow.processes import ProcessSlots
slots = ProcessSlots(2, int(sys.argv[1]))
print(slots.take(), flush=True)
slots.raise_flag(ProcessSlots.STARVING, True)
sys.stdin.read()  # until killed
"""


@pytest.mark.parametrize("memfd", [True, False], ids=["memfd", "file"])
def test_slots_are_shared_between_processes_and_freed_when_one_is_killed(
    memfd: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not memfd:  # as under a seccomp filter without memfd_create: an unlinked file instead
        monkeypatch.delattr(os, "memfd_create")
    slots = ProcessSlots.shared(2)
    assert slots.fd is not None
    command = [sys.executable, "-c", HOLDER, str(slots.fd)]
    with subprocess.Popen(command, pass_fds=(slots.fd,), stdin=subprocess.PIPE, stdout=subprocess.PIPE) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == b"0\n"  # it holds slot 0
            assert wait_until(lambda: slots.flagged_elsewhere(ProcessSlots.STARVING), 5)
            assert not slots.flagged_elsewhere(ProcessSlots.WAITING)
            assert slots.take() == 1 and slots.take() is None
            slots.give(1)
            holder.kill()  # SIGKILL: no chance to give anything back
            holder.wait()
            assert {slots.take(), slots.take()} == {0, 1}
            assert not slots.flagged_elsewhere(ProcessSlots.STARVING)
        finally:
            holder.kill()
            os.close(slots.fd)


# -- as deployed: ``python -m aioserver`` with --workers 1 and 2, on both loops

SERVED = """workflow:
  spin: {tasks: [{action: sample_actions.spin, args: {seconds: 60}, concurrency: process}]}
  spin2: {tasks: [{action: sample_actions.spin, args: {seconds: 2}, concurrency: process}]}
  span: {tasks: [{action: sample_actions.spin_span, args: {seconds: 5}, concurrency: process}]}
  pid: {tasks: [{action: sample_actions.pid, concurrency: process}]}
"""
LOOP_NAMES = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


def children(pid: int) -> set[int]:
    return {child for child in descendants(pid) if parent_of(child) == pid}


def parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rpartition(")")[2].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None


def pool_processes(server: int, workers: int) -> set[int]:
    """The worker processes of the server's pool (zombies included): the children of its
    workers, or of the server itself when it is its only worker."""
    return children(server) if workers == 1 else descendants(server) - children(server)


def busy(pids: set[int], window: float = 0.5) -> set[int]:
    """Those of ``pids`` that use the CPU (a job spinning, not an idle process)."""
    before = {pid: cpu_seconds({pid}) for pid in pids}
    time.sleep(window)
    return {pid for pid in pids if cpu_seconds({pid}) - before[pid] > 0.02}


def post(port: int, name: str, elements: list[Any], timeout: float = 120) -> tuple[int, Any]:
    body = json.dumps({"name": name, "elements": elements}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/workflow", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def posting(port: int, name: str, count: int) -> tuple[list[threading.Thread], list[tuple[int, Any]]]:
    """``count`` requests at once, each on its own connection (so that both workers get some)."""
    answers: list[tuple[int, Any]] = []

    def send() -> None:
        try:
            answers.append(post(port, name, ["x"]))
        except OSError as exc:  # the connection of a worker killed on purpose
            answers.append((0, str(exc)))

    threads = [threading.Thread(target=send, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads, answers


def most_while(threads: list[threading.Thread], count: Callable[[], int]) -> int:
    """The highest ``count()`` seen until every thread has ended."""
    most = 0
    while any(thread.is_alive() for thread in threads):
        most = max(most, count())
        time.sleep(0.02)
    return most


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def serving(loop: str, workers: int, *args: str, tmp_path: Path) -> Server:
    config = tmp_path / "config.yml"
    config.write_text(SERVED)
    return Server("--config", str(config), "--loop", loop, "--workers", str(workers), *args, listeners=workers)


@LOOP_NAMES
def test_one_pool_for_the_server_and_none_outlives_a_killed_worker(loop: str, tmp_path: Path) -> None:
    size = default_size()
    with serving(loop, 2, "--timeout-workflow", "60", tmp_path=tmp_path) as server:
        pid = server.process.pid
        # Three jobs per slot from clients of both workers: never more processes than slots.
        threads, answers = posting(server.port, "spin2", 3 * size)
        most = most_while(threads, lambda: len(pool_processes(pid, 2)))
        assert answers == [(200, ["x"])] * 3 * size
        assert 0 < most <= size, f"{most} worker processes for {size} slots"

        # A worker killed mid-job takes its pool processes along (none is left to run on).
        threads, answers = posting(server.port, "span", size)
        assert wait_until(lambda: len(busy(pool_processes(pid, 2))) == size, 30)
        workers = children(pid)
        victim = next(worker for worker in workers if children(worker))
        orphans = children(victim)
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: not any(map(alive, orphans)), 5), [p for p in orphans if alive(p)]
        for thread in threads:
            thread.join()
        # Its slots were not lost with it: as many jobs as slots still run at the same time.
        threads, answers = posting(server.port, "span", size)
        for thread in threads:
            thread.join()
        assert [status for status, _ in answers] == [200] * size, answers
        spans = [span for _, [span] in answers]
        assert max(start for start, _ in spans) < min(end for _, end in spans), spans

        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
        assert not pool_processes(pid, 2)


@LOOP_NAMES
@pytest.mark.parametrize("workers", [1, 2])
def test_a_504_frees_its_slot_and_shutdown_does_not_wait_for_abandoned_jobs(
    loop: str, workers: int, tmp_path: Path
) -> None:
    size = default_size()
    grace = 10.0
    args = ("--timeout-workflow", "5", "--timeout-graceful-shutdown", str(grace))
    with serving(loop, workers, *args, tmp_path=tmp_path) as server:
        pid = server.process.pid
        # Every slot taken by a job that outlives its request: each 504 kills its job.
        threads, answers = posting(server.port, "spin", size)
        for thread in threads:
            thread.join()
        assert [status for status, _ in answers] == [504] * size
        # The next job gets a process in time (the 504s' jobs held none any more).
        status, pids = post(server.port, "pid", [1])
        assert status == 200 and pids[0] in pool_processes(pid, workers)
        # SIGTERM: the jobs abandoned by the 504s and the idle worker process do not hold the exit.
        busy = pool_processes(pid, workers)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
        assert time.monotonic() - started < grace
        assert not any(map(alive, busy))
