"""JSON for request and response bodies: orjson when installed (the ``speed`` extra), else json.

Both give the same answers: what orjson refuses (lone surrogates, ...) or would round (integers
past 64 bits) goes through the standard library instead. Request bodies are bounded beyond their
size in bytes:

- nesting: at most :data:`MAX_DEPTH` levels, so that no parse recurses deep (the standard
  library's raises RecursionError past about 1000) and whatever is echoed back serializes
  (orjson's dumps stops at 255 levels);
- values: a big body may hold at most ``max_values`` JSON values, counted generously as its
  ``,`` ``:`` ``[`` ``{`` bytes (one precedes every key and every value but the outermost;
  those inside strings count too). Python takes up to about 90 bytes for a parsed value, 20
  to 30 times the bytes that wrote it (``{},`` is 3 bytes, 72 once parsed): counted before
  the parse, the values bound what a body becomes;
- numbers: an integer may have at most :data:`MAX_INT_DIGITS` digits, and a number must be a
  finite double (not ``NaN``, ``Infinity`` or ``1e400``, which no JSON answer can carry).

Big bodies go to :func:`loads_off_loop`: a thread of their own, one body at a time per
process, so that a second parse never adds its memory to the first, and nothing queued in
asyncio's default executor waits behind one. The count is a few milliseconds of C, and the
depth walk is Python, which lets the loop in every few milliseconds; orjson's parse holds the
GIL from start to end, and the value bound is what keeps that short: about 0.1 to 0.2 s for a
million values. The standard library's parse holds it too, except while it hands a number to
the Python functions here that bound it: a body of numbers slow to convert lets the loop in.

What orjson cannot serialize, the standard library's C encoder can, holding the GIL as long as
it takes: 1.1 s for 16 MiB of floats such as ``2.2250738585072014e-308`` (2.4 us each to
format), behind one lone surrogate that sends them there. Answers to big bodies therefore go
through :func:`dumps_off_loop`, which hands that work to the parser thread in pieces of about
:data:`_PIECE` values, letting the loop in between pieces.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
from typing import Any, NoReturn

try:
    import orjson
except ImportError:  # pragma: no cover - exercised where the speed extra is absent
    orjson = None  # type: ignore[assignment]

MAX_DEPTH = 128  # as serde_json's default; txtai's documents are 2 or 3 levels deep
_SHALLOW = 2 * MAX_DEPTH  # no document this short can nest deeper
_STRUCTURAL = b",:[{"  # one of these precedes every key and every value but the outermost
# Every fixed-width integer in use fits (2**256 has 78 digits), and converting one to or from
# text takes well under a microsecond, as a float does; Python's own bound, 4,300 digits, costs
# 0.1 ms each way (int <-> str is quadratic): 3,800 of them made 1.7 s of GIL-holding work.
MAX_INT_DIGITS = 100
# orjson reads an integer past 64 bits as a float, rounding it (up to 308 digits; it refuses
# longer ones). Such an integer has 20 digits, or 19 and a minus sign: a body holding either
# (in a number or not) goes to the standard library, which reads integers exactly.
_DIGITS = bytes.maketrans(b"0123456789", b"0" * 10)
_PAST_64_BITS = (b"0" * 20, b"-" + b"0" * 19)

# One thread, created on first use: big bodies wait for it rather than parse side by side.
_parser = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="aioserver-json")


class TooDeep(ValueError):
    """The document is nested deeper than :data:`MAX_DEPTH` levels."""

    def __init__(self) -> None:
        super().__init__(f"nested deeper than {MAX_DEPTH} levels")


class TooLongInteger(ValueError):
    """The document holds an integer of more than :data:`MAX_INT_DIGITS` digits."""

    def __init__(self) -> None:
        super().__init__(f"an integer of more than {MAX_INT_DIGITS} digits")


class NotFinite(ValueError):
    """The document holds ``NaN``, ``Infinity`` or a number past a double's range."""

    def __init__(self) -> None:
        super().__init__("a number that is not finite (NaN, Infinity, or past 1.8e308)")


class TooManyValues(ValueError):
    """The document holds more JSON values than allowed."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} JSON values")
        self.limit = limit


def loads(raw: bytes) -> Any:
    """Parse a body; raises ValueError (or UnicodeDecodeError) when it is not JSON, TooDeep too deep,
    TooLongInteger or NotFinite for a number out of bounds."""
    if orjson is not None and _fits_orjson(raw):
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
    """Serialize a result (blocking); raises TypeError or ValueError when it is not JSON-serializable."""
    if orjson is not None:
        try:
            return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
        except TypeError:  # JSONEncodeError: a type orjson does not know, or over 255 levels deep
            pass
    try:
        return json.dumps(value).encode()
    except RecursionError:
        raise ValueError("nested too deeply to serialize") from None


def dumps_text(value: Any) -> str:
    """Serialize a log line's fields, never failing: what JSON cannot hold is written as its ``str()``."""
    if orjson is not None:
        try:
            return orjson.dumps(value, default=str).decode()
        except TypeError:  # a lone surrogate, ...: the standard library escapes it
            pass
    return json.dumps(value, default=str)


async def dumps_off_loop(value: Any) -> bytes:
    """:func:`dumps` for an answer that may be big: what orjson refuses, serialized in the parser thread, in pieces."""
    if orjson is not None:
        try:
            return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)  # fast enough for the loop
        except TypeError:
            pass
    return await asyncio.get_running_loop().run_in_executor(_parser, _dumps_in_pieces, value)


def _fits_orjson(raw: bytes) -> bool:
    """Whether orjson reads every integer of ``raw`` exactly (a few ms of C for 16 MiB)."""
    digits = raw.translate(_DIGITS)
    return _PAST_64_BITS[0] not in digits and _PAST_64_BITS[1] not in digits


def _stdlib_loads(raw: bytes) -> Any:
    # As json.loads does for bytes (UTF-8, -16 or -32), with a decoder made once.
    text = raw.decode(json.detect_encoding(raw), "surrogatepass")
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise TooDeep() from None


def _integer(text: str) -> int:
    if len(text) > MAX_INT_DIGITS and len(text) - text.startswith("-") > MAX_INT_DIGITS:
        raise TooLongInteger()  # before int() spends quadratic time on it
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)  # linear in the text's length, however many digits
    if math.isinf(value):
        raise NotFinite()
    return value


def _not_finite(text: str) -> NoReturn:
    raise NotFinite()  # NaN, Infinity, -Infinity: not JSON (RFC 8259, section 6)


# Python functions for numbers bound them, and let the loop in while a big body is parsed.
_DECODER = json.JSONDecoder(parse_int=_integer, parse_float=_finite_float, parse_constant=_not_finite)

# The C encoder's work, one call at a time, is what holds the GIL: each call here gets about
# _PIECE values (2.5 ms for the slowest floats), and Python between them lets the loop in.
_encode = json.JSONEncoder().encode  # one shot: the C encoder, as json.dumps
_PIECE = 1024
_FLAT = 16  # a container of at most this many values, none a container, joins a piece whole
_CONTAINERS = (list, tuple, dict)


def _dumps_in_pieces(value: Any) -> bytes:
    """``json.dumps(value).encode()`` exactly, in calls of the C encoder of about :data:`_PIECE` values each."""
    if not isinstance(value, _CONTAINERS) or not _bulky(value):
        return _encode(value).encode()
    parts: list[str] = []
    try:
        _encode_into(parts, value)
    except RecursionError:  # or circular, which json.dumps calls so: a ValueError either way
        raise ValueError("nested too deeply to serialize") from None
    return "".join(parts).encode()


def _encode_into(parts: list[str], value: Any) -> None:
    """Append the text of a :func:`_bulky` container to ``parts``."""
    is_dict = isinstance(value, dict)
    parts.append("{" if is_dict else "[")
    pairs: dict[Any, Any] = {}  # a piece of a dict: the C encoder writes its keys as json.dumps does
    items: list[Any] = []  # a piece of a list or tuple
    weight = 0
    separator = ""
    for key, item in value.items() if is_dict else enumerate(value):
        if isinstance(item, _CONTAINERS) and _bulky(item):
            if weight:
                parts.extend((separator, _encode(pairs if is_dict else items)[1:-1]))
                pairs, items, weight, separator = {}, [], 0, ", "
            parts.append(separator)
            if is_dict:
                parts.append(_encode({key: None})[1:-5])  # '"key": ' out of '{"key": null}'
            _encode_into(parts, item)
            separator = ", "
            continue
        if is_dict:
            pairs[key] = item
        else:
            items.append(item)
        weight += 1 + (len(item) if isinstance(item, _CONTAINERS) else 0)
        if weight >= _PIECE:
            parts.extend((separator, _encode(pairs if is_dict else items)[1:-1]))
            pairs, items, weight, separator = {}, [], 0, ", "
    if weight:
        parts.extend((separator, _encode(pairs if is_dict else items)[1:-1]))
    parts.append("}" if is_dict else "]")


def _bulky(container: Any) -> bool:
    """Whether a container holds more than :data:`_FLAT` values, or a container."""
    if len(container) > _FLAT:
        return True
    return any(
        isinstance(item, _CONTAINERS) for item in (container.values() if isinstance(container, dict) else container)
    )


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
