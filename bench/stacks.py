"""The stacks under test: how each one is started, checked and stopped.

Every process goes through :class:`Processes`, which stops them all (process group by
process group) however the run ends. Servers listen on 127.0.0.1 only, on free ports.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

BENCH = Path(__file__).resolve().parent
APPS = BENCH / "apps"
HOST = "127.0.0.1"
REQUEST_BODY = b'{"name": "echo", "elements": ["hello"]}'
EXPECTED_ANSWER = ["hello"]
# Settings of aioserver's (SPEC §1) that must not leak from the caller's environment into the
# servers, so that every stack runs on the same defaults.
AIOSERVER_ENV = (
    "CONFIG",
    "HOST",
    "PORT",
    "SSL_CERTFILE",
    "SSL_KEYFILE",
    "SSL_KEYFILE_PASSWORD",
    "SSL_CA_CERTS",
    "SSL_CERT_REQS",
    "TRUSTED_PROXIES",
    "WORKERS",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "TOKEN",
    "TOKEN_FILE",
    "DEPENDENCIES",
    "EXTENSIONS",
    "CREDENTIALS_DIRECTORY",
    "LISTEN_FDS",
    "LISTEN_PID",
    "NOTIFY_SOCKET",
)


class Unavailable(Exception):
    """A stack cannot run in a mode on this build or machine; the message says why."""


class StartFailed(Exception):
    """A server did not come up, or answered wrongly; the message says how."""


class Processes:
    """Every process the benchmark starts, so that all are stopped at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self._running: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []

    def start(self, name: str, command: list[str], env: dict[str, str], cpus: str | None) -> subprocess.Popen[bytes]:
        """Start ``command`` in its own session (so Ctrl-C reaches only us), logging to a file."""
        if cpus is not None:
            command = ["taskset", "-c", cpus, *command]
        log = open(self.logs / f"{name}.log", "ab")
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=self.logs,
            start_new_session=True,
        )
        self._running.append((name, process, log))
        return process

    def log_tail(self, name: str, lines: int = 15) -> str:
        """The end of a process's log, to explain a failure."""
        try:
            text = (self.logs / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop_all(self, grace: float = 10.0) -> None:
        """SIGTERM every process group, newest first; SIGKILL what is left after ``grace``."""
        for _, process, _ in reversed(self._running):
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, process, log in reversed(self._running):
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
            # Children of a process (aioserver's workers, nginx's worker) share its group.
            _signal_group(process, signal.SIGKILL)
            log.close()
        self._running.clear()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def free_port() -> int:
    """A TCP port nobody listens on now on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class Context:
    """What every launcher needs."""

    python: str
    processes: Processes
    work: Path  # temporary directory: certificates, nginx prefix, logs
    certfile: Path
    keyfile: Path
    cafile: Path
    token: str
    token_hash: str
    server_cpus: str | None  # the core pinned servers run on; None when not pinning
    aioserver_flags: frozenset[str]
    floor_loop: str
    nginx: str = "nginx"

    def server_env(self) -> dict[str, str]:
        """The caller's environment without aioserver's settings, plus the token hash."""
        env = {k: v for k, v in os.environ.items() if k not in AIOSERVER_ENV}
        env["TOKEN"] = self.token_hash
        return env


@dataclass(frozen=True)
class Server:
    """A started stack: its base URL and the names of its processes (for logs)."""

    url: str
    names: tuple[str, ...]
    processes: tuple[subprocess.Popen[bytes], ...]


Launcher = Callable[[Context, str, str | None], Server]


@dataclass(frozen=True)
class Stack:
    """One stack under test."""

    key: str
    label: str
    pinned: bool
    reference: str  # the aioserver stack its ratio is computed against (same pinning)
    launch: Launcher
    denials: frozenset[int] = frozenset({401})  # acceptable answers without credentials
    note: str = ""
    # What else it must show once started (the options it is measured with do act); problems.
    verify: Callable[[Context, Server], list[str]] | None = None


def _uvicorn(ctx: Context, name: str, scheme: str, cpus: str | None) -> tuple[int, subprocess.Popen[bytes]]:
    port = free_port()
    command = [
        ctx.python,
        "-m",
        "uvicorn",
        "txtai_app:app",
        "--app-dir",
        str(APPS),
        "--host",
        HOST,
        "--port",
        str(port),
    ]
    if scheme == "https":
        command += ["--ssl-certfile", str(ctx.certfile), "--ssl-keyfile", str(ctx.keyfile)]
    return port, ctx.processes.start(name, command, ctx.server_env(), cpus)


def launch_txtai(ctx: Context, scheme: str, cpus: str | None) -> Server:
    """uvicorn serving the txtai reproduction, HTTPS itself (``--ssl-certfile/--ssl-keyfile``)."""
    name = f"txtai-{scheme}"
    port, process = _uvicorn(ctx, name, scheme, cpus)
    return Server(f"{scheme}://{HOST}:{port}", (name,), (process,))


NGINX_CONF = """\
# Generated by bench/stacks.py: TLS terminated by nginx, plain HTTP/1.1 with keep-alive upstream.
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream txtai {{
        server {host}:{upstream};
        keepalive 64;
    }}
    server {{
        listen {host}:{port}{ssl};
        ssl_certificate {certfile};
        ssl_certificate_key {keyfile};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        location / {{
            proxy_pass http://txtai;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"""


def launch_nginx(ctx: Context, scheme: str, cpus: str | None) -> Server:
    """nginx (one worker) in front of a plain-HTTP uvicorn, both on the servers' core."""
    upstream_name = f"nginx-upstream-{scheme}"
    upstream, uvicorn = _uvicorn(ctx, upstream_name, "http", cpus)
    prefix = ctx.work / f"nginx-{scheme}"
    prefix.mkdir()
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            prefix=prefix,
            host=HOST,
            upstream=upstream,
            port=port,
            ssl=" ssl" if scheme == "https" else "",
            certfile=ctx.certfile,
            keyfile=ctx.keyfile,
        )
    )
    # -e: the start-up error log too goes to our prefix, not /var/log/nginx.
    command = [ctx.nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"), "-g", "daemon off;"]
    name = f"nginx-{scheme}"
    process = ctx.processes.start(name, command, ctx.server_env(), cpus)
    return Server(f"{scheme}://{HOST}:{port}", (name, upstream_name), (process, uvicorn))


def floor_launcher(*options: str) -> Launcher:
    """A launcher of the bare aiohttp app with the same token check, with ``options`` (its
    ``--middlewares N``, ``--access-log``: what aiohttp charges for them)."""

    def launch(ctx: Context, scheme: str, cpus: str | None) -> Server:
        port = free_port()
        command = [ctx.python, str(APPS / "aiohttp_floor.py"), "--port", str(port), "--loop", ctx.floor_loop]
        command += options
        if scheme == "https":
            command += ["--certfile", str(ctx.certfile), "--keyfile", str(ctx.keyfile)]
        variant = "".join(option.replace("--", "-").replace(" ", "") for option in options)
        name = f"aiohttp{variant}-{scheme}"
        process = ctx.processes.start(name, command, ctx.server_env(), cpus)
        return Server(f"{scheme}://{HOST}:{port}", (name,), (process,))

    return launch


launch_floor = floor_launcher()


# Options of aioserver's that need a library of an extra: the module, and the extra.
NEEDS = {"--metrics": ("prometheus_client", "metrics")}


def aioserver_launcher(workers: int, *options: str) -> Launcher:
    """A launcher of ``python -m aioserver`` with ``workers`` workers and ``options``, on its default config.

    An option this build does not list in its ``--help`` (or whose library is missing) makes
    the stack Unavailable, with the reason.
    """

    def launch(ctx: Context, scheme: str, cpus: str | None) -> Server:
        for option in options:
            if option not in ctx.aioserver_flags:
                raise Unavailable(f"this aioserver has no {option} option yet (SPEC §8)")
            if option in NEEDS and importlib.util.find_spec(NEEDS[option][0]) is None:
                module, extra = NEEDS[option]
                raise Unavailable(
                    f"{option} needs {module}, which bench/.venv installs with aioserver's {extra!r} extra:"
                    f" not installed (setup.cfg declares no {extra!r} extra yet, or --no-install)"
                )
        command = [ctx.python, "-m", "aioserver", "--host", HOST, *options]
        if scheme == "https":
            for flag in ("--ssl-certfile", "--ssl-keyfile"):
                if flag not in ctx.aioserver_flags:
                    raise Unavailable(f"this aioserver has no {flag} option yet (SPEC §1): HTTPS cannot be measured")
            command += ["--ssl-certfile", str(ctx.certfile), "--ssl-keyfile", str(ctx.keyfile)]
        if workers != 1:
            if "--workers" not in ctx.aioserver_flags:
                raise Unavailable("this aioserver has no --workers option yet (SPEC §1)")
            command += ["--workers", str(workers)]
        port = free_port()
        command += ["--port", str(port)]
        variant = "".join(option.replace("--", "-") for option in options)
        name = f"aioserver-w{workers}{variant}-{'pinned' if cpus else 'unpinned'}-{scheme}"
        process = ctx.processes.start(name, command, ctx.server_env(), cpus)
        return Server(f"{scheme}://{HOST}:{port}", (name,), (process,))

    return launch


def wait_until_listening(ctx: Context, server: Server, timeout: float = 30.0) -> None:
    """Wait for the server's port to accept connections; StartFailed if a process dies first."""
    parts = urlsplit(server.url)
    deadline = time.monotonic() + timeout
    while True:
        for name, process in zip(server.names, server.processes):
            if process.poll() is not None:
                raise StartFailed(f"{name} exited with status {process.returncode}:\n{ctx.processes.log_tail(name)}")
        try:
            with socket.create_connection((parts.hostname, parts.port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise StartFailed(f"{server.names[0]} not listening after {timeout:g}s") from None
            time.sleep(0.1)


def post(
    url: str, headers: dict[str, str], cafile: Path, attempts: int = 20, method: str = "POST", path: str = "/workflow"
) -> tuple[int, bytes]:
    """POST the echo request (or ``method path`` without a body); retry while the server is
    still warming up (502 from a proxy)."""
    parts = urlsplit(url)
    for attempt in range(attempts):
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=str(cafile))
            connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname or HOST, parts.port, context=context, timeout=10
            )
        else:
            connection = http.client.HTTPConnection(parts.hostname or HOST, parts.port, timeout=10)
        try:
            if method == "POST":
                connection.request(method, path, REQUEST_BODY, {"Content-Type": "application/json", **headers})
            else:
                connection.request(method, path, headers=headers)
            response = connection.getresponse()
            status, body = response.status, response.read()
        except (ConnectionError, http.client.RemoteDisconnected):
            status, body = 0, b""
        finally:
            connection.close()
        if status not in (0, 502) or attempt == attempts - 1:
            return status, body
        time.sleep(0.25)
    raise AssertionError("unreachable")


def check(ctx: Context, stack: Stack, server: Server) -> list[str]:
    """What the server answers wrongly: 200 ``["hello"]`` with the token, a denial without it."""
    problems = []
    status, body = post(server.url, {"Authorization": f"Bearer {ctx.token}"}, ctx.cafile)
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if status != 200 or answer != EXPECTED_ANSWER:
        problems.append(f"with the token: {status} {body[:200]!r}, expected 200 {json.dumps(EXPECTED_ANSWER)}")
    status, body = post(server.url, {}, ctx.cafile)
    if status not in stack.denials:
        problems.append(f"without a token: {status}, expected {' or '.join(map(str, sorted(stack.denials)))}")
    status, body = post(server.url, {"Authorization": "Bearer not-the-token"}, ctx.cafile)
    if status != 401:
        problems.append(f"with a wrong token: {status}, expected 401")
    if stack.verify is not None:
        problems += stack.verify(ctx, server)
    return problems


def auth_only(problems: list[str]) -> bool:
    """Whether every problem :func:`check` found is a missing token check (--allow-missing-auth)."""
    return bool(problems) and all(problem.startswith(("without a token", "with a wrong token")) for problem in problems)


# An access line of aioserver's, text (``"POST /workflow HTTP/1.1" 200``) or JSON (``"path": "/workflow"``).
ACCESS_LINE = re.compile(r'"POST /workflow HTTP/1\.[01]"|"path": ?"/workflow"')


def access_lines(log: str) -> int:
    """How many access lines of the check's POSTs a server's log holds."""
    return len(ACCESS_LINE.findall(log))


def no_access_lines(ctx: Context, server: Server) -> list[str]:
    """--no-access-log acts: the check's requests left no access line in the log."""
    time.sleep(0.5)  # access lines are written in batches, at most 0.1 s late
    found = access_lines(ctx.processes.log_tail(server.names[0], lines=1000))
    return [f"--no-access-log did not act: {found} access lines in its log"] if found else []


def serves_metrics(ctx: Context, server: Server) -> list[str]:
    """--metrics acts: GET /metrics with the token answers 200 with aioserver's counters."""
    status, body = post(server.url, {"Authorization": f"Bearer {ctx.token}"}, ctx.cafile, method="GET", path="/metrics")
    if status != 200 or b"aioserver_requests_total" not in body:
        return [f"--metrics did not act: GET /metrics answered {status} {body[:100]!r}"]
    return []


def aioserver_flags(python: str) -> frozenset[str]:
    """The options this build of aioserver knows, from its ``--help``."""
    result = subprocess.run(
        [python, "-m", "aioserver", "--help"], capture_output=True, text=True, timeout=60, env=dict(os.environ)
    )
    if result.returncode != 0:
        raise StartFailed(f"python -m aioserver --help failed:\n{result.stderr.strip()}")
    return frozenset(word.rstrip(",") for word in result.stdout.split() if word.startswith("--"))
