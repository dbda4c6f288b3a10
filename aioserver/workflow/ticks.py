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
  ``iterations`` over;
- one run at a time across the fleet, as on one host: the run holds
  ``aioserver:schedule:NAME:running`` while it lasts (renewed, and released at its end); a
  tick that comes meanwhile is locked but not run (skipped, as a host skips the times its
  run outlasted). The hold expires :data:`HOLD_SECONDS` after its last renewal, so a process
  killed in a run holds the schedule up that long at most.

Redis away: :class:`~aioserver.fleet.Unavailable` reaches the scheduler, which skips the tick
(fleet.py logs the outage, once).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..fleet import Fleet, Unavailable, key

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

# A run's hold on its schedule lasts this long past its last renewal (every third of it):
# long enough for a loaded host's renewal to come in time, short enough that a process
# killed in a run (its hold left behind) costs the fleet a few ticks at most.
HOLD_SECONDS = 15

# KEYS[1]: the tick's lock; KEYS[2]: the schedule's run count; KEYS[3]: the run's hold.
# ARGV[1]: the lock's lifetime (ms); ARGV[2]: iterations (0: no limit); ARGV[3]: the count
# the claiming process has seen; ARGV[4]: who claims (the lock's and the hold's value);
# ARGV[5]: the hold's lifetime (ms).
# Returns {1 if the tick is the caller's to run, the count (the run's number if so)}.
# A hold of the caller's own is dropped first: a process claims a schedule's tick only when it
# runs nothing of that schedule, so such a hold is a run that never came (a claim that Redis,
# stalled, ran after the caller had given up on its answer: the tick skipped) or one whose
# release was lost. Left, it kept the whole fleet from running the schedule for HOLD_SECONDS.
CLAIM = """
if redis.call('GET', KEYS[3]) == ARGV[4] then
  redis.call('DEL', KEYS[3])
end
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
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {0, runs}
end
redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5])
return {1, redis.call('INCR', KEYS[2])}
"""
# KEYS[1]: the hold; ARGV[1]: its holder; ARGV[2]: its lifetime (ms). Extended only if it is
# the holder's: never taken again once gone (a Redis restarted empty), since a renewal that
# arrives after the run's release must not hold the schedule up.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS[1]: the hold; ARGV[1]: its holder. Deleted only by its holder.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
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
        self.scripts: dict[str, AsyncScript] = {
            script: fleet.client.register_script(text)
            for script, text in (("claim", CLAIM), ("renew", RENEW), ("release", RELEASE))
        }
        # The value of its locks and holds: whose they are, for an operator and for the release
        # (a random part: a pid comes back, after a restart).
        self.claimant = f"{socket.gethostname()} pid {os.getpid()} {secrets.token_hex(4)}"

    async def claim(self, name: str, due: float, iterations: int | None, seen: int) -> Claim:
        """Claim workflow ``name``'s tick at ``due``; raises Unavailable when Redis is away."""
        keys = [tick_key(name, due), runs_key(name), hold_key(name)]
        args: list[int | str] = [LOCK_SECONDS * 1000, iterations or 0, seen, self.claimant, HOLD_SECONDS * 1000]
        ours, runs = await self._script("claim", keys, args)
        return Claim(bool(ours), int(runs))

    @contextlib.asynccontextmanager
    async def holding(self, name: str) -> AsyncIterator[None]:
        """For a run of workflow ``name`` claimed here: keep its hold while it runs, release it after."""
        renewing = asyncio.create_task(self._renew(name), name=f"schedule {name} hold")
        try:
            yield
        finally:
            renewing.cancel()
            await asyncio.wait([renewing])  # a renewal in flight ends (or is cut off) before the release
            try:
                await self._script("release", [hold_key(name)], [self.claimant])
            except Unavailable:
                pass  # then it expires

    async def _renew(self, name: str) -> None:
        while True:
            await asyncio.sleep(HOLD_SECONDS / 3)
            try:
                await self._script("renew", [hold_key(name)], [self.claimant, HOLD_SECONDS * 1000])
            except Unavailable:
                pass  # fleet.py logs the outage; the hold expires meanwhile, or comes back with Redis

    async def _script(self, script: str, keys: list[str], args: list[int | str]) -> Any:
        return await self.fleet.call(lambda client: self.scripts[script](keys, args, client))


def tick_key(name: str, due: float) -> str:
    return key("schedule", _quoted(name), "tick", str(round(due)))


def runs_key(name: str) -> str:
    return key("schedule", _quoted(name), "runs")


def hold_key(name: str) -> str:
    return key("schedule", _quoted(name), "running")


def _quoted(name: str) -> str:
    # Workflow names are any string: quoted, a ':' in one cannot make it another one's key.
    return urllib.parse.quote(name, safe="")
