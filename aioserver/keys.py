"""Typed keys for the state held on the application."""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from .auth import TokenStore
from .config import Config
from .fleet import Fleet
from .limits import WorkflowLimits
from .workflow import Workflow
from .workflow.runtime import Runtime

CONFIG = web.AppKey("config", Config)
WORKFLOWS = web.AppKey("workflows", Mapping[str, Workflow])
TOKENS = web.AppKey("tokens", TokenStore)
RUNTIME = web.AppKey("runtime", Runtime)  # the workflows' client session, process pool, schedules
LIMITS = web.AppKey("limits", WorkflowLimits)
FLEET = web.AppKey("fleet", Fleet)  # with --redis only: the link to the fleet's shared state
