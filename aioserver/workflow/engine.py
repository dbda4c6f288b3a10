"""The workflow engine: elements stream through tasks in batches.

A workflow splits its elements into batches (``batch``, default 100); each batch goes
through every task in order. A task calls its action(s) on the batch, in sub-batches of the
task's own ``batch`` when that is smaller. An action takes a list of elements (plus the
task's ``args``) and returns a list of the same length.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_BATCH = 100


@dataclass(frozen=True, slots=True)
class Action:
    """A resolved callable. Sync ones run in a worker thread so the loop keeps serving."""

    name: str
    function: Callable[..., Any]
    is_async: bool

    async def __call__(self, batch: list[Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[Any]:
        if self.is_async:
            result = await self.function(batch, *args, **kwargs)
        else:
            call = functools.partial(self.function, batch, *args, **kwargs)
            result = await asyncio.get_running_loop().run_in_executor(None, call)
        return self._checked(result, len(batch))

    def _checked(self, result: Any, expected: int) -> list[Any]:
        if isinstance(result, (str, bytes, Mapping)) or not hasattr(result, "__iter__"):
            raise TypeError(f"action {self.name!r} returned {type(result).__name__}, expected a list of results")
        results = list(result)
        if len(results) != expected:
            raise ValueError(f"action {self.name!r} returned {len(results)} results for {expected} elements")
        return results


@dataclass(frozen=True, slots=True)
class Task:
    """One step of a workflow: one action, or several whose results are merged per element."""

    actions: tuple[Action, ...]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    batch: int | None = None

    async def __call__(self, elements: list[Any]) -> list[Any]:
        size = self.batch or len(elements)
        if len(elements) <= size:
            return await self._run(elements)
        results: list[Any] = []
        for start in range(0, len(elements), size):
            results.extend(await self._run(elements[start : start + size]))
        return results

    async def _run(self, batch: list[Any]) -> list[Any]:
        if len(self.actions) == 1:
            return await self.actions[0](batch, self.args, self.kwargs)
        outputs = await asyncio.gather(*(action(batch, self.args, self.kwargs) for action in self.actions))
        # txtai's default merge, "hstack": one row per element, one column per action.
        return [list(row) for row in zip(*outputs)]


@dataclass(frozen=True, slots=True)
class Workflow:
    """A named sequence of tasks."""

    name: str
    tasks: tuple[Task, ...]
    batch: int = DEFAULT_BATCH

    async def __call__(self, elements: list[Any]) -> list[Any]:
        results: list[Any] = []
        for start in range(0, len(elements), self.batch):
            batch = elements[start : start + self.batch]
            for task in self.tasks:
                batch = await task(batch)
            results.extend(batch)
        return results
