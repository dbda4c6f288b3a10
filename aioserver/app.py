"""The application factory."""

from __future__ import annotations

from aiohttp import web

from . import views
from .config import Config
from .errors import error_middleware
from .keys import CONFIG, WORKFLOWS
from .workflow.runtime import setup_workflow_runtime


def create_app(config: Config) -> web.Application:
    """Build the aiohttp application for a resolved config; reads no argv, environment or file."""
    # Middleware order, outermost first. error_middleware must stay first so that it
    # renders, as JSON, every error raised by anything inside it.
    middlewares = [error_middleware]
    app = web.Application(middlewares=middlewares, client_max_size=config.settings.max_body_size)
    app[CONFIG] = config
    app[WORKFLOWS] = config.workflows
    setup_workflow_runtime(app)
    app.router.add_get("/health", views.health, allow_head=False)
    app.router.add_post("/workflow", views.run_workflow)
    return app
