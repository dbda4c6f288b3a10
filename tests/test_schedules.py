"""Scheduled workflows as deployed: ``python -m aioserver`` on both loops, with and without workers.

A schedule runs ``sample_actions.stamp``, which appends ``start PID TIME`` and ``end PID TIME``
to a file for each run: the file is what the host did, whatever the processes.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import pytest

from aioserver.cli import main
from aioserver.workflow.schedules import next_time, parse_run_message, run_message

from conftest import Server

LOOPS = ["asyncio", "uvloop"]
EVERY_SECOND = "* * * * * *"  # croniter: minute hour day month weekday second


class Event(NamedTuple):
    kind: str  # start or end
    pid: int
    time: float


def events(path: Path) -> list[Event]:
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        kind, pid, when = line.split()
        found.append(Event(kind, int(pid), float(when)))
    return found


def starts(path: Path) -> list[Event]:
    return [event for event in events(path) if event.kind == "start"]


def config(
    path: Path, cron: str = EVERY_SECOND, seconds: float = 0.0, iterations: int | None = None, **server: Any
) -> str:
    """Inline config (JSON is YAML): workflow ``tick`` stamps ``path`` on ``cron``."""
    schedule: dict[str, Any] = {"cron": cron, "elements": [str(path)]}
    if iterations is not None:
        schedule["iterations"] = iterations
    task = {"action": "sample_actions.stamp", "args": {"seconds": seconds}}
    return json.dumps({"server": server, "workflow": {"tick": {"tasks": [task], "schedule": schedule}}})


def serve(text: str, loop: str, workers: int = 1, *args: str, env: dict[str, str] | None = None) -> Server:
    return Server("--config", text, "--loop", loop, "--workers", str(workers), *args, env=env, listeners=workers)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, server: Server) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout}s:\n" + "".join(server.log)
        time.sleep(0.02)


def logged(server: Server, text: str) -> Callable[[], bool]:
    return lambda: text in "".join(server.log)


def stop(server: Server, timeout: float = 20) -> int:
    server.process.send_signal(signal.SIGTERM)
    return server.process.wait(timeout=timeout)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("loop", LOOPS)
def test_one_run_per_tick_on_the_host(tmp_path: Path, loop: str, workers: int) -> None:
    path = tmp_path / "runs"
    with serve(config(path), loop, workers) as server:
        wait_for(lambda: len(starts(path)) >= 4, 15, "four runs", server)
        assert stop(server) == 0
    runs = starts(path)
    seconds = [math.floor(run.time) for run in runs]
    assert len(set(seconds)) == len(seconds), runs  # never two runs in one tick
    assert len({run.pid for run in runs}) == 1  # one scheduling process
    assert runs[0].pid != server.process.pid or workers == 1  # a worker, not the parent
    assert "schedules off" not in "".join(server.log)


@pytest.mark.parametrize("loop", LOOPS)
def test_iterations_survive_the_scheduling_worker_killed(tmp_path: Path, loop: str) -> None:
    path = tmp_path / "runs"
    with serve(config(path, iterations=3), loop, 2) as server:
        wait_for(lambda: len(starts(path)) >= 1, 15, "a first run", server)
        victim = starts(path)[0].pid
        os.kill(victim, signal.SIGKILL)  # between two runs: the next tick is up to a second away
        wait_for(lambda: len(starts(path)) >= 3, 20, "three runs", server)
        wait_for(logged(server, "workflow tick: schedule done after 3 runs"), 10, "the schedule's end", server)
        time.sleep(2.5)  # and then nothing more: not a fresh count of 3 in the replacement
        runs = starts(path)
        assert len(runs) == 3, runs
        assert runs[0].pid == victim and runs[-1].pid != victim  # the replacement went on counting
        assert f"(pid {victim}) was killed by SIGKILL" in "".join(server.log)
        assert stop(server) == 0


@pytest.mark.parametrize("loop", LOOPS)
def test_a_run_longer_than_its_interval_skips_the_missed_ticks(tmp_path: Path, loop: str) -> None:
    path = tmp_path / "runs"
    # Every second, each run taking 1.5 s: the tick that passes while one runs is skipped.
    with serve(config(path, seconds=1.5, iterations=2), loop) as server:
        wait_for(logged(server, "schedule done after 2 runs"), 20, "two runs", server)
        assert stop(server) == 0
    first_start, first_end, second_start, _ = events(path)
    assert (first_start.kind, first_end.kind, second_start.kind) == ("start", "end", "start")
    # The next run waits for the next tick after the first ended, instead of starting at once.
    assert second_start.time >= math.floor(first_end.time) + 1, events(path)
    assert "outlasted its interval" in "".join(server.log)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_scheduled_run_gets_the_workflow_time_limit(tmp_path: Path, loop: str) -> None:
    path = tmp_path / "runs"
    with serve(config(path, seconds=60, iterations=1), loop, 1, "--timeout-workflow", "1") as server:
        wait_for(lambda: len(starts(path)) >= 1, 15, "a run", server)
        wait_for(
            logged(server, "scheduled run 1 of workflow tick cancelled: running longer than"), 10, "timeout", server
        )
        assert [event.kind for event in events(path)] == ["start"]  # cancelled: no end
        assert stop(server, timeout=10) == 0  # nothing left running to hold the shutdown


@pytest.mark.parametrize(("seconds", "grace", "finished"), [(2.0, 15, True), (60.0, 1, False)])
@pytest.mark.parametrize("loop", LOOPS)
def test_shutdown_gives_a_running_schedule_the_grace_period(
    tmp_path: Path, loop: str, seconds: float, grace: float, finished: bool
) -> None:
    path = tmp_path / "runs"
    text = config(path, seconds=seconds, iterations=1)
    with serve(text, loop, 1, "--timeout-graceful-shutdown", str(grace)) as server:
        wait_for(lambda: len(starts(path)) >= 1, 15, "a run", server)
        started = time.monotonic()
        assert stop(server) == 0
        took = time.monotonic() - started
    log = "".join(server.log)
    assert [event.kind for event in events(path)] == (["start", "end"] if finished else ["start"]), log
    if finished:
        assert "waiting up to 15s for scheduled run 1 of workflow tick" in log
    else:
        assert "scheduled run 1 of workflow tick cancelled: still running after the 1s graceful-shutdown" in log
        assert took < 10  # the grace period bounds it, not the run's minute


@pytest.mark.parametrize("loop", LOOPS)
def test_cron_times_are_the_servers_local_time(tmp_path: Path, loop: str) -> None:
    zone = "Asia/Kolkata"  # UTC+05:30: its hours are never UTC's
    hour = datetime.now(ZoneInfo(zone)).hour
    # Every second of this local hour and the next (in case the hour ends meanwhile).
    cron = f"* {hour},{(hour + 1) % 24} * * * *"
    path = tmp_path / "runs"
    with serve(config(path, cron=cron), loop, 2, env={"TZ": zone}) as server:
        wait_for(lambda: len(starts(path)) >= 2, 15, "runs at the local hour", server)
        assert stop(server) == 0


@pytest.mark.parametrize("how", ["flag", "config"])
@pytest.mark.parametrize("loop", LOOPS)
def test_no_schedules_on_this_host(tmp_path: Path, loop: str, how: str) -> None:
    path = tmp_path / "runs"
    text = config(path, schedules=False) if how == "config" else config(path)
    args = ("--no-schedules",) if how == "flag" else ()
    with serve(text, loop, 2, *args) as server:
        wait_for(
            logged(server, "schedules off on this host (--no-schedules): not running tick"), 10, "word of it", server
        )
        time.sleep(2.5)
        assert stop(server) == 0
    assert events(path) == []


# -- in-process: the pieces


@pytest.fixture
def new_york(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time is New York's (DST changes on 2026-03-08 and 2026-11-01)."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def utc(text: str) -> float:
    return datetime.fromisoformat(text + "+00:00").timestamp()


@pytest.mark.usefixtures("new_york")
def test_cron_times_follow_the_local_clock_across_dst() -> None:
    assert next_time("30 1 * * *", utc("2026-07-01T00:00")) == utc("2026-07-01T05:30")  # 01:30 EDT
    assert next_time("30 1 * * *", utc("2026-12-01T00:00")) == utc("2026-12-01T06:30")  # 01:30 EST
    # The hour the clock repeats (01:00-02:00 on 2026-11-01) runs once: the first time.
    first = next_time("30 1 * * *", utc("2026-11-01T04:00"))
    assert first == utc("2026-11-01T05:30")
    assert next_time("30 1 * * *", first) == utc("2026-11-02T06:30")
    assert next_time("* * * * *", utc("2026-11-01T05:59:30")) == utc("2026-11-01T07:00")  # 02:00 EST
    # The hour the clock skips (02:00-03:00 on 2026-03-08) comes right after the change.
    assert next_time("30 2 * * *", utc("2026-03-08T05:00")) == utc("2026-03-08T07:30")  # 03:30 EDT
    assert next_time("* * * * *", utc("2026-03-08T06:59:30")) == utc("2026-03-08T07:00")  # 03:00 EDT


def test_next_time_is_strictly_after() -> None:
    start = math.floor(time.time())
    assert next_time(EVERY_SECOND, start) == start + 1
    assert next_time(EVERY_SECOND, start + 0.999) == start + 1


@pytest.mark.parametrize(
    "line",
    [
        "X_SCHEDULE_RUN=",
        "X_SCHEDULE_RUN=[",
        'X_SCHEDULE_RUN=["w"]',
        'X_SCHEDULE_RUN=["w", 1, 2]',
        'X_SCHEDULE_RUN=["w", "1"]',
        'X_SCHEDULE_RUN=["w", true]',
        'X_SCHEDULE_RUN={"w": 1}',
        "X_SCHEDULE_RUN=[1, 1]",
        'WATCHDOG=1["w", 1]',
    ],
)
def test_a_bad_run_report_is_ignored(line: str) -> None:
    assert parse_run_message(line) is None


def test_run_reports_keep_any_name_on_one_line() -> None:
    message = run_message("odd\nname=1", 7)
    assert "\n" not in message
    assert parse_run_message(message) == ("odd\nname=1", 7)


def test_no_schedules_flag_and_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--no-schedules", "--check"], env={}) == 0
    assert "  schedules = False  (command line)" in capsys.readouterr().out
    assert main(["--schedules", "--check"], env={}) == 2  # only the switch that turns them off
