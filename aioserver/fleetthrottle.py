"""The auth-failure throttle counted fleet-wide, in Redis (``--redis``): 10 failures per client per
minute in total, whichever processes of whichever hosts they reach.

Each failure is one round trip: a Lua script increments the client's key (``aioserver:throttle:``
and the client, an IPv6 client's /64), gives a new key the window's time to live and returns
the count and the time left, atomically; from the limit on, the same script publishes the
news on a channel (``Fleet.channel``), to which every process listens. A success costs no round trip: each
process refuses a client (429, before any token is checked) from what it knows locally, as
auth.FailureThrottle does, and what it knows is every reply it had (the fleet's count and
the window's end) and every piece of news it heard. A failure whose count is past the limit
is answered 429.

What an attacker still gets, per client and window: ``limit`` guesses, plus those that other
processes check before the news reaches them (it travels as the script's reply does: well
under a millisecond on a LAN). At most one per other process (every worker of every host),
whatever the timing: a process that has not heard checks one more token, whose count (past
the limit) tells it. A process counts one failure of a client at a time: a request of a
client whose failure is being counted waits for that count before its token is checked, so
that requests sent at once to one process are not all checked before the first count comes
back. Those waits are the only cost a success pays, and only a client failing at that very
moment pays it. A process that was not listening (Redis restarting) has only the replies.

Redis away (:class:`fleet.Unavailable`, or known away): each process counts locally, as
without ``--redis`` (``limit`` per process), and nothing fails. While Redis is known away no
call is even tried (the fleet's probe finds it back), so that no failure waits for a time limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .auth import FailureThrottle
from .fleet import Fleet, Unavailable, key

if TYPE_CHECKING:
    from redis.asyncio import Redis

# KEYS[1]: the client's key; ARGV: the window in milliseconds, the limit, the channel and the
# client. Returns {count, ms left}; from the limit on, publishes "CLIENT MS_LEFT" (one of the
# few messages a window: a process that heard does not count that client's failures again).
# A key without a time to live, or a longer one (never set by us), gets the window's: no key
# found in Redis locks a client out for longer than a window.
COUNT = """
local count = redis.call('INCR', KEYS[1])
local left = redis.call('PTTL', KEYS[1])
if count == 1 or left < 0 or left > tonumber(ARGV[1]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[1])
    left = tonumber(ARGV[1])
end
if count >= tonumber(ARGV[2]) then
    redis.call('PUBLISH', ARGV[3], ARGV[4] .. ' ' .. left)
end
return {count, left}
"""
LISTEN_AGAIN = 1.0  # seconds before listening again, after Redis failed the listener


class FleetThrottle(FailureThrottle):
    """auth.FailureThrottle whose counts are the fleet's, from Redis; local when Redis is away."""

    def __init__(self, fleet: Fleet, limit: int = 10, window: float = 60.0, max_clients: int = 10_000) -> None:
        super().__init__(limit, window, max_clients)
        self.fleet = fleet
        self._window_ms = str(math.ceil(window * 1000))
        self._script = fleet.client.register_script(COUNT)  # EVALSHA; loaded again after a restart
        self.channel = fleet.channel  # the database's (see Fleet.channel)

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
        script, keys = self._script, [key("throttle", client)]
        args = [self._window_ms, str(self.limit), self.channel, client]
        return lambda redis: script(keys=keys, args=args, client=redis)

    async def listening(self, app: web.Application) -> AsyncIterator[None]:
        """The app's cleanup context: :meth:`listen` while the app runs."""
        task = asyncio.create_task(self.listen())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def listen(self) -> None:
        """Take the news of clients at the limit (:attr:`channel`) for as long as the process runs.

        While Redis is away (the fleet's probe says when it is back), or when it fails this
        listener, it listens again a second later: news sent meanwhile is lost, and the
        processes that missed it learn from their own replies.
        """
        from redis.asyncio import ConnectionPool, Redis
        from redis.exceptions import RedisError

        # A connection of its own, in a pool of its own: a subscribed connection is never one
        # that a call takes (after Redis restarts, such a mix-up cut every call's connection).
        shared = self.fleet.client.connection_pool
        pool = ConnectionPool(connection_class=shared.connection_class, **shared.connection_kwargs)
        listener = Redis(connection_pool=pool)
        try:
            while True:
                subscription = listener.pubsub()
                try:
                    if self.fleet.up:
                        await subscription.subscribe(self.channel)
                        # A time limit on each wait: a Redis lost without a word (the fleet's
                        # probe notices) is left for a new subscription once it is back.
                        while self.fleet.up:
                            message = await subscription.get_message(ignore_subscribe_messages=True, timeout=1.0)
                            if message is not None:
                                self._heard(message.get("data"))
                except (RedisError, OSError, TimeoutError):
                    pass
                finally:
                    with contextlib.suppress(RedisError, OSError, TimeoutError):
                        await subscription.aclose()  # type: ignore[no-untyped-call]
                await asyncio.sleep(LISTEN_AGAIN)
        finally:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await pool.disconnect()

    def _heard(self, data: Any) -> None:
        """A piece of news: ``CLIENT MS_LEFT``, a client the fleet has counted ``limit`` failures of."""
        try:
            client, _, left = bytes(data).decode("ascii").rpartition(" ")
            seconds = int(left) / 1000
        except (TypeError, ValueError):
            return  # not ours (anyone who may write to Redis may publish): ignored
        if client:
            self._learn(client, self.limit, seconds)

    def _learn(self, client: str, count: int, left: float) -> None:
        """Take the fleet's ``count`` of ``client``'s failures, in a window ending in ``left`` seconds.

        This process's own count stays if higher: failures it counted while Redis was away, or
        before Redis restarted empty.
        """
        now = time.monotonic()
        local, _ = self._failures.pop(client, (0, now))
        started = now + min(left, self.window) - self.window
        self._failures[client] = (max(count, local), started)
        self._quiet_from = max(self._quiet_from, started + self.window)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)
