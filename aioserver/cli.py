"""The command line: ``python -m aioserver`` and the ``aioserver`` console script.

:func:`main` is the only place that chooses exit statuses: 0 after a clean shutdown (or a
valid ``--check``), 2 for a usage or configuration error, 1 for a runtime failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import NoReturn

from . import __version__, workers
from .config import Config, load_config
from .errors import ConfigError, StartupError
from .logs import configure_logging
from .options import OPTIONS
from .server import run as run_server
from .server import serve
from .workflow.runtime import ACTION_THREADS


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # A usage error is a configuration error like any other: one line, status 2.
        raise ConfigError("command line", None, message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, generated from the option table."""
    parser = _Parser(prog="aioserver", description="Serve YAML-defined workflows over HTTP(S).")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file, or inline YAML (env CONFIG) [default: the embedded demo config]",
    )
    for option in OPTIONS:
        env = f" (env {option.env})" if option.env else ""
        if option.switch:
            parser.add_argument(
                option.flag,
                dest=option.name,
                action="store_const",
                const=True,
                default=argparse.SUPPRESS,
                help=option.help,
            )
            continue
        parser.add_argument(
            option.flag,
            dest=option.name,
            metavar=option.metavar,
            default=argparse.SUPPRESS,
            help=f"{option.help}{env} [default: {option.default}]",
        )
    parser.add_argument("--check", action="store_true", help="validate everything, print a summary, exit 0 or 2")
    parser.add_argument("--version", action="version", version=f"aioserver {__version__}")
    return parser


def summary(config: Config) -> str:
    """What ``--check`` prints: every setting with its origin, and the workflows."""
    lines = [f"config: {config.source}"]
    for option in OPTIONS:
        value = getattr(config.settings, option.name)
        origin = config.origins[option.name].source if option.name in config.origins else "default"
        lines.append(f"  {option.name} = {value}  ({origin})")
    lines.append(f"  tls = {'on' if config.tls else 'off'}, tokens = {len(config.tokens)}")
    for name, workflow in config.workflows.items():
        actions = " -> ".join("+".join(a.name for a in task.actions) for task in workflow.tasks)
        lines.append(f"  workflow {name}: {actions}")
    lines.append("OK")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run the server as the command line says; return the exit status."""
    env = os.environ if env is None else env
    try:
        args = build_parser().parse_args(argv)
        cli = {o.name: getattr(args, o.name) for o in OPTIONS if hasattr(args, o.name)}
        config = load_config(args.config or env.get("CONFIG") or None, cli, env)
    except ConfigError as exc:
        print(f"aioserver: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0

    if args.check:
        print(summary(config))
        return 0

    configure_logging(config.settings.log_level)
    try:
        if config.settings.workers > 1:
            return workers.run(config)
        run_server(serve(config), config.settings.loop)
    except StartupError as exc:
        print(f"aioserver: error: {exc}", file=sys.stderr)
        return 1
    return 0


def run() -> NoReturn:
    """Entry point of the console script and of ``python -m aioserver``."""
    # Like uvicorn's --app-dir ".", so that dotted paths find the user's modules.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    status = main()
    abandoned = [t for t in threading.enumerate() if t.name.startswith(ACTION_THREADS) and t.is_alive()]
    if abandoned:
        # A sync action still running after the grace period cannot be interrupted, and the
        # interpreter would wait for it at exit: leave now, as the grace period promised.
        logging.getLogger("aioserver").warning("exiting with %d action threads still running", len(abandoned))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    raise SystemExit(status)
