"""What running workflows share, owned by the app's lifecycle: the client session, the
safeopen policy, the threads and worker processes, and the scheduled runs.

:func:`setup_workflow_runtime` registers all of it on an app (one ``cleanup_ctx``, and an
``on_shutdown`` hook that gives a running schedule the graceful-shutdown period), so that it
starts with the server and stops cleanly with it. The schedules themselves: :mod:`.schedules`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from .processes import ProcessPool
from .safeopen import SafeOpen, create_session
from .schedules import HostSchedules, Scheduler
from .ticks import FleetTicks

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


def setup_workflow_runtime(app: web.Application, schedules: HostSchedules | None = None) -> None:
    """Give the app its workflow runtime and scheduled runs, for the app's lifetime.

    ``schedules``: this process's part in the host's schedules (by default, it runs them).
    With --redis (``app[FLEET]``), it claims each tick from the fleet.
    """
    from ..keys import CONFIG, FLEET  # here: keys imports this module's Runtime
    from ..readiness import READINESS

    settings = app[CONFIG].settings
    fleet = app.get(FLEET)
    scheduler = Scheduler(
        app[CONFIG].workflows,
        settings.schedules,
        settings.timeout_workflow,
        schedules or HostSchedules(),
        FleetTicks(fleet) if fleet is not None else None,
    )

    async def stop_schedules(app: web.Application) -> None:
        # At the start of the shutdown, as requests start draining: a running schedule gets the
        # same grace period as they do, and is cut off when they are (the runtime's cleanup
        # waits for it); the server says when (without it, a test's app: the grace from now).
        scheduler.stop(settings.timeout_graceful_shutdown, app[READINESS].cut_at if READINESS in app else None)

    app.cleanup_ctx.append(functools.partial(_runtime_context, scheduler=scheduler))
    app.on_shutdown.append(stop_schedules)


async def _runtime_context(app: web.Application, scheduler: Scheduler) -> AsyncIterator[None]:
    from ..keys import CONFIG, RUNTIME

    config = app[CONFIG]
    runtime = Runtime(
        session=create_session(config.safeopen),
        safeopen=config.safeopen,
        processes=ProcessPool(slots=config.process_slots),
    )
    app[RUNTIME] = runtime
    scheduler.start(runtime)
    try:
        yield
    finally:
        await scheduler.close()
        await runtime.close()
