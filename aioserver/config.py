"""The config document: where it comes from, its sections, and the resolved :class:`Config`.

Top-level sections: ``server`` (settings, see :mod:`aioserver.options`), ``workflow``
(see :mod:`aioserver.workflow.spec`), and pipeline sections: a built-in's name or a dotted
path to a class, mapping to its keyword arguments, as in txtai.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import plugins, systemd
from .auth import Token, TokenSources, token_sources
from .autocert import AcmeSettings, StateDirectory
from .clientcerts import Client, ClientSources, client_sources
from .errors import ConfigError
from .options import Origin, Settings, resolve_settings
from .tls import Password, ReloadableContext, TLSError, TLSFiles
from .workflow import Action, Workflow
from .workflow.actions import ActionResolver, is_pipeline_name
from .workflow.processes import ProcessSlots
from .workflow.safeopen import SafeOpen, parse_safeopen
from .workflow.spec import parse_workflows
from .workflow.tasks import Retrieve

if TYPE_CHECKING:
    from .jwtauth import JWTVerifier

logger = logging.getLogger("aioserver.config")

DEFAULT_SOURCE = "<embedded default config>"
INLINE_SOURCE = "<inline config>"
SECTIONS = ("server", "workflow", "safeopen", "auth", "dependencies", "extensions")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
# Environment variables that hold secrets: read once, while the config is built; the command
# line then takes them out of the process environment (cli.forget_secrets).
SECRET_VARIABLES = ("SSL_KEYFILE_PASSWORD", "TOKEN", "REDIS_URL")  # a key password; a token's hash; a password in a URL


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the app needs, resolved and validated; :func:`create_app` reads nothing else."""

    settings: Settings = field(default_factory=Settings)
    workflows: Mapping[str, Workflow] = field(default_factory=dict)
    # The config's pipeline sections (textractor: {...}, txtai.pipeline.X: {...}), by name:
    # the built-in ones get txtai's routes (/segment, ...).
    pipelines: Mapping[str, Action] = field(default_factory=dict)
    # The actions named by a dotted path (txtai.pipeline.Textractor, myactions.fetch): code that
    # opens what it opens itself, outside safeopen, which only the built-ins go through.
    dotted_paths: tuple[str, ...] = ()
    source: str = INLINE_SOURCE
    origins: Mapping[str, Origin] = field(default_factory=dict)  # setting name -> where it came from
    tokens: tuple[Token, ...] = ()
    token_sources: TokenSources = field(default_factory=TokenSources)  # read again on SIGHUP
    # auth.jwt: the identity provider's key set (a file's read again on SIGHUP, a URL's fetched).
    jwt: JWTVerifier | None = None
    # auth.clients: client certificates as identities (clientcerts.py); None: not configured.
    clients: tuple[Client, ...] = ()
    client_sources: ClientSources | None = None  # the config file's auth.clients, read again on SIGHUP
    tls: ReloadableContext | None = None
    # ACME (--acme-domain): tls then serves the state directory's files, loaded once obtained.
    acme: AcmeSettings | None = None
    dependencies: tuple[plugins.Plugin, ...] = ()
    extensions: tuple[plugins.Plugin, ...] = ()
    safeopen: SafeOpen = field(default_factory=SafeOpen)  # what workflows may open
    # Whether a TLS proxy may stand in front: trusted_proxies, --uds or an activated Unix socket.
    proxied: bool = False
    # Whether every listener is on a loopback address, decided once: an open service listening
    # only there answers loopback Host names only (browser.py, against DNS rebinding).
    loopback_only: bool = True
    # The slots of the worker-process pool, made by the parent of --workers before it forks so
    # that all workers share one bound; None: each app's pool has slots of its own.
    process_slots: ProcessSlots | None = None
    # With --metrics and --workers: the directory where the workers keep their metrics, made
    # by the parent (metrics.WorkerFiles); None: each process keeps its own in memory.
    metrics_dir: str | None = None


def read_document(location: str | None) -> tuple[dict[str, Any], str]:
    """The parsed YAML and a name for it: the embedded default, a file, or inline YAML (as txtai)."""
    if location is None:
        text, source = resources.files(__package__).joinpath("default.yml").read_text("utf-8"), DEFAULT_SOURCE
    elif os.path.exists(location) or not _looks_inline(location):
        source = location
        try:
            with open(location, encoding="utf-8") as file:
                text = file.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(location, None, f"cannot read config: {getattr(exc, 'strerror', None) or exc}") from None
    else:
        text, source = location, INLINE_SOURCE

    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(source, None, f"invalid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(source, None, "expected a mapping of sections at the top level")
    return document, source


def _looks_inline(location: str) -> bool:
    """Whether a config location is YAML text rather than a path (txtai accepts both)."""
    return "\n" in location or ": " in location or location.lstrip().startswith("{")


def build_config(
    document: Mapping[str, Any],
    source: str,
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Validate a parsed document against the command line and environment; build the Config."""
    pipelines = {}
    for name, section in document.items():
        if name in SECTIONS:
            continue
        if not isinstance(name, str) or not is_pipeline_name(name):
            raise ConfigError(
                source,
                str(name),
                f"unknown section; expected {', '.join(SECTIONS)}, a built-in pipeline or a dotted path to a class",
            )
        pipelines[name] = section

    server = document.get("server") or {}
    if not isinstance(server, Mapping):
        raise ConfigError(source, "server", "expected a mapping of options")
    env = env or {}
    settings, origins = resolve_settings(cli or {}, env, server, source)
    acme = _acme(settings, origins, env)
    if settings.metrics and importlib.util.find_spec("prometheus_client") is None:
        raise ConfigError(*origins["metrics"], "needs the metrics extra: pip install 'aioserver[metrics]'")
    if settings.redis and importlib.util.find_spec("redis") is None:
        raise ConfigError(*origins["redis"], "needs the redis extra: pip install 'aioserver[redis]'")
    safeopen = parse_safeopen(document.get("safeopen"), source)
    state_directory = env.get("STATE_DIRECTORY", "").split(":")[0] or None  # systemd's: the first of them
    resolver = ActionResolver(pipelines, source)
    workflows = parse_workflows(document.get("workflow"), resolver, source, safeopen, state_directory)
    # A config file's auth.tokens and auth.clients are read again on SIGHUP; inline YAML cannot be.
    config_file = None if source in (DEFAULT_SOURCE, INLINE_SOURCE) else source
    sources = token_sources(document.get("auth"), env, source, config_file)
    tokens = tuple(dataclasses.replace(sources, path=None).load())  # auth.tokens as just read, not the file again
    jwt = _jwt(document.get("auth"), source)
    clients = client_sources(document.get("auth"), source, config_file)
    if acme:
        _keep_workflows_out(acme, safeopen, workflows, source)
    tls = _acme_tls(settings, acme) if acme else _tls(settings, origins, env)
    activated = systemd.activated_addresses(env)
    _refuse_clear_text_tokens(settings, origins, bool(tokens) or jwt is not None, tls, activated)
    proxied = bool(settings.trusted_proxies or settings.uds) or any(f == socket.AF_UNIX for f, _ in activated)
    if clients is not None:
        _check_client_tls(settings, origins, tls, proxied, source)
    return Config(
        settings=settings,
        workflows=workflows,
        pipelines=resolver.sections(),
        dotted_paths=tuple(resolver.dotted_paths()),
        source=source,
        origins=origins,
        safeopen=safeopen,
        tokens=tokens,
        token_sources=sources,
        jwt=jwt,
        clients=clients.fixed if clients else (),
        client_sources=clients,
        tls=tls,
        acme=acme,
        dependencies=plugins.load_plugins("dependencies", document, env, source),
        extensions=plugins.load_plugins("extensions", document, env, source),
        proxied=proxied,
        loopback_only=_loopback_only(settings, activated),
    )


def _jwt(auth: Any, source: str) -> JWTVerifier | None:
    """The verifier of ``auth.jwt`` (token_sources has checked the section's shape), or None."""
    if not isinstance(auth, Mapping) or auth.get("jwt") is None:
        return None
    if importlib.util.find_spec("jwt") is None or importlib.util.find_spec("cryptography") is None:
        raise ConfigError(source, "auth.jwt", "needs the jwt extra: pip install 'aioserver[jwt]'")
    # An extra, which the default install lacks: imported only when asked for.
    from .jwtauth import load_verifier

    return load_verifier(auth["jwt"], source)


def _check_client_tls(
    settings: Settings, origins: Mapping[str, Origin], tls: ReloadableContext | None, proxied: bool, source: str
) -> None:
    """auth.clients needs this server's own TLS to ask for client certificates and verify them.

    Not behind a TLS proxy: the certificate the handshake sees is the proxy's, and one the proxy
    passed in a header could be checked against the CA only by code of our own (see README).
    """
    if tls is None:
        raise ConfigError(
            source,
            "auth.clients",
            "client certificates need HTTPS served by aioserver itself: give ssl_certfile and ssl_keyfile"
            " (or acme_domain), and ssl_ca_certs",
        )
    if not tls.files.ca_certs:
        raise ConfigError(
            source, "auth.clients", "needs ssl_ca_certs: the CA that issues the client certificates to verify"
        )
    if settings.ssl_cert_reqs == "none":
        raise ConfigError(
            *origins["ssl_cert_reqs"], "is none: auth.clients needs client certificates (optional or required)"
        )
    if proxied:
        raise ConfigError(
            source,
            "auth.clients",
            "client certificates cannot be used behind a TLS proxy (trusted_proxies, --uds or a Unix socket):"
            " the proxy ends TLS, so aioserver never sees its clients' certificates; let the clients reach"
            " aioserver's HTTPS directly, or have the proxy check them and use tokens behind it",
        )


def _loopback_only(settings: Settings, activated: list[tuple[int, Any]]) -> bool:
    """Whether every socket served is on a loopback address: the activated ones, else host's.

    A host name is resolved as the listeners will resolve it (``localhost``, or a name
    /etc/hosts maps to 127.0.1.1, is loopback). A name that does not resolve counts as
    loopback: the server will not start on it anyway, and the Host check stays on.
    """
    if activated:
        addresses = [address[0] for family, address in activated if family in (socket.AF_INET, socket.AF_INET6)]
        return len(addresses) == len(activated) and all(_is_loopback(a) for a in addresses)
    if settings.uds:
        return False
    try:
        addresses = [str(ipaddress.ip_address(settings.host))]
    except ValueError:
        try:
            infos = socket.getaddrinfo(settings.host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except (socket.gaierror, UnicodeError):
            return True
        addresses = [str(info[4][0]) for info in infos]
    return all(_is_loopback(a) for a in addresses)


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.partition("%")[0])  # a scoped IPv6 address: fe80::1%eth0
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _tls(settings: Settings, origins: dict[str, Origin], env: Mapping[str, str]) -> ReloadableContext | None:
    keyfile = settings.ssl_keyfile
    credential = os.path.join(env.get("CREDENTIALS_DIRECTORY", ""), "tls.key")
    if keyfile is None and env.get("CREDENTIALS_DIRECTORY") and os.path.exists(credential):
        keyfile, origins["ssl_keyfile"] = credential, Origin("credentials", credential)
    if settings.ssl_certfile is None:
        for name in ("ssl_keyfile", "ssl_keyfile_password_file", "ssl_ca_certs", "ssl_cert_reqs", "redirect_http"):
            if origins[name].source not in ("default", "credentials"):
                raise ConfigError(*origins[name], "needs ssl_certfile: it only applies to HTTPS")
        return None

    password, password_file = None, None
    # The file named on the command line wins over the environment's password, which wins
    # over the file named in the config. A file is read again at each reload (tls.py).
    if settings.ssl_keyfile_password_file and origins["ssl_keyfile_password_file"].source == "command line":
        password_file = settings.ssl_keyfile_password_file
    elif env.get("SSL_KEYFILE_PASSWORD"):
        password = Password(env["SSL_KEYFILE_PASSWORD"])
    elif settings.ssl_keyfile_password_file:
        password_file = settings.ssl_keyfile_password_file
    files = TLSFiles(
        settings.ssl_certfile, keyfile, password, settings.ssl_ca_certs, settings.ssl_cert_reqs, password_file
    )
    try:
        return ReloadableContext(files)
    except TLSError as exc:
        raise ConfigError(*origins[exc.option], exc.problem) from None


def _acme(settings: Settings, origins: dict[str, Origin], env: Mapping[str, str]) -> AcmeSettings | None:
    """The ACME settings, checked (SPEC section 6); None when ``acme_domain`` is not given."""
    if not settings.acme_domain:
        for name in ("acme_email", "acme_ca_certs", "acme_state_dir"):
            if origins[name].source != "default":
                raise ConfigError(*origins[name], "needs acme_domain: it only applies to ACME")
        if origins["acme_directory"].source != "default":
            raise ConfigError(*origins["acme_directory"], "needs acme_domain: it only applies to ACME")
        return None
    where = origins["acme_domain"]
    if importlib.util.find_spec("acme") is None or importlib.util.find_spec("cryptography") is None:
        raise ConfigError(*where, "ACME needs the acme extra: pip install 'aioserver[acme]'")
    for name in ("ssl_certfile", "ssl_keyfile", "ssl_keyfile_password_file"):
        if origins[name].source not in ("default", "credentials"):
            raise ConfigError(
                *origins[name], "cannot be used with acme_domain: ACME brings its own certificate and key"
            )
    if settings.redirect_http is None:
        raise ConfigError(
            *where,
            "needs redirect_http: the CA's http-01 challenges are answered on that plain-HTTP port (80 in production)",
        )
    names = systemd.activated_names(env)
    if names and systemd.REDIRECT_NAME not in names:  # sockets passed: --redirect-http binds none
        raise ConfigError(
            "environment",
            "LISTEN_FDNAMES",
            f"ACME answers the CA's http-01 challenges on the socket named {systemd.REDIRECT_NAME}"
            f" (FileDescriptorName={systemd.REDIRECT_NAME}); systemd passed {', '.join(names)}",
        )
    # Under systemd, a directory of its own in StateDirectory=, where retrieve tasks write
    # (by default) files named by their URLs: never over the account key.
    systemd_state = env.get("STATE_DIRECTORY", "").split(":")[0]
    state_dir = settings.acme_state_dir or (os.path.join(systemd_state, "acme") if systemd_state else "")
    if not state_dir:
        raise ConfigError(*where, "needs acme_state_dir (or $STATE_DIRECTORY, which systemd sets with StateDirectory=)")
    state_origin = origins["acme_state_dir"] if settings.acme_state_dir else Origin("environment", "STATE_DIRECTORY")
    state_dir = os.path.abspath(state_dir)
    try:
        StateDirectory(state_dir, settings.acme_domain[0]).prepare()
    except OSError as exc:
        raise ConfigError(*state_origin, f"cannot use {state_dir}: {exc.strerror or exc}") from None
    if settings.acme_ca_certs:
        try:
            ssl.create_default_context(cafile=settings.acme_ca_certs)
        except (OSError, ssl.SSLError) as exc:
            problem = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
            raise ConfigError(*origins["acme_ca_certs"], f"cannot read {settings.acme_ca_certs}: {problem}") from None
    return AcmeSettings(
        settings.acme_domain, settings.acme_email, settings.acme_directory, settings.acme_ca_certs, state_dir
    )


def _keep_workflows_out(acme: AcmeSettings, safeopen: SafeOpen, workflows: Mapping[str, Workflow], source: str) -> None:
    """The ACME state holds private keys: no workflow may read it (file tasks, under
    safeopen.directory) or write in it (retrieve tasks)."""
    state = Path(acme.state_dir).resolve()
    if safeopen.directory is not None and state.is_relative_to(safeopen.directory):
        raise ConfigError(
            source,
            "safeopen.directory",
            f"holds the ACME state directory {state}: workflows could read its private keys",
        )
    for name, workflow in workflows.items():
        for task in workflow.tasks:
            for action in task.actions:
                function = action.function
                if not isinstance(function, Retrieve):
                    continue
                target = Path(function.directory)
                if target.is_relative_to(state):
                    raise ConfigError(
                        source,
                        f"workflow.{name}",
                        f"a retrieve task writes in the ACME state directory {state}: choose another directory",
                    )
                # Unflattened, a download goes to <directory>/<URL's path>, a copy to
                # <directory>/<file's path>: a path through the state directory would write in it.
                if not function.flatten and state.is_relative_to(target):
                    raise ConfigError(
                        source,
                        f"workflow.{name}",
                        f"a retrieve task with flatten: false writes in folders named by URLs under {target},"
                        f" which holds the ACME state directory {state}: choose another directory",
                    )


def _acme_tls(settings: Settings, acme: AcmeSettings) -> ReloadableContext:
    """The context that serves the state directory's certificate: loaded once there is one."""
    files = StateDirectory(acme.state_dir, acme.name).files(settings.ssl_ca_certs, settings.ssl_cert_reqs)
    return ReloadableContext(files, load=False)


def _refuse_clear_text_tokens(
    settings: Settings,
    origins: Mapping[str, Origin],
    bearer: bool,
    tls: ReloadableContext | None,
    activated: list[tuple[int, Any]],
) -> None:
    """Tokens (``bearer``: hashes or auth.jwt configured) must not cross a network in clear text (SPEC section 2).

    Satisfied by HTTPS, a loopback address, a TLS proxy (``trusted_proxies``, or a Unix socket
    that only a local proxy reaches) or ``--allow-insecure-http``. Under socket activation the
    passed sockets' own addresses are judged, not ``host``.
    """
    if not bearer or tls is not None or settings.allow_insecure_http or settings.trusted_proxies or settings.uds:
        return
    if activated:
        for family, address in activated:
            if family in (socket.AF_INET, socket.AF_INET6) and not ipaddress.ip_address(address[0]).is_loopback:
                raise ConfigError(
                    "environment",
                    "LISTEN_FDS",
                    f"tokens would travel in clear text on the activated socket {address[0]}:{address[1]}:"
                    " serve HTTPS (--ssl-certfile, --ssl-keyfile), set --trusted-proxies for a TLS proxy,"
                    " or pass --allow-insecure-http",
                )
        return
    if settings.host not in LOOPBACK_HOSTS:
        raise ConfigError(
            *origins["host"],
            f"tokens would travel in clear text on {settings.host}: serve HTTPS (--ssl-certfile, --ssl-keyfile),"
            " bind 127.0.0.1 or --uds behind a TLS proxy, set --trusted-proxies, or pass --allow-insecure-http",
        )


def reread_files(config: Config) -> Config:
    """``config`` with its token files, auth.clients, JWT key set and TLS files read again, as SIGHUP does (blocking).

    What cannot be read keeps what was in force. For the workers a supervisor forks after a
    reload (workers.py): they must start from the rotated key and tokens, not from the ones the
    service started with, or a revoked token would come back with a replaced worker.
    """
    tokens, clients = config.tokens, config.clients
    if config.client_sources is not None and config.client_sources.path:
        try:
            clients = config.client_sources.load()
        except ConfigError as exc:  # each worker logs it as an error: said once is enough
            logger.debug("auth.clients not reread: %s", exc)
    if config.token_sources.reloadable:
        try:
            tokens = tuple(config.token_sources.load())
        except ConfigError as exc:  # each worker logs it as an error: said once is enough
            logger.debug("tokens not reread: %s", exc)
    if config.jwt and not config.jwt.settings.fetched:
        try:
            config.jwt.reread_file()
        except ConfigError as exc:
            logger.debug("JWT keys not reread: %s", exc)
    if config.tls:
        try:
            config.tls.reload()
        except TLSError as exc:
            logger.debug("TLS files not reread: %s: %s", exc.option, exc)
    return dataclasses.replace(config, tokens=tokens, clients=clients)


def load_config(
    location: str | None = None,
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Read and build a Config; ``location`` is a path, inline YAML, or None for the default."""
    document, source = read_document(location)
    return build_config(document, source, cli, env)
