"""The auth-failure throttle counted fleet-wide, in Redis (``--redis``): 10 failures per client per
minute in total, whichever processes of whichever hosts they reach.

Each failure is one round trip: a Lua script increments the client's key (``aioserver:throttle:``
and the client, an IPv6 client's /64), gives a new key the window's time to live and returns
the count and the time left, atomically. A success costs no round trip: each process refuses
a client (429, before any token is checked) from what it knows locally, as auth.FailureThrottle
does, and what it knows is every reply it had: the fleet's count and the window's end. So once
the fleet counts ``limit`` failures, the process that counted the last one refuses the client;
a process that has not heard checks one more token, whose failure's count (past the limit) it
answers with 429, and from then on refuses too.

What an attacker still gets, per client and window: ``limit`` guesses, plus one for each other
process of the fleet (every worker of every host), at most. A process counts one failure of a
client at a time: a request of a client whose failure is being counted waits for that count
(the reply, well under a millisecond on a LAN) before its token is checked, so that requests
sent at once to one process are not all checked before the first count comes back. Those
waits are the only cost a success pays, and only a client failing at that very moment pays it.

Redis away (:class:`fleet.Unavailable`, or known away): each process counts locally, as
without ``--redis`` (``limit`` per process), and nothing fails. While Redis is known away no
call is even tried (the fleet's probe finds it back), so that no failure waits for a time limit.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .auth import FailureThrottle
from .fleet import Fleet, Unavailable, key

if TYPE_CHECKING:
    from redis.asyncio import Redis

# KEYS[1]: the client's key; ARGV[1]: the window in milliseconds. Returns {count, ms left}.
# A key without a time to live, or a longer one (never set by us), gets the window's: no key
# found in Redis locks a client out for longer than a window.
COUNT = """
local count = redis.call('INCR', KEYS[1])
local left = redis.call('PTTL', KEYS[1])
if count == 1 or left < 0 or left > tonumber(ARGV[1]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[1])
    left = tonumber(ARGV[1])
end
return {count, left}
"""


class FleetThrottle(FailureThrottle):
    """auth.FailureThrottle whose counts are the fleet's, from Redis; local when Redis is away."""

    def __init__(self, fleet: Fleet, limit: int = 10, window: float = 60.0, max_clients: int = 10_000) -> None:
        super().__init__(limit, window, max_clients)
        self.fleet = fleet
        self._window_ms = str(math.ceil(window * 1000))
        self._script = fleet.client.register_script(COUNT)  # EVALSHA; loaded again after a restart

    async def count(self, client: str) -> int:
        # Counted here first, at once, as without Redis: the fallback if Redis does not answer,
        # and the mark that makes this client's next requests wait for the fleet's count.
        self.failed(client)
        if not self.fleet.up:  # known away: no call waits for its time limit; the probe finds it back
            return self._past(client)
        counting = asyncio.get_running_loop().create_future()
        self.pending[client] = counting
        try:
            reply = await self.fleet.call(self._count(client))
        except Unavailable:
            return self._past(client)
        finally:
            if self.pending.get(client) is counting:
                del self.pending[client]
            counting.set_result(None)
        count, left = int(reply[0]), int(reply[1])
        self._learn(client, count, left / 1000)
        return self._past(client)

    def _count(self, client: str) -> Callable[[Redis], Awaitable[Any]]:
        """The call running the script on ``client``'s key (the reply: [count, ms left])."""
        script, keys, args = self._script, [key("throttle", client)], [self._window_ms]
        return lambda redis: script(keys=keys, args=args, client=redis)

    def _learn(self, client: str, count: int, left: float) -> None:
        """Take the fleet's ``count`` of ``client``'s failures, in a window ending in ``left`` seconds.

        This process's own count stays if higher: failures it counted while Redis was away, or
        before Redis restarted empty.
        """
        now = time.monotonic()
        local, _ = self._failures.pop(client, (0, now))
        started = now + left - self.window
        self._failures[client] = (max(count, local), started)
        self._quiet_from = max(self._quiet_from, started + self.window)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)
