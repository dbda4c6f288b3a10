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
            args: [[], []]          # then one args entry per action
            merge: hstack           # hstack (default), vstack or concat
          - action: other           # another workflow of the config, by name
        schedule:                   # optional: run in the background of the server
          cron: "0 * * * *"
          elements: ["  hourly  "]
          iterations: 24            # default: for as long as the server runs

An action name is, in this order: a pipeline section or built-in (see :mod:`.actions`), a
workflow of the config, a dotted path. Task kinds (``task: url|file|template|workflow|console|
service|retrieve``) and their keys are in :mod:`.tasks`. Every problem is a
:class:`ConfigError` naming the key path, e.g. ``workflow.shout.tasks[1].action``.
"""

from __future__ import annotations

import inspect
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .actions import ActionResolver, argument_problem, import_string
from .engine import CONCURRENCY, DEFAULT_BATCH, MERGES, Action, Call, Schedule, Task, Workflow, WorkflowAction
from .safeopen import SafeOpen
from .tasks import KIND_KEYS, TASK_KINDS, Retrieve, Service, console, selection, unwritable
from .templates import Template, TemplateError, fields

WORKFLOW_KEYS = ("tasks", "batch", "schedule")
TASK_KEYS = (
    "action",
    "task",
    "args",
    "batch",
    "select",
    "unpack",
    "column",
    "merge",
    "onetomany",
    "initialize",
    "finalize",
    "concurrency",
)
SCHEDULE_KEYS = ("cron", "elements", "iterations")


def parse_workflows(
    section: Any,
    resolver: ActionResolver,
    source: str,
    safeopen: SafeOpen | None = None,
    state_directory: str | None = None,
) -> dict[str, Workflow]:
    """All workflows of the section, by name; ``state_directory`` is where retrieve tasks
    write when they name no directory (systemd's ``$STATE_DIRECTORY``)."""
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ConfigError(source, "workflow", "expected a mapping of workflow names to workflows")
    policy = safeopen or SafeOpen()
    # Filled as they are parsed: a task may name a workflow parsed after its own (txtai: before).
    workflows: dict[str, Workflow] = {}
    names = frozenset(section)
    for name, body in section.items():
        workflows[_name(name, source)] = _parse_workflow(
            name, body, resolver, source, f"workflow.{name}", policy, state_directory, (names, workflows)
        )
    _refuse_cycles(workflows, source)
    return workflows


def _name(name: Any, source: str) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigError(source, f"workflow.{name}", "a workflow name must be a non-empty string")
    return name


# The config's workflow names, and the workflows by name (filled once all are parsed).
Workflows = tuple[frozenset[str], Mapping[str, Workflow]]


def _parse_workflow(
    name: str,
    body: Any,
    resolver: ActionResolver,
    source: str,
    key: str,
    policy: SafeOpen,
    state_directory: str | None = None,
    workflows: Workflows = (frozenset(), {}),
) -> Workflow:
    if not isinstance(body, Mapping):
        raise ConfigError(source, key, "expected a mapping with 'tasks'")
    _no_unknown_keys(body, WORKFLOW_KEYS, source, key)
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError(source, f"{key}.tasks", "expected a non-empty list of tasks")
    return Workflow(
        name=name,
        tasks=tuple(
            _parse_task(task, resolver, source, f"{key}.tasks[{i}]", policy, state_directory, workflows)
            for i, task in enumerate(tasks)
        ),
        batch=_batch(body.get("batch", DEFAULT_BATCH), source, f"{key}.batch"),
        schedule=_parse_schedule(body.get("schedule"), source, f"{key}.schedule"),
    )


def _refuse_cycles(workflows: Mapping[str, Workflow], source: str) -> None:
    """A workflow that runs itself, through others or not, would never end: a config error."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in done:
            return
        for i, task in enumerate(workflows[name].tasks):
            for action in task.actions:
                if not isinstance(action.function, WorkflowAction):
                    continue
                other = action.function.name
                if other in path or other == name:
                    start = path.index(other) if other in path else len(path)
                    loop = " -> ".join([*path[start:], name, other])
                    raise ConfigError(
                        source, f"workflow.{name}.tasks[{i}].action", f"workflows run each other in a loop: {loop}"
                    )
                visit(other, [*path, name])
        done.add(name)

    for name in workflows:
        visit(name, [])


def _parse_schedule(schedule: Any, source: str, key: str) -> Schedule | None:
    if schedule is None:
        return None
    if not isinstance(schedule, Mapping):
        raise ConfigError(source, key, "expected a mapping with cron, elements and iterations")
    _no_unknown_keys(schedule, SCHEDULE_KEYS, source, key)
    from croniter import croniter  # a maintained cron parser, rather than one of our own

    cron = schedule.get("cron")
    if not isinstance(cron, str) or not croniter.is_valid(cron):
        raise ConfigError(source, f"{key}.cron", f"not a valid cron expression: {cron!r}")
    elements = schedule.get("elements", [])
    if not isinstance(elements, list):
        raise ConfigError(source, f"{key}.elements", "expected a list of elements")
    iterations = schedule.get("iterations")
    return Schedule(
        cron=cron,
        elements=tuple(elements),
        iterations=None if iterations is None else _batch(iterations, source, f"{key}.iterations"),
    )


def _parse_task(
    task: Any,
    resolver: ActionResolver,
    source: str,
    key: str,
    policy: SafeOpen,
    state_directory: str | None = None,
    workflows: Workflows = (frozenset(), {}),
) -> Task:
    if isinstance(task, str):
        task = {"action": task}
    if not isinstance(task, Mapping):
        raise ConfigError(source, key, "expected an action name or a mapping with 'action'")

    kind = task.get("task") or "default"
    if kind not in TASK_KINDS:
        raise ConfigError(source, f"{key}.task", f"unknown task kind {kind!r}; known: {', '.join(TASK_KINDS)}")
    _no_unknown_keys(task, TASK_KEYS + KIND_KEYS.get(kind, ()), source, key)

    if kind in ("service", "retrieve"):
        if "action" in task:
            raise ConfigError(source, f"{key}.action", f"a {kind} task brings its own action; remove 'action'")
        actions: tuple[Action, ...] = (_kind_action(kind, task, source, key, state_directory),)
    elif "action" in task or kind == "workflow":
        actions = _actions(task.get("action"), resolver, source, key, workflows)
    else:
        actions = ()  # txtai's task without an action: its prepared elements are its results
    if kind == "workflow" and not all(isinstance(a.function, WorkflowAction) for a in actions):
        raise ConfigError(source, f"{key}.action", f"a workflow task runs workflows; known: {_known(workflows[0])}")
    if kind == "file" and policy.directory is None:
        raise ConfigError(source, f"{key}.task", "a file task needs safeopen.directory: no file may be opened without")

    batch = task.get("batch")
    if kind == "service" and isinstance(batch, bool):
        batch = None  # the service's own batch flag, read by _kind_action
    concurrency = _choice(task.get("concurrency", "thread"), CONCURRENCY, source, f"{key}.concurrency")
    if concurrency == "process":
        _check_picklable(actions, source, f"{key}.concurrency")
    accept, prepare = selection(kind, policy, has_action=bool(actions))
    if kind == "template":
        prepare = _template(task, source, key)
    return Task(
        calls=_calls(actions, task.get("args"), task.get("column"), source, key),
        kind=kind,
        batch=None if batch is None else _batch(batch, source, f"{key}.batch"),
        accept=accept,
        prepare=prepare,
        select=_patterns(task.get("select"), source, f"{key}.select"),
        unpack=_flag(task.get("unpack", True), source, f"{key}.unpack"),
        merge=_choice(task.get("merge", "hstack"), MERGES, source, f"{key}.merge"),
        onetomany=_flag(task.get("onetomany", True), source, f"{key}.onetomany"),
        concurrency=concurrency,
        initialize=_hook(task.get("initialize"), source, f"{key}.initialize"),
        finalize=_hook(task.get("finalize"), source, f"{key}.finalize"),
        observe=console(key) if kind == "console" else None,
        blocking=kind == "file",
    )


def _actions(
    names: Any, resolver: ActionResolver, source: str, key: str, workflows: Workflows = (frozenset(), {})
) -> tuple[Action, ...]:
    if isinstance(names, str):
        return (_action(names, resolver, f"{key}.action", workflows),)
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        return tuple(_action(n, resolver, f"{key}.action[{i}]", workflows) for i, n in enumerate(names))
    raise ConfigError(source, f"{key}.action", "expected an action name or a non-empty list of action names")


def _action(name: str, resolver: ActionResolver, key: str, workflows: Workflows) -> Action:
    """A workflow of the config when ``name`` is one (and no pipeline or built-in), else the resolver's."""
    names, parsed = workflows
    if name in names and not resolver.knows(name):
        return Action(name=name, function=WorkflowAction(name, parsed), is_async=True, wants_runtime=True)
    return resolver.resolve(name, key)


def _known(names: frozenset[str]) -> str:
    return ", ".join(sorted(names)) or "none"


def _calls(actions: tuple[Action, ...], args: Any, column: Any, source: str, key: str) -> tuple[Call, ...]:
    """Each action with its arguments (one ``args`` entry per action, when there are several) and column."""
    if args is not None and not actions:
        raise ConfigError(source, f"{key}.args", "arguments without an action: add one, or remove 'args'")
    if args is not None and any(isinstance(a.function, WorkflowAction) for a in actions):
        raise ConfigError(source, f"{key}.args", "a workflow takes no arguments")
    if len(actions) > 1 and args is not None:
        if not isinstance(args, list) or len(args) != len(actions):
            raise ConfigError(
                source,
                f"{key}.args",
                f"expected a list of {len(actions)} entries, one per action (each a list, a mapping or null)",
            )
        entries = [_arguments(entry, source, f"{key}.args[{i}]") for i, entry in enumerate(args)]
    else:
        entries = [_arguments(args, source, f"{key}.args")] * len(actions)
    for i, (action, (positional, keywords)) in enumerate(zip(actions, entries)):
        # What would be a TypeError on every request is a configuration error now.
        problem = argument_problem(action, positional, keywords)
        if problem:
            where = f"{key}.args[{i}]" if len(actions) > 1 and args is not None else f"{key}.args"
            raise ConfigError(source, where, f"{action.name!r} cannot take these arguments: {problem}")
    columns = _columns(column, len(actions), source, f"{key}.column")
    return tuple(
        Call(action, positional, keywords, columns[i])
        for i, (action, (positional, keywords)) in enumerate(zip(actions, entries))
    )


def _arguments(args: Any, source: str, key: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args is None:
        return (), {}
    if isinstance(args, list):
        return tuple(args), {}
    if isinstance(args, Mapping):
        return (), dict(args)
    raise ConfigError(source, key, "expected a list (positional) or a mapping (keyword arguments)")


def _columns(column: Any, count: int, source: str, key: str) -> list[int | None]:
    """The column each action gets: one for all, or a mapping of action index to column."""
    if column is None:
        return [None] * count
    if _is_integer(column):
        return [column] * count
    if isinstance(column, Mapping) and all(_is_integer(k) and _is_integer(v) for k, v in column.items()):
        missing = [i for i in range(count) if i not in column]
        extra = [k for k in column if not 0 <= k < count]
        if not missing and not extra:
            return [column[i] for i in range(count)]
    raise ConfigError(
        source,
        key,
        f"expected a column index, or a mapping of each action's index (0 to {count - 1}) to a column index",
    )


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _template(task: Mapping[str, Any], source: str, key: str) -> Template:
    template = task.get("template")
    if template is not None:
        if not isinstance(template, str):
            raise ConfigError(source, f"{key}.template", f"expected a text with {{fields}}, got {template!r}")
        try:
            fields(template)
        except TemplateError as exc:
            raise ConfigError(source, f"{key}.template", str(exc)) from None
    rules = task.get("rules") or {}
    if not isinstance(rules, Mapping) or not all(isinstance(k, str) for k in rules):
        raise ConfigError(source, f"{key}.rules", "expected a mapping of an object's keys to values")
    return Template(
        template=template, rules=dict(rules), strict=_flag(task.get("strict", True), source, f"{key}.strict")
    )


def _kind_action(kind: str, task: Mapping[str, Any], source: str, key: str, state_directory: str | None) -> Action:
    if kind == "retrieve":
        directory = task.get("directory", state_directory)
        if directory is None:
            raise ConfigError(
                source, f"{key}.directory", "expected a directory to write in (none given, and no $STATE_DIRECTORY)"
            )
        if not isinstance(directory, str) or not os.path.isdir(directory):
            raise ConfigError(source, f"{key}.directory", f"expected an existing directory, got {directory!r}")
        # Checked now, as the service's own user in its own sandbox (ProtectSystem=strict makes
        # everything read-only but its StateDirectory=): else every request would be a 500.
        problem = unwritable(directory)
        if problem:
            raise ConfigError(source, f"{key}.directory", f"cannot write in {directory}: {problem}")
        flatten = _flag(task.get("flatten", True), source, f"{key}.flatten")
        if task.get("safeopen", True) is not True:  # txtai's switch, per task, of its checks
            raise ConfigError(
                source,
                f"{key}.safeopen",
                "safeopen cannot be turned off for a task: list the hosts it may reach in safeopen.allow,"
                " and the files it may copy go under safeopen.directory",
            )
        retrieve = Retrieve(task=key, directory=Path(directory).resolve(), flatten=flatten)
        return Action(name=f"{key} (retrieve)", function=retrieve, is_async=True, wants_runtime=True)

    url = task.get("url")
    if not isinstance(url, str) or not re.match(r"^https?://", url):
        raise ConfigError(source, f"{key}.url", f"expected an http(s) URL, got {url!r}")
    method = _choice(str(task.get("method", "post")).lower(), ("get", "post"), source, f"{key}.method")
    params = task.get("params")
    if params is not None and not isinstance(params, Mapping):
        raise ConfigError(
            source, f"{key}.params", "expected a mapping of parameter names to values (null: the element)"
        )
    extract = task.get("extract", [])
    if isinstance(extract, (str, int)):
        extract = [extract]
    if not isinstance(extract, list) or not all(isinstance(k, (str, int)) for k in extract):
        raise ConfigError(source, f"{key}.extract", "expected a key or a list of keys into the JSON answer")
    batch = task.get("batch", True)
    service = Service(
        task=key,
        url=url,
        method=method,
        params=dict(params) if params else None,
        batch=batch if isinstance(batch, bool) else True,
        extract=tuple(extract),
    )
    return Action(name=f"{key} (service)", function=service, is_async=True, wants_runtime=True)


def _choice(value: Any, choices: tuple[str, ...], source: str, key: str) -> str:
    if value not in choices:
        raise ConfigError(source, key, f"expected one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _flag(value: Any, source: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(source, key, f"expected true or false, got {value!r}")
    return value


def _patterns(value: Any, source: str, key: str) -> tuple[re.Pattern[str], ...]:
    if value is None:
        return ()
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(source, key, "expected a regular expression or a list of them")
    try:
        return tuple(re.compile(p) for p in patterns)
    except re.error as exc:
        raise ConfigError(source, key, f"invalid regular expression: {exc}") from None


def _hook(path: Any, source: str, key: str) -> Any:
    if path is None:
        return None
    if not isinstance(path, str) or "." not in path:
        raise ConfigError(source, key, f"expected a dotted path to a callable, got {path!r}")
    try:
        hook = import_string(path)
    except Exception as exc:  # a user's module may fail in any way while importing
        raise ConfigError(source, key, f"cannot import {path!r}: {type(exc).__name__}: {exc}") from None
    if not callable(hook):
        raise ConfigError(source, key, f"{path!r} is not callable")
    return hook


def _check_picklable(actions: tuple[Action, ...], source: str, key: str) -> None:
    # A process pool sends the action to another process by reference: it must be a sync
    # callable importable by dotted path (a module-level function or a picklable instance).
    for action in actions:
        if action.is_async or inspect.iscoroutinefunction(action.function):
            raise ConfigError(source, key, f"{action.name!r} is async; concurrency: process is for sync actions")
        try:
            pickle.dumps(action.function)
        except Exception as exc:
            raise ConfigError(source, key, f"{action.name!r} cannot go to another process: {exc}") from None


def _batch(value: Any, source: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(source, key, f"expected a positive integer, got {value!r}")
    return value


def _no_unknown_keys(mapping: Mapping[Any, Any], known: tuple[str, ...], source: str, key: str) -> None:
    for name in mapping:
        if name not in known:
            raise ConfigError(source, f"{key}.{name}", f"unknown key; known: {', '.join(known)}")
