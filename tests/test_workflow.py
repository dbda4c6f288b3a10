"""The workflow engine: sync, async, class and multi-action actions, args and batching."""

from __future__ import annotations

import asyncio
import threading

import pytest

from aioserver import load_config
from aioserver.errors import InvalidElement
from aioserver.workflow.builtins import BUILTINS

import sample_actions


async def run(yaml_text: str, elements: list, name: str = "w") -> list:  # type: ignore[type-arg]
    return await load_config(yaml_text).workflows[name](elements)


@pytest.mark.parametrize(
    ("tasks", "elements", "expected"),
    [
        ("[sample_actions.double]", [1, 2], [2, 4]),
        ("[sample_actions.async_double]", [1, 2], [2, 4]),
        ("[sample_actions.double, sample_actions.async_double]", [1, 2], [4, 8]),
        ("[sample_actions.Multiplier]", [1, 2], [3, 6]),
        ("[sample_actions.AsyncPrefixer]", [1, 2], [">1", ">2"]),
        ("[{action: [sample_actions.double, sample_actions.AsyncPrefixer]}]", [1, 2], [(2, ">1"), (4, ">2")]),
        ("[{action: sample_actions.add, args: [10]}]", [1], [11]),
        ("[{action: sample_actions.add, args: [10, 100, 1000]}]", [1], [1111]),
        ("[{action: sample_actions.scale, args: {factor: 2, offset: 1}}]", [1, 2], [3, 5]),
        # Several actions: one args entry each (txtai's rule).
        ("[{action: [sample_actions.add, sample_actions.scale], args: [[10], {factor: 3}]}]", [1], [(11, 3)]),
        ("[{action: [sample_actions.add, sample_actions.add], args: [[10], null]}]", [1], [(11, 2)]),
        ("[echo]", [], []),
    ],
)
async def test_actions(tasks: str, elements: list, expected: list) -> None:  # type: ignore[type-arg]
    assert await run(f"workflow:\n  w:\n    tasks: {tasks}\n", elements) == expected


async def test_class_section_arguments() -> None:
    text = "sample_actions.AsyncPrefixer: {prefix: '#'}\nworkflow:\n  w: {tasks: [sample_actions.AsyncPrefixer]}\n"
    assert await run(text, ["a"]) == ["#a"]


async def test_sync_actions_run_off_the_event_loop() -> None:
    names = await run("workflow:\n  w: {tasks: [sample_actions.thread_name]}\n", [1])
    assert names != [threading.current_thread().name]


@pytest.mark.parametrize(
    ("workflow_batch", "task_batch", "count", "calls"),
    [
        (None, None, 250, [100, 100, 50]),
        (2, None, 5, [2, 2, 1]),
        (None, 30, 70, [30, 30, 10]),
        (4, 3, 10, [3, 1, 3, 1, 2]),
        (None, None, 100, [100]),
    ],
)
async def test_batching(workflow_batch: int | None, task_batch: int | None, count: int, calls: list[int]) -> None:
    task = "{action: sample_actions.record" + (f", batch: {task_batch}" if task_batch else "") + "}"
    body = f"{{tasks: [{task}]" + (f", batch: {workflow_batch}" if workflow_batch else "") + "}"
    sample_actions.CALLS.clear()
    elements = list(range(count))
    assert await run(f"workflow:\n  w: {body}\n", elements) == elements
    assert sample_actions.CALLS == calls


async def test_tasks_run_in_sequence() -> None:
    text = "workflow:\n  w:\n    tasks: [sample_actions.double, {action: sample_actions.add, args: [1]}]\n"
    assert await run(text, [1, 2, 3]) == [3, 5, 7]


@pytest.mark.parametrize(
    ("action", "error", "message"),
    [
        ("sample_actions.too_few", ValueError, "returned 1 results for 2 elements"),
        ("sample_actions.boom", RuntimeError, "the action broke"),
    ],
)
async def test_action_contract_errors(action: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        await run(f"workflow:\n  w: {{tasks: [{action}]}}\n", [1, 2])


@pytest.mark.parametrize(
    ("name", "elements", "kwargs", "expected"),
    [
        ("echo", [1, "a", None, {"k": [1]}], {}, [1, "a", None, {"k": [1]}]),
        ("upper", ["abc", "Déjà"], {}, ["ABC", "DÉJÀ"]),
        ("lower", ["ABC"], {}, ["abc"]),
        ("strip", ["  a b \n"], {}, ["a b"]),
        ("length", ["abc", [1, 2], {"a": 1}], {}, [3, 2, 1]),
        ("template", ["x", 3], {"template": "<{}>"}, ["<x>", "<3>"]),
        ("template", [{"who": "Ada"}], {"template": "hi {who}"}, ["hi Ada"]),
    ],
)
async def test_builtins(name: str, elements: list, kwargs: dict, expected: list) -> None:  # type: ignore[type-arg]
    assert await BUILTINS[name](elements, **kwargs) == expected


@pytest.mark.parametrize(
    ("name", "elements", "kwargs"),
    [
        ("upper", [1], {}),
        ("lower", [None], {}),
        ("strip", [["a"]], {}),
        ("length", [1.5], {}),
        ("template", [{"a": 1}], {"template": "{b}"}),
        ("template", [{"a": 1}], {"template": "{}"}),
    ],
)
async def test_builtins_reject_unfit_elements(name: str, elements: list, kwargs: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidElement):
        await BUILTINS[name](elements, **kwargs)


async def test_the_loop_runs_between_batches() -> None:
    # An async action that never suspends (echo) must not hold the loop for a whole request:
    # one echo of a million elements once kept every other request waiting 0.2 s.
    turns = 0

    async def other_work() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    seen: list[int] = []

    async def note_turns(batch: list[int]) -> list[int]:
        seen.append(turns)
        return batch

    sample_actions.NOTE_TURNS = note_turns  # type: ignore[attr-defined]
    worker = asyncio.create_task(other_work())
    await asyncio.sleep(0)
    try:
        assert await run("workflow:\n  w: {batch: 1, tasks: [sample_actions.NOTE_TURNS]}\n", [1, 2, 3]) == [1, 2, 3]
    finally:
        worker.cancel()
        del sample_actions.NOTE_TURNS  # type: ignore[attr-defined]
    assert seen[0] < seen[1] < seen[2]
