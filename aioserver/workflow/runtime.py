"""What running workflows share, owned by the app's lifecycle: the client session, the
safeopen policy, the threads and worker processes, and the scheduled runs.

:func:`setup_workflow_runtime` registers all of it on an app (one ``cleanup_ctx``), so that it
starts with the server and stops cleanly with it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
from aiohttp import web

from .processes import ProcessPool
from .safeopen import SafeOpen, create_session

if TYPE_CHECKING:
    from .engine import Workflow

logger = logging.getLogger("aioserver.workflow")
ACTION_THREADS = "aioserver-action"  # the name prefix of the threads sync actions run in
T = TypeVar("T")


@dataclass(slots=True)
class Runtime:
    """Services shared by every workflow run of one app."""

    session: aiohttp.ClientSession
    safeopen: SafeOpen
    # Sync actions run here, not in asyncio's default executor: on shutdown this pool is
    # left without waiting, so a thread a timed-out workflow abandoned cannot hold the exit.
    threads: concurrent.futures.ThreadPoolExecutor = field(
        # 40 threads, as many as Starlette's thread pool gives txtai's sync endpoints.
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(40, thread_name_prefix=ACTION_THREADS)
    )
    # CPU work (the built-in pipelines, ``concurrency: process`` tasks) runs in worker
    # processes, started on first use; a job whose request is cancelled has its process killed.
    # With --workers, their number is bounded for the whole server (config.process_slots).
    processes: ProcessPool = field(default_factory=ProcessPool)

    async def to_thread(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in one of the runtime's threads (asyncio's default executor is the server's)."""
        return await asyncio.get_running_loop().run_in_executor(self.threads, function, *args)

    async def close(self) -> None:
        """Close the session, leave the threads, kill the worker processes."""
        await self.session.close()
        self.threads.shutdown(wait=False, cancel_futures=True)
        await self.processes.close()


def setup_workflow_runtime(app: web.Application) -> None:
    """Give the app its workflow runtime and scheduled runs, for the app's lifetime."""
    app.cleanup_ctx.append(_runtime_context)


async def _runtime_context(app: web.Application) -> AsyncIterator[None]:
    from ..keys import CONFIG, RUNTIME  # here: keys imports this module's Runtime

    config = app[CONFIG]
    runtime = Runtime(
        session=create_session(config.safeopen),
        safeopen=config.safeopen,
        processes=ProcessPool(slots=config.process_slots),
    )
    app[RUNTIME] = runtime
    schedules = start_schedules(config.workflows, runtime)
    try:
        yield
    finally:
        for task in schedules:
            task.cancel()
        await asyncio.gather(*schedules, return_exceptions=True)
        await runtime.close()


def start_schedules(workflows: Mapping[str, Workflow], runtime: Runtime) -> list[asyncio.Task[None]]:
    """One background task per workflow that has a ``schedule``."""
    return [
        asyncio.create_task(run_schedule(workflow, runtime), name=f"schedule {name}")
        for name, workflow in workflows.items()
        if workflow.schedule is not None
    ]


async def run_schedule(workflow: Workflow, runtime: Runtime) -> None:
    """Run a workflow at each time its cron expression gives, ``iterations`` times (or forever)."""
    from croniter import croniter

    schedule = workflow.schedule
    assert schedule is not None
    times = croniter(schedule.cron, time.time())
    run = 0
    logger.info("workflow %s scheduled: %s", workflow.name, schedule.cron)
    while schedule.iterations is None or run < schedule.iterations:
        await asyncio.sleep(max(0.0, times.get_next(float) - time.time()))
        run += 1
        try:
            results = await workflow(list(schedule.elements), runtime)
        except Exception:
            # A failing run is logged and the schedule goes on, as a failing request would.
            logger.exception("scheduled run %d of workflow %s failed", run, workflow.name)
        else:
            logger.info("scheduled run %d of workflow %s: %d results", run, workflow.name, len(results))
    logger.info("workflow %s: schedule done after %d runs", workflow.name, run)
