"""--ssl-watch-interval: certificate, key and CA files reloaded when their content changes on disk."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import http.client
import json
import logging
import os
import re
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from aioserver import tls as tls_module
from aioserver.tls import ReloadableContext, TLSError, TLSFiles
from aioserver.watch import FileWatch, in_reload_thread, watch_tls_files

from conftest import PemFiles, Server

WHOAMI = "extensions: [sample_plugins.add_whoami]"
INTERVAL = "0.5"
WAIT = 15.0  # seconds: a generous bound for what takes two intervals (a second), under load


class Files:
    """A certificate, its key and a CA file in a test's folder, rewritten as a deployment's tools would."""

    def __init__(self, folder: Path, ca: trustme.CA) -> None:
        self.ca = ca
        self.cert, self.key, self.ca_file = folder / "cert.pem", folder / "key.pem", folder / "ca.pem"
        ca.cert_pem.write_to_path(self.ca_file)
        self.leaves: dict[str, trustme.LeafCert] = {}

    def leaf(self, name: str) -> trustme.LeafCert:
        if name not in self.leaves:
            self.leaves[name] = self.ca.issue_cert("localhost", "127.0.0.1", common_name=name)
        return self.leaves[name]

    def install(self, name: str, cert: bool = True, key: bool = True) -> None:
        """Write the certificate named ``name`` and/or its key, each atomically (temp + rename)."""
        leaf = self.leaf(name)
        if cert:
            replace(self.cert, leaf.cert_chain_pems[0].bytes())
        if key:
            replace(self.key, leaf.private_key_pem.bytes())

    def args(self) -> tuple[str, ...]:
        return ("--ssl-certfile", str(self.cert), "--ssl-keyfile", str(self.key))


def replace(path: Path, content: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(content)
    temporary.replace(path)


@pytest.fixture
def files(tmp_path: Path, tls_certificate_authority: trustme.CA) -> Files:
    return Files(tmp_path, tls_certificate_authority)


def client_context(ca: Path, client: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(client)
    return context


def served(port: int, ca: Path) -> str:
    """The common name of the certificate a new connection to ``port`` gets."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with client_context(ca).wrap_socket(sock, server_hostname="localhost") as tls:
            return common_name(tls.getpeercert())


def common_name(certificate: object) -> str:
    assert isinstance(certificate, dict)
    return next(value for rdn in certificate["subject"] for name, value in rdn if name == "commonName")


def wait_for(condition: Callable[[], bool], server: Server, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}, after {timeout}s:\n" + "".join(server.log)
        time.sleep(0.05)


def every_new_connection(port: int, ca: Path, name: str, count: int = 6) -> bool:
    """Whether ``count`` new connections in a row (every worker's, most likely) get ``name``."""
    return all(served(port, ca) == name for _ in range(count))


def log_count(server: Server, text: str) -> int:
    return "".join(server.log).count(text)


RELOADED = "reloaded TLS files changed on disk"
NOT_LOADED = "but do not load, keeping the current certificate"


# -- the service as deployed


@pytest.mark.workers
def test_a_replaced_certificate_is_served_without_sighup(files: Files) -> None:
    files.install("first")
    args = ("--config", WHOAMI, *files.args(), "--ssl-watch-interval", INTERVAL, "--timeout-keep-alive", "60")
    with Server(*args) as server:
        assert every_new_connection(server.port, files.ca_file, "first")
        kept = http.client.HTTPSConnection("127.0.0.1", server.port, context=client_context(files.ca_file), timeout=5)
        kept.request("GET", "/whoami")
        assert kept.getresponse().read()
        assert kept.sock is not None
        assert common_name(kept.sock.getpeercert()) == "first"

        files.install("second")
        wait_for(lambda: every_new_connection(server.port, files.ca_file, "second"), server, "never served")
        wait_for(lambda: log_count(server, RELOADED) == server.workers, server, "not every worker said it")
        line = next(line for line in server.log if RELOADED in line)
        assert f"certificate {files.cert}, key {files.key}" in line

        # The keep-alive connection made before the swap goes on, on its own handshake.
        kept.request("GET", "/whoami")
        response = kept.getresponse()
        assert response.status == 200 and json.loads(response.read())["client_subject"] is None
        assert common_name(kept.sock.getpeercert()) == "first"
        kept.close()
    assert "ERROR" not in "".join(server.log)


@pytest.mark.workers
def test_files_that_do_not_load_keep_the_current_certificate(files: Files) -> None:
    files.install("first")
    with Server(*files.args(), "--ssl-watch-interval", INTERVAL) as server:
        new = files.leaf("second")

        def failures(problem: str) -> int:
            return sum(NOT_LOADED in line and problem in line for line in server.log)

        half = new.cert_chain_pems[0].bytes()
        replace(files.cert, half[: len(half) // 2])  # a half-written certificate
        no_pem = f"ssl_certfile: {files.cert} holds no PEM certificate"
        wait_for(lambda: failures(no_pem) == server.workers, server, "the half-written file not said")
        time.sleep(2)  # four more looks at the same bytes: not said again
        assert failures(no_pem) == server.workers
        assert every_new_connection(server.port, files.ca_file, "first")

        files.install("second", key=False)  # the new certificate, the old key
        mismatch = "ssl_keyfile: the private key does not match the certificate"
        wait_for(lambda: failures(mismatch) == server.workers, server, "the mismatched pair not said")
        line = next(line for line in server.log if mismatch in line)
        assert f"(certificate {files.cert})" in line  # what changed: not the key
        time.sleep(2)
        assert failures(mismatch) == server.workers
        assert every_new_connection(server.port, files.ca_file, "first")
        assert log_count(server, RELOADED) == 0

        files.install("second", cert=False)  # the pair completed
        wait_for(lambda: every_new_connection(server.port, files.ca_file, "second"), server, "never served")
        wait_for(lambda: log_count(server, RELOADED) == server.workers, server, "not every worker said it")
    assert log_count(server, "ERROR") == 2 * server.workers


def test_the_same_content_rewritten_reloads_nothing(files: Files) -> None:
    files.install("first")
    with Server(*files.args(), "--ssl-watch-interval", INTERVAL) as server:
        later = time.time() + 5
        os.utime(files.cert, (later, later))  # touch
        files.cert.write_bytes(files.cert.read_bytes())  # the same bytes, written again
        files.install("first", cert=False)  # the same key, in a new file (another inode)
        time.sleep(3)  # six looks
        assert log_count(server, RELOADED) == 0
        # The watcher was looking all along: a real change is seen.
        files.install("second")
        wait_for(lambda: log_count(server, RELOADED) == server.workers, server, "the change not seen")


def test_a_changed_ca_file_is_picked_up(files: Files, pem_files: PemFiles, tmp_path: Path) -> None:
    files.install("first")
    clients = trustme.CA()  # a second CA, for clients: trusted once the CA file says so
    bob = tmp_path / "bob.pem"
    clients.issue_cert(common_name="bob").private_key_and_cert_chain_pem.write_to_path(bob)
    args = ("--config", WHOAMI, *files.args(), "--ssl-ca-certs", str(files.ca_file), "--ssl-watch-interval", INTERVAL)

    def client_name(client: Path) -> str | None:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", server.port, context=client_context(files.ca_file, client), timeout=5
        )
        try:
            connection.request("GET", "/whoami")
            return str(json.loads(connection.getresponse().read())["client_subject"]["commonName"])
        except (ssl.SSLError, OSError):  # refused: a handshake alert, or TLS 1.3's after it
            return None
        finally:
            connection.close()

    with Server(*args) as server:
        assert client_name(pem_files.client) == "alice" and client_name(bob) is None
        replace(files.ca_file, files.ca.cert_pem.bytes() + clients.cert_pem.bytes())
        wait_for(lambda: client_name(bob) == "bob", server, "the new CA not trusted")
        assert client_name(pem_files.client) == "alice"
        line = next(line for line in server.log if RELOADED in line)
        assert line.rstrip().endswith(f"reloaded TLS files changed on disk: CA certificates {files.ca_file}")


def test_watching_off_reloads_only_on_sighup(files: Files) -> None:
    files.install("first")
    with Server(*files.args(), "--ssl-watch-interval", "0") as server:
        files.install("second")
        time.sleep(3)
        assert every_new_connection(server.port, files.ca_file, "first")
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: every_new_connection(server.port, files.ca_file, "second"), server, "SIGHUP did not reload")
    assert log_count(server, RELOADED) == 0


def test_a_worker_forked_after_a_change_notices_it(files: Files) -> None:
    """A replacement starts from its parent's context, loaded before the change: its first look sees it."""
    files.install("first")
    with Server(*files.args(), "--workers", "2", "--ssl-watch-interval", INTERVAL, listeners=2) as server:
        started = re.compile(r"worker \d started, pid (\d+)")
        pids = [int(match[1]) for line in server.log if (match := started.search(line))]
        assert len(pids) == 2
        files.install("second")
        for pid in pids:  # before or after their own look: they go, with what they loaded
            os.kill(pid, signal.SIGKILL)

        def replaced() -> bool:
            return len([line for line in server.log if started.search(line)]) == 4

        wait_for(replaced, server, "the workers were not replaced")
        wait_for(lambda: every_new_connection(server.port, files.ca_file, "second"), server, "never served")

        def reloaded_by_replacements() -> int:  # the lines after the first replacement started
            first = [i for i, line in enumerate(server.log) if started.search(line)][2]
            return sum(RELOADED in line for line in server.log[first:])

        wait_for(lambda: reloaded_by_replacements() == 2, server, "a replacement did not reload")


# -- in process: the fingerprint, and the watcher's looks


@pytest.fixture
def context(files: Files, tmp_path: Path) -> ReloadableContext:
    files.install("first")
    password = tmp_path / "password"
    password.write_text("unused\n")  # read at each load; the key is not encrypted: it goes unused
    return ReloadableContext(
        TLSFiles(str(files.cert), str(files.key), ca_certs=str(files.ca_file), password_file=str(password))
    )


def test_changed_on_disk_follows_content(context: ReloadableContext, files: Files, tmp_path: Path) -> None:
    assert not context.changed_on_disk()
    os.utime(files.cert, (time.time() + 60, time.time() + 60))
    files.install("first")  # the same bytes, new files
    assert not context.changed_on_disk()

    files.install("second")
    assert context.changed_on_disk()
    context.reload()
    assert not context.changed_on_disk()

    for path in (files.ca_file, tmp_path / "password"):
        before = path.read_bytes()
        path.write_bytes(before + b"\n")
        assert context.changed_on_disk(), path
        path.write_bytes(before)
        assert not context.changed_on_disk(), path


def test_an_unreadable_file_counts_as_changed(context: ReloadableContext, files: Files) -> None:
    files.key.unlink()
    assert context.changed_on_disk()
    with pytest.raises(TLSError, match="cannot read"):
        context.reload()
    assert context.changed_on_disk()  # the failed load changed nothing
    files.install("first", cert=False)
    assert not context.changed_on_disk()


def test_the_fingerprint_is_read_before_loading(
    context: ReloadableContext, files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change while a load reads the files is seen at the next look, whichever version was loaded."""
    load = tls_module.create_ssl_context

    def load_while_replaced(given: TLSFiles) -> ssl.SSLContext:
        files.install("second")
        return load(given)

    files.install("other")
    monkeypatch.setattr(tls_module, "create_ssl_context", load_while_replaced)
    context.reload()  # read "other", loaded "second"
    monkeypatch.undo()
    assert context.changed_on_disk()
    context.reload()
    assert not context.changed_on_disk()


def test_a_failed_reload_keeps_the_fingerprint(context: ReloadableContext, files: Files) -> None:
    before = context.fingerprint
    files.install("second", key=False)
    with pytest.raises(TLSError, match="does not match"):
        context.reload()
    assert context.fingerprint == before and context.changed_on_disk()


@pytest.mark.parametrize("missing", ["cert", "key", "ca_file"])
def test_a_file_gone_during_a_load_is_a_tls_error(
    context: ReloadableContext, files: Files, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    """A file removed between the readability check and OpenSSL's read (rm, then cp): a TLSError
    naming it, never an OSError that would end the watcher."""
    monkeypatch.setattr(tls_module, "_check_readable", lambda option, path: None)
    getattr(files, missing).unlink()
    with pytest.raises(TLSError) as caught:
        context.reload()
    gone = os.strerror(errno.ENOENT)
    said = {
        "cert": ("ssl_certfile", f"cannot read {files.cert} or its key: {gone}"),
        "key": ("ssl_certfile", f"cannot read {files.cert} or its key: {gone}"),  # OpenSSL does not say which
        "ca_file": ("ssl_ca_certs", f"cannot read {files.ca_file}: {gone}"),
    }
    assert (caught.value.option, str(caught.value)) == said[missing]


def test_a_file_gone_while_a_failed_load_is_diagnosed_is_a_tls_error(
    context: ReloadableContext, files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    diagnose = tls_module._diagnose

    def replaced_meanwhile(given: TLSFiles, password: object, exc: ssl.SSLError) -> TLSError:
        files.cert.unlink()  # rm, then cp
        return diagnose(given, password, exc)  # type: ignore[arg-type]

    monkeypatch.setattr(tls_module, "_diagnose", replaced_meanwhile)
    files.key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    with pytest.raises(TLSError) as caught:
        context.reload()
    assert (caught.value.option, str(caught.value)) == (
        "ssl_keyfile",
        f"cannot read the certificate or key file: {os.strerror(errno.ENOENT)}",
    )


def test_a_failure_is_said_once_after_two_looks(
    context: ReloadableContext, files: Files, caplog: pytest.LogCaptureFixture
) -> None:
    watch = FileWatch()
    caplog.set_level(logging.DEBUG, "aioserver.watch")
    watch.reload_if_changed(context)  # nothing changed: nothing to say
    assert caplog.records == []
    files.install("second", key=False)
    with pytest.raises(TLSError) as caught:
        tls_module.create_ssl_context(context.files)
    problem = caught.value
    watch.reload_if_changed(context)  # mid-update, maybe (certbot's links): not an error yet
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("DEBUG", f"TLS files changed on disk (certificate {files.cert}) but do not load yet: {problem}")
    ]
    for _ in range(3):
        watch.reload_if_changed(context)
    assert [r.levelname for r in caplog.records] == ["DEBUG", "ERROR"]
    assert caplog.records[1].getMessage() == (
        f"TLS files changed on disk (certificate {files.cert}) but do not load, keeping the current certificate"
        f" until they change again: {problem.option}: {problem}"
    )

    files.install("first", cert=True, key=False)  # back to what is loaded: nothing to load
    watch.reload_if_changed(context)
    watch.reload_if_changed(context)
    assert caplog.records[-1].getMessage() == "TLS files on disk are those in force again"
    files.install("second", key=False)  # the same failure again is news again
    watch.reload_if_changed(context)
    watch.reload_if_changed(context)
    assert [r.levelname for r in caplog.records] == ["DEBUG", "ERROR", "INFO", "DEBUG", "ERROR"]

    files.install("second", cert=False)  # the pair completed
    watch.reload_if_changed(context)
    assert caplog.records[-1].levelname == "INFO"
    assert (
        caplog.records[-1].getMessage()
        == f"reloaded TLS files changed on disk: certificate {files.cert}, key {files.key}"
    )
    assert not context.changed_on_disk()
    count = len(caplog.records)
    watch.reload_if_changed(context)  # loaded: nothing more to say
    assert len(caplog.records) == count


def test_the_watcher_names_each_file_that_changed(
    context: ReloadableContext, files: Files, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    watch = FileWatch()
    caplog.set_level(logging.INFO, "aioserver.watch")
    password = tmp_path / "password"
    password.write_text("still unused\n")
    watch.reload_if_changed(context)
    trustme.CA().cert_pem.write_to_path(files.ca_file)
    watch.reload_if_changed(context)
    assert [r.getMessage() for r in caplog.records] == [
        f"reloaded TLS files changed on disk: key password {password}",
        f"reloaded TLS files changed on disk: CA certificates {files.ca_file}",
    ]


def test_a_reload_at_the_first_look_leaves_nothing_to_say_after(
    context: ReloadableContext, files: Files, caplog: pytest.LogCaptureFixture
) -> None:
    watch = FileWatch()
    caplog.set_level(logging.DEBUG, "aioserver.watch")
    files.install("second")
    watch.reload_if_changed(context)
    watch.reload_if_changed(context)
    assert [r.getMessage() for r in caplog.records] == [
        f"reloaded TLS files changed on disk: certificate {files.cert}, key {files.key}"
    ]


async def test_the_watcher_reloads_off_the_loop(context: ReloadableContext, files: Files) -> None:
    before = context.current
    watching = asyncio.create_task(watch_tls_files(context, 0.05))
    try:
        await asyncio.sleep(0.3)
        assert context.current is before  # nothing changed: nothing loaded
        files.install("second")
        async with asyncio.timeout(10):
            while context.current is before:
                await asyncio.sleep(0.05)
    finally:
        watching.cancel()
    assert not context.changed_on_disk()


async def test_a_reload_runs_in_a_thread_of_its_own_whatever_fills_the_default_executor() -> None:
    """SIGHUP's reload must not wait behind workflows' sync work in asyncio's default executor."""
    loop = asyncio.get_running_loop()
    busy = concurrent.futures.ThreadPoolExecutor(1)
    loop.set_default_executor(busy)
    release = threading.Event()
    blocked = loop.run_in_executor(None, release.wait, 30)
    try:
        async with asyncio.timeout(10):
            name = await in_reload_thread(lambda: threading.current_thread().name)
        assert name.startswith("aioserver-reload")
    finally:
        release.set()
        await blocked


async def test_a_reload_given_up_does_not_hold_the_loop() -> None:
    """Cancelled (a stop while a reload runs): the loop goes on at once; the thread ends on its own."""
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def reload() -> None:
        started.set()
        release.wait(10)
        finished.set()

    reloading = asyncio.create_task(in_reload_thread(reload))
    try:
        async with asyncio.timeout(10):
            while not started.is_set():
                await asyncio.sleep(0.01)
        reloading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reloading
        assert not finished.is_set()  # the loop did not wait for the thread
    finally:
        release.set()
