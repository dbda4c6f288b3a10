"""An extension for the metrics tests: a route with a parameter."""

from __future__ import annotations

from aiohttp import web


def items(app: web.Application) -> None:
    """``GET /items/{id}``: the id, back."""

    async def item(request: web.Request) -> web.Response:
        return web.json_response(request.match_info["id"])

    app.router.add_get("/items/{id}", item)
