"""JSON for request and response bodies: orjson when installed (the ``speed`` extra), else json.

Both give the same answers: what orjson refuses (integers beyond 64 bits, non-string keys it
cannot convert) goes through the standard library instead.
"""

from __future__ import annotations

import json
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - exercised where the speed extra is absent
    orjson = None  # type: ignore[assignment]


def loads(raw: bytes) -> Any:
    """Parse a body; raises ValueError (or UnicodeDecodeError) when it is not JSON."""
    if orjson is not None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # the standard library decides, so that both accept the same documents
    return json.loads(raw)


def dumps(value: Any) -> bytes:
    """Serialize a result; raises TypeError or ValueError when it is not JSON-serializable."""
    if orjson is not None:
        try:
            return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
        except TypeError:
            pass
    return json.dumps(value).encode()
