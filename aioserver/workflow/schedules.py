"""Scheduled workflows: each workflow's ``schedule:`` run at its cron's times, once per host.

The policy (the README's "Schedules" says the same to users):

- Cron times are the server's local time, as cron's (``TZ``, else ``/etc/localtime``).
- A schedule has one run at a time. A run that outlasts its interval is not followed by the
  runs it missed: the next one starts at the first time after it ended (missed times skipped,
  never caught up back-to-back).
- A run counts toward ``iterations`` from its start, whatever its outcome: success, failure,
  cut off by ``--timeout-workflow``, or lost with its process (a run is never repeated).
- Each run has the ``--timeout-workflow`` limit; past it, it is cancelled and logged.
- At shutdown a schedule waiting for its next time stops at once; a running one gets the
  graceful-shutdown period to finish, then is cancelled and logged.
- One process per host runs the schedules (:class:`HostSchedules`): the only one, or under
  ``--workers`` the worker of slot 0, which reports each run to the parent; the parent hands
  the counts so far to that worker's replacement, so ``iterations`` outlives a worker.
- With ``--redis``, those processes of every host contend for each tick (:mod:`.ticks`): one
  runs it, one run at a time in the fleet, and ``iterations`` counts across the fleet. A tick
  that cannot be claimed (Redis away) is skipped; one more than ``ticks.LATE`` seconds past
  is not claimed at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from ..fleet import Unavailable
from .ticks import LATE

if TYPE_CHECKING:
    from .engine import Workflow
    from .runtime import Runtime
    from .ticks import FleetTicks

logger = logging.getLogger("aioserver.workflow")

# The worker's report of a run to the parent, an sd_notify-style line on its channel (the X_
# prefix that sd_notify(3) leaves to applications): a JSON [workflow name, runs so far].
RUN_MESSAGE = "X_SCHEDULE_RUN="
# Sleep at most this long at once, then look at the clock again: asyncio sleeps on the
# monotonic clock, cron times are on the wall clock (which may be set, or jump after a suspend).
LONGEST_SLEEP = 60.0


def _nobody(name: str, runs: int) -> None:
    """Where runs are reported when this process is the host's only one."""


@dataclass(slots=True)
class HostSchedules:
    """This process's part in its host's schedules, which one process runs.

    ``here``: whether this process runs them; ``runs``: how many runs each scheduled workflow
    has had on the host so far (counted on from there); ``report``: told of each new run, so
    that the count outlives this process.
    """

    here: bool = True
    runs: dict[str, int] = field(default_factory=dict)
    report: Callable[[str, int], None] = _nobody


def run_message(name: str, runs: int) -> str:
    """The line that reports ``runs`` runs of workflow ``name`` (json escapes any newline in it)."""
    return RUN_MESSAGE + json.dumps([name, runs])


def parse_run_message(line: str) -> tuple[str, int] | None:
    """The workflow name and run count of a :func:`run_message` line; None for anything else."""
    if not line.startswith(RUN_MESSAGE):
        return None
    try:
        name, runs = json.loads(line[len(RUN_MESSAGE) :])
    except ValueError:  # bad JSON, or not a pair
        return None
    if not isinstance(name, str) or not isinstance(runs, int) or isinstance(runs, bool):
        return None
    return name, runs


def next_time(cron: str, after: float) -> float:
    """The first time of ``cron`` strictly after ``after`` (seconds since the epoch), in local time.

    croniter walks the local wall clock; each time is converted back to the epoch. Around a
    DST change the wall clock repeats an hour (its times are taken once, the first time) or
    skips one (its times come right after the change), as cron does.
    """
    from croniter import croniter

    times = croniter(cron, datetime.fromtimestamp(after))
    while True:
        when: float = times.get_next(datetime).timestamp()
        if when > after:  # a repeated hour's wall-clock times map to its first pass, already gone
            return when


class Scheduler:
    """Runs the scheduled workflows of one app, when this process is the host's scheduler."""

    def __init__(
        self,
        workflows: Mapping[str, Workflow],
        enabled: bool,
        timeout: float,
        host: HostSchedules,
        fleet: FleetTicks | None = None,
    ) -> None:
        self.workflows = [workflow for workflow in workflows.values() if workflow.schedule is not None]
        self.enabled = enabled  # --no-schedules: not on this host
        self.timeout = timeout  # --timeout-workflow
        self.host = host
        self.fleet = fleet  # with --redis: each tick is claimed there, and runs where claimed
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.running: dict[str, int] = {}  # workflow name -> its run in progress
        self.stopping = False
        self._grace = 0.0
        self._cut: set[str] = set()  # runs cancelled for outlasting the graceful-shutdown period
        self._timers: list[asyncio.TimerHandle] = []

    def start(self, runtime: Runtime | None) -> None:
        """Start a task per scheduled workflow, if this process runs the host's schedules."""
        if not self.workflows or not self.host.here:
            return
        if not self.enabled:
            names = ", ".join(workflow.name for workflow in self.workflows)
            logger.info("schedules off on this host (--no-schedules): not running %s", names)
            return
        for workflow in self.workflows:
            assert workflow.schedule is not None
            runs = self.host.runs.get(workflow.name, 0)
            if workflow.schedule.iterations is not None and runs >= workflow.schedule.iterations:
                logger.info("workflow %s: schedule already done (%d runs)", workflow.name, runs)
                continue
            self.tasks[workflow.name] = asyncio.create_task(
                self._keep(workflow, runtime), name=f"schedule {workflow.name}"
            )

    def stop(self, grace: float, cut_at: float | None = None) -> None:
        """No more runs: a schedule waiting for its time ends now, a running one within ``grace``
        seconds (the graceful-shutdown period), cut off at ``cut_at`` (loop time) when given:
        with the requests in flight, before the period ends."""
        self.stopping = True
        self._grace = grace
        loop = asyncio.get_running_loop()
        when = loop.time() + grace if cut_at is None else cut_at
        for name, task in self.tasks.items():
            run = self.running.get(name)
            if run is None:
                task.cancel()
                continue
            logger.info("waiting up to %gs for scheduled run %d of workflow %s", grace, run, name)
            self._timers.append(loop.call_at(when, self._cut_off, name))

    async def close(self) -> None:
        """Wait for the schedules stopped by :meth:`stop` (cancel them at once if it was not called)."""
        if not self.stopping:
            for task in self.tasks.values():
                task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        for timer in self._timers:
            timer.cancel()

    def _cut_off(self, name: str) -> None:
        task = self.tasks[name]
        if not task.done():
            self._cut.add(name)
            task.cancel()

    async def _keep(self, workflow: Workflow, runtime: Runtime | None) -> None:
        """Run ``workflow`` at its schedule's times, ``iterations`` times in all (or forever).

        In all on the host; with --redis, in all on the fleet, each time where it is claimed.
        """
        schedule = workflow.schedule
        assert schedule is not None
        name, cron, host = workflow.name, schedule.cron, self.host

        def more() -> bool:
            return schedule.iterations is None or host.runs.get(name, 0) < schedule.iterations

        after = time.time()
        logger.info(
            "workflow %s scheduled: %s (local time), next run at %s, %d runs so far%s",
            name,
            cron,
            _local(next_time(cron, after)),
            host.runs.get(name, 0),
            " (each time by one process of the fleet: redis)" if self.fleet else "",
        )
        while more():
            if self.fleet is not None:
                after = max(after, time.time() - LATE)  # see ticks.LATE: a tick long past is not claimed
            due = next_time(cron, after)
            while (wait := due - time.time()) > 0:
                await asyncio.sleep(min(wait, LONGEST_SLEEP))
            run = await self._claim(name, due, schedule.iterations)
            if run is None:  # another process of the fleet runs it, or Redis is away
                after = due
                continue
            self.running[name] = run
            try:
                # With --redis, the run holds the schedule: one run at a time in the fleet, as on a host.
                async with self.fleet.holding(name) if self.fleet else contextlib.nullcontext():
                    await self._run(workflow, run, runtime)
            finally:
                del self.running[name]
            if self.stopping:
                return
            ended = time.time()
            if next_time(cron, due) <= ended and more():
                logger.warning(
                    "scheduled run %d of workflow %s outlasted its interval (%.1fs): the times missed"
                    " meanwhile are skipped, the next run is at %s",
                    run,
                    name,
                    ended - due,
                    _local(next_time(cron, ended)),
                )
            after = max(due, ended)
        logger.info(
            "workflow %s: schedule done after %d runs%s",
            name,
            host.runs.get(name, 0),
            " across the fleet" if self.fleet else "",
        )

    async def _claim(self, name: str, due: float, iterations: int | None) -> int | None:
        """The number of the run this process makes at ``due``, counted before it runs; None if not here."""
        host = self.host
        if self.fleet is None:  # the host's own tick
            run = host.runs[name] = host.runs.get(name, 0) + 1
            host.report(name, run)  # before it runs: a run is counted once, even if its process dies
            return run
        try:
            claim = await self.fleet.claim(name, due, iterations, host.runs.get(name, 0))
        except Unavailable:  # fleet.py logs the outage once; a line per tick would flood the log
            logger.debug("workflow %s: time %s skipped: redis is away", name, _local(due))
            return None
        if claim.runs > host.runs.get(name, 0):  # the fleet's count, kept by the parent for a replacement
            host.runs[name] = claim.runs
            host.report(name, claim.runs)
        if not claim.ours:
            logger.debug("workflow %s: time %s is another process's (%d runs so far)", name, _local(due), claim.runs)
            return None
        return claim.runs

    async def _run(self, workflow: Workflow, run: int, runtime: Runtime | None) -> None:
        """One run, within the time limit; its outcome logged, never raised (the schedule goes on)."""
        assert workflow.schedule is not None
        name = workflow.name
        limit = asyncio.timeout(self.timeout)
        try:
            async with limit:
                # A copy each time: an action that changes its elements cannot change the next run's.
                results = await workflow(copy.deepcopy(list(workflow.schedule.elements)), runtime)
        except asyncio.CancelledError:
            if name in self._cut:
                logger.warning(
                    "scheduled run %d of workflow %s cancelled: still running after the %gs graceful-shutdown period",
                    run,
                    name,
                    self._grace,
                )
            raise
        except Exception as exc:
            if isinstance(exc, TimeoutError) and limit.expired():
                logger.error(
                    "scheduled run %d of workflow %s cancelled: running longer than %gs (--timeout-workflow)",
                    run,
                    name,
                    self.timeout,
                )
            else:  # as a failing request would: logged, and the schedule goes on
                logger.exception("scheduled run %d of workflow %s failed", run, name)
        else:
            logger.info("scheduled run %d of workflow %s: %d results", run, name, len(results))


def _local(when: float) -> str:
    return datetime.fromtimestamp(when).astimezone().isoformat(timespec="seconds")
