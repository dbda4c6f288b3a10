"""Several worker processes serving the same sockets, and the parent that looks after them.

The parent opens the listening sockets once (or takes them from systemd), forks N workers
that each run the ordinary :func:`aioserver.server.serve` on the inherited sockets (the
kernel hands each new connection to one of them), and then only supervises: it restarts a
worker that dies (backing off when one dies young), kills and replaces one whose event loop
is stuck, forwards SIGTERM/SIGINT and SIGHUP, and alone speaks sd_notify for the group. Each
worker reports READY/RELOADING/STOPPING to the parent over its own datagram socket pair, with
the same sd_notify messages it would send to systemd, and a WATCHDOG=1 heartbeat every second
from its event loop. The parent runs no event loop (forking under a running loop is unsafe);
it waits for signals with ``sigtimedwait``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

from . import systemd
from .config import Config, reread_files
from .errors import StartupError
from .listeners import Listener, open_listeners, stop_listening
from .listeners import close as close_listeners
from .server import run as run_server
from .server import serve
from .systemd import Notifier
from .workflow.processes import ProcessSlots
from .workflow.schedules import HostSchedules, parse_run_message, run_message

if TYPE_CHECKING:
    from .metrics import WorkerFiles

logger = logging.getLogger("aioserver.workers")

SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD}
TICK = 0.1  # seconds between looks at the workers' messages when no signal comes
YOUNG = 5.0  # a worker dying sooner than this after its start makes the next restart wait longer
MAX_BACKOFF = 10.0
HEARTBEAT = 1.0  # seconds between a worker's heartbeats (a quarter of a shorter healthcheck timeout)
# A worker still running this long after the grace period of a stop is killed: its own stop
# cuts off what is left at the end of the grace period and exits.
STOP_SLACK = 1.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass
class Worker:
    """One forked worker as the parent sees it."""

    slot: int
    pid: int
    channel: socket.socket  # the parent's end of the worker's sd_notify socket pair
    started: float = field(default_factory=time.monotonic)
    ready: bool = False
    serving: bool = False  # it has said READY once: its heartbeats are due from then on
    accepting: bool = True  # until it says it stopped accepting connections (NOT_ACCEPTING)
    killed: bool = False  # by us, with SIGKILL: not again
    last_ping: float = field(default_factory=time.monotonic)


class Supervisor:
    """Forks and watches ``count`` workers serving ``listeners``."""

    def __init__(
        self,
        config: Config,
        listeners: Sequence[Listener],
        count: int,
        watchdog: float | None,
        metrics: WorkerFiles | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics  # with --metrics: the files where the workers keep theirs
        self.listeners = listeners
        self.count = count
        self.watchdog = watchdog
        self.workers: dict[int, Worker] = {}  # by pid
        self.restarts: dict[int, float] = {}  # slot -> when to start it again
        self.backoff: dict[int, float] = {}  # slot -> the wait before its next restart
        self.announced = False  # READY=1 sent for the current generation
        self.parent = os.getpid()
        # The host's schedules run in the worker of slot 0, which reports each run; its
        # replacement is handed the counts so far (iterations hold across restarts).
        self.schedule_runs: dict[str, int] = {}
        self.healthcheck = config.settings.timeout_worker_healthcheck
        self.heartbeat = min(HEARTBEAT, self.healthcheck / 4)
        self.last_ping = time.monotonic()  # to systemd
        self.notifier = Notifier()  # systemd's, once run() is given it

    def run(self, notifier: Notifier) -> int:
        """Supervise until SIGTERM/SIGINT; return 0 when every worker stopped cleanly."""
        self.notifier = notifier
        for slot in range(self.count):
            self.start(slot)
        while True:
            info = signal.sigtimedwait(SIGNALS, TICK)
            self.read_messages()
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                return self.stop(notifier)
            if info is not None and info.si_signo == signal.SIGUSR1:
                logger.info("SIGUSR1 ignored (logs go to stderr: nothing to reopen)")
            if info is not None and info.si_signo == signal.SIGHUP:
                notifier.reloading()
                # As each worker does: a worker forked from now on (a replacement) serves what
                # this reload reads, not what the service started with.
                self.config = reread_files(self.config)
                self.announced = False
                for worker in self.workers.values():
                    worker.ready = False
                    os.kill(worker.pid, signal.SIGHUP)
            self.reap(notifier)
            now = time.monotonic()
            for slot, when in list(self.restarts.items()):
                if when <= now:
                    del self.restarts[slot]
                    self.start(slot)
            if not self.announced and len(self.workers) == self.count and all(w.ready for w in self.workers.values()):
                notifier.ready(f"{self.count} workers serving")
                self.announced = True
            self.kill_stuck(now)
            self.ping(notifier, now)

    def kill_stuck(self, now: float) -> None:
        """Kill a serving worker whose heartbeats stopped: its event loop is stuck (reap restarts it)."""
        for worker in self.workers.values():
            if worker.serving and not worker.killed and now - worker.last_ping > self.healthcheck:
                logger.error(
                    "worker %d (pid %d) sent no heartbeat for %.1fs (--timeout-worker-healthcheck %g): its event"
                    " loop is stuck; killing it",
                    worker.slot,
                    worker.pid,
                    now - worker.last_ping,
                    self.healthcheck,
                )
                self.kill(worker)

    def kill(self, worker: Worker) -> None:
        worker.killed = True
        try:
            os.kill(worker.pid, signal.SIGKILL)
        except ProcessLookupError:  # dead already, not reaped yet
            pass

    def ping(self, notifier: Notifier, now: float) -> None:
        """WATCHDOG=1 to systemd while the parent supervises: it replaces a stuck worker itself,
        so the group stays healthy (and the service is not killed) while one is."""
        if self.watchdog and now - self.last_ping >= self.watchdog:
            notifier.watchdog()
            self.last_ping = now

    def start(self, slot: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        pid = os.fork()
        if pid == 0:
            ours.close()
            for worker in self.workers.values():
                worker.channel.close()  # the other workers' channels are the parent's business
            if self.metrics is not None:  # before the app makes its metrics
                self.metrics.serve_as(slot)
            _work(self.config, self.listeners, theirs, self.heartbeat, self.parent, slot == 0, self.schedule_runs)
        theirs.close()
        ours.setblocking(False)
        self.workers[pid] = Worker(slot, pid, ours)
        logger.info("worker %d started, pid %d", slot, pid)

    def read_messages(self) -> None:
        for worker in self.workers.values():
            while True:
                try:
                    lines = worker.channel.recv(4096).decode(errors="replace").splitlines()
                except BlockingIOError:
                    break
                if "READY=1" in lines:
                    worker.ready = True
                    if not worker.serving:  # heartbeats are due from now on, not from its start
                        worker.serving, worker.last_ping = True, time.monotonic()
                if "RELOADING=1" in lines or "STOPPING=1" in lines:
                    worker.ready = False
                if systemd.NOT_ACCEPTING in lines:
                    worker.accepting = False
                if "WATCHDOG=1" in lines:
                    worker.last_ping = time.monotonic()
                if not self.announced:
                    # A worker waiting for its ACME certificate asks systemd for more time, and
                    # says why: passed on, the group is not ready until every worker is.
                    passed = [line for line in lines if line.startswith(("EXTEND_TIMEOUT_USEC=", "STATUS=acme:"))]
                    if passed:
                        self.notifier.notify(*passed)
                for name, runs in filter(None, map(parse_run_message, lines)):
                    self.schedule_runs[name] = runs

    def reap(self, notifier: Notifier) -> None:
        """Collect dead workers and plan their restart."""
        while self.workers:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            self.read_messages()  # a dead worker's last words (a run it reported) are still in its channel
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            worker.channel.close()
            if self.metrics is not None:  # its counts stay in the sums; its gauges go
                self.metrics.forget(worker.slot)
            lived = time.monotonic() - worker.started
            wait = min(MAX_BACKOFF, self.backoff.get(worker.slot, 0.05) * 2) if lived < YOUNG else 0.1
            self.backoff[worker.slot] = wait
            self.restarts[worker.slot] = time.monotonic() + wait
            logger.error("worker %d (pid %d) %s; restarting in %.1fs", worker.slot, pid, _describe(status), wait)
            notifier.status(f"worker {worker.slot} died, restarting")

    def stop(self, notifier: Notifier) -> int:
        """Stop every worker within --shutdown-delay and the grace period; 0 when each one stopped cleanly.

        SIGTERM goes to each worker, which answers GET /ready 503 and serves on for
        --shutdown-delay, then stops accepting and finishes its requests in flight; the sockets
        stop listening at the end of the delay, so that new connections are refused at once
        (they would wait in the backlog until the exit, then be reset). A second SIGINT is
        passed on (the workers end the delay and cut off their requests at once) and ends the
        delay here too. A worker still running after the delay and the grace period, or whose
        event loop is stuck, is killed.
        """
        notifier.stopping()
        grace = self.config.settings.timeout_graceful_shutdown
        delay = self.config.settings.shutdown_delay
        # Taken before the workers are signalled: their delay ends a little after ours, so that
        # the sockets stop listening while the workers still accept (see below).
        listening_until = time.monotonic() + delay
        deadline = listening_until + grace + STOP_SLACK
        self.restarts.clear()
        for worker in self.workers.values():
            os.kill(worker.pid, signal.SIGTERM)
        if delay > 0:
            logger.info(
                "stopping %d workers in %gs (--shutdown-delay): GET /ready answers 503, requests are served until then",
                len(self.workers),
                delay,
            )
        listening, again, hurried, clean = True, True, False, True
        while self.workers:
            if listening and (hurried or time.monotonic() >= listening_until):
                logger.info("stopping %d workers: up to %gs for their requests in flight", len(self.workers), grace)
                # While the workers still accept: only the connections of this very instant are in
                # the backlog, to be reset. Each worker stops reading the sockets a moment later.
                stop_listening(self.listeners)
                listening = False
            if not listening and again and not any(worker.accepting for worker in self.workers.values()):
                # A worker still starting when the stop came may have made them listen again.
                stop_listening(self.listeners)
                again = False
            wait = min(TICK, max(0.0, listening_until - time.monotonic())) if listening else TICK
            info = signal.sigtimedwait(SIGNALS, wait)
            self.read_messages()
            if info is not None and info.si_signo == signal.SIGINT and not hurried:
                logger.warning("second SIGINT: stopping now, the workers cut off their requests in flight")
                hurried = True
                for worker in self.workers.values():
                    os.kill(worker.pid, signal.SIGINT)
            elif info is not None and info.si_signo == signal.SIGUSR1:
                logger.info("SIGUSR1 ignored (logs go to stderr: nothing to reopen)")
            elif info is not None and info.si_signo in (signal.SIGTERM, signal.SIGHUP):
                logger.info("%s ignored: shutting down already", signal.Signals(info.si_signo).name)
            clean = self.collect() and clean
            now = time.monotonic()
            self.kill_stuck(now)
            if now >= deadline:
                for worker in self.workers.values():
                    if not worker.killed:
                        logger.error(
                            "worker %d (pid %d) still running %gs after SIGTERM: killing it",
                            worker.slot,
                            worker.pid,
                            delay + grace + STOP_SLACK,
                        )
                        self.kill(worker)
            self.ping(notifier, now)
        return 0 if clean else 1

    def collect(self) -> bool:
        """Collect the workers that exited while stopping; False if one did not exit cleanly."""
        clean = True
        while self.workers:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            worker.channel.close()
            if os.waitstatus_to_exitcode(status) != 0:
                logger.error("worker %d (pid %d) %s", worker.slot, pid, _describe(status))
                clean = False
        return clean


def _describe(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"


def _die_with_parent(parent: int) -> None:
    """Have the kernel send us SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG), Linux only."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _work(
    config: Config,
    listeners: Sequence[Listener],
    channel: socket.socket,
    heartbeat: float,
    parent: int,
    scheduling: bool,
    schedule_runs: Mapping[str, int],
) -> NoReturn:
    """A worker's life: serve like a single process, report to the parent, never return.

    The scheduling worker runs the host's schedules from the runs counted so far, and reports each new one.
    """
    # Our own process group: a terminal's Ctrl-C or a group kill reaches the parent only, which
    # forwards one SIGTERM (a second one would kill a worker that is finishing its requests).
    os.setpgid(0, 0)
    _die_with_parent(parent)
    # SIGTERM, SIGINT and SIGHUP stay blocked until serve() has its handlers in place: one that
    # came sooner would kill the worker (a pending one is delivered then).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    # Never wait on the parent: a parent that reads nothing for a while must not stall the loop.
    channel.setblocking(False)
    notifier = Notifier(sock=channel)
    schedules = HostSchedules(
        scheduling, dict(schedule_runs), lambda name, runs: notifier.notify(run_message(name, runs))
    )
    status = 0
    try:
        # The heartbeat is serve()'s watchdog ping, sent from the event loop: it stops when the loop is stuck.
        run_server(serve(config, listeners, notifier, heartbeat, schedules), config.settings.loop)
    except BaseException:
        logger.exception("worker %d failed", os.getpid())
        status = 1
    finally:
        logging.shutdown()
        os._exit(status)  # never run the parent's cleanup (or a test runner's) in the child


def run(config: Config) -> int:
    """Open the sockets, run ``config.settings.workers`` workers on them; the exit status."""
    listeners = open_listeners(config)
    # One bound on worker processes for the whole server: every worker takes its slots here.
    config = dataclasses.replace(config, process_slots=ProcessSlots.shared())
    metrics = None
    if config.settings.metrics:
        # An extra, imported only when asked for (config.py has checked it is installed).
        from .metrics import WorkerFiles

        try:
            metrics = WorkerFiles()
        except OSError as exc:
            close_listeners(listeners)
            raise StartupError(f"cannot make a directory for the workers' metrics: {exc.strerror or exc}") from None
        config = dataclasses.replace(config, metrics_dir=metrics.path)
    notifier = Notifier.from_env()
    watchdog = systemd.watchdog_interval()
    # The parent speaks to systemd for the group; the workers must not believe it is theirs.
    for variable in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(variable, None)
    # Blocked here and unblocked in each worker: no signal is lost between fork and serve.
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        return Supervisor(config, listeners, config.settings.workers, watchdog, metrics).run(notifier)
    finally:
        # Exiting: a signal still pending, or a late one, must neither kill the parent nor raise
        # KeyboardInterrupt (a traceback where a clean stop was logged).
        for sig in SIGNALS - {signal.SIGCHLD}:
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        close_listeners(listeners)
        if metrics is not None:
            metrics.remove()
