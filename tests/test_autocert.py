"""ACME's parts that need no CA: the state directory, the certificate held, the challenge route,
the configuration rules. The orders themselves run against a real pebble in test_acme.py."""

from __future__ import annotations

import datetime
import errno
import logging
import os
import stat
from pathlib import Path

import pytest
import requests
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from aioserver import autocert
from aioserver.autocert import AcmeSettings, Held, StateDirectory, load_held
from aioserver.config import build_config
from aioserver.errors import ConfigError
from aioserver.server import create_redirect_app

DOMAINS = ("api.aioserver.test", "www.aioserver.test")
NOW = datetime.datetime.now(datetime.UTC)


def certificate(
    names: tuple[str, ...] = DOMAINS,
    not_before: datetime.datetime = NOW - datetime.timedelta(days=1),
    not_after: datetime.datetime = NOW + datetime.timedelta(days=89),
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[bytes, bytes]:
    """A self-signed certificate for ``names`` and its key, both PEM."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    leaf = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return leaf.public_bytes(serialization.Encoding.PEM), pem


@pytest.fixture
def state(tmp_path: Path) -> StateDirectory:
    directory = StateDirectory(str(tmp_path / "state"), DOMAINS[0])
    directory.prepare()
    return directory


def hold(state: StateDirectory, chain: bytes, key: bytes, directory: bytes | None = b"https://ca.test/dir\n") -> None:
    state.write(state.key_file, key)
    state.write(state.chain_file, chain)
    if directory is not None:
        state.write(state.directory_file, directory)


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- the state directory


def test_prepare_makes_every_directory_0700(state: StateDirectory) -> None:
    for directory in (state.path, os.path.dirname(state.certificate_dir), state.certificate_dir, state.challenge_dir):
        assert mode(directory) == 0o700, directory


def test_prepare_fails_on_a_directory_it_cannot_write(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes anywhere: a file in the way instead
        (tmp_path / "state").rmdir()
        (tmp_path / "state").write_text("not a directory")
    with pytest.raises(OSError):
        StateDirectory(str(tmp_path / "state"), DOMAINS[0]).prepare()


def test_write_replaces_whole_files_mode_0600_leaving_no_temporary(state: StateDirectory) -> None:
    old = os.umask(0o022)  # a usual umask: mkstemp's 0600 holds whatever it is
    try:
        state.write(state.key_file, b"one")
        state.write(state.key_file, b"two")
    finally:
        os.umask(old)
    assert Path(state.key_file).read_bytes() == b"two"
    assert mode(state.key_file) == 0o600
    assert os.listdir(state.certificate_dir) == ["key.pem"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    state: StateDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    state.write(state.key_file, b"old")

    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(autocert.os, "replace", full_disk)
    with pytest.raises(OSError):
        state.write(state.key_file, b"new")
    assert Path(state.key_file).read_bytes() == b"old"
    assert os.listdir(state.certificate_dir) == ["key.pem"]


def test_files_staged_together_replace_nothing_until_all_are_written(
    state: StateDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new key and chain: a disk filling up between the two leaves the pair in force whole."""
    state.write(state.key_file, b"old key")
    state.write(state.chain_file, b"old chain")
    staged = state.stage(state.key_file, b"new key")
    written = []

    def full_disk(descriptor: int) -> None:
        written.append(descriptor)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(autocert.os, "fsync", full_disk)
    with pytest.raises(OSError):
        state.stage(state.chain_file, b"new chain", staged)
    assert written and staged.files == []
    assert Path(state.key_file).read_bytes() == b"old key" and Path(state.chain_file).read_bytes() == b"old chain"
    assert sorted(os.listdir(state.certificate_dir)) == ["fullchain.pem", "key.pem"]  # no temporary left
    monkeypatch.undo()
    state.replace(state.stage(state.chain_file, b"new chain", state.stage(state.key_file, b"new key")))
    assert Path(state.key_file).read_bytes() == b"new key" and Path(state.chain_file).read_bytes() == b"new chain"
    assert sorted(os.listdir(state.certificate_dir)) == ["fullchain.pem", "key.pem"]


@pytest.mark.parametrize("token", ["", "../account.key", "a/b", "a.b", "%2e%2e", "x" * 257, "tok en"])
def test_a_challenge_token_that_is_not_base64url_reads_nothing(state: StateDirectory, token: str) -> None:
    Path(state.path, "account.key").write_bytes(b"secret")
    assert state.challenge(token) is None


def test_a_challenge_answer_is_stored_read_and_dropped(state: StateDirectory) -> None:
    state.put_challenge("Tok_en-1", "Tok_en-1.thumbprint")
    assert state.challenge("Tok_en-1") == b"Tok_en-1.thumbprint"
    assert mode(os.path.join(state.challenge_dir, "Tok_en-1")) == 0o600
    state.drop_challenge("Tok_en-1")
    state.drop_challenge("Tok_en-1")  # twice: nothing to drop is no error
    assert state.challenge("Tok_en-1") is None


# -- the certificate held


def test_a_certificate_for_every_name_with_its_key_is_held(state: StateDirectory) -> None:
    chain, key = certificate()
    hold(state, chain, key)
    held = load_held(state, DOMAINS)
    assert held is not None
    assert held.chain == chain
    assert held.directory == "https://ca.test/dir"
    assert held.not_after == x509.load_pem_x509_certificate(chain).not_valid_after_utc


def test_nothing_is_held_without_both_files(state: StateDirectory) -> None:
    chain, key = certificate()
    assert load_held(state, DOMAINS) is None
    state.write(state.chain_file, chain)
    assert load_held(state, DOMAINS) is None
    os.unlink(state.chain_file)
    state.write(state.key_file, key)
    assert load_held(state, DOMAINS) is None


@pytest.mark.parametrize("broken", ["chain", "key"])
def test_a_corrupt_file_holds_nothing_and_says_so(
    state: StateDirectory, broken: str, caplog: pytest.LogCaptureFixture
) -> None:
    chain, key = certificate()
    hold(
        state,
        b"-----BEGIN CERTIFICATE-----\nnot base64\n" if broken == "chain" else chain,
        key if broken == "chain" else b"garbage",
    )
    with caplog.at_level(logging.INFO, "aioserver.acme"):
        assert load_held(state, DOMAINS) is None
    assert "unreadable: ordering a new one" in caplog.text


def test_a_file_that_cannot_be_read_holds_nothing_and_says_so(
    state: StateDirectory, caplog: pytest.LogCaptureFixture
) -> None:
    """An I/O error (here a directory where the chain should be) is no crash: the manager would
    stop there, and renew nothing ever again."""
    _, key = certificate()
    state.write(state.key_file, key)
    os.mkdir(state.chain_file)
    with caplog.at_level(logging.INFO, "aioserver.acme"):
        assert load_held(state, DOMAINS) is None
    assert f"cannot read the certificate or key in {state.certificate_dir}: Is a directory" in caplog.text


def test_a_key_of_another_certificate_holds_nothing(state: StateDirectory, caplog: pytest.LogCaptureFixture) -> None:
    chain, _ = certificate()
    _, other = certificate()
    hold(state, chain, other)
    with caplog.at_level(logging.INFO, "aioserver.acme"):
        assert load_held(state, DOMAINS) is None
    assert "does not match its certificate" in caplog.text


def test_a_certificate_missing_a_name_holds_nothing(state: StateDirectory, caplog: pytest.LogCaptureFixture) -> None:
    chain, key = certificate(names=DOMAINS[:1])
    hold(state, chain, key)
    with caplog.at_level(logging.INFO, "aioserver.acme"):
        assert load_held(state, DOMAINS) is None
        assert load_held(state, DOMAINS[:1]) is not None
    assert "does not name www.aioserver.test" in caplog.text


def test_an_expired_certificate_holds_nothing(state: StateDirectory) -> None:
    chain, key = certificate(
        not_before=NOW - datetime.timedelta(days=90), not_after=NOW - datetime.timedelta(seconds=5)
    )
    hold(state, chain, key)
    assert load_held(state, DOMAINS) is None


def test_renewal_comes_when_a_third_of_the_lifetime_is_left_a_little_earlier_at_random() -> None:
    start = NOW
    held = Held(start, start + datetime.timedelta(days=90), None, b"")
    times = [held.renew_at() for _ in range(200)]
    assert all(start + datetime.timedelta(days=57) <= t <= start + datetime.timedelta(days=60) for t in times)
    assert len(set(times)) > 1  # jitter


# -- what the CA says


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert autocert._seconds("120") == 120
    assert autocert._seconds(None) is None
    assert autocert._seconds("soon") is None
    # From now, not from NOW (the module's import): under xdist this test may run minutes later.
    later = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert 3500 < (autocert._seconds(later) or 0) <= 3600


def test_a_ca_that_cannot_be_reached_is_said_in_a_few_words(unused_tcp_port: int) -> None:
    with pytest.raises(requests.RequestException) as caught:
        requests.get(f"https://127.0.0.1:{unused_tcp_port}/dir", timeout=5)
    assert autocert._network_problem(caught.value) == "cannot reach the ACME server: Connection refused"


# -- the plain listener


async def test_the_plain_listener_answers_challenges_and_redirects_the_rest(state: StateDirectory) -> None:
    state.put_challenge("tok-1", "tok-1.thumb")
    Path(state.path, "account.key").write_bytes(b"secret")
    async with TestClient(TestServer(create_redirect_app(8443, state))) as client:
        answer = await client.get("/.well-known/acme-challenge/tok-1", headers={"Host": "api.aioserver.test"})
        assert answer.status == 200
        assert await answer.read() == b"tok-1.thumb"
        assert answer.content_type == "application/octet-stream"
        unknown = await client.get("/.well-known/acme-challenge/tok-2", headers={"Host": "api.aioserver.test"})
        assert unknown.status == 404
        assert (await unknown.json())["error"]
        for path in ("/.well-known/acme-challenge/..%2faccount.key", "/.well-known/acme-challenge/../../account.key"):
            sneaky = await client.get(path, headers={"Host": "api.aioserver.test"}, allow_redirects=False)
            assert sneaky.status in (404, 308)
            assert b"secret" not in await sneaky.read()
        other = await client.get("/workflow", headers={"Host": "api.aioserver.test"}, allow_redirects=False)
        assert other.status == 308
        assert other.headers["Location"] == "https://api.aioserver.test:8443/workflow"


async def test_without_acme_there_is_no_challenge_route(state: StateDirectory) -> None:
    state.put_challenge("tok-1", "tok-1.thumb")
    async with TestClient(TestServer(create_redirect_app(443))) as client:
        answer = await client.get("/.well-known/acme-challenge/tok-1", allow_redirects=False)
        assert answer.status == 308


# -- the configuration


def acme_config(tmp_path: Path, document: dict[str, object] | None = None, **cli: str) -> object:
    options = {"acme_domain": "api.aioserver.test", "redirect_http": "8080", "acme_state_dir": str(tmp_path / "acme")}
    return build_config(document or {}, "config.yml", {**options, **cli}, {})


def test_acme_settings_come_from_the_options(tmp_path: Path) -> None:
    config = build_config(
        {},
        "config.yml",
        {
            "acme_domain": "API.aioserver.test,www.aioserver.test",
            "redirect_http": "80",
            "acme_email": "ops@aioserver.test",
        },
        {"STATE_DIRECTORY": f"{tmp_path}:/elsewhere"},
    )
    assert config.acme == AcmeSettings(
        DOMAINS, "ops@aioserver.test", "https://acme-v02.api.letsencrypt.org/directory", None, str(tmp_path / "acme")
    )
    assert config.tls is not None and config.tls.current is None  # nothing to serve until ordered
    assert mode(str(tmp_path / "acme")) == 0o700


@pytest.mark.parametrize(
    ("cli", "key", "problem"),
    [
        ({"ssl_certfile": "cert.pem"}, "--ssl-certfile", "ACME brings its own certificate"),
        ({"redirect_http": None}, "--acme-domain", "needs redirect_http"),
        ({"acme_state_dir": None}, "--acme-domain", "needs acme_state_dir"),
        ({"acme_ca_certs": "/nonexistent/ca.pem"}, "--acme-ca-certs", "cannot read /nonexistent/ca.pem"),
    ],
)
def test_acme_misconfigured(tmp_path: Path, cli: dict[str, str | None], key: str, problem: str) -> None:
    options = {"acme_domain": "api.aioserver.test", "redirect_http": "8080", "acme_state_dir": str(tmp_path / "acme")}
    options.update(cli)
    with pytest.raises(ConfigError) as caught:
        build_config({}, "config.yml", {k: v for k, v in options.items() if v is not None}, {})
    assert caught.value.key == key
    assert problem in str(caught.value)


def test_acme_options_without_a_domain_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config({}, "config.yml", {"acme_email": "ops@aioserver.test"}, {})
    assert "needs acme_domain" in str(caught.value)


def test_workflows_may_not_read_the_acme_state(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        acme_config(tmp_path, {"safeopen": {"directory": str(tmp_path)}})
    assert caught.value.key == "safeopen.directory"
    assert "private keys" in str(caught.value)


def test_workflows_may_not_write_in_the_acme_state(tmp_path: Path) -> None:
    (tmp_path / "acme").mkdir()
    document = {"workflow": {"fetch": {"tasks": [{"task": "retrieve", "directory": str(tmp_path / "acme")}]}}}
    with pytest.raises(ConfigError) as caught:
        acme_config(tmp_path, document)
    assert caught.value.key == "workflow.fetch"
    # Beside it is fine.
    (tmp_path / "downloads").mkdir()
    document = {"workflow": {"fetch": {"tasks": [{"task": "retrieve", "directory": str(tmp_path / "downloads")}]}}}
    acme_config(tmp_path, document)


async def test_the_names_of_the_certificate_are_allowed_hosts(tmp_path: Path) -> None:
    from aioserver.app import create_app

    config = acme_config(tmp_path)
    async with TestClient(TestServer(create_app(config))) as client:  # type: ignore[arg-type]
        assert (await client.get("/health", headers={"Host": "api.aioserver.test"})).status == 200
        assert (await client.get("/health", headers={"Host": "evil.test"})).status == 400
