"""A real Redis for the fleet's tests: Debian's ``redis-server``, on 127.0.0.1, in a folder of its own.

:class:`RedisServer` runs it on a port below the ephemeral range (so that, stopped and started
again, it gets its port back: the fleet reconnects to the same URL), without persistence, with
a password (so that the tests can check it never reaches a log or an answer). :meth:`stop`
kills it as a crash would; :meth:`start` brings it back, empty.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import IO

import redis

from acmeserver import free_ports

REDIS_SERVER = "/usr/bin/redis-server"  # Debian's package (.ci/run installs it)
START_TIMEOUT = 30.0  # seconds for it to answer, on a loaded two-core machine
PASSWORD = "redis-password-8c6976e5b5"


class RedisServer:
    """redis-server, running until :meth:`close` (or the ``with`` block's end)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_ports(1)[0]
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL to give ``--redis``: password included."""
        return f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it (empty), and wait until it answers."""
        assert self.process is None, "already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        self._log = open(self.directory / "redis.log", "ab")
        command = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        command += ["--dir", str(self.directory), "--requirepass", PASSWORD, "--daemonize", "no"]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self.process.returncode}): see {self.directory}/redis.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer within {START_TIMEOUT}s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill it (SIGKILL: as a crash, nothing saved) and wait until the port is closed."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def client(self) -> redis.Redis:
        """A client of redis-py's (the test extra's), for a test to look at what the fleet stored."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=PASSWORD, decode_responses=True, socket_timeout=5)

    def answers(self) -> bool:
        with self.client() as client:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
