"""JSON for request and response bodies: orjson when installed (the ``speed`` extra), else json.

Both give the same answers: what orjson refuses (``NaN``, lone surrogates, ...) goes through the
standard library instead. Request bodies are bounded beyond their size in bytes:

- nesting: at most :data:`MAX_DEPTH` levels, so that no parse recurses deep (the standard
  library's raises RecursionError past about 1000) and whatever is echoed back serializes
  (orjson's dumps stops at 255 levels);
- values: a big body may hold at most ``max_values`` JSON values, counted generously as its
  ``,`` ``:`` ``[`` ``{`` bytes (one precedes every key and every value but the outermost;
  those inside strings count too). Python takes up to about 90 bytes for a parsed value, 20
  to 30 times the bytes that wrote it (``{},`` is 3 bytes, 72 once parsed): counted before
  the parse, the values bound what a body becomes.

Big bodies go to :func:`loads_off_loop`: a thread of their own, one body at a time per
process, so that a second parse never adds its memory to the first, and nothing queued in
asyncio's default executor waits behind one. The count is a few milliseconds of C, and the
depth walk is Python, which lets the loop in every few milliseconds; the parse itself holds
the GIL from start to end (orjson's and the standard library's alike), and the value bound is
what keeps that short: about 0.1 to 0.2 s for a million values.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - exercised where the speed extra is absent
    orjson = None  # type: ignore[assignment]

MAX_DEPTH = 128  # as serde_json's default; txtai's documents are 2 or 3 levels deep
_SHALLOW = 2 * MAX_DEPTH  # no document this short can nest deeper
_STRUCTURAL = b",:[{"  # one of these precedes every key and every value but the outermost

# One thread, created on first use: big bodies wait for it rather than parse side by side.
_parser = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="aioserver-json")


class TooDeep(ValueError):
    """The document is nested deeper than :data:`MAX_DEPTH` levels."""

    def __init__(self) -> None:
        super().__init__(f"nested deeper than {MAX_DEPTH} levels")


class TooManyValues(ValueError):
    """The document holds more JSON values than allowed."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} JSON values")
        self.limit = limit


def loads(raw: bytes) -> Any:
    """Parse a body; raises ValueError (or UnicodeDecodeError) when it is not JSON, TooDeep too deep."""
    if orjson is not None:
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            if "depth limit" in str(exc):  # orjson stops at 1024 levels; the library would only recurse
                raise TooDeep() from None  # (were the message reworded, its RecursionError says the same)
            value = _stdlib_loads(raw)  # the standard library decides: both accept the same documents
    else:
        value = _stdlib_loads(raw)
    # Nesting deeper than MAX_DEPTH takes as many brackets, opened and closed: most bodies need no walk.
    if len(raw) > _SHALLOW and raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _deeper_than(value, MAX_DEPTH):
        raise TooDeep()
    return value


def loads_bounded(raw: bytes, max_values: int) -> Any:
    """:func:`loads`, refusing a body of more than ``max_values`` values before parsing it (blocking)."""
    if sum(raw.count(byte) for byte in _STRUCTURAL) > max_values:
        raise TooManyValues(max_values)
    return loads(raw)


async def loads_off_loop(raw: bytes, max_values: int) -> Any:
    """:func:`loads_bounded` in the parser thread, one body at a time per process."""
    return await asyncio.get_running_loop().run_in_executor(_parser, loads_bounded, raw, max_values)


def dumps(value: Any) -> bytes:
    """Serialize a result; raises TypeError or ValueError when it is not JSON-serializable."""
    if orjson is not None:
        try:
            return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
        except TypeError:  # JSONEncodeError: a type orjson does not know, or over 255 levels deep
            pass
    try:
        return json.dumps(value).encode()
    except RecursionError:
        raise ValueError("nested too deeply to serialize") from None


def _stdlib_loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except RecursionError:
        raise TooDeep() from None


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists and objects more than ``limit`` levels deep, walked level by level."""
    if type(value) is not list and type(value) is not dict:
        return False
    level: list[Any] = [value]
    for _ in range(limit):  # after i rounds, ``level`` holds the containers at depth i + 1
        below: list[Any] = []
        for container in level:
            items = container.values() if type(container) is dict else container
            below.extend(item for item in items if type(item) is list or type(item) is dict)
        if not below:
            return False
        level = below
    return True
