"""Built-in actions, usable by name in any workflow without code of the user's.

They are cheap, so they are coroutines that run on the event loop itself, sparing the
thread hop a sync action needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..errors import InvalidElement
from .pipelines import Segmentation, Summary, Textractor


def _strings(name: str, batch: list[Any]) -> list[str]:
    for element in batch:
        if not isinstance(element, str):
            raise InvalidElement(f"{name} takes strings, got an element of type {_json_type(element)}")
    return batch


def _json_type(value: Any) -> str:
    # A tuple is a JSON array that the workflow took as txtai's (id, data, tags).
    names = {dict: "object", list: "array", tuple: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


async def echo(batch: list[Any]) -> list[Any]:
    """Each element unchanged."""
    return batch


async def upper(batch: list[Any]) -> list[str]:
    """Each string in upper case."""
    return [text.upper() for text in _strings("upper", batch)]


async def lower(batch: list[Any]) -> list[str]:
    """Each string in lower case."""
    return [text.lower() for text in _strings("lower", batch)]


async def strip(batch: list[Any]) -> list[str]:
    """Each string without leading and trailing white space."""
    return [text.strip() for text in _strings("strip", batch)]


async def length(batch: list[Any]) -> list[int]:
    """The length of each string, array or object."""
    for element in batch:
        if not isinstance(element, (str, list, tuple, dict)):
            raise InvalidElement(f"length takes strings, arrays or objects, got {_json_type(element)}")
    return [len(element) for element in batch]


async def template(batch: list[Any], template: str) -> list[str]:
    """Each element put into ``template``: ``{}`` for the element, ``{key}`` for an object's key."""
    results = []
    for element in batch:
        try:
            results.append(template.format(**element) if isinstance(element, dict) else template.format(element))
        except (KeyError, IndexError) as exc:
            raise InvalidElement(f"template needs {exc} in every element") from None
    return results


BUILTINS: Mapping[str, Callable[..., Any]] = {
    **{f.__name__: f for f in (echo, upper, lower, strip, length, template)},
    # Pipelines: classes, configured by a top-level section of the same name.
    "textractor": Textractor,
    "segmentation": Segmentation,
    "summary": Summary,
}
