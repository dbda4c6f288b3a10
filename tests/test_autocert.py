"""ACME's parts that need no CA: the state directory, the certificate held, the challenge route,
the configuration rules. The orders themselves run against a real pebble in test_acme.py."""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import os
import shutil
import socket
import ssl
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import trustme
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from aioserver import autocert
from aioserver.autocert import AcmeSettings, CertificateManager, Held, StateDirectory, load_held
from aioserver.config import build_config
from aioserver.errors import ConfigError
from aioserver.server import create_redirect_app
from aioserver.systemd import Notifier
from aioserver.tls import ReloadableContext, TLSFiles

DOMAINS = ("api.aioserver.test", "www.aioserver.test")
NOW = datetime.datetime.now(datetime.UTC)


def certificate(
    names: tuple[str, ...] = DOMAINS,
    not_before: datetime.datetime = NOW - datetime.timedelta(days=1),
    not_after: datetime.datetime = NOW + datetime.timedelta(days=89),
    key: ec.EllipticCurvePrivateKey | None = None,
    alt_names: bool = True,
) -> tuple[bytes, bytes]:
    """A self-signed certificate for ``names`` (in its subjectAltName, unless not ``alt_names``:
    then only its common name holds the first) and its key, both PEM."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
    leaf = builder.sign(key, hashes.SHA256())
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


def said(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What aioserver.acme logged, each line whole."""
    return [record.getMessage() for record in caplog.records if record.name == "aioserver.acme"]


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


@contextlib.contextmanager
def unprivileged() -> Iterator[None]:
    """Run as nobody for a while, when root: root writes in any directory whatever its mode."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_prepare_fails_on_a_prepared_directory_it_cannot_write() -> None:
    """Every directory there already (mkdir says so before it asks for permission), but no file
    can be made: prepare() says so at start-up, not the first order."""
    outside = tempfile.mkdtemp()  # not under pytest's 0700 tmp_path: nobody must reach it
    try:
        os.chmod(outside, 0o755)
        state = StateDirectory(os.path.join(outside, "state"), DOMAINS[0])
        state.prepare()
        for directory in (
            state.path,
            os.path.dirname(state.certificate_dir),
            state.certificate_dir,
            state.challenge_dir,
        ):
            os.chmod(directory, 0o555)
        with unprivileged(), pytest.raises(PermissionError):
            state.prepare()
        assert sorted(os.listdir(state.path)) == ["certificates", "challenges"]
    finally:
        for directory, _, _ in os.walk(outside):
            os.chmod(directory, 0o755)
        shutil.rmtree(outside)


def test_the_state_directory_is_laid_out_as_documented(tmp_path: Path) -> None:
    """README: account.key, certificates/<first name>/fullchain.pem and key.pem; and beside them
    the CA's directory URL, the pending challenges and the lock. What one version of aioserver
    wrote, the next finds, and processes of several instances sharing the directory agree."""
    root = tmp_path / "state"
    state = StateDirectory(str(root), DOMAINS[0])
    state.prepare()
    made = sorted(path.relative_to(root).as_posix() for path in root.rglob("*"))
    assert made == ["certificates", f"certificates/{DOMAINS[0]}", "challenges"]
    certificates = root / "certificates" / DOMAINS[0]
    chain, key = certificate()
    (certificates / "fullchain.pem").write_bytes(chain)
    (certificates / "key.pem").write_bytes(key)
    (certificates / "directory").write_bytes(b"https://ca.test/dir\n")
    held = load_held(StateDirectory(str(root), DOMAINS[0]), DOMAINS)
    assert held is not None and held.chain == chain and held.directory == "https://ca.test/dir"
    assert state.files("ca.pem", "optional") == TLSFiles(
        str(certificates / "fullchain.pem"), str(certificates / "key.pem"), ca_certs="ca.pem", cert_reqs="optional"
    )
    (root / "challenges" / "tok-1").write_bytes(b"tok-1.thumb")
    assert state.challenge("tok-1") == b"tok-1.thumb"
    state.put_challenge("tok-2", "tok-2.thumb")
    assert (root / "challenges" / "tok-2").read_bytes() == b"tok-2.thumb"
    account = autocert._account_key(state)
    assert serialization.load_pem_private_key((root / "account.key").read_bytes(), None).public_key() == (
        account.public_key()
    )
    manager = CertificateManager(
        AcmeSettings(DOMAINS, None, "https://ca.test/dir", None, str(root)),
        ReloadableContext(state.files(None, None), False),
    )
    assert manager._take_lock() and manager._lock is not None
    try:
        # One lock per certificate: services for other names may share the directory.
        assert os.path.samestat(os.fstat(manager._lock), os.stat(certificates / "lock"))
    finally:
        os.close(manager._lock)


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


def test_write_makes_a_missing_directory_0700(state: StateDirectory) -> None:
    shutil.rmtree(os.path.dirname(state.certificate_dir))  # removed by hand, say
    old = os.umask(0o022)
    try:
        state.write(state.key_file, b"key")
    finally:
        os.umask(old)
    assert mode(os.path.dirname(state.certificate_dir)) == 0o700
    assert mode(state.certificate_dir) == 0o700
    assert mode(state.key_file) == 0o600


def test_a_temporary_is_made_beside_its_file_and_is_never_answered_as_a_challenge(
    state: StateDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rename is atomic within one file system: the temporary is made in the file's own
    directory, and named so (a leading dot) that the challenge route never serves one half-written."""
    renames: list[tuple[str, str, bytes | None]] = []
    rename = os.replace

    def watched(source: str, target: str) -> None:
        renames.append((source, target, state.challenge(os.path.basename(source))))
        rename(source, target)

    monkeypatch.setattr(autocert.os, "replace", watched)
    state.put_challenge("tok-1", "tok-1.thumb")
    state.write(state.key_file, b"key")
    assert [target for _, target, _ in renames] == [os.path.join(state.challenge_dir, "tok-1"), state.key_file]
    for source, target, answered in renames:
        assert os.path.dirname(source) == os.path.dirname(target)
        assert os.path.basename(source).startswith(f".{os.path.basename(target)}.")
        assert answered is None


def test_a_failed_write_raises_its_own_error_when_its_temporary_is_gone_already(
    state: StateDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process's drop_stale_challenges() may remove a temporary in the challenge directory."""

    def dropped_then_full(source: str, target: str) -> None:
        os.unlink(source)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(autocert.os, "replace", dropped_then_full)
    with pytest.raises(OSError) as caught:
        state.put_challenge("tok-1", "tok-1.thumb")
    assert caught.value.errno == errno.ENOSPC
    assert os.listdir(state.challenge_dir) == []


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
    leaf = x509.load_pem_x509_certificate(chain)
    assert (held.not_before, held.not_after) == (leaf.not_valid_before_utc, leaf.not_valid_after_utc)


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
    assert said(caplog) == [
        f"acme: the certificate held in {state.certificate_dir} or its key is unreadable: ordering a new one"
    ]


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
    assert f"cannot read the certificate or key in {state.certificate_dir}: not a regular file" in caplog.text


def test_a_key_of_another_certificate_holds_nothing(state: StateDirectory, caplog: pytest.LogCaptureFixture) -> None:
    chain, _ = certificate()
    _, other = certificate()
    hold(state, chain, other)
    with caplog.at_level(logging.INFO, "aioserver.acme"):
        assert load_held(state, DOMAINS) is None
    assert said(caplog) == [
        f"acme: the certificate held in {state.certificate_dir} does not match its key: ordering a new one"
    ]


def test_a_certificate_missing_a_name_holds_nothing(state: StateDirectory, caplog: pytest.LogCaptureFixture) -> None:
    chain, key = certificate(names=DOMAINS[:1])
    hold(state, chain, key)
    with caplog.at_level(logging.INFO, "aioserver.acme"):
        assert load_held(state, DOMAINS) is None
        assert load_held(state, DOMAINS[:1]) is not None
        assert load_held(state, (*DOMAINS, "ops.aioserver.test")) is None
    assert said(caplog) == [
        f"acme: the certificate held in {state.certificate_dir} does not name www.aioserver.test: ordering a new one",
        f"acme: the certificate held in {state.certificate_dir} does not name www.aioserver.test, ops.aioserver.test:"
        " ordering a new one",
    ]


def test_a_certificate_naming_no_alternative_names_holds_nothing(
    state: StateDirectory, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients look for the names in subjectAltName only (RFC 6125), never in the common name."""
    chain, key = certificate(names=DOMAINS[:1], alt_names=False)
    hold(state, chain, key)
    with caplog.at_level(logging.INFO, "aioserver.acme"):
        assert load_held(state, DOMAINS[:1]) is None
    assert said(caplog) == [
        f"acme: the certificate held in {state.certificate_dir} does not name api.aioserver.test: ordering a new one"
    ]


def test_an_expired_certificate_holds_nothing(state: StateDirectory, caplog: pytest.LogCaptureFixture) -> None:
    expired = NOW - datetime.timedelta(seconds=5)
    chain, key = certificate(not_before=NOW - datetime.timedelta(days=90), not_after=expired)
    hold(state, chain, key)
    with caplog.at_level(logging.INFO, "aioserver.acme"):
        assert load_held(state, DOMAINS) is None
    when = expired.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert said(caplog) == [
        f"acme: the certificate held in {state.certificate_dir} expired at {when}: ordering a new one"
    ]


@pytest.mark.parametrize(
    ("written", "directory"),
    [
        (None, None),  # from before the file was kept: taken as from the directory configured
        (b"", None),
        (b"https://ca.test/dir\n", "https://ca.test/dir"),
        (b"https://ca.test/\xff\xfedir\n", "https://ca.test/\ufffd\ufffddir"),  # damaged: another CA's, not a crash
    ],
)
def test_the_directory_a_certificate_came_from(
    state: StateDirectory, written: bytes | None, directory: str | None
) -> None:
    chain, key = certificate()
    hold(state, chain, key, written)
    held = load_held(state, DOMAINS)
    assert held is not None
    assert held.directory == directory


# -- the account key and the lock


def test_the_account_key_is_made_once_p256_and_private(state: StateDirectory) -> None:
    old = os.umask(0o022)
    try:
        key = autocert._account_key(state)
    finally:
        os.umask(old)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    assert mode(state.account_key_file) == 0o600
    assert autocert._account_key(state).private_numbers() == key.private_numbers()


@pytest.mark.parametrize("kind", ["garbage", "not-ecdsa"])
def test_an_unusable_account_key_is_made_anew(
    state: StateDirectory, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    if kind == "garbage":
        written = b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n"
    else:
        written = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    state.write(state.account_key_file, written)
    with caplog.at_level(logging.INFO, "aioserver.acme"):
        key = autocert._account_key(state)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert said(caplog) == [f"acme: {state.account_key_file} is unreadable: making a new account key"]
    stored = serialization.load_pem_private_key(Path(state.account_key_file).read_bytes(), None)
    assert isinstance(stored, ec.EllipticCurvePrivateKey)
    assert stored.private_numbers() == key.private_numbers()


def manager(state: StateDirectory) -> CertificateManager:
    settings = AcmeSettings(DOMAINS, None, "https://ca.test/dir", None, state.path)
    return CertificateManager(settings, ReloadableContext(state.files(None, None), load=False))


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_one_manager_at_a_time_holds_the_state_directory(state: StateDirectory) -> None:
    """The one that orders: the lock is the file's (flock), another open of it waits its turn."""
    first, second = manager(state), manager(state)
    old = os.umask(0o022)
    try:
        assert first._take_lock()
    finally:
        os.umask(old)
    assert first._lock is not None
    try:
        assert mode(state.lock_file) == 0o600
        # Not inherited by the programs a worker runs: they would keep the lock past its death.
        assert not os.get_inheritable(first._lock)
        before = open_descriptors()
        assert not second._take_lock()
        assert second._lock is None
        assert open_descriptors() == before
    finally:
        os.close(first._lock)  # as run() does on its way out, or the kernel when the process dies
    assert second._take_lock()
    assert second._lock is not None
    os.close(second._lock)


# -- a process that does not order: it follows the files


def test_a_follower_serves_what_is_written_once_it_is_usable(state: StateDirectory) -> None:
    follower = manager(state)
    follower._follow()  # nothing yet
    assert follower.tls.current is None and not follower.ready.is_set()

    chain, key = certificate()
    _, other_key = certificate()
    hold(state, chain, other_key)  # a pair half-replaced: not usable
    follower._follow()
    assert follower.tls.current is None and not follower.ready.is_set()

    state.write(state.key_file, key)
    follower._follow()
    assert follower.tls.current is not None and follower.ready.is_set()
    served = follower.tls.current
    follower._follow()  # nothing changed: nothing loaded again
    assert follower.tls.current is served

    renewed, renewed_key = certificate()
    state.write(state.key_file, renewed_key)  # the key first, as order() writes them
    follower._follow()
    assert follower.tls.current is served
    state.write(state.chain_file, renewed)
    follower._follow()
    assert follower.tls.current is not served
    assert not follower.tls.changed_on_disk()


def test_a_follower_keeps_what_it_serves_when_the_files_do_not_load(
    state: StateDirectory, caplog: pytest.LogCaptureFixture
) -> None:
    """load_held reads the leaf; OpenSSL reads the whole chain, here cut short after it (a full disk)."""
    follower = manager(state)
    chain, key = certificate()
    intermediate, _ = certificate()
    hold(state, chain + intermediate[: len(intermediate) // 2], key)
    with caplog.at_level(logging.INFO, "aioserver.acme"):
        follower._follow()
    assert follower.tls.current is None and not follower.ready.is_set()
    assert said(caplog) == [
        f"acme: the certificate files do not load yet ({state.chain_file} holds no PEM certificate): trying again"
    ]
    state.write(state.chain_file, chain)
    follower._follow()
    assert follower.tls.current is not None and follower.ready.is_set()


def test_systemd_is_told_to_wait_and_why_until_a_certificate_serves(state: StateDirectory) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, theirs:
        theirs.setblocking(False)
        settings = AcmeSettings(DOMAINS, None, "https://ca.test/dir", None, state.path)
        certificates = CertificateManager(
            settings, ReloadableContext(state.files(None, None), load=False), Notifier(sock=ours)
        )
        certificates.extend_start_timeout(92.5)
        assert theirs.recv(100) == b"EXTEND_TIMEOUT_USEC=92500000"
        certificates._status("acme: ordering a certificate for api.aioserver.test")
        assert theirs.recv(100) == b"STATUS=acme: ordering a certificate for api.aioserver.test"
        certificates.ready.set()
        certificates._status("acme: order for api.aioserver.test failed, retrying in 15s")  # serving: it says so
        with pytest.raises(BlockingIOError):
            theirs.recv(100)
    quiet = manager(state)  # no systemd: nothing to say, no error
    quiet.extend_start_timeout(90)
    quiet._status("acme: ordering")


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
    earlier = (NOW - datetime.timedelta(hours=1)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert autocert._seconds(earlier) == 0


def test_a_ca_that_cannot_be_reached_is_said_in_a_few_words(unused_tcp_port: int) -> None:
    with pytest.raises(requests.RequestException) as caught:
        requests.get(f"https://127.0.0.1:{unused_tcp_port}/dir", timeout=5)
    assert autocert._network_problem(caught.value) == "cannot reach the ACME server: Connection refused"


@pytest.fixture
def untrusted_tls_port(tls_certificate: trustme.LeafCert) -> Iterator[int]:
    """A TLS server on 127.0.0.1 with a certificate of conftest's CA, for one handshake."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_certificate.configure_cert(context)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        with contextlib.suppress(OSError), listener.accept()[0] as connection:
            connection.settimeout(10)
            with contextlib.suppress(OSError):
                context.wrap_socket(connection, server_side=True).close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield listener.getsockname()[1]
    finally:
        server.join(15)
        listener.close()


def test_a_ca_not_trusted_is_said_in_a_few_words(untrusted_tls_port: int, tmp_path: Path) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(other_ca)
    with pytest.raises(requests.RequestException) as caught:
        requests.get(f"https://127.0.0.1:{untrusted_tls_port}/dir", timeout=5, verify=str(other_ca))
    assert autocert._network_problem(caught.value) == "TLS with the ACME server failed: CERTIFICATE_VERIFY_FAILED"


class Refusal(Exception):
    """An exception whose ``reason`` is text, as urllib's URLError may hold."""

    reason = "refused by policy"


def chained(outer: BaseException, inner: BaseException, how: str) -> BaseException:
    """``outer`` raised while handling ``inner`` (context), from it (cause), or with it (reason)."""
    if how == "context":
        try:
            try:
                raise inner
            except BaseException:
                raise outer  # noqa: B904
        except BaseException as exc:
            return exc
    if how == "cause":
        outer.__cause__ = inner
        outer.__suppress_context__ = True
    elif how == "reason":
        outer.reason = inner  # type: ignore[attr-defined]
    return outer


def refused() -> OSError:
    return OSError(errno.ECONNREFUSED, "Connection refused")


def looped() -> BaseException:
    first, second = requests.ConnectionError("first"), ValueError("second")
    first.__context__, second.__context__ = second, first
    return first


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (
            lambda: chained(requests.ConnectionError("down"), refused(), "context"),
            "cannot reach the ACME server: Connection refused",
        ),
        (
            lambda: chained(requests.ConnectionError("down"), refused(), "cause"),
            "cannot reach the ACME server: Connection refused",
        ),
        (
            lambda: chained(requests.ConnectionError("down"), refused(), "reason"),
            "cannot reach the ACME server: Connection refused",
        ),
        (lambda: requests.ConnectionError(refused()), "cannot reach the ACME server: Connection refused"),
        (lambda: requests.ConnectionError(OSError(errno.ECONNRESET, "")), "cannot reach the ACME server: ECONNRESET"),
        (lambda: requests.ConnectionError(Refusal()), "cannot reach the ACME server (ConnectionError)"),
        (looped, "cannot reach the ACME server (ConnectionError)"),
        (lambda: requests.ReadTimeout("read timed out"), "the ACME server did not answer in time"),
        (lambda: requests.exceptions.SSLError("bad handshake"), "TLS with the ACME server failed"),
        (
            lambda: requests.exceptions.SSLError(ssl.SSLError("read error: SysCallError(-1, 'Unexpected EOF')")),
            "TLS with the ACME server failed: read error: SysCallError(-1, 'Unexpected EOF')",
        ),
        (
            lambda: requests.exceptions.SSLError(ssl.SSLError(1, "[SSL: BAD_RECORD_MAC] bad record mac")),
            "TLS with the ACME server failed: [SSL: BAD_RECORD_MAC] bad record mac",
        ),
        (lambda: requests.exceptions.SSLError(ssl.SSLError()), "TLS with the ACME server failed: SSLError"),
        (lambda: requests.TooManyRedirects("30 redirects"), "cannot reach the ACME server (TooManyRedirects)"),
    ],
)
def test_what_went_wrong_reaching_the_ca(make: Callable[[], BaseException], words: str) -> None:
    """The first errno or TLS error down the chain of causes, contexts, reasons and arguments."""
    assert autocert._network_problem(make()) == words


def test_times_are_said_in_utc_to_the_second() -> None:
    zone = os.environ.get("TZ")
    os.environ["TZ"] = "EST+5"  # a local time that is not UTC (POSIX form: no tz database needed)
    time.tzset()
    try:
        paris = datetime.timezone(datetime.timedelta(hours=2))
        assert autocert._iso(datetime.datetime(2027, 2, 28, 14, 42, 56, 999999, datetime.UTC)) == "2027-02-28T14:42:56Z"
        assert autocert._iso(datetime.datetime(2027, 2, 28, 16, 42, 56, tzinfo=paris)) == "2027-02-28T14:42:56Z"
    finally:
        if zone is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = zone
        time.tzset()


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
        assert await unknown.json() == {"error": "no such ACME challenge"}
        for path in ("/.well-known/acme-challenge/..%2faccount.key", "/.well-known/acme-challenge/../../account.key"):
            sneaky = await client.get(path, headers={"Host": "api.aioserver.test"}, allow_redirects=False)
            assert sneaky.status in (404, 308)
            assert b"secret" not in await sneaky.read()
        other = await client.get("/workflow", headers={"Host": "api.aioserver.test"}, allow_redirects=False)
        assert other.status == 308
        assert other.headers["Location"] == "https://api.aioserver.test:8443/workflow"


@pytest.mark.parametrize("method", ["HEAD", "POST", "PUT"])
async def test_only_get_answers_a_challenge(state: StateDirectory, method: str) -> None:
    """The CA fetches with GET (RFC 8555 section 8.3); any other method is redirected as ever."""
    state.put_challenge("tok-1", "tok-1.thumb")
    async with TestClient(TestServer(create_redirect_app(8443, state))) as client:
        answer = await client.request(
            method, "/.well-known/acme-challenge/tok-1", headers={"Host": "api.aioserver.test"}, allow_redirects=False
        )
        assert answer.status == 308
        assert answer.headers["Location"] == "https://api.aioserver.test:8443/.well-known/acme-challenge/tok-1"


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


def test_what_a_process_stopped_mid_order_left_is_dropped_once_stale(state: StateDirectory) -> None:
    """Answers and temporaries older than any order: dropped by the next leader; fresher ones may
    be another process's order under way, and the files in force stay whatever their age."""
    old = time.time() - autocert.STALE_CHALLENGE - 60
    paths = {
        "old answer": Path(state.challenge_dir, "tok-old"),
        "fresh answer": Path(state.challenge_dir, "tok-new"),
        "old temporary": Path(state.certificate_dir, ".key.pem.abc123"),
        "fresh temporary": Path(state.certificate_dir, ".key.pem.def456"),
        "key in force": Path(state.key_file),
    }
    for path in paths.values():
        path.write_bytes(b"x")
    for name in ("old answer", "old temporary", "key in force"):
        os.utime(paths[name], (old, old))
    state.drop_stale_challenges()
    assert {name for name, path in paths.items() if path.exists()} == {
        "fresh answer",
        "fresh temporary",
        "key in force",
    }
