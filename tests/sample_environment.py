"""Actions that report what their process can see of the environment (dotted paths for the tests)."""

from __future__ import annotations

import os
from typing import Any


def keyfile_password(batch: list[Any]) -> list[str | None]:
    """``SSL_KEYFILE_PASSWORD`` as the action's process environment holds it."""
    return [os.environ.get("SSL_KEYFILE_PASSWORD") for _ in batch]


def environ_holds(batch: list[str]) -> list[bool]:
    """Whether ``/proc/self/environ`` (the environment as it was at exec) holds each element."""
    with open("/proc/self/environ", "rb") as file:
        environ = file.read()
    return [element.encode() in environ for element in batch]


def variables(batch: list[str]) -> list[str | None]:
    """Each named variable as the action's process environment holds it."""
    return [os.environ.get(name) for name in batch]
