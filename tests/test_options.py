"""Each option on each channel, and the precedence command line > environment > file > default."""

from __future__ import annotations

import pytest

from aioserver.errors import ConfigError
from aioserver.fleet import RedisURL
from aioserver.options import OPTIONS, Settings, resolve_settings

# name -> (a valid value as a string, the same value parsed, an invalid value)
SAMPLES = {
    "host": ("0.0.0.0", "0.0.0.0", " "),
    "port": ("9001", 9001, "70000"),
    "ssl_certfile": ("/etc/cert.pem", "/etc/cert.pem", ""),
    "ssl_keyfile": ("/etc/key.pem", "/etc/key.pem", " "),
    "ssl_keyfile_password_file": ("/run/pw", "/run/pw", ""),
    "ssl_ca_certs": ("/etc/ca.pem", "/etc/ca.pem", ""),
    "ssl_cert_reqs": ("Optional", "optional", "sometimes"),
    "ssl_watch_interval": ("0", 0.0, "-5"),
    "acme_domain": ("API.example.com,www.example.com", ("api.example.com", "www.example.com"), "*.example.com"),
    "acme_email": ("ops@example.com", "ops@example.com", "ops"),
    "acme_directory": ("https://acme-staging-v02.api.letsencrypt.org/directory",) * 2 + ("http://ca.test/dir",),
    "acme_ca_certs": ("/etc/acme-ca.pem", "/etc/acme-ca.pem", ""),
    "acme_state_dir": ("/var/lib/aioserver", "/var/lib/aioserver", " "),
    "redirect_http": ("8080", 8080, "-1"),
    "allow_insecure_http": ("true", True, "maybe"),
    "uds": ("/run/aioserver/http.sock", "/run/aioserver/http.sock", ""),
    "trusted_proxies": ("127.0.0.1, 10.0.0.0/8,::1", ("127.0.0.1/32", "10.0.0.0/8", "::1/128"), "10.0.0.1/8"),
    "workers": ("4", 4, "0"),
    "timeout_worker_healthcheck": ("2.5", 2.5, "0"),
    "loop": ("AsyncIO", "asyncio", "trio"),
    "schedules": ("false", False, "sometimes"),
    "max_body_size": ("1024", 1024, "-1"),
    "limit_concurrency": ("8", 8, "0"),
    "limit_connections": ("50", 50, "many"),
    "timeout_workflow": ("0.5", 0.5, "-3"),
    "timeout_request_body": ("10", 10.0, "inf"),
    "max_line_size": ("4096", 4096, "0"),
    "max_field_size": ("4096", 4096, "1.5"),
    "max_headers": ("32", 32, "x"),
    "timeout_keep_alive": ("2.5", 2.5, "soon"),
    "timeout_handshake": ("3", 3.0, "-1"),
    "timeout_send": ("20", 20.0, "never"),
    "timeout_graceful_shutdown": ("4", 4.0, "0"),
    "log_level": ("DEBUG", "debug", "loud"),
    "access_log": ("false", False, "maybe"),
    "log_format": ("JSON", "json", "xml"),
    "metrics": ("on", True, "2"),
    "shutdown_delay": ("0", 0.0, "-1"),
    "redis": ("redis://:pw@db:6379/1", RedisURL("redis://:pw@db:6379/1"), "http://db"),
    "allowed_hosts": ("Example.org, .corp.test", ("example.org", ".corp.test"), "example.org:80"),
}


def test_every_option_has_samples() -> None:
    assert set(SAMPLES) == {o.name for o in OPTIONS}


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_default(option) -> None:  # type: ignore[no-untyped-def]
    settings, origins = resolve_settings({}, {}, {}, "config.yml")
    assert getattr(settings, option.name) == option.default == getattr(Settings(), option.name)
    assert origins[option.name].source == "default"


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_precedence(option) -> None:  # type: ignore[no-untyped-def]
    text, parsed, _ = SAMPLES[option.name]
    other = str(option.default)
    section = {option.key: text}
    env = {option.env: text} if option.env else {}

    settings, origins = resolve_settings({}, {}, section, "config.yml")
    assert (getattr(settings, option.name), origins[option.name].source) == (parsed, "config.yml")

    if option.env:
        settings, origins = resolve_settings({}, env, {option.key: other}, "config.yml")
        assert (getattr(settings, option.name), origins[option.name].source) == (parsed, "environment")

    settings, origins = resolve_settings(
        {option.name: text}, {option.env: other} if option.env else {}, {option.key: other}, "config.yml"
    )
    assert (getattr(settings, option.name), origins[option.name].source) == (parsed, "command line")


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_invalid_value_names_channel_and_key(option) -> None:  # type: ignore[no-untyped-def]
    bad = SAMPLES[option.name][2]
    with pytest.raises(ConfigError) as cli_error:
        resolve_settings({option.name: bad}, {}, {}, "config.yml")
    assert str(cli_error.value).startswith(f"command line: {option.flag}: expected")

    with pytest.raises(ConfigError) as file_error:
        resolve_settings({}, {}, {option.key: bad}, "config.yml")
    assert str(file_error.value).startswith(f"config.yml: server.{option.key}: expected")

    if option.env:
        with pytest.raises(ConfigError) as env_error:
            resolve_settings({}, {option.env: bad}, {}, "config.yml")
        assert str(env_error.value).startswith(f"environment: {option.env}: expected")


@pytest.mark.parametrize(
    ("section", "key"),
    [({"prot": 1}, "server.prot"), ({"port": {"x": 1}}, "server.port")],
)
def test_unknown_or_misshapen_file_keys(section, key) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as error:
        resolve_settings({}, {}, section, "config.yml")
    assert (error.value.source, error.value.key) == ("config.yml", key)


@pytest.mark.parametrize("value", [True, 8000.5, None, [8000]])
def test_yaml_types_are_checked(value) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="server.port: expected"):
        resolve_settings({}, {}, {"port": value}, "config.yml")


def test_typed_yaml_values() -> None:
    settings, _ = resolve_settings({}, {}, {"port": 8080, "timeout_keep_alive": 3}, "config.yml")
    assert (settings.port, settings.timeout_keep_alive) == (8080, 3.0)
