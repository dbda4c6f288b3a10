"""HTTP handlers: ``POST /workflow`` and ``GET /health``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from . import jsoncodec
from .auth import check_scope
from .errors import http_error
from .keys import CONFIG, LIMITS, RUNTIME, WORKFLOWS
from .limits import check_length, read_body
from .requestids import known_string_keys
from .workflow.engine import request_elements

# The name a POST /workflow asked for, kept on the request as soon as it is read (the access
# log and the metrics show it): a string key, as the request id's (SPEC section 8).
WORKFLOW = "aioserver.workflow"
known_string_keys(WORKFLOW)

REQUEST_KEYS = frozenset({"name", "elements"})
# Bodies up to this size are parsed, and answered, on the event loop, where even the costliest
# values take a few milliseconds; bigger ones go to jsoncodec's parser thread.
INLINE_BODY = 64 * 1024
# A big body may hold one JSON value per this many bytes of --max-body-size, and never fewer
# than an inline body can: at 16 MiB, 1 Mi values, at most about 90 MiB once parsed (plus
# their strings' text) where 16 MiB of ``{},`` would make 400 MiB.
BYTES_PER_VALUE = 16


async def health(request: web.Request) -> web.Response:
    """Liveness, open to all, revealing nothing else."""
    return web.json_response({"status": "ok"})


async def run_workflow(request: web.Request) -> web.Response:
    """Run the named workflow over the elements and answer with the list of results."""
    app = request.app
    check_length(request)  # 413 before 503: waiting for a free slot would not help
    limits = app[LIMITS]
    with limits:  # a slot, or 503, before the body is read
        body, inline = await read_json(request)
        name, elements = _fields(body)
        request[WORKFLOW] = name
        check_scope(request, name)
        workflow = app[WORKFLOWS].get(name)
        if workflow is None:
            raise http_error(web.HTTPNotFound, f"no workflow named {name[:100]!r}")
        elements = request_elements(elements)  # JSON arrays are txtai's (id, data, tags) tuples
        runtime = app[RUNTIME]
        results = await limits.run(lambda: workflow(elements, runtime))
        # A small body's answer is made here, without a coroutine of its own (json_answer's).
        try:
            answer = jsoncodec.dumps(results) if inline else await jsoncodec.dumps_off_loop(results)
        except (TypeError, ValueError) as exc:
            raise _not_serializable(f"workflow {name!r}", exc) from None
    return web.Response(body=answer, content_type="application/json")


async def read_json(request: web.Request) -> tuple[Any, bool]:
    """The request's body, parsed; and whether it was small enough to parse on the loop.

    Within ``timeout_request_body``, the size limit and the value and depth limits of
    :mod:`.jsoncodec`, each broken limit its own JSON error.
    """
    raw = await read_body(request, request.app[CONFIG].settings.timeout_request_body)
    inline = len(raw) <= INLINE_BODY
    try:
        if inline:
            return jsoncodec.loads(raw), inline
        max_values = max(request.client_max_size // BYTES_PER_VALUE, INLINE_BODY)
        return await jsoncodec.loads_off_loop(raw, max_values), inline
    except jsoncodec.TooManyValues as exc:
        raise web.HTTPRequestEntityTooLarge(
            max_size=request.client_max_size, actual_size=len(raw), text=f"body holds {exc}"
        ) from None
    except jsoncodec.TooDeep as exc:
        raise http_error(web.HTTPBadRequest, f"body is {exc}") from None
    except (jsoncodec.TooLongInteger, jsoncodec.NotFinite) as exc:
        raise http_error(web.HTTPBadRequest, f"body holds {exc}") from None
    except (ValueError, UnicodeDecodeError):
        raise http_error(web.HTTPBadRequest, "body is not valid JSON") from None


async def json_answer(results: Any, inline: bool, who: str) -> bytes:
    """``results`` as JSON: on the loop for an answer to a small body, else off it."""
    try:
        # An answer to a big body may be big too: what orjson cannot serialize leaves the loop.
        return jsoncodec.dumps(results) if inline else await jsoncodec.dumps_off_loop(results)
    except (TypeError, ValueError) as exc:
        raise _not_serializable(who, exc) from None


def _not_serializable(who: str, exc: Exception) -> TypeError:
    """The error (a 500) of a result that JSON cannot hold."""
    return TypeError(f"{who} returned a result that is not JSON-serializable: {exc}")


def _fields(body: Any) -> tuple[str, list[Any]]:
    """The name and elements of a parsed body, or 400 saying what is wrong with its shape."""
    if not isinstance(body, dict):
        raise http_error(web.HTTPBadRequest, 'body must be a JSON object {"name": ..., "elements": [...]}')
    if not body.keys() <= REQUEST_KEYS:  # no set made when there is nothing unknown
        unknown = body.keys() - REQUEST_KEYS
        raise http_error(web.HTTPBadRequest, f"unknown key {sorted(unknown)[0][:100]!r}; expected name and elements")
    name, elements = body.get("name"), body.get("elements")
    if not isinstance(name, str):
        raise http_error(web.HTTPBadRequest, "'name' must be a string")
    if not isinstance(elements, list):
        raise http_error(web.HTTPBadRequest, "'elements' must be a list")
    return name, elements
