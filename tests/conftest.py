"""Shared fixtures: configs built from inline YAML, clients driving create_app, the real server.

Server-level tests (those that start ``python -m aioserver`` through :class:`Server` or
:func:`aioserver_command`, in their body, a helper or a fixture of theirs) run once per
:data:`DEPLOYMENTS` entry, as deployed:

- ``[asyncio]``: in a venv made by the README's first command (``pip install`` without extras:
  neither uvloop nor orjson), on the default ``--loop auto``, which is then asyncio's loop;
- ``[uvloop]``: in the test venv, whose extras hold the ``speed`` extra's uvloop and orjson, on
  the default ``--loop auto``, which is then uvloop.

Each configuration's log must say it ran on its loop. Tests marked ``@pytest.mark.workers``
(where more processes change the behaviour: signals, reloads, shutdown, the access log) run
a third time, ``[uvloop-workers]``, with ``--workers 2``. A test that takes a ``loop``
argument chooses its loops itself (``--loop``), in the test venv, and is left alone.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import inspect
import locale
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import types
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization

from aioserver import create_app, load_config

TESTS = Path(__file__).parent
PYTHON = sys.executable

ClientFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def make_client(aiohttp_client) -> ClientFactory:  # type: ignore[no-untyped-def]
    """Start the whole service on a config given as inline YAML (and an environment)."""

    async def factory(yaml_text: str, env: dict[str, str] | None = None) -> TestClient:
        return await aiohttp_client(create_app(load_config(yaml_text, env=env)))

    return factory


# -- the real thing: ``python -m aioserver`` as a user starts it, in the configurations users deploy

ROOT = TESTS.parent
NO_EXTRAS_VENV = ROOT / ".venv-no-extras"


@dataclass(frozen=True)
class Deployment:
    """An install and a process layout that server-level tests run in (see the module's docstring)."""

    name: str
    loop: str  # the event loop its server must run on, by default (--loop auto)
    no_extras: bool = False  # in the venv of the README's first command, else in the test venv
    workers: int = 1  # --workers, unless the test gives it

    def __str__(self) -> str:
        return self.name

    @property
    def python(self) -> str:
        return no_extras_python() if self.no_extras else PYTHON

    def command(self) -> list[str]:
        """``python -m aioserver`` as installed in this deployment."""
        if self.no_extras and "MUTANT_UNDER_TEST" in os.environ:
            # Under mutmut the mutated modules import mutmut, which only the test venv holds:
            # there, asyncio's loop by option (and orjson) is as near as it gets.
            return [PYTHON, "-m", "aioserver", "--loop", self.loop]
        return [self.python, "-m", "aioserver"]


AS_INSTALLED = Deployment("asyncio", "asyncio", no_extras=True)
WITH_SPEED = Deployment("uvloop", "uvloop")
WITH_WORKERS = Deployment("uvloop-workers", "uvloop", workers=2)
DEPLOYMENTS = (AS_INSTALLED, WITH_SPEED)

# The current test's deployment, set by the autouse fixture below while a test runs.
_deployment: Deployment | None = None


def _current_deployment() -> Deployment | None:
    """The deployment set by the conftest of the running session.

    pytest imports conftest.py anew for each session, while test modules imported in an earlier
    session of the same process keep the conftest they imported (``from conftest import
    Server``): mutmut runs several sessions in one process, and forks each mutant's run from one
    that collected already. Their Server must see what this session's fixture set.
    """
    current: Deployment | None = sys.modules[__name__]._deployment
    return current


_no_extras: str | BaseException | None = None


def no_extras_python() -> str:
    """The interpreter of a venv holding aioserver as the README's first command installs it.

    Made once (kept in .venv-no-extras/ while setup.cfg and pyproject.toml do not change), with
    this worktree installed editable, so that it runs this code; it must lack uvloop and orjson.
    Failing to make it fails the tests that need it.
    """
    global _no_extras
    if _no_extras is None:
        try:
            _no_extras = _make_no_extras_venv()
        except BaseException as exc:  # once: every test needing it fails with the same reason
            _no_extras = exc
    if isinstance(_no_extras, BaseException):
        raise AssertionError(f"no venv without extras: {_no_extras}") from _no_extras
    return _no_extras


def _make_no_extras_venv() -> str:
    sources = b"".join((ROOT / name).read_bytes() for name in ("setup.cfg", "pyproject.toml"))
    wanted = hashlib.sha256(sources + sys.version.encode()).hexdigest()

    def lacks_extras(python: str) -> None:
        for extra in ("uvloop", "orjson"):  # else the configuration would not be the README's
            found = subprocess.run([python, "-c", f"import {extra}"], capture_output=True, timeout=60)
            assert found.returncode != 0, f"{extra} is installed in {NO_EXTRAS_VENV}"

    return made_venv(NO_EXTRAS_VENV, wanted, ["-e", str(ROOT)], lacks_extras)


def made_venv(venv: Path, wanted: str, install: list[str], check: Callable[[str], None]) -> str:
    """The interpreter of ``venv``, made anew (``pip install *install``, then ``check(python)``)
    unless its stamp says it was made for ``wanted``. Under a lock beside it: the test
    processes of xdist share it. Anything that fails raises, naming what."""
    python = venv / "bin" / "python"
    stamp = venv / "installed-from"
    with open(ROOT / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test process may be making it
        if not (python.exists() and stamp.exists() and stamp.read_text() == wanted):
            subprocess.run([PYTHON, "-m", "venv", "--clear", str(venv)], check=True, timeout=120)
            done = subprocess.run(
                [str(python), "-m", "pip", "install", "-q", *install], capture_output=True, text=True, timeout=900
            )
            assert done.returncode == 0, f"pip install {' '.join(install)} failed:\n{done.stderr}"
            check(str(python))
            stamp.write_text(wanted)
    return str(python)


def _given(args: tuple[str, ...], flag: str) -> str | None:
    """The value of ``flag`` among ``args`` (``--flag V`` or ``--flag=V``), or None."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.partition("=")[2]
    return None


class _ServerProcess(subprocess.Popen[str]):
    """The server's process, whose :meth:`wait` returns once its log is read to the end too: a
    test reading the log after the exit must see its last lines (the drainer thread reads them
    some time after the exit, later still on a loaded machine)."""

    drainer: threading.Thread | None = None

    def wait(self, timeout: float | None = None) -> int:
        code = super().wait(timeout)
        if self.drainer is not None and self.drainer.is_alive():
            self.drainer.join(timeout=10)  # EOF once every process holding the pipe (workers) is gone
        return code


class Server:
    """A running ``python -m aioserver``, its port read from its own log line.

    It runs in the current test's :class:`Deployment` (or ``deployment``, for a fixture of a
    wider scope, which must then be parametrized over :data:`DEPLOYMENTS` itself), unless its
    arguments choose the loop (``--loop``). Under a deployment's workers, every worker logs
    "serving on": ``listeners`` lines are awaited per worker and ``ports`` holds each port once.
    ``workers`` is how many processes serve (a test waiting for each one's log line needs it).
    """

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        listeners: int = 1,
        pattern: str = r"serving on https?://127\.0\.0\.1:(\d+)",  # a group: the port, if any
        deployment: Deployment | None = None,
        prefix: tuple[str, ...] = (),  # a command that runs it (it must exec, keeping the pid)
    ) -> None:
        deployment = deployment or _current_deployment()
        loop = _given(args, "--loop")
        if deployment is None and loop is None:
            raise AssertionError(
                "Server started outside a deployment: a fixture wider than a test must be parametrized"
                " over conftest.DEPLOYMENTS and pass deployment=; else a test or a helper that conftest"
                " could not see starting it (see pytest_generate_tests)"
            )
        command = [PYTHON, "-m", "aioserver"] if deployment is None or loop is not None else deployment.command()
        self.loop = loop if loop not in (None, "auto") else deployment.loop if deployment else None
        options: tuple[str, ...] = ()
        given_workers = _given(args, "--workers")
        self.workers = int(given_workers) if given_workers else 1
        duplicates = False  # the same listener's line once per worker
        if deployment is not None and deployment.workers > 1 and given_workers is None:
            options = ("--workers", str(deployment.workers))
            self.workers = deployment.workers
            listeners *= deployment.workers
            duplicates = True
        environment = {**os.environ, "PYTHONPATH": str(TESTS), **(env or {})}
        self.deployment = deployment
        self.listeners = listeners
        self.pattern = pattern
        self.ports: list[int] = []
        self.process = _ServerProcess(
            [*prefix, *command, "--port", "0", *options, *args],
            env=environment,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self.process.drainer = self._drainer
        self.port = self._wait_for_port()
        if duplicates:
            self.ports = list(dict.fromkeys(self.ports))
        self._check_loop()

    def _check_loop(self) -> None:
        """The log names the loop it runs on (at --log-level info or below): the one intended."""
        loops = re.findall(r"INFO aioserver: event loop: (\w+)$", "".join(self.log), re.MULTILINE)
        if self.loop and loops and loops != [self.loop] * len(loops):
            self.__exit__()
            raise AssertionError(f"meant to run on {self.loop}, ran on {', '.join(loops)}:\n" + "".join(self.log))

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self._drainer.is_alive():
            self._drainer.join()
        assert self.process.stderr is not None
        self.process.stderr.close()

    def _wait_for_port(self, timeout: float = 30) -> int:
        assert self.process.stderr is not None
        # A server that never says it serves is killed, so that the test fails instead of hanging.
        watchdog = threading.Timer(timeout, self.process.kill)
        watchdog.start()
        try:
            return self._read_ports()
        finally:
            watchdog.cancel()

    def _read_ports(self) -> int:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            found = re.search(self.pattern, line)
            if found:
                self.ports.append(int(found.group(1)) if found.groups() else 0)
            if len(self.ports) == self.listeners:
                self._drainer.start()
                return self.ports[0]
        self.__exit__()
        raise AssertionError("server exited or hung before serving:\n" + "".join(self.log))

    def _drain(self) -> None:
        assert self.process.stderr is not None
        self.log.extend(self.process.stderr)

    def post(self, body: bytes, token: str | None = None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/workflow", data=body, method="POST", headers=headers
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()


def aioserver_command(*args: str) -> list[str]:
    """``python -m aioserver ARGS`` as the current test's deployment runs it.

    For a test that starts the server its own way (under systemd-socket-activate, say): it is
    run in each deployment as a Server-starting test is, and should check the loop line itself.
    """
    deployment = _current_deployment()
    if deployment is None:
        raise AssertionError("aioserver_command() outside a deployment: see Server")
    options = ("--workers", str(deployment.workers)) if deployment.workers > 1 and not _given(args, "--workers") else ()
    return [*deployment.command(), *options, *args]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "workers: a server-level test run also with --workers 2 (uvloop), where workers change the behaviour"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test that starts :class:`Server` in each deployment (see the module's docstring)."""
    if "deployment" not in metafunc.fixturenames or "loop" in metafunc.fixturenames:
        return  # a test choosing its loops itself keeps them
    # The fixtures a test asks for, its own and those they ask for, by test-scoped fixture
    # functions: pytest has resolved them already (a wider one has to choose its deployment).
    fixtures = [
        fixture.func
        for definitions in metafunc._arg2fixturedefs.values()
        for fixture in definitions
        if fixture.scope == "function"
    ]
    seen: set[int] = set()
    if not any(_starts_server(function, seen) for function in [metafunc.function, *fixtures]):
        return
    deployments = list(DEPLOYMENTS)
    if metafunc.definition.get_closest_marker("workers"):
        deployments.append(WITH_WORKERS)
    metafunc.parametrize("deployment", deployments, indirect=True, ids=str)


def _starts_server(thing: Any, seen: set[int]) -> bool:
    """Whether ``thing`` starts a Server: names it, or calls a function or class of the tests that does."""
    if _one_of_ours(thing, "Server") or _one_of_ours(thing, "aioserver_command"):
        return True
    if id(thing) in seen or _one_of_ours(thing, "_starts_server"):  # this one names Server without starting it
        return False
    seen.add(id(thing))
    if isinstance(thing, (staticmethod, classmethod)):
        thing = thing.__func__
    elif isinstance(thing, property):
        thing = thing.fget
    if inspect.isclass(thing):
        module = sys.modules.get(thing.__module__)
        return _ours(getattr(module, "__file__", None)) and any(_starts_server(v, seen) for v in vars(thing).values())
    if not inspect.isfunction(thing) or not _ours(thing.__code__.co_filename):
        return False
    names = {name for code in _code_objects(thing.__code__) for name in code.co_names}
    named = [thing.__globals__[name] for name in names if name in thing.__globals__]
    # conftest.Server: an attribute of a module it names (attribute names are in co_names too).
    named += [
        getattr(m, name, None)
        for m in named
        if inspect.ismodule(m) and _ours(getattr(m, "__file__", None))
        for name in names
    ]
    return any(_starts_server(value, seen) for value in named)


def _one_of_ours(thing: Any, name: str) -> bool:
    """Whether ``thing`` is this module's ``name``, from this session's import of it or an earlier
    one's (see :func:`_current_deployment`)."""
    return getattr(thing, "__module__", None) == __name__ and getattr(thing, "__qualname__", None) == name


def _ours(path: str | None) -> bool:
    return path is not None and Path(path).is_relative_to(TESTS)


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    """A function's code and that of the functions, lambdas and comprehensions inside it."""
    yield code
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            yield from _code_objects(constant)


@pytest.fixture(autouse=True)
def deployment(request: pytest.FixtureRequest) -> Iterator[Deployment | None]:
    """The deployment the current test's servers run in: one of its parameters, or none."""
    global _deployment
    _deployment = getattr(request, "param", None)
    try:
        yield _deployment
    finally:
        _deployment = None


@pytest.fixture
def ascii_locale() -> Iterator[None]:
    """LC_CTYPE=C for the test: open() without an encoding then reads ASCII only.

    As a service started under a non-UTF-8 locale would; a file read as UTF-8 must not care.
    """
    previous = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        assert locale.getpreferredencoding(False) != "UTF-8"
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, previous)


async def exchange(port: int, data: bytes, wait: float = 5) -> bytes:
    """Send raw bytes to 127.0.0.1:port; return the server's first response (head and body), or all until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        async with asyncio.timeout(wait):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                None,
            )
            return head + (await reader.readexactly(length) if length is not None else await reader.read())
    except asyncio.IncompleteReadError as closed:
        return closed.partial
    finally:
        writer.close()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- TLS, for real: a CA of trustme's, certificates for this machine, files and contexts.

TOKEN = "test-token-d41d8cd98f00b204"
TOKEN_HASH = hashlib.sha256(TOKEN.encode()).hexdigest()
KEY_PASSWORD = "key-password-5f4dcc3b"


@dataclass(frozen=True)
class PemFiles:
    """Paths of the PEM files a server and its clients use."""

    ca: Path
    cert: Path
    key: Path
    encrypted_key: Path
    password_file: Path
    client: Path  # a client certificate and its key, for mTLS
    other_cert: Path  # a second server certificate and key (same names), for reloads
    other_key: Path


@pytest.fixture(scope="session")
def tls_certificate_authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_certificate(tls_certificate_authority: trustme.CA) -> trustme.LeafCert:
    return tls_certificate_authority.issue_cert("localhost", "127.0.0.1", "::1")


@pytest.fixture(scope="session")
def pem_files(
    tmp_path_factory: pytest.TempPathFactory, tls_certificate_authority: trustme.CA, tls_certificate: trustme.LeafCert
) -> PemFiles:
    folder = tmp_path_factory.mktemp("pem")
    files = PemFiles(
        *(
            folder / name
            for name in (
                "ca.pem",
                "cert.pem",
                "key.pem",
                "encrypted-key.pem",
                "password",
                "client.pem",
                "other-cert.pem",
                "other-key.pem",
            )
        )
    )
    tls_certificate_authority.cert_pem.write_to_path(files.ca)
    for blob in tls_certificate.cert_chain_pems:
        blob.write_to_path(files.cert, append=True)
    tls_certificate.private_key_pem.write_to_path(files.key)
    key = serialization.load_pem_private_key(tls_certificate.private_key_pem.bytes(), password=None)
    files.encrypted_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(KEY_PASSWORD.encode()),
        )
    )
    files.password_file.write_text(KEY_PASSWORD + "\n")
    tls_certificate_authority.issue_cert(common_name="alice").private_key_and_cert_chain_pem.write_to_path(files.client)
    other = tls_certificate_authority.issue_cert("localhost", "127.0.0.1", common_name="reloaded")
    other.cert_chain_pems[0].write_to_path(files.other_cert)
    other.private_key_pem.write_to_path(files.other_key)
    return files


@pytest.fixture(scope="session")
def client_ssl_ctx(tls_certificate_authority: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    tls_certificate_authority.configure_trust(context)
    return context


# -- real servers a test needs beside aioserver, each in the test's own folder, stopped after it


@pytest.fixture
def pebble(tmp_path: Path) -> Iterator[Any]:
    """A real ACME server (acmeserver.Pebble: pebble and its DNS server), running for the test."""
    from acmeserver import Pebble

    with Pebble(tmp_path / "pebble") as running:
        yield running


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Any]:
    """A real redis-server with a password (redisserver.RedisServer), running for the test."""
    from redisserver import RedisServer

    with RedisServer(tmp_path / "redis") as running:
        yield running
