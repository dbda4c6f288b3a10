"""Schedule ticks shared by a fleet (``--redis``): each time of a schedule runs on one process of the fleet.

Every host's scheduling process (the only one, or the worker of slot 0) wakes at each time of
each schedule and *claims* that tick in Redis; the first claim runs it, the others go back to
sleep. A claim is one Lua script, atomic in Redis, one round trip:

- the tick's lock, ``aioserver:schedule:NAME:tick:DUE`` (DUE: the tick's time in seconds since
  the epoch, computed from the cron and the clock: the same on every host whose clock is right
  and whose time zone is the same), is set only if absent (SET NX) and expires by itself, so
  there is nothing to release and nothing is left behind;
- the schedule's runs so far, ``aioserver:schedule:NAME:runs``, are counted in the same step:
  with ``iterations``, the lock is taken only while they are fewer (a run counts from its
  start, as on one host). The count is kept, without expiry: it outlives restarts of any
  host, or of all of them. Each claim also hands Redis the count its process has seen, so
  that a Redis restarted empty gets the count back at the first claim instead of starting
  ``iterations`` over.

Redis away: :class:`~aioserver.fleet.Unavailable` reaches the scheduler, which skips the tick
(fleet.py logs the outage, once).
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..fleet import Fleet, key

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

# How long a tick's lock lives. It must outlast every claim of that tick: the last one comes
# when the host with the latest clock, or the slowest loop, wakes for it, at most LATE seconds
# after the tick by its own clock (see below). Five minutes covers LATE plus clocks up to two
# minutes apart, far more than NTP leaves (milliseconds); a host off by more could run a tick
# a second time once its lock is gone. A lock costs ~100 bytes of Redis memory for its
# lifetime: 300 locks at most per schedule that runs every second.
LOCK_SECONDS = 300
# A tick more than this far in the past (a loop stalled, a host suspended, a clock set back)
# is not claimed: the fleet ran it already, and its lock must still be there to say so.
LATE = 60.0

# KEYS[1]: the tick's lock; KEYS[2]: the schedule's run count.
# ARGV[1]: the lock's lifetime (ms); ARGV[2]: iterations (0: no limit); ARGV[3]: the count
# the claiming process has seen; ARGV[4]: who claims (the lock's value, for an operator).
# Returns {1 if the tick is the caller's to run, the count (the run's number if so)}.
CLAIM = """
local runs = tonumber(redis.call('GET', KEYS[2]) or '0')
local seen = tonumber(ARGV[3])
if seen > runs then
  runs = seen
  redis.call('SET', KEYS[2], runs)
end
local iterations = tonumber(ARGV[2])
if iterations > 0 and runs >= iterations then
  return {0, runs}
end
if not redis.call('SET', KEYS[1], ARGV[4], 'NX', 'PX', ARGV[1]) then
  return {0, runs}
end
return {1, redis.call('INCR', KEYS[2])}
"""


@dataclass(frozen=True, slots=True)
class Claim:
    """A claim's answer: whether this process runs the tick, and the fleet's runs so far (with it)."""

    ours: bool
    runs: int


class FleetTicks:
    """This process's claims on the fleet's schedule ticks, through :class:`~aioserver.fleet.Fleet`."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.script: AsyncScript = fleet.client.register_script(CLAIM)
        self.claimant = f"{socket.gethostname()} pid {os.getpid()}"

    async def claim(self, name: str, due: float, iterations: int | None, seen: int) -> Claim:
        """Claim workflow ``name``'s tick at ``due``; raises Unavailable when Redis is away."""
        keys = [tick_key(name, due), runs_key(name)]
        args: list[int | str] = [LOCK_SECONDS * 1000, iterations or 0, seen, self.claimant]
        ours, runs = await self.fleet.call(lambda client: self.script(keys, args, client))
        return Claim(bool(ours), int(runs))


def tick_key(name: str, due: float) -> str:
    return key("schedule", _quoted(name), "tick", str(round(due)))


def runs_key(name: str) -> str:
    return key("schedule", _quoted(name), "runs")


def _quoted(name: str) -> str:
    # Workflow names are any string: quoted, a ':' in one cannot make it another one's key.
    return urllib.parse.quote(name, safe="")
