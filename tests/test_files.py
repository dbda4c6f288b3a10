"""What sits at a TLS file's path may be anything: a FIFO, a device, a file of gigabytes.

Black-box first: a server whose certificate is replaced by one of them goes on serving, says
why it does not load it, reloads on SIGHUP and stops on SIGTERM. Then aioserver.files, which
reads them.
"""

from __future__ import annotations

import errno
import http.client
import os
import re
import signal
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from aioserver.files import read_small_file
from aioserver.tls import TLSFiles, fingerprint

from conftest import PemFiles, Server

WAIT = 15.0  # seconds: a generous bound for what takes a few looks of the watcher, under load


def wait_for(server: Server, pattern: str, timeout: float = WAIT) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(pattern, "".join(server.log))
        if found:
            return found
        assert time.monotonic() < deadline, f"{pattern!r} not logged within {timeout}s:\n{''.join(server.log)}"
        time.sleep(0.1)


def health(port: int, ca: Path) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=5)
    try:
        connection.sock = context.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname="localhost"
        )
        connection.request("GET", "/health")
        return connection.getresponse().status
    finally:
        connection.close()


def fifo(path: Path) -> None:
    os.mkfifo(path)


def huge(path: Path) -> None:
    with open(path, "wb") as file:  # sparse: 64 MiB on no disk
        file.truncate(64 << 20)


HOSTILE: dict[str, tuple[Callable[[Path], None], str]] = {
    # A FIFO: open() blocked until a writer came; SIGHUP hung the server, and SIGTERM with it.
    "fifo": (fifo, "not a regular file"),
    # Read whole at each look (and a file of gigabytes filled the memory).
    "huge": (huge, "larger than"),
}


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_certificate_replaced_by_what_is_not_one_keeps_the_server_serving(
    kind: str, tmp_path: Path, pem_files: PemFiles
) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_bytes(pem_files.cert.read_bytes())
    args = ("--ssl-certfile", str(cert), "--ssl-keyfile", str(pem_files.key), "--ssl-watch-interval", "0.2")
    with Server(*args) as server:
        plant, problem = HOSTILE[kind]
        cert.unlink()
        plant(cert)
        wait_for(server, rf"TLS files changed on disk .* do not load.*: ssl_certfile: .*{problem}")
        assert health(server.port, pem_files.ca) == 200
        server.process.send_signal(signal.SIGHUP)
        wait_for(server, rf"TLS reload failed, keeping the current certificate: ssl_certfile: .*{problem}")
        assert health(server.port, pem_files.ca) == 200
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=WAIT) == 0


# -- aioserver.files


def test_a_regular_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "cert.pem"
    path.write_bytes(b"x" * 100)
    assert read_small_file(str(path), 100) == b"x" * 100
    (tmp_path / "link").symlink_to(path)
    assert read_small_file(str(tmp_path / "link"), 100) == b"x" * 100


@pytest.mark.parametrize(
    ("make", "code"),
    [
        pytest.param(lambda path: os.mkfifo(path), errno.EINVAL, id="fifo"),
        pytest.param(lambda path: path.symlink_to("/dev/null"), errno.EINVAL, id="device"),
        pytest.param(lambda path: path.mkdir(), errno.EINVAL, id="directory"),
        pytest.param(lambda path: path.write_bytes(b"x" * 101), errno.EFBIG, id="too-large"),
        pytest.param(lambda path: path.symlink_to(path), errno.ELOOP, id="link-loop"),
        pytest.param(lambda path: None, errno.ENOENT, id="missing"),
    ],
)
def test_what_is_not_a_small_regular_file_is_refused_at_once(
    tmp_path: Path, make: Callable[[Path], None], code: int
) -> None:
    path = tmp_path / "cert.pem"
    make(path)
    started = time.monotonic()
    with pytest.raises(OSError) as caught:
        read_small_file(str(path), 100)
    assert caught.value.errno == code
    assert time.monotonic() - started < 1


def test_no_link_is_followed_when_asked(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_bytes(b"secret")
    (tmp_path / "link").symlink_to(tmp_path / "key.pem")
    with pytest.raises(OSError) as caught:
        read_small_file(str(tmp_path / "link"), 100, follow_symlinks=False)
    assert caught.value.errno == errno.ELOOP


def test_a_fingerprint_says_why_a_file_is_not_read(tmp_path: Path) -> None:
    """A device (here /dev/null, which reads empty; /dev/zero would never end) is not a file to serve."""
    (tmp_path / "cert.pem").symlink_to("/dev/null")
    ((_, _, digest),) = fingerprint(TLSFiles(str(tmp_path / "cert.pem")))
    assert digest == "unreadable: not a regular file"
