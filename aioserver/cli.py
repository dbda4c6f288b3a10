"""The command line: ``python -m aioserver`` and the ``aioserver`` console script.

:func:`main` is the only place that chooses exit statuses: 0 after a clean shutdown (or a
valid ``--check``), 2 for a usage or configuration error, 1 for a runtime failure.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NoReturn

from . import __version__, fleet, workers
from .autocert import ACME_THREAD
from .certinfo import describe_certificates
from .config import SECRET_VARIABLES, Config, load_config
from .errors import ConfigError, StartupError
from .logs import configure_logging, flush_logs
from .logtext import loggable
from .options import OPTIONS
from .pipelineviews import served
from .server import run as run_server
from .server import serve
from .workflow.runtime import ACTION_THREADS

# What an unknown option may be shown as: a flag of ours would look like this. Anything else,
# and whatever follows an unknown flag, may be a value, which may be a secret typed in the wrong
# place (a token, a password meant for --ssl-keyfile-password-file): never echoed.
_FLAG = re.compile(r"--[a-z][a-z0-9-]{0,39}")
_NOT_SHOWN = "not shown: values may be secrets"


class _Parser(argparse.ArgumentParser):
    """argparse, without abbreviations and without echoing values in its errors."""

    def __init__(self, **kwargs: Any) -> None:
        # No prefix matching: "--ssl-keyfile-password SECRET" must not pass for
        # --ssl-keyfile-password-file and have the secret read as a file name.
        super().__init__(allow_abbrev=False, **kwargs)

    def parse(self, argv: Sequence[str] | None) -> argparse.Namespace:
        """The parsed command line; unknown arguments are a usage error naming flags only."""
        args, unknown = self.parse_known_args(argv)
        if unknown:
            raise ConfigError("command line", None, _unrecognized(unknown))
        return args

    def error(self, message: str) -> NoReturn:
        # A usage error is a configuration error like any other: one line, status 2. argparse
        # quotes the values it complains about ("ignored explicit argument 'x'"): cut there.
        if message.startswith("unrecognized arguments:"):  # from parse_args, which main avoids
            message = f"unrecognized arguments ({_NOT_SHOWN})"
        cut = min((i for i in (message.find("'"), message.find('"')) if i >= 0), default=-1)
        if cut >= 0:
            message = f"{message[:cut].rstrip()} ({_NOT_SHOWN})"
        raise ConfigError("command line", None, message)


def _unrecognized(unknown: Sequence[str]) -> str:
    """``unrecognized arguments: --token (and 1 more, not shown...)``: flags named, values counted."""
    named: list[str] = []
    hidden = 0
    after_flag = False  # the previous argument was an unknown flag: this one may be its value
    for argument in unknown:
        flag, has_value, _ = argument.partition("=")
        if _FLAG.fullmatch(flag) and not after_flag:
            named.append(flag)
            hidden += bool(has_value)
            after_flag = not has_value
        else:
            hidden += 1
            after_flag = False
    if not named:
        return f"unrecognized arguments: {hidden} ({_NOT_SHOWN})"
    more = f" (and {hidden} more, {_NOT_SHOWN})" if hidden else ""
    return f"unrecognized arguments: {', '.join(named)}{more}"


def build_parser() -> _Parser:
    """The argument parser, generated from the option table."""
    parser = _Parser(prog="aioserver", description="Serve YAML-defined workflows over HTTP(S).")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file, or inline YAML (env CONFIG) [default: the embedded demo config]",
    )
    for option in OPTIONS:
        env = f" (env {option.env})" if option.env else ""
        kwargs: dict[str, Any]
        if option.paired:  # --metrics and --no-metrics
            kwargs = {
                "action": argparse.BooleanOptionalAction,
                "help": f"{option.help} [default: {'on' if option.default else 'off'}]",
            }
        elif option.switch:  # the opposite of the default: --no-schedules
            kwargs = {"action": "store_const", "const": not option.default, "help": option.help}
        else:
            kwargs = {"metavar": option.metavar, "help": f"{option.help}{env} [default: {option.default}]"}
        parser.add_argument(option.flag, dest=option.name, default=argparse.SUPPRESS, **kwargs)
    parser.add_argument("--check", action="store_true", help="validate everything, print a summary, exit 0 or 2")
    parser.add_argument("--version", action="version", version=f"aioserver {__version__}")
    return parser


def summary(config: Config) -> str:
    """What ``--check`` prints: every setting with its origin, the certificates, and the workflows."""
    lines = [f"config: {config.source}"]
    for option in OPTIONS:
        value = getattr(config.settings, option.name)
        origin = config.origins[option.name].source if option.name in config.origins else "default"
        lines.append(f"  {option.name} = {value}  ({origin})")
    tls = f"acme ({', '.join(config.acme.domains)})" if config.acme else "on" if config.tls else "off"
    clients = f", clients = {len(config.clients)}" if config.client_sources is not None else ""
    lines.append(f"  tls = {tls}, tokens = {len(config.tokens)}{clients}")
    for client in config.clients:
        scope = ", ".join(sorted(client.workflows)) if client.workflows is not None else "everything"
        lines.append(f"  client {loggable(client.name)}: {loggable(client.described)}; may call {loggable(scope)}")
    if config.jwt:
        lines.append(f"  {config.jwt.describe()}")
    if config.acme:
        lines.append(f"  acme state: {config.acme.state_dir}")
    if config.tls:
        files = config.tls.files
        for title, path in (("served certificate chain", files.certfile), ("client CA certificates", files.ca_certs)):
            if config.acme and path == files.certfile and not os.path.exists(path):
                lines.append(f"  {title}: none yet (ordered by ACME at start-up)")
            elif path:
                lines.append(f"  {title}:")
                lines.extend(f"    {line}" for line in describe_certificates(path))
    for name, workflow in config.workflows.items():
        actions = " -> ".join("+".join(a.name for a in task.actions) or f"({task.kind})" for task in workflow.tasks)
        lines.append(f"  workflow {name}: {actions}")
    for routes, _ in served(config.pipelines):
        lines.append(f"  pipeline {routes.pipeline}: GET {routes.path}?{routes.parameter}=, POST {routes.batch_path}")
    if config.dotted_paths:
        lines.append(
            f"  outside safeopen: {', '.join(config.dotted_paths)} (dotted paths: what they open, files or URLs,"
            " they open themselves; only the built-ins go through safeopen)"
        )
    lines.append("OK")
    return "\n".join(lines)


def forget_secrets(variables: Iterable[str]) -> None:
    """Remove ``variables`` from the process environment, their bytes included.

    ``os.environ.pop`` unsets a variable for ``getenv`` and for every process started later, but
    its bytes stay where the kernel put them at exec, and ``/proc/self/environ`` shows them to
    any code of this process or of a worker forked from it (proc(5)): overwritten here first.
    """
    libc = _libc()
    for variable in variables:
        if variable not in os.environ:
            continue
        if libc is not None and (address := libc.getenv(variable.encode())):
            ctypes.memset(address, 0, libc.strlen(address))
        del os.environ[variable]


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.getenv.argtypes, libc.getenv.restype = [ctypes.c_char_p], ctypes.c_void_p
        libc.strlen.argtypes, libc.strlen.restype = [ctypes.c_void_p], ctypes.c_size_t
    except (OSError, AttributeError):  # no C library to speak to: unsetting is all we can do
        return None
    return libc


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run the server as the command line says; return the exit status."""
    env = os.environ if env is None else env
    try:
        args = build_parser().parse(argv)
        cli = {o.name: getattr(args, o.name) for o in OPTIONS if hasattr(args, o.name)}
        config = load_config(args.config or env.get("CONFIG") or None, cli, env)
    except ConfigError as exc:
        print(f"aioserver: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    # Read into the config (the TLS context holds the key itself): out of the environment
    # before any action, worker or process pool could inherit them.
    forget_secrets(SECRET_VARIABLES)

    if args.check:
        text = summary(config)
        if config.settings.redis:  # connects, and says whether it answers
            try:
                text = text.removesuffix("OK") + fleet.check(config.settings.redis) + "\nOK"
            except fleet.Unavailable as exc:
                print(text.removesuffix("\nOK"))
                print(
                    f"aioserver: error: {ConfigError(*config.origins['redis'], f'no answer: {exc}')}", file=sys.stderr
                )
                return 2
        print(text)
        return 0

    configure_logging(config.settings.log_level, config.settings.log_format)
    try:
        if config.settings.workers > 1:
            return workers.run(config)
        run_server(serve(config), config.settings.loop)
    except StartupError as exc:
        if config.settings.log_format == "json":  # every line of a JSON log is one object: this one too
            logging.getLogger("aioserver").critical("%s", exc)
            flush_logs()
        else:
            print(f"aioserver: error: {exc}", file=sys.stderr)
        return 1
    return 0


def run() -> NoReturn:
    """Entry point of the console script and of ``python -m aioserver``."""
    # Like uvicorn's --app-dir ".", so that dotted paths find the user's modules.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    status = main()
    alive = [t for t in threading.enumerate() if t.is_alive()]
    abandoned = [t for t in alive if t.name.startswith(ACTION_THREADS)]
    # An ACME order abandoned at the stop may be inside cryptography's Rust code, GIL released:
    # at the interpreter's finalization its thread would be ended by pthread_exit, whose unwinding
    # Rust's panic guard stops ("FATAL: exception not rethrown"): SIGABRT, a core, a failed stop.
    ordering = any(t.name == ACME_THREAD for t in alive)
    if abandoned or ordering:
        if abandoned:
            # A sync action still running after the grace period cannot be interrupted, and the
            # interpreter would wait for it at exit: leave now, as the grace period promised.
            logging.getLogger("aioserver").warning("exiting with %d action threads still running", len(abandoned))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    raise SystemExit(status)
