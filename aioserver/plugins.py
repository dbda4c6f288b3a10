"""The user's own code: ``DEPENDENCIES`` run on every request, ``EXTENSIONS`` add routes (as txtai).

Both are comma-separated dotted paths (environment) or lists (config keys ``dependencies:``
and ``extensions:``). A class is instantiated once, without arguments; a function is used
as it is. A dependency gets the request after the token check, may be sync or async, and
denies by raising an ``aiohttp.web.HTTPException``. An extension gets the application; the
routes it adds are authorized like every other one, scopes included: a token with a
``workflows`` list calls an extension's route only when the list names its path as
registered (``/stats``, ``/items/{id}``), which the authorization checks after routing.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

from aiohttp import web

from .auth import OPEN_PATHS
from .errors import Check, ConfigError
from .workflow.actions import import_string

Plugin = Callable[..., Any]


def load_plugins(kind: str, document: Mapping[str, Any], env: Mapping[str, str], source: str) -> tuple[Plugin, ...]:
    """The ``kind`` plugins ("dependencies" or "extensions"): the environment's, else the config's."""
    variable = kind.upper()
    value: Any
    if env.get(variable, "").strip():
        where, key, value = "environment", variable, env[variable]
    else:
        where, key, value = source, kind, document.get(kind)
    if value is None:
        return ()
    paths = value.split(",") if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ConfigError(where, key, "expected dotted paths (a list, or comma-separated)")
    return tuple(_load(path.strip(), where, key) for path in paths if path.strip())


def _load(path: str, where: str, key: str) -> Plugin:
    try:
        target = import_string(path)
        plugin = target() if inspect.isclass(target) else target
    except Exception as exc:  # the user's import or constructor may fail in any way
        raise ConfigError(where, key, f"cannot load {path!r}: {type(exc).__name__}: {exc}") from None
    if not callable(plugin):
        raise ConfigError(where, key, f"{path!r} is not callable")
    return cast(Plugin, plugin)


def dependencies_check(dependencies: tuple[Plugin, ...]) -> Check:
    """Run every dependency on each request but the open ones, after authorization (a check of
    error_middleware's): the first async one's result, and the rest, are returned to await."""

    def check(request: web.Request) -> Awaitable[None] | None:
        if request.path in OPEN_PATHS and request.method == "GET":
            return None
        for i, dependency in enumerate(dependencies):
            result = dependency(request)
            if inspect.isawaitable(result):
                return _rest(request, result, dependencies[i + 1 :])
        return None

    return check


async def _rest(request: web.Request, pending: Awaitable[Any], dependencies: tuple[Plugin, ...]) -> None:
    await pending
    for dependency in dependencies:
        result = dependency(request)
        if inspect.isawaitable(result):
            await result
