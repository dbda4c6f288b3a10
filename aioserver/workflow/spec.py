"""Parsing of the config's ``workflow:`` section (txtai's shape) into engine objects.

    workflow:
      shout:
        batch: 100                  # elements per batch through the tasks (default 100)
        tasks:
          - strip                   # a bare action name
          - action: template        # or a mapping
            args: {template: "{}!"} # list -> positional, mapping -> keyword arguments
            batch: 10               # at most this many elements per call of the action
          - action: [upper, length] # several actions, results merged per element

Every problem is a :class:`ConfigError` naming the key path, e.g.
``workflow.shout.tasks[1].action``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from .actions import ActionResolver
from .engine import DEFAULT_BATCH, Task, Workflow

WORKFLOW_KEYS = ("tasks", "batch")
TASK_KEYS = ("action", "task", "args", "batch")
TASK_KINDS = ("default",)


def parse_workflows(section: Any, resolver: ActionResolver, source: str) -> dict[str, Workflow]:
    """All workflows of the section, by name."""
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ConfigError(source, "workflow", "expected a mapping of workflow names to workflows")
    return {
        _name(name, source): _parse_workflow(str(name), body, resolver, source, f"workflow.{name}")
        for name, body in section.items()
    }


def _name(name: Any, source: str) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigError(source, f"workflow.{name}", "a workflow name must be a non-empty string")
    return name


def _parse_workflow(name: str, body: Any, resolver: ActionResolver, source: str, key: str) -> Workflow:
    if not isinstance(body, Mapping):
        raise ConfigError(source, key, "expected a mapping with 'tasks'")
    _no_unknown_keys(body, WORKFLOW_KEYS, source, key)
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError(source, f"{key}.tasks", "expected a non-empty list of tasks")
    return Workflow(
        name=name,
        tasks=tuple(_parse_task(task, resolver, source, f"{key}.tasks[{i}]") for i, task in enumerate(tasks)),
        batch=_batch(body.get("batch", DEFAULT_BATCH), source, f"{key}.batch"),
    )


def _parse_task(task: Any, resolver: ActionResolver, source: str, key: str) -> Task:
    if isinstance(task, str):
        task = {"action": task}
    if not isinstance(task, Mapping):
        raise ConfigError(source, key, "expected an action name or a mapping with 'action'")
    _no_unknown_keys(task, TASK_KEYS, source, key)

    kind = task.get("task") or "default"
    if kind not in TASK_KINDS:
        raise ConfigError(source, f"{key}.task", f"unknown task kind {kind!r}; known: {', '.join(TASK_KINDS)}")

    names = task.get("action")
    if isinstance(names, str):
        actions = (resolver.resolve(names, f"{key}.action"),)
    elif isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        actions = tuple(resolver.resolve(n, f"{key}.action[{i}]") for i, n in enumerate(names))
    else:
        raise ConfigError(source, f"{key}.action", "expected an action name or a non-empty list of action names")

    args = task.get("args")
    if args is not None and not isinstance(args, (list, Mapping)):
        raise ConfigError(source, f"{key}.args", "expected a list (positional) or a mapping (keyword arguments)")
    batch = task.get("batch")
    return Task(
        actions=actions,
        args=tuple(args) if isinstance(args, list) else (),
        kwargs=dict(args) if isinstance(args, Mapping) else {},
        batch=None if batch is None else _batch(batch, source, f"{key}.batch"),
    )


def _batch(value: Any, source: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(source, key, f"expected a positive integer, got {value!r}")
    return value


def _no_unknown_keys(mapping: Mapping[Any, Any], known: tuple[str, ...], source: str, key: str) -> None:
    for name in mapping:
        if name not in known:
            raise ConfigError(source, f"{key}.{name}", f"unknown key; known: {', '.join(known)}")
