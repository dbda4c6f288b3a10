"""Actions for the tests, referenced by dotted path (tests/ is on sys.path under pytest)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import warnings
from typing import Any

CALLS: list[int] = []  # batch sizes seen by ``record``


def double(batch: list[Any]) -> list[Any]:
    return [x * 2 for x in batch]


async def async_double(batch: list[Any]) -> list[Any]:
    await asyncio.sleep(0)
    return [x * 2 for x in batch]


def record(batch: list[Any]) -> list[Any]:
    CALLS.append(len(batch))
    return batch


def thread_name(batch: list[Any]) -> list[str]:
    return [threading.current_thread().name for _ in batch]


def add(batch: list[Any], amount: int = 1, *more: int) -> list[Any]:
    return [x + amount + sum(more) for x in batch]


def scale(batch: list[Any], factor: int, offset: int = 0) -> list[Any]:
    return [x * factor + offset for x in batch]


def sleepy(batch: list[Any], seconds: float = 1.0) -> list[Any]:
    time.sleep(seconds)
    return batch


def nap() -> None:
    """A slow sync hook (a task's ``initialize``): blocks a worker thread for a while."""
    time.sleep(8)


def boom(batch: list[Any]) -> list[Any]:
    raise RuntimeError("the action broke: secret-detail-42")


def bad_element(batch: list[Any]) -> list[Any]:
    """An operator's check that names the client's element in its message, and in its cause's."""
    try:
        raise RuntimeError(f"cause: {batch[0]}")
    except RuntimeError as exc:
        raise ValueError(f"bad: {batch[0]}") from exc


def too_few(batch: list[Any]) -> list[Any]:
    return batch[1:]


def not_json(batch: list[Any]) -> list[Any]:
    return [object() for _ in batch]


class Multiplier:
    """A class action: instantiated once with its config section's arguments."""

    instances = 0

    def __init__(self, factor: int = 3) -> None:
        type(self).instances += 1
        self.factor = factor

    def __call__(self, batch: list[Any]) -> list[Any]:
        return [x * self.factor for x in batch]


class AsyncPrefixer:
    def __init__(self, prefix: str = ">") -> None:
        self.prefix = prefix

    async def __call__(self, batch: list[Any]) -> list[Any]:
        return [self.prefix + str(x) for x in batch]


class Broken:
    def __init__(self) -> None:
        raise ValueError("cannot start")


NOT_CALLABLE = 42


def pid(batch: list[Any]) -> list[int]:
    import os

    return [os.getpid() for _ in batch]


def spin(batch: list[Any], seconds: float = 1.0) -> list[Any]:
    """CPU-bound: busy for ``seconds`` without sleeping, holding its interpreter's GIL."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return batch


def spin_span(batch: list[Any], seconds: float = 1.0) -> list[tuple[float, float]]:
    """``spin``, answering when it started and ended (wall clock, comparable between processes).

    A tuple per element: a list would become two elements (txtai's one-to-many).
    """
    started = time.time()
    spin(batch, seconds)
    return [(started, time.time()) for _ in batch]


HOOKS: list[str] = []


def start() -> None:
    HOOKS.append("start")


async def stop() -> None:
    HOOKS.append("stop")


RUNS: list[int] = []


async def count_runs(batch: list[Any]) -> list[Any]:
    RUNS.append(len(batch))
    return batch


CANCELLED: list[str] = []


async def async_sleepy(batch: list[Any], seconds: float = 1.0) -> list[Any]:
    """Sleeps on the loop; records when a timeout cancels it."""
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        CANCELLED.append("async_sleepy")
        raise
    return batch


async def hold_loop(batch: list[Any], seconds: float = 0.5) -> list[int]:
    """Blocks its worker's event loop on purpose, so that the next connection goes to another."""
    import os

    time.sleep(seconds)
    return [os.getpid() for _ in batch]


async def stamp(batch: list[str], seconds: float = 0.0) -> list[str]:
    """For scheduled runs: appends ``start PID TIME`` to each element (a file path), sleeps
    ``seconds`` on the loop, then appends ``end PID TIME``; a cancelled run has no end line."""
    import os

    def write(event: str) -> None:
        for path in batch:
            with open(path, "a", encoding="utf-8") as file:
                file.write(f"{event} {os.getpid()} {time.time():.6f}\n")

    write("start")
    await asyncio.sleep(seconds)
    write("end")
    return batch


async def block_loop(batch: list[Any], seconds: float = 600) -> list[Any]:
    """A broken async action: sleeps without awaiting, so its process's event loop is stuck."""
    time.sleep(seconds)
    return batch


def warn(batch: list[Any]) -> list[Any]:
    """Log a warning and warn as Python does (from a worker process with ``concurrency: process``), then echo."""
    logging.getLogger("sample_actions").warning("warned about %d elements in process %d", len(batch), os.getpid())
    warnings.warn("a warning of Python's own", UserWarning, stacklevel=1)
    return batch


def pair(batch: list[Any]) -> list[list[Any]]:
    """Each element twice, as a list: one element becomes two (txtai's one-to-many)."""
    return [[x, x] for x in batch]
