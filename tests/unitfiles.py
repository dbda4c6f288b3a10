"""The shipped systemd units, run as systemd runs them, where systemd itself is not running.

No service manager is PID 1 on a test machine, so this reads ``conf/aioserver.service`` and
``conf/aioserver.socket`` (and drop-ins) and does what systemd does for the settings they use:

- ``ListenStream=``: binds each socket before the service starts (a port becomes 127.0.0.1 on a
  free port, or the one the test asks for; a path is made with ``SocketMode=``,
  ``SocketUser=``/``SocketGroup=``), and passes them from fd 3 on with
  ``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES`` (each unit's ``FileDescriptorName=``), for every
  socket unit that triggers the service (``Service=``, by default the same name) or that the
  service lists in ``Sockets=``;
- ``Type=notify``: the start is done at READY=1 on ``NOTIFY_SOCKET``, or fails when the process exits
  or ``TimeoutStartSec=`` (default 90 s) passes, which ``EXTEND_TIMEOUT_USEC=`` pushes back;
- ``LoadCredential=``: each file is copied once, at start, into ``$CREDENTIALS_DIRECTORY``, owned by
  the service user and read-only; the copy never changes while the service runs (a reload
  included), as systemd.io/CREDENTIALS says;
- ``StateDirectory=``: made under /var/lib (``StateDirectoryMode=``, 0755 by default), owned by the
  service user, named in ``$STATE_DIRECTORY``;
- ``ProtectSystem=strict``: the whole installed tree is read-only but for the state directories;
- ``User=``/``Group=``: the service runs as an unprivileged user and group (``SERVICE_ID``), so
  that a file the README installs ``-g aioserver`` is readable through its group bits only;
- ``LimitNOFILE=``, ``UMask=``, ``Environment=``, ``ExecStart=``, ``ExecReload=`` (its signal).

Every absolute path the units name lives under an installation root (``Installed``): the units'
``/etc/aioserver/token`` is ``<root>/etc/aioserver/token`` here, and ``/opt/aioserver/bin/aioserver``
is this interpreter's ``-m aioserver``. Emulating users and mounts needs root, as the suite runs
(CI and the development machines run as root).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TESTS = Path(__file__).parent
CONF = TESTS.parent / "conf"
INSTALLED = "/opt/aioserver/bin/aioserver"  # the units' ExecStart program, as the README installs it
SERVICE_ID = 61999  # uid and gid of the emulated service user: used by nothing else on the machine


class UnitFile:
    """A unit file and its drop-ins, read as systemd reads them: every key a list of values, an
    empty assignment resetting the list (how a drop-in replaces ``ExecStart=`` or ``ListenStream=``)."""

    def __init__(self, path: Path, *dropins: Path) -> None:
        self.path = path
        self.sections: dict[str, dict[str, list[str]]] = {}
        for file in (path, *dropins):
            self._read(file.read_text())

    def _read(self, text: str) -> None:
        section = None
        for line in re.sub(r"\\\n", " ", text).splitlines():
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = self.sections.setdefault(line.strip("[]"), {})
                continue
            assert section is not None, line
            key, _, value = line.partition("=")
            values = section.setdefault(key.strip(), [])
            if value.strip():
                values.append(value.strip())
            else:
                values.clear()

    def values(self, section: str, key: str) -> list[str]:
        return self.sections.get(section, {}).get(key, [])

    def value(self, section: str, key: str, default: str | None = None) -> str | None:
        values = self.values(section, key)
        return values[-1] if values else default


def service_unit(*dropins: str) -> UnitFile:
    return UnitFile(CONF / "aioserver.service", *(CONF / "aioserver.service.d" / d for d in dropins))


def socket_unit(*dropins: str, name: str = "aioserver.socket") -> UnitFile:
    return UnitFile(CONF / name, *(CONF / f"{name}.d" / d for d in dropins))


def service_ids() -> tuple[int, int]:
    assert os.geteuid() == 0, "emulating User=, Group= and ProtectSystem= needs root (as CI runs the tests)"
    return SERVICE_ID, SERVICE_ID


class Installed:
    """An installation root: where the units' absolute paths are, made traversable by anyone
    (as / is), so that the service user and nginx's workers reach what they may."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="aioserver-root-"))
        self.root.chmod(0o755)
        self.uid, self.gid = service_ids()

    def path(self, absolute: str) -> Path:
        assert absolute.startswith("/"), absolute
        return self.root / absolute.lstrip("/")

    def map(self, text: str) -> str:
        """An argument or value of the units with the paths moved under the root."""
        for top in ("/etc/", "/run/", "/var/", "/srv/"):
            if text.startswith(top):
                return str(self.path(text))
            text = text.replace("=" + top, "=" + str(self.root) + top)  # --flag=/etc/... and VAR=/etc/...
        return text

    def install(self, data: bytes | str | Path, absolute: str, mode: int = 0o644, group: bool = False) -> Path:
        """``install -D -m MODE [-g aioserver] DATA PATH``: root-owned, the group the service's if asked."""
        target = self.path(absolute)
        for parent in reversed(target.relative_to(self.root).parents[:-1]):
            directory = self.root / parent
            if not directory.exists():
                directory.mkdir(mode=0o755)
        content = data.read_bytes() if isinstance(data, Path) else data.encode() if isinstance(data, str) else data
        temporary = target.with_name(target.name + ".new")
        temporary.write_bytes(content)
        os.chown(temporary, 0, self.gid if group else 0)
        temporary.chmod(mode)
        os.replace(temporary, target)  # as `install X F.new && mv F.new F`: readers see a whole file
        return target

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# Runs in the service's process before it becomes aioserver (same pid, as systemd's own
# executor): the mount namespace, the limits, the user, the passed fds, then exec.
_EXECUTOR = """
import ctypes, fcntl, json, os, resource, sys
spec, argv = json.loads(sys.argv[1]), sys.argv[2:]
libc = ctypes.CDLL(None, use_errno=True)
def call(result, what):
    if result != 0:
        raise OSError(ctypes.get_errno(), what)
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
call(libc.unshare(0x00020000), "unshare(CLONE_NEWNS)")  # mounts of its own, gone with the process
call(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
for operation, source, target in spec["mounts"]:
    flags = {"bind": MS_BIND, "rbind": MS_BIND | MS_REC, "ro": MS_REMOUNT | MS_BIND | MS_RDONLY}[operation]
    call(libc.mount(source and source.encode(), target.encode(), None, flags, None), f"{operation} {target}")
if spec["nofile"]:  # capped by the hard limit here: a container may lack CAP_SYS_RESOURCE
    limit = min(spec["nofile"], resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
os.umask(spec["umask"])
os.setgroups([])
os.setgid(spec["gid"])
os.setuid(spec["uid"])
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in spec["fds"]]
for fd in spec["fds"]:
    os.close(fd)
for number, fd in enumerate(high, start=3):
    os.dup2(fd, number)
    os.close(fd)
if high:
    os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(argv[0], argv)
"""


@dataclass
class Running:
    """A service started from the units: its process, log, sockets and notifications."""

    process: subprocess.Popen[bytes]
    log: Path
    ports: dict[str, int]  # ListenStream= value (a port) -> the port on 127.0.0.1 it became
    paths: dict[str, Path]  # ListenStream= value (a path) -> the socket file
    reload_signal: signal.Signals
    notify: socket.socket
    sockets: list[socket.socket] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    timeout_start: float = 90.0  # TimeoutStartSec=, systemd's DefaultTimeoutStartSec by default
    started: float = field(default_factory=time.monotonic)
    _extended: list[float] = field(default_factory=list)  # deadlines EXTEND_TIMEOUT_USEC= asked for

    @property
    def port(self) -> int:
        return next(iter(self.ports.values()))

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def ready(self, timeout: float = 30) -> None:
        """Wait for READY=1, as systemd does for Type=notify; fail if the process exits first, or
        when systemd would have given up on the start (TimeoutStartSec=, as extended)."""
        deadline = time.monotonic() + timeout
        while "READY=1" not in self.messages:
            assert self.process.poll() is None, f"exited {self.process.returncode} before READY=1:\n{self.text()}"
            assert time.monotonic() < deadline, f"no READY=1 within {timeout}s:\n{self.text()}"
            assert time.monotonic() < self.start_deadline(), f"start timed out (TimeoutStartSec=):\n{self.text()}"
            self._receive(0.1)

    def start_deadline(self) -> float:
        """When systemd fails the start: TimeoutStartSec= after it began, or later when extended.

        An EXTEND_TIMEOUT_USEC=N received at t moves the deadline to t + N when that is later
        (sd_notify(3)), so a service that asks in time, again and again, may start for as long as it needs.
        """
        return max([self.started + self.timeout_start, *self._extended])

    def _receive(self, wait: float) -> None:
        self.notify.settimeout(wait)
        try:
            lines = self.notify.recv(4096).decode().splitlines()
        except TimeoutError:
            return
        now = time.monotonic()
        if "READY=1" not in self.messages:  # only the start is extended here
            for line in lines:
                if line.startswith("EXTEND_TIMEOUT_USEC="):
                    assert now < self.start_deadline(), "extended after the start timed out: too late"
                    self._extended.append(now + int(line.partition("=")[2]) / 1_000_000)
        self.messages.extend(lines)

    def wait_for(self, pattern: str, timeout: float = 15, count: int = 1) -> list[str]:
        """The log lines matching ``pattern``, once there are ``count`` of them."""
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.text().splitlines() if re.search(pattern, line)]
            if len(found) >= count:
                return found
            assert time.monotonic() < deadline, f"no {count} x {pattern!r} within {timeout}s:\n{self.text()}"
            time.sleep(0.05)

    def reload(self) -> None:
        """``systemctl reload``: ExecReload's signal to the main process."""
        self.process.send_signal(self.reload_signal)

    def stop(self, timeout: float = 45) -> int:
        """``systemctl stop``: SIGTERM to the main process (KillMode=mixed), its exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the whole "cgroup": the workers too
        self.process.wait()
        for sock in (*self.sockets, self.notify):
            sock.close()


def _listen(
    value: str, installed: Installed, unit: UnitFile, port: int = 0
) -> tuple[socket.socket, int | None, Path | None]:
    """One ListenStream= socket, bound and listening as systemd makes it (a port on ``port``, 0: any free one)."""
    backlog = int(unit.value("Socket", "Backlog", "4096") or 4096)
    if value.startswith("/"):
        path = installed.path(value)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)  # DirectoryMode=0755
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        user = unit.value("Socket", "SocketUser", "root") or "root"
        group = unit.value("Socket", "SocketGroup", "root") or "root"
        os.chown(path, _id(user, "passwd"), _id(group, "group"))
        path.chmod(int(unit.value("Socket", "SocketMode", "0666") or "0666", 8))
        sock.listen(backlog)
        return sock, None, path
    # [address:]port: here on 127.0.0.1, on a free port (the test's stand-in for 443 or 80).
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(backlog)
    return sock, sock.getsockname()[1], None


def _id(name: str, database: str) -> int:
    if name.isdigit():
        return int(name)
    return pwd.getpwnam(name).pw_uid if database == "passwd" else grp.getgrnam(name).gr_gid


def start(
    installed: Installed,
    service: UnitFile,
    sockets: UnitFile | Sequence[UnitFile] | None = None,
    *,
    extra: Iterable[str] = (),
    env: dict[str, str] | None = None,
    ports: Mapping[str, int] | None = None,
) -> Running:
    """Start the service as systemd would (sockets first); ``extra`` arguments go after ExecStart's.

    ``ports`` binds a ListenStream= port on 127.0.0.1 on the port given (``{"80": 5002}``), not a free one.
    """
    name = service.path.name
    socket_units = [sockets] if isinstance(sockets, UnitFile) else list(sockets or ())
    listed = {unit for value in service.values("Service", "Sockets") for unit in value.split()}
    bound_ports: dict[str, int] = {}
    paths: dict[str, Path] = {}
    bound: list[socket.socket] = []
    names: list[str] = []
    for unit in socket_units:
        triggers = unit.value("Socket", "Service", unit.path.stem + ".service")
        # systemd passes a socket unit's fds to the service it triggers and to those listing it.
        assert triggers == name or unit.path.name in listed, f"{unit.path.name} is not {name}'s"
        for value in unit.values("Socket", "ListenStream"):
            sock, port, path = _listen(value, installed, unit, (ports or {}).get(value, 0))
            bound.append(sock)
            names.append(unit.value("Socket", "FileDescriptorName", unit.path.stem) or "")
            if port is not None:
                bound_ports[value] = port
            if path is not None:
                paths[value] = path

    environment = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(TESTS),  # the test actions; the rest is the unit's
        "INVOCATION_ID": os.urandom(16).hex(),
    }
    for assignments in service.values("Service", "Environment"):
        for assignment in shlex.split(assignments):
            key, _, value = assignment.partition("=")
            environment[key] = installed.map(value)
    if bound:
        environment["LISTEN_FDS"] = str(len(bound))
        environment["LISTEN_FDNAMES"] = ":".join(names)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = f"@aioserver-unit-{os.getpid()}-{time.monotonic_ns()}"
    notify.bind("\0" + address[1:])
    environment["NOTIFY_SOCKET"] = address
    watchdog = service.value("Service", "WatchdogSec")
    if watchdog:
        environment["WATCHDOG_USEC"] = str(int(_seconds(watchdog) * 1_000_000))

    credentials = service.values("Service", "LoadCredential")
    if credentials:
        directory = installed.path(f"/run/credentials/{name}")
        directory.mkdir(parents=True, mode=0o700)
        for credential in credentials:
            identifier, _, source = credential.partition(":")
            copy = directory / identifier
            shutil.copyfile(installed.path(source), copy)  # once: the copy never follows the file
            os.chown(copy, installed.uid, installed.gid)
            copy.chmod(0o400)
        os.chown(directory, installed.uid, installed.gid)
        directory.chmod(0o500)
        environment["CREDENTIALS_DIRECTORY"] = str(directory)
    state = [installed.path(f"/var/lib/{d}") for v in service.values("Service", "StateDirectory") for d in v.split()]
    for directory in state:
        directory.mkdir(parents=True, exist_ok=True)
        os.chown(directory, installed.uid, installed.gid)
        directory.chmod(int(service.value("Service", "StateDirectoryMode", "0755") or "0755", 8))
    if state:
        environment["STATE_DIRECTORY"] = ":".join(map(str, state))
    environment.update(env or {})

    command = shlex.split(service.value("Service", "ExecStart") or "")
    assert command[0] == INSTALLED, command
    argv = [sys.executable, "-m", "aioserver", *map(installed.map, command[1:]), *extra]
    spec = {
        "mounts": _mounts(installed, service, state),
        "nofile": int(service.value("Service", "LimitNOFILE", "0") or 0),
        "umask": int(service.value("Service", "UMask", "0022") or "0022", 8),
        "uid": installed.uid,
        "gid": installed.gid,
        "fds": [sock.fileno() for sock in bound],
    }
    reload = shlex.split(service.value("Service", "ExecReload") or "")
    assert reload[0] == "/bin/kill" and reload[2] == "$MAINPID", reload
    log = installed.path(f"/{name}.log")
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-c", _EXECUTOR, json.dumps(spec), *argv],
            env=environment,
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            pass_fds=spec["fds"],
            start_new_session=True,
        )
    timeout = service.value("Service", "TimeoutStartSec")
    return Running(
        process,
        log,
        bound_ports,
        paths,
        signal.Signals["SIG" + reload[1].lstrip("-")],
        notify,
        bound,
        timeout_start=_seconds(timeout) if timeout else 90.0,
    )


def _mounts(installed: Installed, service: UnitFile, state: list[Path]) -> list[tuple[str, str | None, str]]:
    """The mounts of the service's namespace: ProtectHome=, ProtectSystem=strict, and a way
    through to what the service runs from here.

    The service runs as an unprivileged user, on this interpreter, venv and checkout. Where
    one of them lies under a directory that user may not enter (pyenv's /root, a checkout in a
    0700 folder), that directory is covered with an empty one through which they alone show:
    the stand-ins for an installation's /usr/bin/python3 and /opt/aioserver.
    """
    needed = {Path(sys.base_prefix), Path(sys.prefix), TESTS.parent}
    needed = {path for path in needed if not any(path != other and path.is_relative_to(other) for other in needed)}
    covered = []
    if service.value("Service", "ProtectHome") in ("yes", "tmpfs", "read-only"):
        covered += [home for home in (Path("/root"), Path("/home")) if home.is_dir()]
    for path in needed:
        ancestors = [a for a in reversed(path.parents) if a != Path("/") and not a.stat().st_mode & 0o001]
        if ancestors and not any(ancestors[0].is_relative_to(c) for c in covered):
            covered.append(ancestors[0])
    binds: list[tuple[str, str | None, str]] = []
    covers: list[tuple[str, str | None, str]] = []
    for number, directory in enumerate(covered):
        stage = installed.path(f"/.covered{number}")
        stage.mkdir(mode=0o755, exist_ok=True)  # made by an earlier start in the same root (a restart)
        for path in needed:
            if path.is_relative_to(directory):
                through = stage / path.relative_to(directory)
                through.mkdir(parents=True, exist_ok=True)
                for made in [through, *through.parents]:
                    if made.is_relative_to(stage):
                        made.chmod(0o755)
                binds.append(("bind", str(path), str(through)))
        covers.append(("rbind", str(stage), str(directory)))
    mounts = binds + covers  # bound while still in sight, then covered
    if service.value("Service", "ProtectSystem") == "strict":
        # The whole installed tree read-only but for the state directories, bound first so that
        # the read-only tree keeps them as they are.
        mounts += [("bind", str(d), str(d)) for d in state]
        mounts += [("rbind", str(installed.root), str(installed.root)), ("ro", None, str(installed.root))]
    return mounts


def _seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "min": 60, "": 1}
    number, unit = re.fullmatch(r"([0-9.]+)\s*([a-z]*)", value).groups()  # type: ignore[union-attr]
    return float(number) * units[unit]


@contextmanager
def running(
    installed: Installed, service: UnitFile, sockets: UnitFile | Sequence[UnitFile] | None = None, **kwargs: Any
) -> Iterator[Running]:
    """A started service, closed (its whole process group killed) at the end."""
    service_process = start(installed, service, sockets, **kwargs)
    try:
        yield service_process
    finally:
        service_process.close()
