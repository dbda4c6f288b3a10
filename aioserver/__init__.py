"""aioserver: a standalone, secure HTTP API for YAML-defined workflows, on aiohttp."""

from .app import create_app
from .config import Config, load_config

__all__ = ["Config", "create_app", "load_config"]
__version__ = "0.1.0"
