"""HTTP handlers: ``POST /workflow`` and ``GET /health``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from . import jsoncodec
from .auth import check_scope
from .errors import http_error
from .keys import CONFIG, LIMITS, RUNTIME, WORKFLOWS
from .limits import check_length, read_body

REQUEST_KEYS = frozenset({"name", "elements"})


async def health(request: web.Request) -> web.Response:
    """Liveness, open to all, revealing nothing else."""
    return web.json_response({"status": "ok"})


async def run_workflow(request: web.Request) -> web.Response:
    """Run the named workflow over the elements and answer with the list of results."""
    app = request.app
    check_length(request)  # 413 before 503: waiting for a free slot would not help
    with app[LIMITS]:  # a slot, or 503, before the body is read
        name, elements = _parse_body(await read_body(request, app[CONFIG].settings.timeout_request_body))
        check_scope(request, name)
        workflow = app[WORKFLOWS].get(name)
        if workflow is None:
            raise http_error(web.HTTPNotFound, f"no workflow named {name[:100]!r}")
        results = await app[LIMITS].run(lambda: workflow(elements, app[RUNTIME]))
        try:
            answer = jsoncodec.dumps(results)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"workflow {name!r} returned a result that is not JSON-serializable: {exc}") from None
    return web.Response(body=answer, content_type="application/json")


def _parse_body(raw: bytes) -> tuple[str, list[Any]]:
    try:
        body = jsoncodec.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise http_error(web.HTTPBadRequest, "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise http_error(web.HTTPBadRequest, 'body must be a JSON object {"name": ..., "elements": [...]}')
    unknown = body.keys() - REQUEST_KEYS
    if unknown:
        raise http_error(web.HTTPBadRequest, f"unknown key {sorted(unknown)[0][:100]!r}; expected name and elements")
    name, elements = body.get("name"), body.get("elements")
    if not isinstance(name, str):
        raise http_error(web.HTTPBadRequest, "'name' must be a string")
    if not isinstance(elements, list):
        raise http_error(web.HTTPBadRequest, "'elements' must be a list")
    return name, elements
