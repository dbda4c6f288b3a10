"""A small pool of worker processes whose jobs can be stopped: CPU work that a request may abandon.

``await pool.run(function, *args)`` runs a picklable call in a worker process and returns its
result or raises its exception. A job whose caller is cancelled (a workflow past its time
limit, a client gone, shutdown) has its process killed, so the work stops with the request
instead of running on unseen, and the next job starts a fresh process. A process that dies
during a job fails that job with :class:`WorkerDied`.

Unlike :class:`concurrent.futures.ProcessPoolExecutor`, whose cancelled jobs keep their
process busy to the end, nothing here outlives its caller. Each worker is a fresh
interpreter (as multiprocessing's spawn: forking a process that runs threads and an event
loop can copy a lock in a held state), started with the parent's ``sys.path`` and talking
over a socket pair in length-prefixed pickles; the parent side is plain asyncio.

The bound is the server's, not the process's: with ``--workers N`` every worker has a pool,
and all of them take their processes from the same :class:`ProcessSlots`, made by the parent
before it forks, so that N workers start no more processes than one would.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from ..logs import configure_logging, configured

logger = logging.getLogger("aioserver.workflow")
T = TypeVar("T")

_LENGTH = struct.Struct("!Q")
_CHILD = "from aioserver.workflow.processes import serve; serve()"
# While jobs wait for a slot that another process of the server holds: how often to look.
POLL = 0.05
# How often a pool holding idle processes looks whether another process of the server waits,
# and how long a process idles before it gives its slot to that one (not at once: in a steady
# stream of requests, the next job of its own comes soon).
IDLE_POLL = 0.25
IDLE_GRACE = 1.0
# A process kept this long (seconds) by one server worker is handed over at the end of a job
# when a worker that holds none has waited that long: starting one costs a third of a second
# of CPU, so slots move between busy workers at this pace, not at every job.
LEASE = 2.0
# After handing a slot over, a pool takes none for this long: the other process's turn.
HANDOVER = 5 * POLL


class WorkerDied(RuntimeError):
    """The worker process running a job exited before answering."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker process (as its ``__cause__``)."""

    def __str__(self) -> str:
        return str(self.args[0])


def default_size() -> int:
    """Two workers, or one on a single core: CPU work of requests must leave the server a core."""
    return min(2, os.cpu_count() or 1)


class ProcessSlots:
    """The right to have one worker process, ``size`` of them for the whole server.

    A slot is a byte of a file, held with a POSIX record lock (``lockf``). Such locks belong
    to a process, not to a file descriptor: the server's workers, forked from the parent
    that made the file, share its descriptor yet compete for the bytes, and the kernel
    releases a process's locks when it dies, even by SIGKILL, so a killed worker leaks no
    slot. (Within one process they never conflict: :attr:`held` is that process's count.)
    The file is a ``memfd``, which no one else can open and which goes with its last holder.

    Two more bytes carry news between the workers, as shared locks that others may test:
    :data:`WAITING`, some process waits for a slot; :data:`STARVING`, some process holding no
    slot has waited :data:`LEASE` seconds. Made without a file (``shared()`` not called, or
    one process), the slots are this process's only.
    """

    WAITING = 0
    STARVING = 1

    def __init__(self, size: int | None = None, fd: int | None = None) -> None:
        self.size = size or default_size()
        self.fd = fd
        self.held: set[int] = set()
        self._flags: set[int] = set()  # the flags this process has raised

    @classmethod
    def shared(cls, size: int | None = None) -> ProcessSlots:
        """Slots for the processes that will be forked from this one (call it before forking)."""
        try:
            fd = os.memfd_create("aioserver-process-slots")
        except (AttributeError, OSError):  # not Linux, or a seccomp filter: an unlinked file
            try:
                with tempfile.TemporaryFile() as file:
                    fd = os.dup(file.fileno())
            except OSError as exc:
                logger.warning("worker processes: no file to share their bound (%s): each worker has its own", exc)
                return cls(size)
        return cls(size, fd)

    @property
    def is_shared(self) -> bool:
        return self.fd is not None

    def take(self) -> int | None:
        """A free slot, now held by this process; None when every one is held."""
        for slot in range(self.size):
            if slot not in self.held and self._lock(slot, fcntl.LOCK_EX):
                self.held.add(slot)
                return slot
        return None

    def give(self, slot: int) -> None:
        """Give back a slot taken with :meth:`take`."""
        self.held.discard(slot)
        if self.fd is not None:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, slot)

    def raise_flag(self, flag: int, up: bool) -> None:
        """Raise (or lower) :data:`WAITING` or :data:`STARVING` for the other processes to see.

        Best effort: while another process tests the flag, raising it fails; the caller
        tries again at its next look.
        """
        if self.fd is None or up == (flag in self._flags):
            return
        if not up:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, self.size + flag)
            self._flags.discard(flag)
        elif self._lock(self.size + flag, fcntl.LOCK_SH):
            self._flags.add(flag)

    def flagged_elsewhere(self, flag: int) -> bool:
        """Whether another process has raised ``flag``."""
        if self.fd is None:
            return False
        byte = self.size + flag
        if not self._lock(byte, fcntl.LOCK_EX):
            return True
        # Our own shared lock, if we had one, became the exclusive one: make it shared again.
        fcntl.lockf(self.fd, fcntl.LOCK_SH if flag in self._flags else fcntl.LOCK_UN, 1, byte)
        return False

    def _lock(self, byte: int, kind: int) -> bool:
        if self.fd is None:
            return True
        try:
            fcntl.lockf(self.fd, kind | fcntl.LOCK_NB, 1, byte)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        return True


class ProcessPool:
    """Worker processes started on demand, one job each at a time, as many as ``slots`` allow.

    ``size`` (default :func:`default_size`) makes slots of the pool's own; ``slots`` shares
    them with the other workers of the server. Jobs beyond wait their turn, in order. With
    shared slots, a process that has idled :data:`IDLE_GRACE` seconds gives its slot to a
    worker of the server whose jobs wait; and a worker that holds none and has waited
    :data:`LEASE` seconds gets one from an idle process at once, or at the end of a job of
    one held that long: no worker starves, and slots do not move at every job.
    """

    def __init__(self, size: int | None = None, slots: ProcessSlots | None = None) -> None:
        self.slots = slots or ProcessSlots(size)
        self.size = self.slots.size
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._waiters: collections.deque[tuple[asyncio.Future[_Worker | int], float]] = collections.deque()
        self._reaping: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._yielding = 0.0  # until when (loop time) a slot just handed over is left to others
        self._closed = False

    async def run(self, function: Callable[..., T], /, *args: Any) -> T:
        """``function(*args)`` in a worker process; its process is killed if this is cancelled."""
        if self._closed:
            raise RuntimeError("the process pool is closed")
        request = pickle.dumps((function, args), pickle.HIGHEST_PROTOCOL)
        worker = await self._acquire()
        self._busy.add(worker)
        try:
            reply = await worker.call(request)
        except BaseException:
            # Cancelled (or the worker broke): the job's process may still be computing.
            self._busy.discard(worker)
            self._retire(worker)
            raise
        self._busy.discard(worker)
        self._release(worker)
        succeeded, value, remote_traceback = pickle.loads(reply)
        if succeeded:
            return value  # type: ignore[no-any-return]
        raise value from RemoteTraceback(remote_traceback)

    @property
    def pids(self) -> list[int]:
        """The process ids of the live workers (for tests and diagnostics)."""
        return [worker.process.pid for worker in (*self._idle, *self._busy)]

    async def _acquire(self) -> _Worker:
        """An idle worker, a new one in a free slot, or the first of either once it is our turn."""
        worker = self._idle_worker()
        if worker is not None:
            return worker
        slot = None if self._waiters else self._take()  # those waiting come first
        if slot is None:
            got = await self._wait()
            if isinstance(got, _Worker):
                return got
            slot = got
        try:
            worker = await _Worker.start(slot)
        except BaseException:
            self._give(slot)
            raise
        if self._closed:  # closed while it started
            self._retire(worker)
            raise RuntimeError("the process pool is closed")
        return worker

    async def _wait(self) -> _Worker | int:
        future: asyncio.Future[_Worker | int] = asyncio.get_running_loop().create_future()
        entry = (future, asyncio.get_running_loop().time())
        self._waiters.append(entry)
        self._look()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self._hand_back(future.result())  # given to us just as we were cancelled
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)
            if not self._waiters:
                self._look()

    def _hand_back(self, got: _Worker | int) -> None:
        if isinstance(got, _Worker):
            self._release(got)
        else:
            self._give(got)

    def _next_waiter(self) -> asyncio.Future[_Worker | int] | None:
        while self._waiters:
            future, _ = self._waiters.popleft()
            if not future.done():
                return future
        return None

    def _idle_worker(self) -> _Worker | None:
        while self._idle:
            worker = self._idle.pop()
            if worker.process.returncode is None:
                return worker
            self._retire(worker)  # died while idle (killed by someone, out of memory)
        return None

    def _release(self, worker: _Worker) -> None:
        """A worker whose job is done: to the next job, to the idle ones, or its slot to another process."""
        if self._closed:
            self._retire(worker)
            return
        now = asyncio.get_running_loop().time()
        handing = not self._idle and self._may_hand_over(now)  # an idle one goes first (_tick)
        if handing and now - worker.started >= LEASE and self._starving_elsewhere():
            self._retire(worker, handover=True)
            return
        waiter = self._next_waiter()
        if waiter is not None:
            waiter.set_result(worker)
        else:
            worker.idle_since = now
            self._idle.append(worker)
            self._look()

    def _give(self, slot: int) -> None:
        """A slot back to the server; the first job waiting here may take it at once."""
        self.slots.give(slot)
        if not self._closed:
            self._give_free_slots()

    def _look(self) -> None:
        """Raise or lower our flags; look again soon while jobs wait or processes idle (shared slots only)."""
        if not self.slots.is_shared or self._closed:
            return
        loop = asyncio.get_running_loop()
        waiting = bool(self._waiters)
        self.slots.raise_flag(ProcessSlots.WAITING, waiting)
        starving = waiting and not self.slots.held and loop.time() - self._waiters[0][1] >= LEASE
        self.slots.raise_flag(ProcessSlots.STARVING, starving)
        if self._timer is None and (waiting or self._idle):
            self._timer = loop.call_later(POLL if waiting else IDLE_POLL, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._closed:
            return
        if self._waiters:  # another process may have given a slot back
            self._give_free_slots()
        now = asyncio.get_running_loop().time()
        if self._idle and self._may_hand_over(now):
            # The longest idle goes to a process that has none at once, to one that waits for
            # more once it has idled a while.
            idle_long = now - self._idle[0].idle_since >= IDLE_GRACE
            if self._starving_elsewhere() or (idle_long and self.slots.flagged_elsewhere(ProcessSlots.WAITING)):
                self._retire(self._idle.pop(0), handover=True)
        self._look()

    def _may_hand_over(self, now: float) -> bool:
        """Not while a slot handed over is still on its way (one at a time)."""
        return self.slots.is_shared and now >= self._yielding

    def _starving_elsewhere(self) -> bool:
        return self.slots.flagged_elsewhere(ProcessSlots.STARVING)

    def _take(self) -> int | None:
        """A free slot for a job here, unless another process of the server needs it more."""
        if self._yielding and asyncio.get_running_loop().time() < self._yielding:
            return None
        if self.slots.held and self._starving_elsewhere():
            return None  # we have some, it has none
        slot = self.slots.take()
        if slot is not None and len(self.slots.held) == 1:
            self._look()  # no longer starving: say so at once, or another would hand over one more
        return slot

    def _give_free_slots(self) -> None:
        while self._waiters:
            slot = self._take()
            if slot is None:
                return
            waiter = self._next_waiter()
            if waiter is None:
                self.slots.give(slot)
                return
            waiter.set_result(slot)

    def _retire(self, worker: _Worker, handover: bool = False) -> None:
        """Kill a worker; its slot is given back once it is reaped (in the background: no job waits for it).

        ``handover``: the slot is for another process of the server, which looks for it
        every :data:`POLL` seconds; this pool leaves it alone meanwhile.
        """
        if worker.retired:
            return
        if handover:
            logger.debug("worker process %d ends: its slot goes to another process of the server", worker.process.pid)
        worker.kill()
        worker.handover = handover
        if handover:
            self._yielding = asyncio.get_running_loop().time() + HANDOVER
        task = asyncio.get_running_loop().create_task(self._reap(worker))
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)

    async def _reap(self, worker: _Worker) -> None:
        try:
            await worker.wait()
        finally:
            if worker.handover:
                self._yielding = asyncio.get_running_loop().time() + HANDOVER
            self._give(worker.slot)

    async def close(self, timeout: float = 5.0) -> None:
        """Kill every worker, idle or busy, and wait (``timeout`` seconds at most) until they are gone."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while (waiter := self._next_waiter()) is not None:
            waiter.set_exception(RuntimeError("the process pool is closed"))
        workers = [*self._idle, *self._busy]
        self._idle.clear()
        self._busy.clear()
        for worker in workers:
            self._retire(worker)
        if self._reaping:
            _, pending = await asyncio.wait(list(self._reaping), timeout=timeout)
            for wait in pending:  # a process in uninterruptible sleep: it dies when the kernel lets it
                wait.cancel()
            if pending:
                logger.warning("%d worker processes not yet ended after SIGKILL", len(pending))
        self.slots.raise_flag(ProcessSlots.WAITING, False)
        self.slots.raise_flag(ProcessSlots.STARVING, False)


class _Worker:
    """One worker process, the parent's end of its socket, and the slot it holds."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        slot: int,
    ) -> None:
        self.process, self.reader, self.writer, self.slot = process, reader, writer, slot
        self.started = asyncio.get_running_loop().time()
        self.retired = False
        self.handover = False  # retired to give its slot to another process of the server
        self.idle_since = 0.0

    @classmethod
    async def start(cls, slot: int) -> _Worker:
        ours, theirs = socket.socketpair()
        try:
            # The parent's sys.path, so that the worker imports what the parent imported
            # (dotted-path actions from the working directory, say) the same way.
            path = os.pathsep.join(p for p in sys.path if isinstance(p, str))
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _CHILD,
                str(theirs.fileno()),
                str(os.getpid()),
                *(configured() or ()),  # its log lines as the server's (JSON ones included)
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": path},
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        try:
            reader, writer = await asyncio.open_unix_connection(sock=ours)
        except BaseException:
            ours.close()
            process.kill()
            raise
        logger.debug("worker process %d started", process.pid)
        return cls(process, reader, writer, slot)

    async def call(self, request: bytes) -> bytes:
        try:
            self.writer.write(_LENGTH.pack(len(request)))
            self.writer.write(request)
            await self.writer.drain()
            (length,) = _LENGTH.unpack(await self.reader.readexactly(_LENGTH.size))
            return await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            status = await self.process.wait()
            raise WorkerDied(f"the worker process died during the job (exit status {status})") from None

    def kill(self) -> None:
        self.retired = True
        self.writer.close()
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    async def wait(self) -> None:
        status = await self.process.wait()
        logger.debug("worker process %d ended (exit status %d)", self.process.pid, status)


# -- the worker's side


def serve() -> None:
    """A worker's main loop: read a call, run it, write back its result or its exception."""
    # Ctrl-C in a terminal reaches the whole process group: the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(int(sys.argv[2]))
    if len(sys.argv) > 4:  # the server's log level and format: an action's log lines look like the server's
        configure_logging(sys.argv[3], sys.argv[4])
    channel = socket.socket(fileno=int(sys.argv[1]))
    while True:
        request = _receive(channel)
        if request is None:  # the parent closed its end, or died
            return
        try:
            function, args = pickle.loads(request)
            reply = pickle.dumps((True, function(*args), None), pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            reply = _failure(exc)
        channel.sendall(_LENGTH.pack(len(reply)) + reply)


def _failure(exc: Exception) -> bytes:
    # Pickling drops an exception's traceback: it travels as text, to become the cause.
    remote_traceback = "".join(traceback.format_exception(exc))
    try:
        return pickle.dumps((False, exc, remote_traceback), pickle.HIGHEST_PROTOCOL)
    except Exception:  # an exception that does not pickle: its type and message still tell
        substitute = RuntimeError(f"{type(exc).__name__}: {exc}")
        return pickle.dumps((False, substitute, remote_traceback), pickle.HIGHEST_PROTOCOL)


def _receive(channel: socket.socket) -> bytes | None:
    header = _read(channel, _LENGTH.size)
    return None if header is None else _read(channel, _LENGTH.unpack(header)[0])


def _read(channel: socket.socket, size: int) -> bytes | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    while view:
        count = channel.recv_into(view)
        if count == 0:
            return None
        view = view[count:]
    return bytes(buffer)


def _die_with_parent(parent: int) -> None:
    """On Linux, SIGKILL this process when its parent dies, even mid-job, so that none is orphaned.

    (Linux sends the signal when the parent's thread that started us ends: the event loop's,
    which lives as long as the server.)
    """
    if not sys.platform.startswith("linux"):
        return  # elsewhere a worker leaves when its socket closes, after the job it runs
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl: nobody will kill us
        os._exit(1)
