"""Connections from accept to close: counted, bounded, and reclaimed when clients hold too many.

Every connection counts from the moment it is accepted, its TLS handshake included (aiohttp's
own count starts after the handshake). At ``limit_connections``, a new connection takes the
place of the oldest one that is still handshaking or idle (a keep-alive connection between
requests, or one that has not sent a request yet), as nginx reclaims idle keep-alive
connections, else of the oldest one whose client has taken nothing of its answer for a while;
only when every connection has a request in progress or an answer on its way is the new one
answered 503 and closed. So no client can lock others out by holding sockets open, and the
process stays within its file descriptors. The log says so once per episode at the limit.

An answer its client does not read holds its connection as long as it is being written: its
handler waits in aiohttp's ``drain()``, or, once the handler is done, the transport waits to
pass its buffer on before it lets go (for ever, when asked to close). So, as nginx's
``send_timeout``, a connection whose output makes no progress for ``send_timeout`` seconds is
reset; and at the limit, one whose output has made none for ``RECLAIM_STALLED`` seconds makes
room, after idle ones. Progress is what the client acknowledges: the bytes it has not, in the
transport's buffer and in the kernel's send queue (SIOCOUTQ), changed. The transport's buffer
alone would not do: the kernel takes more of it only once about a third of its send buffer
(MBs) is free, so a client reading steadily but slowly would seem stalled for seconds; and
under TLS it is only the TLS layer's buffer (both loops' TLS code hands a whole answer to the
TCP transport below it, out of reach).

One sweep over the connections, every 2 s (a quarter of the timeout below 8 s) while any is
open, measures that: no work per request. The kernel is asked (a system call) only about
connections with output pending, a request in progress, or an answer since they were last
found with nothing pending (see ``_measure``); the others cost well under a microsecond each.

TLS listeners accept connections themselves (:class:`TLSSite`) and hand each one to the loop's
``connect_accepted_socket`` with the context in force and a bound on the handshake's time. So
the socket is ours, and can be cut off, from accept; a reload takes effect for the next
connection, with a new session cache and new ticket keys (no earlier session resumes); and the
loop's own TLS code (C, under uvloop) carries the bytes afterwards, as with ``create_server``.
Two simpler ways do not work: ``create_server(ssl=...)`` keeps its context for good, runs the
handshake out of our reach (aiohttp passes no handshake timeout: asyncio's is 60 s); and
``start_tls`` from a plain protocol comes too late under uvloop, which starts reading once
``connection_made`` returns, so the ClientHello would reach the plain protocol.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import resource
import socket
import ssl
import struct
import termios
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .requestids import id_in_head
from .tls import ReloadableContext

logger = logging.getLogger("aioserver.connections")

# The answer to a refused connection, with its request id (see overloaded()).
_OVERLOADED = (
    b"HTTP/1.1 503 Service Unavailable\r\nServer: aioserver\r\nX-Content-Type-Options: nosniff\r\n"
    b"X-Request-ID: %s\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b'Connection: close\r\nContent-Length: 35\r\n\r\n{"error": "too many connections"}\r\n'
)
ANSWERING = 64  # refused connections being answered 503 at once; beyond, closed unanswered
ANSWER_WAIT = 2.0  # seconds a refused client has to send its request head, then to close
HEAD_LIMIT = 16 * 1024  # bytes of a refused request's head read at most before answering
FILE_RESERVE = 256  # descriptors for all but connections: listeners, logs, files, outgoing HTTP
ACCEPT_RETRY_DELAY = 1.0  # asyncio's pause after running out of descriptors
# A keep-alive connection is idle enough to close once it answered this long ago: by then its
# client has read the answer. Closed sooner, a client whose next request is on its way gets a
# reset, which makes its kernel drop the answer it has not read yet: a request served, its
# answer lost (and a POST is not safe to repeat).
RECLAIM_IDLE = 1.0
# At the limit, a connection whose client has taken nothing of its answer for this long makes
# room (after idle ones): it has lost its answer, but a client that holds a connection by not
# reading can no longer keep others out until the send timeout. A live client on a slow link
# takes something within a few retransmissions; only at the limit does this cut one off.
RECLAIM_STALLED = 5.0
SWEEP_EVERY = 2.0  # seconds between sweeps at most (a quarter of the send timeout below 8 s)


@dataclass(slots=True)
class _Episode:
    reclaimed: int = 0
    stalled: int = 0
    refused: int = 0


@dataclass(slots=True)
class _Link:
    """What we hold of one open connection."""

    sock: socket.socket | None  # while it is ours to cut off (TLS: handshaking)
    # From connection_made to connection_lost: aiohttp lets go of it once it asks it to close,
    # while the transport may still be writing its buffer out.
    transport: asyncio.Transport | None = None
    fd: int = -1  # its socket's descriptor, to ask the kernel about its send queue
    unsent: int = 0  # its output not yet acknowledged, when last measured (0: none pending)
    since: float = 0.0  # when that amount was first measured
    # The handler's keep-alive deadline when nothing was found pending: it moves on with each
    # answer, so while it has not, there is nothing new to ask the kernel about.
    clean_at: float = 0.0


class Connections:
    """The open connections of one process, oldest first, and what happens at the limit."""

    def __init__(self, limit: int, send_timeout: float) -> None:
        self.limit = limit
        self.send_timeout = send_timeout
        # Handler -> what we hold of its connection, in the order of accept.
        self._open: dict[RequestHandler, _Link] = {}
        self._answering = 0
        self._episode: _Episode | None = None
        # An episode ends once a tenth of the room is free again, not at each close and reopen.
        self._calm = limit - max(1, limit // 10)
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_every = min(SWEEP_EVERY, send_timeout / 4)

    def __len__(self) -> int:
        return len(self._open)

    def accept(
        self, make_handler: Callable[[], RequestHandler], sock: socket.socket | None = None
    ) -> asyncio.BaseProtocol:
        """The protocol for a new connection: a handler, counted, or a refusal.

        ``sock`` is the connection's socket when it is still ours to cut off (TLS, until the
        handshake is done); a plain connection is cut off through its handler's transport.
        """
        if len(self._open) < self.limit or self._reclaim():
            handler = make_handler()
            self._open[handler] = _Link(sock)
            if self._sweeper is None:
                self._sweeper = asyncio.get_running_loop().call_later(self._sweep_every, self._sweep)
            return handler
        assert self._episode is not None
        self._episode.refused += 1
        if self._answering >= ANSWERING:
            return Refusal(None)
        self._answering += 1
        return Refusal(self._answered)

    def in_flight(self) -> list[RequestHandler]:
        """The connections with a request in progress: being handled, or its answer on its way."""
        return [handler for handler in self._open if handler._request_in_progress]

    def made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        """The connection of ``handler`` is made (TLS: its handshake is done)."""
        link = self._open.get(handler)
        if link is not None:
            link.sock = None  # cut off through its transport from now on
            link.transport = transport
            sock = transport.get_extra_info("socket")  # TLS: the TCP socket under it
            link.fd = sock.fileno() if sock is not None else -1

    def forget(self, protocol: asyncio.BaseProtocol) -> None:
        """A connection ended before its protocol heard of it (a TLS handshake that failed)."""
        if isinstance(protocol, Refusal):
            protocol.connection_lost(None)
        else:
            self.discard(cast(RequestHandler, protocol))

    def discard(self, handler: RequestHandler) -> None:
        """The connection of ``handler`` is closed (or being closed)."""
        if self._open.pop(handler, None) is not None and self._episode and len(self._open) <= self._calm:
            episode, self._episode = self._episode, None
            logger.info(
                "connections back under the limit (%d open): %d idle or handshaking and %d stalled ones"
                " closed to make room, %d refused meanwhile",
                len(self._open),
                episode.reclaimed,
                episode.stalled,
                episode.refused,
            )

    def _answered(self) -> None:
        self._answering -= 1

    def _reclaim(self) -> bool:
        """Close the oldest connection that is handshaking or idle, else the oldest stalled one.

        False if every one is busy: a request in progress, or an answer on its way.
        """
        if self._episode is None:
            self._episode = _Episode()
            logger.warning(
                "connection limit reached: %d open; closing the oldest idle or handshaking connection"
                " (else one whose client reads nothing) for each new one, answering 503 while none is",
                self.limit,
            )
        now = asyncio.get_running_loop().time()
        idle_before = now - RECLAIM_IDLE
        stalled: tuple[RequestHandler, _Link, asyncio.Transport] | None = None
        for handler, link in self._open.items():
            transport = link.transport
            if transport is None:  # still in its TLS handshake (a plain one: about to start)
                if link.sock is not None:
                    break
            elif transport.get_write_buffer_size() or link.unsent:
                # Output pending: stalled if it was at the last sweep, and still is (one system
                # call per scan at most; none for the others, which may be thousands). One whose
                # client has taken it all since then is not idle before the next sweep.
                if (
                    stalled is None
                    and link.unsent
                    and now - link.since >= RECLAIM_STALLED
                    and _measure(handler, link, now)
                    and now - link.since >= RECLAIM_STALLED
                ):
                    stalled = handler, link, transport
            # aiohttp's mark for "a request is being handled" (False before the first one too),
            # nothing sent or asked for a while, and nothing left for the client to take.
            elif (
                not handler._request_in_progress
                and _idle_since(handler) <= idle_before
                and not _measure(handler, link, now)
            ):
                break
        else:
            if stalled is None:
                return False
            handler, link, transport = stalled
            logger.info(
                "connection limit: %s read nothing for %.0fs, %d bytes or more unsent; connection reset to make room",
                peer(transport),
                now - link.since,
                link.unsent,
            )
            del self._open[handler]
            self._episode.stalled += 1
            _cut_off_stalled(handler, transport)
            return True
        del self._open[handler]
        self._episode.reclaimed += 1
        if transport is not None:
            transport.abort()  # idle: nothing to flush; a TLS close would wait for the peer
        else:
            assert link.sock is not None
            _cut_off(link.sock)
        return True

    def _sweep(self) -> None:
        """Reset the connections whose output has made no progress for the send timeout."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        settled = now - RECLAIM_IDLE
        expired = []
        for handler, link in self._open.items():
            transport = link.transport
            if transport is None:
                continue
            # Most connections have nothing that could be pending: _measure's conditions, inline
            # and cheapest first (a sweep over thousands of connections takes a millisecond).
            deadline = handler._next_keepalive_close_time
            if (
                (deadline == link.clean_at or deadline - handler._keepalive_timeout > settled)
                and not link.unsent
                and not handler._request_in_progress
                and not transport.get_write_buffer_size()
                and not transport.is_closing()
            ):
                continue
            if _measure(handler, link, now) and now - link.since >= self.send_timeout:
                expired.append((handler, link))
        for handler, link in expired:  # not while iterating: a reset may end its connection at once
            assert link.transport is not None
            logger.info(
                "send timeout: %s read nothing for %gs, %d bytes or more unsent; connection reset",
                peer(link.transport),
                self.send_timeout,
                link.unsent,
            )
            _cut_off_stalled(handler, link.transport)
        self._sweeper = loop.call_later(self._sweep_every, self._sweep) if self._open else None


# The open connections of the process serving an app (server.py sets it), for the metrics.
CONNECTIONS = web.AppKey("connections", Connections)


def _measure(handler: RequestHandler, link: _Link, now: float) -> int:
    """The connection's output its client has not acknowledged, noted with when it last moved.

    The transport's buffer, plus the kernel's send queue (what is not yet acknowledged): that
    shrinks as the client reads, and holds what a TLS transport passed on to the one below it.
    The kernel is asked only when output may be pending: some is buffered or was last time, a
    request is being handled, the transport is closing, or the connection answered (RECLAIM_IDLE
    ago at least: a connection answering on and on is not asked each time) since it was last
    found with nothing pending.
    """
    transport = link.transport
    assert transport is not None
    buffered = transport.get_write_buffer_size()
    if not (buffered or link.unsent or handler._request_in_progress or transport.is_closing()):
        deadline = handler._next_keepalive_close_time  # moves on with each answer
        if deadline == link.clean_at or deadline - handler._keepalive_timeout > now - RECLAIM_IDLE:
            return 0
    unsent = buffered + _kernel_queue(link.fd)
    if unsent != link.unsent:
        link.unsent, link.since = unsent, now
    if not unsent:
        link.clean_at = handler._next_keepalive_close_time
    return unsent


def _kernel_queue(fd: int) -> int:
    """Bytes in a socket's send queue not yet acknowledged by the peer (SIOCOUTQ); 0 if unknown."""
    try:
        queued: int = struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError):  # closed already (fd -1), or a platform without it for sockets
        return 0
    return queued


def _cut_off_stalled(handler: RequestHandler, transport: asyncio.Transport) -> None:
    """Reset a connection whose client reads nothing, its request logged as for a client gone.

    A handler still waiting in aiohttp's ``drain()`` for its answer is woken with an error
    first, and the connection reset on the next turn of the loop: aiohttp then logs the request
    (its access line, 0 bytes sent), where the reset alone would have it cancelled unlogged
    (handler_cancellation), or logged as if the answer had been sent.
    """
    waiter = handler._drain_waiter
    if waiter is not None and not waiter.done():
        waiter.set_exception(ConnectionResetError("send timeout"))
        asyncio.get_running_loop().call_soon(reset, transport)  # after the handler's turn
    else:
        reset(transport)


def reset(transport: asyncio.Transport) -> None:
    """Abort a connection whose client reads nothing, dropping what the kernel holds for it too.

    A plain close (``abort`` alone) leaves the kernel sending its queue, MBs, to a client that
    takes none of it, long after; a reset (SO_LINGER 0) frees it at once, as nginx's
    ``reset_timedout_connection``.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:  # closed already
            pass
    transport.abort()


def peer(transport: asyncio.Transport) -> str:
    """How a connection's client is named in the log: its address and port."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple):
        return f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
    return "a client"  # a Unix socket's peer has no name


def _idle_since(handler: RequestHandler) -> float:
    """When the connection last answered (or was accepted): aiohttp's keep-alive timer starts then."""
    return handler._next_keepalive_close_time - handler.keepalive_timeout


def _cut_off(sock: socket.socket) -> None:
    """End a connection whose socket the loop may be using: never close its descriptor under it.

    The loop sees the end of the stream, fails the handshake and closes the socket itself.
    """
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed, by the client or by the loop
        pass


def overloaded(request_id: str) -> bytes:
    """The 503 answering a connection over the limit, carrying ``request_id`` (ASCII, see requestids.py)."""
    return _OVERLOADED % request_id.encode("ascii")


class Refusal(asyncio.Protocol):
    """A connection over the limit: read the request head, answer 503, close.

    Reading first matters: closing a socket with unread data makes the kernel send a reset,
    and the client would lose the answer. ``done`` is None to close at once, unanswered.
    """

    def __init__(self, done: Callable[[], None] | None) -> None:
        self.answers = done is not None
        self._done = done
        self._transport: asyncio.Transport | None = None
        self._head = b""
        self._answered = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Any transport: asyncio's and uvloop's (which is no asyncio.WriteTransport subclass).
        self._transport = cast(asyncio.Transport, transport)
        if not self.answers:
            self._transport.abort()
            return
        self._timer = asyncio.get_running_loop().call_later(ANSWER_WAIT, self._answer)

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return  # the rest of a request we answered already: read, so that no reset is sent
        self._head += data
        if b"\r\n\r\n" in self._head or b"\n\n" in self._head or len(self._head) > HEAD_LIMIT:
            self._answer()

    def eof_received(self) -> bool:
        if not self._answered:
            self._answer()
        return False  # the transport closes once the answer is written

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        done, self._done = self._done, None
        if done is not None:
            done()

    def _answer(self) -> None:
        if self._answered or self._transport is None or self._transport.is_closing():
            return
        self._answered = True
        request_id = id_in_head(self._head)
        self._head = b""
        if self._timer is not None:
            self._timer.cancel()
        transport = self._transport
        transport.write(overloaded(request_id))
        if transport.can_write_eof():
            transport.write_eof()  # our end after the answer; the client's end follows
        else:
            transport.close()  # TLS: close_notify after the answer
        self._timer = asyncio.get_running_loop().call_later(ANSWER_WAIT, transport.abort)


class TLSSite(web.BaseSite):
    """A listening socket served over TLS, each connection counted from its accept.

    See the module's docstring for why it accepts connections itself.
    """

    __slots__ = ("_sock", "_tls", "_connections", "_make_handler", "_handshake_timeout", "_name")

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        tls: ReloadableContext,
        connections: Connections,
        make_handler: Callable[[], RequestHandler],
        handshake_timeout: float,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._sock = sock
        self._tls = tls
        self._connections = connections
        self._make_handler = make_handler
        self._handshake_timeout = handshake_timeout
        address = sock.getsockname()
        if isinstance(address, tuple):
            host = f"[{address[0]}]" if ":" in address[0] else address[0]
            self._name = f"https://{host}:{address[1]}"
        else:
            self._name = f"https+unix://{address}"

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        acceptor = _Acceptor(
            asyncio.get_running_loop(),
            self._sock,
            self._tls,
            self._connections,
            self._make_handler,
            self._handshake_timeout,
        )
        acceptor.start()
        self._server = acceptor

    async def stop(self) -> None:
        acceptor = self._server
        await super().stop()
        if acceptor is not None:
            await acceptor.wait_closed()


class _Acceptor(asyncio.AbstractServer):
    """Accepts on one listening socket and starts each connection's TLS handshake."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        tls: ReloadableContext,
        connections: Connections,
        make_handler: Callable[[], RequestHandler],
        handshake_timeout: float,
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._tls = tls
        self._connections = connections
        self._make_handler = make_handler
        self._handshake_timeout = handshake_timeout
        self._handshakes: dict[asyncio.Task[None], socket.socket] = {}
        self._serving = False
        self._retry: asyncio.TimerHandle | None = None

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._sock,)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        if not self._serving:
            self.start()

    async def serve_forever(self) -> None:
        raise NotImplementedError("served by its site: see TLSSite")

    def start(self) -> None:
        self._sock.setblocking(False)
        self._loop.add_reader(self._sock.fileno(), self._accept)
        self._serving = True

    def close(self) -> None:
        """Stop accepting and cut off the handshakes in flight; open connections go on."""
        if self._retry is not None:
            self._retry.cancel()
        if self._serving:
            self._loop.remove_reader(self._sock.fileno())
            self._serving = False
        for sock in self._handshakes.values():
            _cut_off(sock)

    async def wait_closed(self) -> None:
        if self._handshakes:
            await asyncio.wait(list(self._handshakes))

    def _resume(self) -> None:
        self._retry = None
        self.start()

    def _accept(self) -> None:
        # One connection per turn of the loop, as nginx does by default (multi_accept off):
        # the socket stays readable while others wait, and a burst of new connections, each
        # with a handshake to compute, does not delay the requests of those already open
        # (accepting all at once made the median answer 4x slower under a handshake load).
        try:
            sock, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # As asyncio does: pause a little, the clients wait in the kernel's queue.
                logger.error("cannot accept connections: %s; trying again in %gs", exc.strerror, ACCEPT_RETRY_DELAY)
                self._loop.remove_reader(self._sock.fileno())
                self._serving = False
                self._retry = self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume)
            return  # ECONNABORTED and the like: that client is gone already
        sock.setblocking(False)
        protocol = self._connections.accept(self._make_handler, sock)
        if isinstance(protocol, Refusal) and not protocol.answers:
            sock.close()  # too many being answered already
            return
        context = self._tls.current
        if context is None:  # not loaded yet: the site is not started before (server.py)
            sock.close()
            self._connections.forget(protocol)
            return
        task = self._loop.create_task(self._handshake(sock, protocol, context))
        self._handshakes[task] = sock
        task.add_done_callback(self._handshakes.pop)

    async def _handshake(self, sock: socket.socket, protocol: asyncio.BaseProtocol, context: ssl.SSLContext) -> None:
        try:
            await self._loop.connect_accepted_socket(
                lambda: protocol, sock, ssl=context, ssl_handshake_timeout=self._handshake_timeout
            )
        except Exception as exc:  # failed, timed out or cut off: the loop has closed the socket
            logger.debug("TLS handshake failed: %s", type(exc).__name__)
            self._connections.forget(protocol)


def ensure_file_limit(connections: int) -> None:
    """Make room for ``connections`` in RLIMIT_NOFILE, or warn that the limit cannot be honoured.

    The soft limit is raised as far as needed, up to the hard one (as nginx's
    worker_rlimit_nofile, and Go at start-up): epoll has no use for the 1024 of select().
    """
    needed = connections + ANSWERING + FILE_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # e.g. a seccomp filter forbidding setrlimit
            pass
    if soft < needed:
        logger.warning(
            "--limit-connections %d needs about %d file descriptors, but RLIMIT_NOFILE allows %d:"
            " raise it (LimitNOFILE=, ulimit -n) or lower --limit-connections",
            connections,
            needed,
            soft,
        )
