"""txtai's pipeline routes, for the built-in pipelines a config section configures.

As txtai's API, which adds a pipeline's routes when the config has a section of its name:

    GET  /textract?file=...                              -> its text (textractor)
    POST /batchtextract  ["file", ...]                   -> [text, ...]
    GET  /segment?text=...                               -> its pieces (segmentation)
    POST /batchsegment   ["text", ...]                   -> [pieces, ...]
    GET  /summary?text=...&minlength=N&maxlength=N       -> its summary (summary)
    POST /batchsummary   {"texts": [...], "minlength": N, "maxlength": N} -> [summary, ...]

They run as a workflow's task would: a ``--limit-concurrency`` slot, ``--timeout-workflow``,
the body limits of ``POST /workflow``, the work in the server's worker processes, files and
URLs only through safeopen (the pipelines are ours). They are routes like any other for
authorization: a token scoped to workflows calls one only when its list names the path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .errors import http_error
from .keys import LIMITS, RUNTIME
from .limits import check_length
from .views import json_answer, read_json
from .workflow.engine import Action

# A length is a number of tokens: digits only, and few enough that no int() of them is slow.
_LENGTH = re.compile(r"[0-9]{1,9}")
BATCH_SUMMARY_KEYS = frozenset({"texts", "minlength", "maxlength"})


@dataclass(frozen=True, slots=True)
class PipelineRoutes:
    """The routes of one pipeline: its GET path and query parameter, its POST path."""

    pipeline: str  # the config section's name: textractor, segmentation, summary
    path: str
    parameter: str
    batch_path: str
    lengths: bool = False  # minlength and maxlength (summary)


ROUTES = (
    PipelineRoutes("textractor", "/textract", "file", "/batchtextract"),
    PipelineRoutes("segmentation", "/segment", "text", "/batchsegment"),
    PipelineRoutes("summary", "/summary", "text", "/batchsummary", lengths=True),
)


def served(pipelines: Mapping[str, Action]) -> list[tuple[PipelineRoutes, Action]]:
    """The routes served for the configured ``pipelines`` (config sections by name)."""
    return [(routes, pipelines[routes.pipeline]) for routes in ROUTES if routes.pipeline in pipelines]


def setup_pipeline_routes(app: web.Application, pipelines: Mapping[str, Action]) -> None:
    """Add the routes of each built-in pipeline that ``pipelines`` holds."""
    for routes, action in served(pipelines):
        # No HEAD: it would run the pipeline to send no answer (txtai's GET routes have none either).
        app.router.add_get(routes.path, _one(routes, action), allow_head=False)
        app.router.add_post(routes.batch_path, _batch(routes, action))


def _one(routes: PipelineRoutes, action: Action) -> Any:
    async def handler(request: web.Request) -> web.Response:
        value = _single(request, routes.parameter)
        if value is None:
            raise http_error(web.HTTPBadRequest, f"missing query parameter {routes.parameter!r}")
        lengths = (
            {name: _length_parameter(request, name) for name in ("minlength", "maxlength")} if routes.lengths else {}
        )
        (result,) = await _run(request, action, [value], lengths)
        return web.Response(body=await json_answer(result, True, routes.pipeline), content_type="application/json")

    return handler


def _batch(routes: PipelineRoutes, action: Action) -> Any:
    async def handler(request: web.Request) -> web.Response:
        check_length(request)  # 413 before 503: waiting for a free slot would not help
        with request.app[LIMITS]:  # a slot, or 503, before the body is read
            body, inline = await read_json(request)
            texts, lengths = _summary_fields(body) if routes.lengths else (_strings(body, routes.parameter), {})
            results = await _run_in_slot(request, action, texts, lengths)
            answer = await json_answer(results, inline, routes.pipeline)
        return web.Response(body=answer, content_type="application/json")

    return handler


async def _run(request: web.Request, action: Action, batch: list[Any], kwargs: Mapping[str, Any]) -> list[Any]:
    with request.app[LIMITS]:
        return await _run_in_slot(request, action, batch, kwargs)


async def _run_in_slot(request: web.Request, action: Action, batch: list[Any], kwargs: Mapping[str, Any]) -> list[Any]:
    app = request.app
    return await app[LIMITS].run(lambda: action(batch, (), kwargs, app[RUNTIME]))


def _single(request: web.Request, name: str) -> str | None:
    """The query parameter ``name``; 400 when given more than once (which one would count?)."""
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise http_error(web.HTTPBadRequest, f"query parameter {name!r} given {len(values)} times; give it once")
    return values[0] if values else None


def _length_parameter(request: web.Request, name: str) -> int | None:
    value = _single(request, name)
    if value is None:
        return None
    if not _LENGTH.fullmatch(value):
        raise http_error(web.HTTPBadRequest, f"query parameter {name!r} must be a number of tokens (0 or more)")
    return int(value) or None  # 0 is none, as in txtai


def _strings(body: Any, what: str) -> list[str]:
    if not isinstance(body, list) or not all(isinstance(value, str) for value in body):
        raise http_error(web.HTTPBadRequest, f"body must be a JSON array of strings (each a {what})")
    return body


def _summary_fields(body: Any) -> tuple[list[str], dict[str, int | None]]:
    """The texts, minlength and maxlength of a ``POST /batchsummary`` body."""
    if not isinstance(body, dict):
        raise http_error(
            web.HTTPBadRequest, 'body must be a JSON object {"texts": [...], "minlength": ..., "maxlength": ...}'
        )
    unknown = body.keys() - BATCH_SUMMARY_KEYS
    if unknown:
        raise http_error(
            web.HTTPBadRequest, f"unknown key {sorted(unknown)[0][:100]!r}; expected texts, minlength and maxlength"
        )
    if "texts" not in body:
        raise http_error(web.HTTPBadRequest, "'texts' is required")
    texts = body["texts"]
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        raise http_error(web.HTTPBadRequest, "'texts' must be a list of strings")
    lengths: dict[str, int | None] = {}
    for name in ("minlength", "maxlength"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise http_error(web.HTTPBadRequest, f"{name!r} must be a number of tokens (an integer, 0 or more) or null")
        lengths[name] = value or None
    return texts, lengths
