"""A small pool of worker processes whose jobs can be stopped: CPU work that a request may abandon.

``await pool.run(function, *args)`` runs a picklable call in one of at most ``size`` worker
processes (jobs beyond wait their turn) and returns its result or raises its exception. A
job whose caller is cancelled (a workflow past its time limit, a client gone, shutdown) has
its process killed, so the work stops with the request instead of running on unseen, and
the next job starts a fresh process. A process that dies during a job fails that job with
:class:`WorkerDied`.

Unlike :class:`concurrent.futures.ProcessPoolExecutor`, whose cancelled jobs keep their
process busy to the end, nothing here outlives its caller. Each worker is a fresh
interpreter (as multiprocessing's spawn: forking a process that runs threads and an event
loop can copy a lock in a held state), started with the parent's ``sys.path`` and talking
over a socket pair in length-prefixed pickles; the parent side is plain asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

logger = logging.getLogger("aioserver.workflow")
T = TypeVar("T")

_LENGTH = struct.Struct("!Q")
_CHILD = "from aioserver.workflow.processes import serve; serve()"


class WorkerDied(RuntimeError):
    """The worker process running a job exited before answering."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker process (as its ``__cause__``)."""

    def __str__(self) -> str:
        return str(self.args[0])


def default_size() -> int:
    """Two workers, or one on a single core: CPU work of requests must leave the server a core."""
    return min(2, os.cpu_count() or 1)


class ProcessPool:
    """At most ``size`` worker processes, started on demand, running one job each at a time."""

    def __init__(self, size: int | None = None) -> None:
        self.size = size or default_size()
        self._slots = asyncio.Semaphore(self.size)
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._reaping: set[asyncio.Task[None]] = set()
        self._closed = False

    async def run(self, function: Callable[..., T], /, *args: Any) -> T:
        """``function(*args)`` in a worker process; its process is killed if this is cancelled."""
        if self._closed:
            raise RuntimeError("the process pool is closed")
        request = pickle.dumps((function, args), pickle.HIGHEST_PROTOCOL)
        async with self._slots:
            worker = self._idle_worker() or await _Worker.start()
            self._busy.add(worker)
            try:
                reply = await worker.call(request)
            except BaseException:
                # Cancelled (or the worker broke): the job's process may still be computing.
                self._busy.discard(worker)
                self._retire(worker)
                raise
            self._busy.discard(worker)
            self._idle.append(worker)
        succeeded, value, remote_traceback = pickle.loads(reply)
        if succeeded:
            return value  # type: ignore[no-any-return]
        raise value from RemoteTraceback(remote_traceback)

    def _idle_worker(self) -> _Worker | None:
        while self._idle:
            worker = self._idle.pop()
            if worker.process.returncode is None:
                return worker
            self._retire(worker)  # died while idle (killed by someone, out of memory)
        return None

    @property
    def pids(self) -> list[int]:
        """The process ids of the live workers (for tests and diagnostics)."""
        return [worker.process.pid for worker in (*self._idle, *self._busy)]

    def _retire(self, worker: _Worker) -> None:
        worker.kill()
        if self._closed:  # close() waits for it
            return
        # Reaped in the background: a new job need not wait for it, and close() awaits it.
        task = asyncio.get_running_loop().create_task(worker.wait())
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)

    async def close(self, timeout: float = 5.0) -> None:
        """Kill every worker, idle or busy, and wait (``timeout`` seconds at most) until they are gone."""
        self._closed = True
        workers = [*self._idle, *self._busy]
        self._idle.clear()
        self._busy.clear()
        for worker in workers:
            worker.kill()
        waits = [asyncio.ensure_future(worker.wait()) for worker in workers] + list(self._reaping)
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout)
            for wait in pending:  # a process in uninterruptible sleep: it dies when the kernel lets it
                wait.cancel()
            if pending:
                logger.warning("%d worker processes not yet ended after SIGKILL", len(pending))


class _Worker:
    """One worker process and the parent's end of its socket."""

    def __init__(
        self, process: asyncio.subprocess.Process, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.process, self.reader, self.writer = process, reader, writer

    @classmethod
    async def start(cls) -> _Worker:
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
        return cls(process, reader, writer)

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
