"""aioserver: a standalone, secure HTTP API for YAML-defined workflows, on aiohttp."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .config import Config, load_config

__all__ = ["Config", "create_app", "load_config"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Imported when first asked for, not with the package: `python -m aioserver` runs
    # __main__ before aiohttp is imported, so that it can hold SIGHUP from its first line.
    if name == "create_app":
        from .app import create_app

        return create_app
    if name in ("Config", "load_config"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'aioserver' has no attribute {name!r}")
