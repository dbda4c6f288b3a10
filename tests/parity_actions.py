"""Actions for the parity tests, imported by dotted path by txtai and aioserver alike.

Plain functions of a batch (txtai's calling convention, which aioserver shares): each takes
the list of elements a task chose and returns one result per element.
"""

from __future__ import annotations

from typing import Any


def upper(batch: list[Any]) -> list[Any]:
    """Strings in upper case; anything else as it is."""
    return [x.upper() if isinstance(x, str) else x for x in batch]


def words(batch: list[Any]) -> list[Any]:
    """Each string's words, a list per element (one element becomes many)."""
    return [x.split() if isinstance(x, str) else x for x in batch]


def empty(batch: list[Any]) -> list[str]:
    """An empty string per element."""
    return ["" for _ in batch]


def describe(batch: list[Any]) -> list[str]:
    """What each element is, as the action sees it: its type and its value."""
    return [f"{type(x).__name__}:{x!r}" for x in batch]


def add(batch: list[Any], *numbers: int) -> list[Any]:
    """Each number plus the task's arguments."""
    return [x + sum(numbers) for x in batch]


def scale(batch: list[Any], factor: int = 1, offset: int = 0) -> list[Any]:
    """Each number times ``factor``, plus ``offset``."""
    return [x * factor + offset for x in batch]


def read(batch: list[Any]) -> list[Any]:
    """The text of each file a path names."""
    results = []
    for path in batch:
        with open(path, encoding="utf-8") as file:
            results.append(file.read())
    return results


def same(batch: list[Any]) -> list[Any]:
    """Each element unchanged."""
    return list(batch)


def paired(batch: list[Any]) -> list[Any]:
    """Each string and its upper case, as a tuple (which stands for a whole txtai element)."""
    return [(x, x.upper()) if isinstance(x, str) else x for x in batch]
