"""Readiness: ``GET /ready`` answers 200 only while this process serves and is not stopping.

Liveness (``/health``) says the process answers; readiness says whether a balancer should
send it new requests. The server lifecycle (server.py) moves the state on: starting until
every listener serves, serving, then stopping from the stop signal on, so that a balancer
polling ``/ready`` takes the process out before its listeners close (``--shutdown-delay``).
"""

from __future__ import annotations

import enum

from aiohttp import web


class State(enum.Enum):
    STARTING = "starting"
    SERVING = "ready"
    STOPPING = "stopping"


# The answers are the same every time: made once, as bytes.
_BODIES = {state: f'{{"status": "{state.value}"}}'.encode() for state in State}


class Readiness:
    """This process's readiness; moves forward only (a stop is never undone)."""

    def __init__(self) -> None:
        self.state = State.STARTING
        # Once the stop's deadline is known (loop time): when what still runs is cut off, so
        # that a scheduled run is cancelled (and says so) together with the requests in flight.
        self.cut_at: float | None = None

    def serving(self) -> None:
        """Every listener serves: ready, unless the stop has begun already."""
        if self.state is State.STARTING:
            self.state = State.SERVING

    def stopping(self) -> None:
        """The stop has begun: not ready from now on."""
        self.state = State.STOPPING


READINESS = web.AppKey("readiness", Readiness)


async def ready(request: web.Request) -> web.Response:
    """200 ``{"status": "ready"}`` while serving; 503 with ``starting`` or ``stopping`` otherwise.

    Open to all, like /health: it reveals nothing but whether to send requests here.
    """
    state = request.app[READINESS].state
    # no-store: a cache between the balancer and us must not keep a stale answer.
    return web.Response(
        body=_BODIES[state],
        status=200 if state is State.SERVING else 503,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )
