"""Server settings, each declared once.

Every field of :class:`Settings` carries its own flag, environment variable, key in the
config file's ``server:`` section, parser and help. That one table drives argparse, the
environment, the YAML section, ``--check``'s summary and the README. Flag names follow
uvicorn's (``--timeout-keep-alive``), attribute names follow the flags.

Precedence: command line > environment > config file > default.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .browser import parse_allowed_hosts
from .errors import ConfigError
from .fleet import RedisURL, parse_redis_url
from .proxy import parse_trusted

MiB = 1024 * 1024
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
CERT_REQS = ("none", "optional", "required")
LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LOOPS = ("auto", "asyncio", "uvloop")
LOG_FORMATS = ("text", "json")


# -- parsers: each takes a value from argv/env (str) or YAML (any) and returns it typed,
#    or raises ValueError with a message that says what was expected.


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected an integer, got {type(value).__name__}")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"expected an integer, got {value!r}") from None


def port_number(value: Any) -> int:
    port = _integer(value)
    if not 0 <= port <= 65535:
        raise ValueError(f"expected a TCP port from 0 to 65535, got {port}")
    return port


def positive_int(value: Any) -> int:
    number = _integer(value)
    if number <= 0:
        raise ValueError(f"expected a positive integer, got {number}")
    return number


def positive_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a number of seconds, got {type(value).__name__}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise ValueError(f"expected a positive number of seconds, got {value!r}")
    return number


def host_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a host name or IP address")
    return value.strip()


def file_path(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a file path")
    return value


def cert_reqs(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in CERT_REQS:
        raise ValueError(f"expected one of {', '.join(CERT_REQS)}, got {value!r}")
    return value.lower()


def event_loop(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in LOOPS:
        raise ValueError(f"expected one of {', '.join(LOOPS)}, got {value!r}")
    if value.lower() == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ValueError("uvloop is not installed (pip install 'aioserver[speed]')")
    return value.lower()


def non_negative_float(value: Any) -> float:
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            if float(value) == 0:
                return 0.0
        except ValueError:
            pass
    return positive_float(value)


# A DNS name an ACME CA issues for over http-01: letters, digits and hyphens in dot-separated
# labels, no wildcard (http-01 cannot prove one), no IP address, no trailing dot.
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)", re.ASCII)


def domain_names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (str, list, tuple)):
        raise ValueError("expected comma-separated DNS names")
    items = value.split(",") if isinstance(value, str) else value
    names: list[str] = []
    for item in items:
        name = str(item).strip().lower()
        labels = name.split(".")
        if (
            len(name) > 253
            or len(labels) < 2
            or not all(_DNS_LABEL.fullmatch(label) for label in labels)
            or labels[-1].isdigit()
        ):
            raise ValueError(f"expected DNS names such as api.example.com (no wildcard, no IP address), got {item!r}")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("expected at least one DNS name")
    return tuple(names)


def email_address(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[^@\s:]+@[^@\s:]+\.[^@\s:]+", value.strip()):
        raise ValueError(f"expected an e-mail address, got {value!r}")
    return value.strip()


def https_url(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"https://[^\s/?#]+(/\S*)?", value.strip()):
        raise ValueError(f"expected an https:// URL (an ACME directory), got {value!r}")
    return value.strip()


def log_format(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in LOG_FORMATS:
        raise ValueError(f"expected one of {', '.join(LOG_FORMATS)}, got {value!r}")
    return value.lower()


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise ValueError(f"expected true or false, got {value!r}")


def log_level(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value.lower()


@dataclass(frozen=True, slots=True)
class Option:
    """How one setting is spelled on each channel, parsed and explained."""

    name: str
    default: Any
    parse: Callable[[Any], Any]
    help: str
    env: str | None
    key: str  # dotted key under the config file's ``server:`` section
    metavar: str
    switch: bool  # a flag without a value on the command line, giving the opposite of the default
    paired: bool = False  # a switch spelled both ways, --metrics and --no-metrics (uvicorn's --access-log)

    @property
    def flag(self) -> str:
        # A switch that is on by default turns it off: --no-schedules; a paired one is named as on.
        negation = "no-" if self.switch and self.default is True and not self.paired else ""
        return "--" + negation + self.name.replace("_", "-")


def _option(
    default: Any,
    parse: Callable[[Any], Any],
    help: str,
    *,
    env: str | None = None,
    key: str | None = None,
    metavar: str = "VALUE",
    flag_only: bool = False,
    paired: bool = False,
) -> Any:
    spec = {
        "default": default,
        "parse": parse,
        "help": help,
        "env": env,
        "key": key,
        "metavar": metavar,
        "switch": flag_only or paired,
        "paired": paired,
    }
    return field(default=default, metadata={"option": spec})


@dataclass(frozen=True, slots=True)
class Settings:
    """The resolved server settings (not the workflows)."""

    host: str = _option("127.0.0.1", host_name, "address to bind", env="HOST", metavar="HOST")
    port: int = _option(8000, port_number, "TCP port to bind", env="PORT", metavar="PORT")
    ssl_certfile: str | None = _option(
        None,
        file_path,
        "serve HTTPS with this PEM certificate (chain)",
        env="SSL_CERTFILE",
        key="ssl.certfile",
        metavar="PATH",
    )
    ssl_keyfile: str | None = _option(
        None, file_path, "the certificate's private key (PEM)", env="SSL_KEYFILE", key="ssl.keyfile", metavar="PATH"
    )
    # The password itself may come from SSL_KEYFILE_PASSWORD, never from the command line.
    ssl_keyfile_password_file: str | None = _option(
        None, file_path, "file holding the key's password", key="ssl.keyfile_password_file", metavar="PATH"
    )
    ssl_ca_certs: str | None = _option(
        None,
        file_path,
        "verify client certificates against these CAs (mTLS)",
        env="SSL_CA_CERTS",
        key="ssl.ca_certs",
        metavar="PATH",
    )
    ssl_cert_reqs: str | None = _option(
        None,
        cert_reqs,
        "client certificates: none, optional or required (required when a CA is given)",
        env="SSL_CERT_REQS",
        key="ssl.cert_reqs",
        metavar="MODE",
    )
    ssl_watch_interval: float = _option(
        30.0,
        non_negative_float,
        "check the certificate, key and CA files this often and reload them when they change (0: only on SIGHUP)",
        key="ssl.watch_interval",
        metavar="SECONDS",
    )
    # Automatic certificates (ACME, RFC 8555): see aioserver.autocert.
    acme_domain: tuple[str, ...] = _option(
        (),
        domain_names,
        "obtain and renew a certificate for these DNS names by ACME (comma-separated; the first names it)",
        env="ACME_DOMAINS",
        key="acme.domains",
        metavar="NAMES",
    )
    acme_email: str | None = _option(
        None, email_address, "contact address of the ACME account", env="ACME_EMAIL", key="acme.email", metavar="ADDR"
    )
    acme_directory: str = _option(
        LETS_ENCRYPT,
        https_url,
        "the ACME server's directory URL",
        env="ACME_DIRECTORY",
        key="acme.directory",
        metavar="URL",
    )
    acme_ca_certs: str | None = _option(
        None,
        file_path,
        "trust these CAs for the ACME server's own HTTPS [default: the system trust store]",
        env="ACME_CA_CERTS",
        key="acme.ca_certs",
        metavar="PATH",
    )
    acme_state_dir: str | None = _option(
        None,
        file_path,
        "where the ACME account, certificates and keys are kept [default: $STATE_DIRECTORY under systemd]",
        env="ACME_STATE_DIR",
        key="acme.state_dir",
        metavar="DIR",
    )
    redirect_http: int | None = _option(
        None, port_number, "also listen on this plain-HTTP port, answering 308 to HTTPS", metavar="PORT"
    )
    allow_insecure_http: bool = _option(
        False, boolean, "allow tokens over plain HTTP on a non-loopback address", flag_only=True
    )
    # Deployment (issue 4): a Unix socket for a local proxy, the proxies believed, worker processes.
    uds: str | None = _option(
        None, file_path, "listen on this Unix socket instead of host/port, for a local proxy", metavar="PATH"
    )
    trusted_proxies: tuple[str, ...] = _option(
        (),
        parse_trusted,
        "believe X-Forwarded-*/Forwarded from these addresses/CIDRs (comma-separated)",
        env="TRUSTED_PROXIES",
        metavar="LIST",
    )
    workers: int = _option(1, positive_int, "worker processes serving the same sockets", env="WORKERS", metavar="N")
    timeout_worker_healthcheck: float = _option(
        10.0,
        positive_float,
        "with --workers: a worker whose event loop sends its parent no heartbeat for this long is killed and replaced",
        metavar="SECONDS",
    )
    loop: str = _option(
        "auto", event_loop, "event loop: auto (uvloop when installed), asyncio or uvloop", metavar="LOOP"
    )
    # One process per host runs the schedules; with several hosts, all but one say --no-schedules.
    schedules: bool = _option(
        True, boolean, "run no scheduled workflows on this host (another host runs them)", flag_only=True
    )
    max_body_size: int = _option(
        16 * MiB, positive_int, "largest request body accepted, in bytes (413 beyond)", metavar="BYTES"
    )
    limit_concurrency: int = _option(
        100, positive_int, "workflows running at once; beyond, 503 with Retry-After", metavar="N"
    )
    limit_connections: int = _option(
        1000,
        positive_int,
        "open connections per process, from accept; at the limit the oldest idle or handshaking one"
        " (else one whose client reads nothing) is closed for a new one, and with none the new one gets 503",
        metavar="N",
    )
    timeout_workflow: float = _option(
        300.0,
        positive_float,
        "a workflow running longer is cancelled (async) or abandoned (sync): 504",
        metavar="SECONDS",
    )
    timeout_request_body: float = _option(
        30.0, positive_float, "a request body not received within this time: 408", metavar="SECONDS"
    )
    max_line_size: int = _option(
        8190, positive_int, "longest request line, in bytes (aiohttp's default)", metavar="BYTES"
    )
    max_field_size: int = _option(
        8190, positive_int, "longest header field, in bytes (aiohttp's default)", metavar="BYTES"
    )
    max_headers: int = _option(128, positive_int, "most header fields in a request (aiohttp's default)", metavar="N")
    timeout_keep_alive: float = _option(
        15.0,
        positive_float,
        "close idle keep-alive connections, and clients that take longer to send a request's headers",
        metavar="SECONDS",
    )
    timeout_handshake: float = _option(
        10.0, positive_float, "a TLS handshake not done within this time is cut off", metavar="SECONDS"
    )
    timeout_send: float = _option(
        60.0,
        positive_float,
        "a connection whose client takes nothing of its answer for this long is reset (nginx's send_timeout)",
        metavar="SECONDS",
    )
    timeout_graceful_shutdown: float = _option(
        30.0,
        positive_float,
        "on SIGTERM/SIGINT, wait this long for in-flight requests before closing them (after --shutdown-delay)",
        metavar="SECONDS",
    )
    log_level: str = _option("info", log_level, "log level: " + ", ".join(LOG_LEVELS), env="LOG_LEVEL", metavar="LEVEL")
    # Observability (issue 12, SPEC section 8).
    access_log: bool = _option(True, boolean, "one line per request (shown at --log-level info or below)", paired=True)
    log_format: str = _option(
        "text", log_format, "log lines as text, or one JSON object each", env="LOG_FORMAT", metavar="FORMAT"
    )
    metrics: bool = _option(False, boolean, "serve GET /metrics in Prometheus's text format", paired=True)
    shutdown_delay: float = _option(
        0.0,
        non_negative_float,
        "on SIGTERM/SIGINT, answer GET /ready with 503 and serve on this long before the listeners close"
        " (for a balancer to notice); --timeout-graceful-shutdown comes after it",
        metavar="SECONDS",
    )
    # The fleet (issue 15): state shared through Redis; without it, each process keeps its own.
    redis: RedisURL | None = _option(
        None,
        parse_redis_url,
        "share the auth throttle, schedule ticks and ACME certificates with the other processes and hosts"
        " of the fleet through this Redis (redis://, rediss:// with TLS, unix://); needs the redis extra",
        env="REDIS_URL",
        metavar="URL",
    )
    allowed_hosts: tuple[str, ...] = _option(
        (),
        parse_allowed_hosts,
        "Host names answered besides loopback ones while open on loopback (comma-separated;"
        " .example.org: it and its subdomains, *.example.org: its subdomains, *: any)",
        env="ALLOWED_HOSTS",
        metavar="LIST",
    )


def options() -> Iterator[Option]:
    """The option table, in declaration order."""
    for f in dataclasses.fields(Settings):
        spec = f.metadata["option"]
        yield Option(name=f.name, **{**spec, "key": spec["key"] or f.name})


OPTIONS: tuple[Option, ...] = tuple(options())


def _flatten(section: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in section.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and any(o.key.startswith(dotted + ".") for o in OPTIONS):
            yield from _flatten(value, dotted + ".")
        else:
            yield dotted, value


class Origin(NamedTuple):
    """Where a setting came from: ``source`` (a file, "command line", ...) and the ``key`` there."""

    source: str
    key: str


def resolve_settings(
    cli: Mapping[str, Any],
    env: Mapping[str, str],
    section: Mapping[str, Any],
    source: str,
) -> tuple[Settings, dict[str, Origin]]:
    """Resolve every option from its channels; return the settings and where each came from.

    ``cli`` maps option names to the strings given on the command line, ``section`` is the
    config file's ``server:`` mapping and ``source`` names that file in errors.
    """
    by_key = {o.key: o for o in OPTIONS}
    from_file = {}
    for key, value in _flatten(section):
        if key not in by_key:
            raise ConfigError(source, f"server.{key}", f"unknown option; known: {', '.join(by_key)}")
        from_file[key] = value

    values: dict[str, Any] = {}
    origins: dict[str, Origin] = {}
    for option in OPTIONS:
        if option.name in cli:
            raw, where, key = cli[option.name], "command line", option.flag
        elif option.env and option.env in env:
            raw, where, key = env[option.env], "environment", option.env
        elif option.key in from_file:
            raw, where, key = from_file[option.key], source, f"server.{option.key}"
        else:
            origins[option.name] = Origin("default", option.flag)
            continue
        try:
            values[option.name] = option.parse(raw)
        except ValueError as exc:
            raise ConfigError(where, key, str(exc)) from None
        origins[option.name] = Origin(where, key)
    return Settings(**values), origins
