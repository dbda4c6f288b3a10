"""``GET /openapi.json``: an OpenAPI 3.1 document of the routes this server serves.

Made once, when the app is made, from its router: the workflows' names (an enum), the
pipeline routes of the sections configured, ``/metrics`` with ``--metrics``, an extension's
routes (described as such), and the bearer scheme when tokens are configured. It is a route
like any other for authorization. ``info.version`` is the API's, not the package's: the
server tells nobody which release it runs (as its ``Server`` header does not).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from .auth import IDENTITY, OPEN_PATHS
from .config import Config
from .pipelineviews import PipelineRoutes, served
from .workflow.engine import Action
from .workflow.pipelines import Segmentation

PATH = "/openapi.json"
MAX_SCOPES = 64
API_VERSION = "1"
JSON_MEDIA = "application/json"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_PARAMETER = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")

ERROR = {"$ref": "#/components/schemas/Error"}
STRINGS = {"type": "array", "items": {"type": "string"}}
LENGTH = {
    "type": ["integer", "null"],
    "minimum": 0,
    "description": "tokens (words, numbers, punctuation marks); 0 or null: none",
}
# The answers every authorized route may give, besides its own.
AUTH_ANSWERS = {
    "400": "malformed Authorization header (error=invalid_request)",
    "401": "no token, or an unknown one (error=invalid_token)",
    "403": "a token whose scope does not include this (error=insufficient_scope)",
    "429": "too many failed authorizations from this address (see Retry-After)",
}
WORK_ANSWERS = {
    "400": "a body or parameter of the wrong shape, or an element the work cannot take",
    "413": "a body over --max-body-size",
    "415": "a POST whose Content-Type is not JSON",
    "500": "the work failed: the error id is in the server's log",
    "502": "a remote service the work calls failed",
    "503": "over --limit-concurrency (see Retry-After)",
    "504": "over --timeout-workflow",
}


def setup_openapi(app: web.Application, config: Config) -> None:
    """Add ``GET /openapi.json``, documenting every route the app has now (call it last).

    A scoped token (one whose list names ``/openapi.json``) is shown only what it may call: the
    routes its list names, the open ones, and ``POST /workflow`` with its workflows only, so
    that the document tells it no more than its 403s would.
    """
    full: dict[str, Any] = {}
    whole: list[bytes] = []  # the whole document, encoded
    bodies: dict[frozenset[str], bytes] = {}  # by scope: a few, as tokens are few

    async def openapi(request: web.Request) -> web.Response:
        token = request.get(IDENTITY)
        scope = token.workflows if token is not None else None
        if scope is None:
            return web.Response(body=whole[0], content_type=JSON_MEDIA)
        body = bodies.get(scope)
        if body is None:
            if len(bodies) >= MAX_SCOPES:  # a reload's tokens, or JWTs' scope claims: start afresh
                bodies.clear()
            body = bodies[scope] = _encode(scoped(full, scope))
        return web.Response(body=body, content_type=JSON_MEDIA)

    app.router.add_get(PATH, openapi)
    full.update(document(app, config))
    whole.append(_encode(full))


def _encode(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, indent=1).encode()


def scoped(doc: Mapping[str, Any], scope: frozenset[str]) -> dict[str, Any]:
    """``doc`` as a token whose list is ``scope`` may see it: what it may call, nothing else."""
    paths: dict[str, Any] = {}
    for path, operations in doc["paths"].items():
        if path in OPEN_PATHS or path in scope:
            paths[path] = operations
        elif path == "/workflow":
            workflow = json.loads(json.dumps(operations))  # a copy to narrow
            schema = workflow["post"]["requestBody"]["content"][JSON_MEDIA]["schema"]["properties"]["name"]
            names = [name for name in schema.get("enum", ()) if name in scope]
            if names:
                schema["enum"] = names
                paths[path] = workflow
    return {**doc, "paths": paths}


def document(app: web.Application, config: Config) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app``'s routes, made for ``config``."""
    secured = bool(config.tokens)
    known = _operations(config)
    paths: dict[str, dict[str, Any]] = {}
    for route in app.router.routes():
        resource = route.resource
        method = route.method.lower()
        if resource is None or method not in METHODS:
            continue  # a route for any method ("*"): no single operation to describe
        path = resource.canonical
        operation = known.get((method, path))
        if operation is None and method == "head" and ("get", path) in known:
            operation = {"summary": f"as GET {path}, without the body", "responses": _copy_heads(known[("get", path)])}
        if operation is None:
            operation = _extension_operation(path)
        operation = dict(operation)
        if path in OPEN_PATHS and method in ("get", "head"):
            operation["security"] = []  # open to all, token or not
        elif secured:
            responses = operation["responses"]
            for status, description in AUTH_ANSWERS.items():
                responses.setdefault(status, _error(description))
        paths.setdefault(path, {})[method] = operation
    result: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "aioserver",
            "version": API_VERSION,
            "description": "YAML-defined workflows, and txtai's pipeline routes for the pipelines configured.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {"error": {"type": "string"}, "id": {"type": "string"}},
                    "required": ["error"],
                }
            }
        },
    }
    if secured:
        result["components"]["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "a token whose SHA-256 hash the server holds: any visible ASCII characters",
            }
        }
        result["security"] = [{"bearer": []}]
    return result


def _operations(config: Config) -> dict[tuple[str, str], dict[str, Any]]:
    """What this server's own routes take and answer, by (method, path)."""
    names = sorted(config.workflows)
    name: dict[str, Any] = {"type": "string", "description": "a workflow of the config"}
    if names:
        name["enum"] = names
    operations: dict[tuple[str, str], dict[str, Any]] = {
        ("get", "/health"): {
            "operationId": "health",
            "summary": "liveness",
            "responses": {"200": _json("serving", {"type": "object", "properties": {"status": {"const": "ok"}}})},
        },
        ("get", "/ready"): {
            "operationId": "ready",
            "summary": "readiness: 503 once shutdown has begun",
            "responses": {
                "200": _json("serving", {"type": "object", "properties": {"status": {"const": "ready"}}}),
                "503": _json("starting or stopping", {"type": "object", "properties": {"status": {"type": "string"}}}),
            },
        },
        ("post", "/workflow"): {
            "operationId": "workflow",
            "summary": "run a workflow over a list of elements",
            "requestBody": _body(
                {
                    "type": "object",
                    "properties": {"name": name, "elements": {"type": "array"}},
                    "required": ["name", "elements"],
                    "additionalProperties": False,
                }
            ),
            "responses": {
                "200": _json("the results, in order", {"type": "array"}),
                "404": _error("no workflow of that name"),
                **_work_answers(),
            },
        },
        ("get", PATH): {
            "operationId": "openapi",
            "summary": "this document",
            "responses": {"200": _json("the OpenAPI document", {"type": "object"})},
        },
    }
    if config.settings.metrics:
        operations[("get", "/metrics")] = {
            "operationId": "metrics",
            "summary": "Prometheus metrics",
            "responses": {
                "200": {"description": "the text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
            },
        }
    for routes, action in served(config.pipelines):
        operations.update(_pipeline_operations(routes, action))
    return operations


def _pipeline_operations(routes: PipelineRoutes, action: Action) -> dict[tuple[str, str], dict[str, Any]]:
    result = _result_schema(action)
    what = {"file": "an HTML string, a file path or a URL", "text": "the text"}[routes.parameter]
    parameters: list[dict[str, Any]] = [
        {"name": routes.parameter, "in": "query", "required": True, "schema": {"type": "string"}, "description": what}
    ]
    batch: dict[str, Any] = STRINGS
    if routes.lengths:
        parameters += [
            {"name": name, "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}}
            for name in ("minlength", "maxlength")
        ]
        batch = {
            "type": "object",
            "properties": {"texts": STRINGS, "minlength": LENGTH, "maxlength": LENGTH},
            "required": ["texts"],
            "additionalProperties": False,
        }
    name = routes.path.lstrip("/")
    return {
        ("get", routes.path): {
            "operationId": name,
            "summary": f"txtai's {name}: the {routes.pipeline} pipeline on one {routes.parameter}",
            "parameters": parameters,
            "responses": {"200": _json("its result", result), **_work_answers()},
        },
        ("post", routes.batch_path): {
            "operationId": routes.batch_path.lstrip("/"),
            "summary": f"txtai's {routes.batch_path.lstrip('/')}: the {routes.pipeline} pipeline on a list",
            "requestBody": _body(batch),
            "responses": {
                "200": _json("a result each, in order", {"type": "array", "items": result}),
                **_work_answers(),
            },
        },
    }


def _result_schema(action: Action) -> dict[str, Any]:
    """What the pipeline gives for one text, as its section configures it."""
    pipeline = action.function
    if not isinstance(pipeline, Segmentation):  # summary
        return {"type": "string"}
    if pipeline.splits:
        return STRINGS
    if pipeline.minlength and pipeline.cleantext:
        return {"type": ["string", "null"], "description": "null: shorter than minlength"}
    return {"type": "string"}


def _extension_operation(path: str) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": "a route added by an extension (EXTENSIONS)",
        "responses": {"default": {"description": "the extension's answer"}},
    }
    names = _PARAMETER.findall(path)
    if names:
        operation["parameters"] = [
            {"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names
        ]
    return operation


def _json(description: str, schema: Mapping[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {JSON_MEDIA: {"schema": dict(schema)}}}


def _error(description: str) -> dict[str, Any]:
    return _json(description, ERROR)


def _body(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {JSON_MEDIA: {"schema": dict(schema)}}}


def _work_answers() -> dict[str, Any]:
    return {status: _error(description) for status, description in WORK_ANSWERS.items()}


def _copy_heads(get: Mapping[str, Any]) -> dict[str, Any]:
    """A GET's answers, without their bodies: HEAD's."""
    return {status: {"description": answer["description"]} for status, answer in get["responses"].items()}
