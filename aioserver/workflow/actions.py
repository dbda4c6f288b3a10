"""Action resolution: from a name in the config to a ready :class:`Action`.

A name is, in this order: a pipeline section of the config (a top-level key naming a
built-in or a dotted path, whose mapping gives the keyword arguments of the class), a
built-in, or a dotted path to a callable or a class. Classes are instantiated once, at
start-up, and shared by every task that names them.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, cast

from ..errors import ConfigError
from .builtins import BUILTINS
from .engine import Action


def import_string(path: str) -> Any:
    """Import ``package.module.attribute`` (the attribute may be nested: ``mod.Class.method``)."""
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            target: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name):
                continue  # that prefix is not a module: try a shorter one
            raise
        for attribute in parts[split:]:
            target = getattr(target, attribute)
        return target
    raise ModuleNotFoundError(f"No module named {parts[0]!r}")


def is_pipeline_name(name: str) -> bool:
    """Whether a top-level config key can name a pipeline section."""
    return name in BUILTINS or "." in name


def _is_async(function: Any) -> bool:
    call = getattr(function, "__call__", None)  # noqa: B004 - instances with async __call__
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(call)


class ActionResolver:
    """Resolves action names for one config, instantiating each class once."""

    def __init__(self, pipelines: Mapping[str, Any], source: str) -> None:
        self._pipelines = pipelines
        self._source = source
        self._actions: dict[str, Action] = {}
        for name in pipelines:  # eagerly, so that a broken section fails at start-up
            self.resolve(name, name)

    def dotted_paths(self) -> list[str]:
        """The actions named by a dotted path (the user's code, or txtai's), in order of appearance."""
        return [name for name in self._actions if name not in BUILTINS]

    def sections(self) -> dict[str, Action]:
        """The action of each pipeline section of the config, by the section's name."""
        return {name: self._actions[name] for name in self._pipelines}

    def knows(self, name: str) -> bool:
        """Whether ``name`` is a pipeline section of the config or a built-in."""
        return name in self._pipelines or name in BUILTINS

    def resolve(self, name: str, key: str) -> Action:
        """The action called ``name``; ``key`` locates the reference in errors."""
        if name not in self._actions:
            self._actions[name] = self._create(name, key)
        return self._actions[name]

    def _create(self, name: str, key: str) -> Action:
        if name in BUILTINS:
            target = BUILTINS[name]
        elif "." in name:
            target = self._import(name, key)
        else:
            known = ", ".join(sorted({*BUILTINS, *self._pipelines}))
            raise ConfigError(
                self._source,
                key,
                f"unknown action {name!r}; expected one of {known} or a dotted path (module.function)",
            )

        arguments = self._pipelines.get(name)
        if arguments is None:
            arguments = {}
        elif not isinstance(arguments, Mapping):
            raise ConfigError(self._source, name, "a pipeline section must be a mapping of keyword arguments")
        if inspect.isclass(target):
            try:
                target = cast(Any, target)(**arguments)
            except Exception as exc:
                raise ConfigError(self._source, key, f"cannot create {name!r}: {type(exc).__name__}: {exc}") from None
        elif arguments:
            raise ConfigError(self._source, name, f"{name!r} is a function, not a class: it takes no section")
        if not callable(target):
            raise ConfigError(self._source, key, f"{name!r} is not callable")
        wants_runtime = getattr(target, "wants_runtime", False) is True
        return Action(name=name, function=target, is_async=_is_async(target), wants_runtime=wants_runtime)

    def _import(self, path: str, key: str) -> Any:
        try:
            return import_string(path)
        except Exception as exc:  # a user's module may fail in any way while importing
            raise ConfigError(self._source, key, f"cannot import {path!r}: {type(exc).__name__}: {exc}") from None


def argument_problem(action: Action, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str | None:
    """Why calling ``action`` on a batch with a task's ``args`` would fail at once, or None.

    The call is bound to the action's signature (a batch, the arguments, and ``runtime=`` for
    an action that wants it), as Python will bind it on every request: a name it does not
    take, one too many or one missing is a TypeError each time, found here at start-up. An
    action with a ``check_arguments`` method (the built-in summary) then judges their values.
    """
    function = action.function
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # no signature to read (some builtins): the call will tell
        return None
    if action.wants_runtime and "runtime" in kwargs:
        return "got an unexpected keyword argument 'runtime' (the server gives it)"
    given = {**kwargs, "runtime": None} if action.wants_runtime else kwargs
    try:
        bound = signature.bind([], *args, **given)
    except TypeError as exc:
        return str(exc)
    check = getattr(function, "check_arguments", None)
    if callable(check):
        values = dict(list(bound.arguments.items())[1:])  # all but the batch
        values.pop("runtime", None)
        try:
            check(**values)
        except (TypeError, ValueError) as exc:
            return str(exc)
    return None
