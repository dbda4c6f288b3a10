"""The workflow engine: elements stream through tasks in batches.

A workflow splits its elements into batches (``batch``, default 100); each batch goes
through every task in order. A task picks the elements it accepts (its kind and ``select``),
unpacks txtai's ``{"id", "text", "tags"}`` documents, calls its action(s) on them, in
sub-batches of the task's own ``batch`` when that is smaller, merges the results of several
actions (``merge``) and puts them back in place; the other elements pass through unchanged.
An action takes a list of elements (plus the task's ``args``) and returns a list of the same
length.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runtime import Runtime

DEFAULT_BATCH = 100
MERGES = ("hstack", "vstack", "concat")
CONCURRENCY = ("thread", "process")
DOCUMENT_KEYS = frozenset({"id", "text", "tags"})


@dataclass(frozen=True, slots=True)
class Action:
    """A resolved callable. Sync ones run in a worker thread (or process) so the loop keeps serving.

    An action whose function has ``wants_runtime = True`` (the built-in pipelines that open
    URLs) is also given ``runtime=``, the app's shared session and safeopen policy.
    """

    name: str
    function: Callable[..., Any]
    is_async: bool
    wants_runtime: bool = False

    async def __call__(
        self,
        batch: list[Any],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        runtime: Runtime | None = None,
        concurrency: str = "thread",
    ) -> list[Any]:
        if self.wants_runtime:
            kwargs = {**kwargs, "runtime": runtime}
        if self.is_async:
            result = await self.function(batch, *args, **kwargs)
        else:
            call = functools.partial(self.function, batch, *args, **kwargs)
            if runtime is None:  # a workflow called outside a server
                result = await asyncio.get_running_loop().run_in_executor(None, call)
            elif concurrency == "process":  # its process is killed if the request is cancelled
                result = await runtime.processes.run(call)
            else:
                result = await runtime.to_thread(call)
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
    accept: Callable[[Any], bool] | None = None  # the task kind's selection (url, file)
    prepare: Callable[[Any], Any] | None = None  # the kind's check of a chosen element (safeopen)
    select: tuple[re.Pattern[str], ...] = ()  # txtai's select: regexes a string element must match
    unpack: bool = True
    merge: str = "hstack"
    concurrency: str = "thread"
    initialize: Callable[[], Any] | None = None
    finalize: Callable[[], Any] | None = None

    async def __call__(self, elements: list[Any], runtime: Runtime | None = None) -> list[Any]:
        if self._takes_all(elements):  # the common case, without the bookkeeping below
            return await self.actions[0](elements, self.args, self.kwargs, runtime, self.concurrency)
        chosen = [i for i, element in enumerate(elements) if self._accepts(self._unpacked(element))]
        data = [self._unpacked(elements[i]) for i in chosen]
        if self.prepare is not None:
            data = [self.prepare(element) for element in data]
        size = self.batch or len(data) or 1
        outputs: list[list[Any]] = []
        for start in range(0, len(data), size):
            outputs.extend(await self._run(data[start : start + size], runtime))
        # Each element becomes a slot: itself when not chosen, its result(s) when chosen.
        slots: list[list[Any]] = [[element] for element in elements]
        for i, results in zip(chosen, outputs):
            slots[i] = [self._repacked(elements[i], result) for result in results]
        return [item for slot in slots for item in slot]

    def _takes_all(self, elements: list[Any]) -> bool:
        """Whether one action takes every element as it is, in one call."""
        return (
            len(self.actions) == 1
            and self.accept is None
            and self.prepare is None
            and not self.select
            and (self.batch is None or len(elements) <= self.batch)
            and not (self.unpack and any(map(_is_document, elements)))
        )

    def _accepts(self, element: Any) -> bool:
        if self.accept is not None and not self.accept(element):
            return False
        return not self.select or isinstance(element, str) and any(p.search(element) for p in self.select)

    def _unpacked(self, element: Any) -> Any:
        return element["text"] if self.unpack and _is_document(element) else element

    def _repacked(self, element: Any, result: Any) -> Any:
        return {**element, "text": result} if self.unpack and _is_document(element) else result

    async def _run(self, batch: list[Any], runtime: Runtime | None) -> list[list[Any]]:
        """Per element, the list of what it becomes (several rows with ``vstack``)."""
        if len(self.actions) == 1:  # no gather: it would cost a task and a loop iteration
            return [
                [result] for result in await self.actions[0](batch, self.args, self.kwargs, runtime, self.concurrency)
            ]
        outputs = await asyncio.gather(
            *(action(batch, self.args, self.kwargs, runtime, self.concurrency) for action in self.actions)
        )
        rows = [list(row) for row in zip(*outputs)]
        if self.merge == "vstack":  # one row per action's result
            return rows
        if self.merge == "concat":  # txtai joins the results' text with ". "
            return [[". ".join(str(value) for value in row)] for row in rows]
        return [[row] for row in rows]  # hstack: one row per element, a column per action


def _is_document(element: Any) -> bool:
    return isinstance(element, dict) and "text" in element and element.keys() <= DOCUMENT_KEYS


@dataclass(frozen=True, slots=True)
class Schedule:
    """A workflow's ``schedule``: run on ``elements`` at each time of ``cron``."""

    cron: str
    elements: tuple[Any, ...] = ()
    iterations: int | None = None  # None: for as long as the server runs


@dataclass(frozen=True, slots=True)
class Workflow:
    """A named sequence of tasks."""

    name: str
    tasks: tuple[Task, ...]
    batch: int = DEFAULT_BATCH
    schedule: Schedule | None = None

    async def __call__(self, elements: list[Any], runtime: Runtime | None = None) -> list[Any]:
        for task in self.tasks:
            if task.initialize is not None:
                await _call(task.initialize, runtime)
        try:
            results: list[Any] = []
            for start in range(0, len(elements), self.batch):
                if start:  # let the loop in between batches: async actions may never suspend
                    await asyncio.sleep(0)
                batch = elements[start : start + self.batch]
                for task in self.tasks:
                    batch = await task(batch, runtime)
                results.extend(batch)
            return results
        finally:
            for task in self.tasks:
                if task.finalize is not None:
                    await _call(task.finalize, runtime)


async def _call(function: Callable[[], Any], runtime: Runtime | None) -> Any:
    """Call a no-argument hook: await it when async, in a thread when sync (the runtime's, if any)."""
    if asyncio.iscoroutinefunction(function):
        return await function()
    if runtime is None:
        return await asyncio.to_thread(function)
    return await runtime.to_thread(function)
