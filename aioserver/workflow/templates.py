"""The template task kind: each element put into a text template, by txtai's TemplateTask rules.

    - task: template
      template: "This is a {text} task"   # without one, elements pass through unchanged
      rules: {kind: skip}                 # an object whose "kind" is "skip" becomes "skip"
      strict: true                        # (default) every key of an object must be used

An element fills the template's fields as follows: an object by its keys (``{name}``); a tuple
(a JSON array the task did not unpack: ``unpack: false``, or of one item) by its items, as
``{arg0}``, ``{arg1}``...; anything else as ``{text}``. ``strict`` refuses an element that
has a key (or item) the template does not use, as txtai's does. ``rules`` come first: an
object holding one of their keys with the rule's value becomes that value, unformatted.

An element that does not fit (a field it lacks, a key unused under ``strict``) is the client's
error: 400, naming the field.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidElement


class TemplateError(ValueError):
    """A template that no element can fill (for the config's error)."""


class _Unused(Exception):
    def __init__(self, names: list[str]) -> None:
        super().__init__(names)
        self.names = names


class _StrictFormatter(string.Formatter):
    """str.format, refusing keyword arguments that no field uses."""

    def check_unused_args(self, used_args: set[int | str], args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        unused = sorted(str(name) for name in kwargs if name not in used_args)
        if unused:
            raise _Unused(unused)


_STRICT = _StrictFormatter()
_LENIENT = string.Formatter()


def fields(template: str) -> list[str]:
    """The names of the template's fields; TemplateError for bad syntax or a positional field."""
    try:
        parsed = list(_LENIENT.parse(template))
    except ValueError as exc:
        raise TemplateError(f"not a valid template: {exc}") from None
    names = [name for _, name, _, _ in parsed if name is not None]
    for name in names:
        head = name.split(".", 1)[0].split("[", 1)[0]
        if not head or head.isdigit():
            raise TemplateError(
                f"{{{name}}} is positional: name each field ({{text}}, an object's keys, or {{arg0}}... for tuples)"
            )
    return names


@dataclass(frozen=True, slots=True)
class Template:
    """The template task's preparation of an element (the engine's ``prepare``)."""

    template: str | None = None
    rules: Mapping[str, Any] = field(default_factory=dict)
    strict: bool = True

    def __call__(self, element: Any) -> Any:
        if self.rules and isinstance(element, dict):
            for key, value in self.rules.items():
                if key in element and element[key] == value:
                    return element[key]
        if self.template is None:
            return element
        if isinstance(element, dict):
            values: Mapping[Any, Any] = element
        elif isinstance(element, tuple):
            values = {f"arg{i}": item for i, item in enumerate(element)}
        else:
            values = {"text": element}
        formatter = _STRICT if self.strict else _LENIENT
        try:
            return formatter.vformat(self.template, (), values)
        except KeyError as exc:
            raise InvalidElement(f"template: the element has no {_field(exc.args[0])}") from None
        except _Unused as exc:
            raise InvalidElement(
                f"template: the element's {_names(exc.names)} unused (strict: true wants every one used)"
            ) from None
        except (AttributeError, IndexError, TypeError, ValueError) as exc:
            raise InvalidElement(f"template: the element does not fit the template: {exc}") from None


def _field(name: Any) -> str:
    return f"{{{name}}}" if isinstance(name, str) else repr(name)


def _names(names: Iterable[str]) -> str:
    listed = [repr(name[:100]) for name in names]
    return f"key {listed[0]} is" if len(listed) == 1 else f"keys {', '.join(listed[:10])} are"
