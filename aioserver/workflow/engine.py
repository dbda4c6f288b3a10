"""The workflow engine: elements stream through tasks in batches, by txtai's rules.

A workflow splits its elements into batches (``batch``, default 100); each batch goes through
every task in order. A task, as txtai's ``Task`` does:

1. chooses the elements it takes: those its kind accepts (``url``, ``file``, ...) and that
   match one of its ``select`` patterns, looked for in the element's text in lower case;
2. unpacks them: of a tuple of two or more items, txtai's ``(id, data, tags)``, the actions get
   the data (``unpack: false``: the whole tuple); the JSON arrays of a request are such tuples
   (:func:`request_elements`), a JSON object goes whole;
3. prepares each one (its kind's step: a file's path resolved, a template filled);
4. calls its actions, each with its own ``args`` (and ``column``: one item of a tuple), in
   sub-batches of the task's ``batch`` when that is smaller; with no action, the prepared
   elements are the results;
5. merges the results of several actions (``merge``): ``hstack`` a tuple per element, ``vstack``
   one element per result, ``concat`` their text joined by ". ";
6. puts each result back in its element's place (into its tuple, when it was unpacked); a
   result that is a list becomes one element per item (``onetomany``, default true). Elements
   not chosen pass through unchanged.

An action takes a list of elements (plus its ``args``) and returns a list of the same length.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import InvalidElement

if TYPE_CHECKING:
    from .runtime import Runtime

DEFAULT_BATCH = 100
MERGES = ("hstack", "vstack", "concat")
CONCURRENCY = ("thread", "process")


def request_elements(elements: list[Any]) -> list[Any]:
    """A request's elements as txtai's API hands them to a workflow: each JSON array a tuple."""
    if list not in map(type, elements):  # the common case, scanned in C: nothing to copy
        return elements
    return [tuple(element) if isinstance(element, list) else element for element in elements]


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
            # Without arguments to spread (nearly every action): a plain call, cheaper than spreading none.
            result = await (self.function(batch, *args, **kwargs) if args or kwargs else self.function(batch))
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
        # A list, as nearly every action returns: none of the checks of other types (Mapping's is an ABC's).
        if type(result) is not list and (isinstance(result, (str, bytes, Mapping)) or not hasattr(result, "__iter__")):
            raise TypeError(f"action {self.name!r} returned {type(result).__name__}, expected a list of results")
        results = list(result)
        if len(results) != expected:
            raise ValueError(f"action {self.name!r} returned {len(results)} results for {expected} elements")
        return results


@dataclass(frozen=True, slots=True)
class Call:
    """One action of a task, with what the task gives it: ``args`` and the ``column`` it takes."""

    action: Action
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    column: int | None = None  # of a tuple element, the item this action gets


class Many:
    """An element's results that become several elements (txtai's ``OneToMany``)."""

    __slots__ = ("values",)

    def __init__(self, values: list[Any]) -> None:
        self.values = values


@dataclass(frozen=True, slots=True)
class Task:
    """One step of a workflow: its actions (none, one, or several whose results are merged)."""

    calls: tuple[Call, ...]
    kind: str = "default"  # txtai's task: url, file, template... (for --check and errors)
    batch: int | None = None
    accept: Callable[[Any], bool] | None = None  # the task kind's selection (url, file)
    prepare: Callable[[Any], Any] | None = None  # the kind's step before the actions (safeopen, template)
    select: tuple[re.Pattern[str], ...] = ()  # txtai's select: patterns an element's text, lowered, must match
    unpack: bool = True
    merge: str = "hstack"
    onetomany: bool = True
    concurrency: str = "thread"
    initialize: Callable[[], Any] | None = None
    finalize: Callable[[], Any] | None = None
    observe: Callable[[list[Any], list[Any]], None] | None = None  # the console kind's: inputs, outputs
    blocking: bool = False  # whether accept and prepare touch the file system (then: in a thread)
    # Whether one action takes the elements as they are, with nothing to choose, prepare or extract.
    _direct: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        direct = (
            len(self.calls) == 1
            and self.calls[0].column is None
            and self.accept is None
            and self.prepare is None
            and not self.select
            and self.observe is None
        )
        object.__setattr__(self, "_direct", direct)

    @property
    def actions(self) -> tuple[Action, ...]:
        """The task's actions, in order."""
        return tuple(call.action for call in self.calls)

    async def __call__(self, elements: list[Any], runtime: Runtime | None = None) -> list[Any]:
        if (
            self._direct
            and (self.batch is None or len(elements) <= self.batch)
            and not (self.unpack and _has(tuple, elements))
        ):  # the common case, without the bookkeeping of _chosen: each result is its element's
            call = self.calls[0]
            results = await call.action(elements, call.args, call.kwargs, runtime, self.concurrency)
            if self.onetomany and _has(list, results):
                return [item for result in results for item in (result if isinstance(result, list) else (result,))]
            return results
        outputs = await self._chosen(elements, runtime)
        if self.observe is not None:
            self.observe(elements, outputs)
        return outputs

    async def _chosen(self, elements: list[Any], runtime: Runtime | None) -> list[Any]:
        """The task's outputs by txtai's rules: its kind's and select's choice, unpacked, prepared, merged, packed."""
        if not self.blocking:
            chosen, data = self._choose(elements)
        elif runtime is None:  # a workflow called outside a server
            chosen, data = await asyncio.to_thread(self._choose, elements)
        else:
            chosen, data = await runtime.to_thread(self._choose, elements)
        size = self.batch or len(data) or 1
        results: list[Any] = []
        for start in range(0, len(data), size):
            results.extend(await self._run(data[start : start + size], runtime))
        # Each element becomes a slot: itself when not chosen, its result(s) when chosen.
        slots: list[Any] = list(elements)
        for i, result in zip(chosen, results):
            element = elements[i]
            if isinstance(result, Many):
                slots[i] = Many([self._packed(element, value) for value in result.values])
            else:
                slots[i] = self._packed(element, result)
        if not any(isinstance(slot, Many) for slot in slots):
            return slots
        return [item for slot in slots for item in (slot.values if isinstance(slot, Many) else (slot,))]

    def _choose(self, elements: list[Any]) -> tuple[list[int], list[Any]]:
        """The positions of the elements the task takes, and what its actions get of each, prepared."""
        chosen: list[int] = []
        data: list[Any] = []
        for i, element in enumerate(elements):
            inside = _inside(element)
            if self._accepts(element if inside is _NOTHING else inside):
                chosen.append(i)
                data.append(inside if self.unpack and inside is not _NOTHING else element)
        if self.prepare is not None:
            data = [self.prepare(element) for element in data]
        return chosen, data

    def _accepts(self, value: Any) -> bool:
        """txtai's rule: ``select`` looks in the text in lower case (None is taken), then the kind's."""
        if self.select and value is not None:
            if not isinstance(value, str):
                return False
            lowered = value.lower()
            if not any(pattern.search(lowered) for pattern in self.select):
                return False
        return self.accept is None or self.accept(value)

    def _packed(self, element: Any, result: Any) -> Any:
        """A result put back into its element: into its tuple's data, when the element was unpacked."""
        if not (self.unpack and isinstance(element, tuple) and len(element) > 1):
            return result
        # A tuple result stands for the whole element, unless it is hstack's row of results.
        if isinstance(result, tuple) and (len(self.calls) == 1 or self.merge != "hstack"):
            return result
        return (element[0], result, *element[2:])

    async def _run(self, batch: list[Any], runtime: Runtime | None) -> list[Any]:
        """Per element of ``batch``, its result, or :class:`Many` results."""
        if not self.calls:  # the prepared elements are the results
            return batch
        outputs: list[list[Any]]
        if len(self.calls) == 1:  # no gather: it would cost a task and a loop iteration
            outputs = [await self._call(self.calls[0], batch, runtime)]
        else:
            outputs = list(await asyncio.gather(*(self._call(call, batch, runtime) for call in self.calls)))
        if len(outputs) == 1:
            if not self.onetomany:
                return outputs[0]
            return [Many(result) if isinstance(result, list) else result for result in outputs[0]]
        rows = list(zip(*outputs))
        if self.merge == "vstack":  # one element per action's result; a list's items each one
            return [
                Many([v for value in row for v in (value if isinstance(value, list) else (value,))]) for row in rows
            ]
        if self.merge == "concat":  # txtai joins the results' text with ". ", leaving out empty ones
            return [". ".join(str(value) for value in row if value is not None and value != "") for row in rows]
        return rows  # hstack: a tuple per element, an item per action

    async def _call(self, call: Call, batch: list[Any], runtime: Runtime | None) -> list[Any]:
        if call.column is not None:
            batch = [self._column(element, call.column) for element in batch]
        return await call.action(batch, call.args, call.kwargs, runtime, self.concurrency)

    def _column(self, element: Any, column: int) -> Any:
        """The item of a tuple element that an action with ``column`` gets (other elements whole)."""
        if not isinstance(element, tuple):
            return element
        if not self.unpack and len(element) == 3 and isinstance(element[1], tuple):
            return (element[0], _item(element[1], column), element[2])  # (id, (columns...), tags)
        return _item(element, column)


_NOTHING = object()


def _inside(element: Any) -> Any:
    """The data of a txtai ``(id, data, tags)`` tuple (of two items or more), else _NOTHING."""
    return element[1] if isinstance(element, tuple) and len(element) > 1 else _NOTHING


def _item(element: tuple[Any, ...], column: int) -> Any:
    try:
        return element[column]
    except IndexError:
        raise InvalidElement(f"an element of {len(element)} items has no column {column}") from None


def _has(kind: type, values: Sequence[Any]) -> bool:
    """Whether any of ``values`` is a ``kind`` (all in C: no Python frame per value)."""
    return any(map(isinstance, values, itertools.repeat(kind)))


@dataclass(frozen=True, slots=True, eq=False)
class WorkflowAction:
    """An action that runs another workflow of the config (txtai's ``task: workflow``).

    ``workflows`` is the config's, by name: filled once every workflow is parsed, so that a
    task may name one that the config defines after it.
    """

    name: str
    workflows: Mapping[str, Workflow]
    wants_runtime = True

    async def __call__(self, batch: list[Any], runtime: Runtime | None = None) -> list[Any]:
        return await self.workflows[self.name](batch, runtime)


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
    # Whether no task has an initialize or finalize hook: then a single batch takes the short way.
    _plain: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        plain = all(task.initialize is None and task.finalize is None for task in self.tasks)
        object.__setattr__(self, "_plain", plain)

    async def __call__(self, elements: list[Any], runtime: Runtime | None = None) -> list[Any]:
        if self._plain and 0 < len(elements) <= self.batch:
            # The common case: one batch and no hooks to call around it, without their bookkeeping.
            batch = elements[:]
            for task in self.tasks:
                batch = await task(batch, runtime)
            return batch
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
