"""``--check`` reading hostile certificate files: it says what is wrong, quickly, never hangs or crashes.

Black-box through ``python -m aioserver --check`` with ACME, whose certificate file (in the
state directory, written from what a CA sent) is described without OpenSSL loading it first;
then the DER reader fuzzed in-process.
"""

from __future__ import annotations

import base64
import os
import ssl
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aioserver.certinfo import decode_certificate, describe_certificates

from conftest import PYTHON

DOMAIN = "api.aioserver.test"
BOUND = 10.0  # seconds: generous for what takes milliseconds; the hostile files took minutes


def der(tag: int, content: bytes) -> bytes:
    """One DER element (definite length)."""
    if len(content) < 0x80:
        return bytes([tag, len(content)]) + content
    size = len(content).to_bytes((len(content).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def certificate_with_oid(oid: bytes) -> bytes:
    """A certificate whose subject's attribute type is the OID ``oid`` (encoded content), signed by nobody."""
    name = der(0x30, der(0x31, der(0x30, der(0x06, oid) + der(0x0C, b"x"))))
    validity = der(0x30, der(0x17, b"260101000000Z") + der(0x17, b"270101000000Z"))
    algorithm = der(0x30, der(0x06, bytes.fromhex("2a8648ce3d040302")))
    tbs = der(0x30, der(0x02, b"\x01") + algorithm + name + validity + name + der(0x30, b""))
    return der(0x30, tbs + algorithm + der(0x03, b"\x00"))


def pem(blob: bytes) -> bytes:
    text = base64.encodebytes(blob).decode().replace("\n", "")
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return ("-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n").encode()


def valid() -> bytes:
    return trustme.CA().issue_cert(DOMAIN).cert_chain_pems[0].bytes()


HOSTILE: dict[str, tuple[Callable[[Path], None], str]] = {
    # Each BEGIN without an END: the regular expression looked for its END to the file's end,
    # for each of them (quadratic: this 560 kB file took a minute, a few MB hours).
    "begins-without-end": (
        lambda path: path.write_bytes(valid() + b"-----BEGIN CERTIFICATE-----\n" * 20000),
        "certificate 1 of 1: O=trustme",
    ),
    # An OID of 400 000 continuation bytes: one number shifted 400 000 times (quadratic, 30 s).
    "an-endless-oid": (
        lambda path: path.write_bytes(pem(certificate_with_oid(b"\xff" * 400000 + b"\x01"))),
        "cannot be decoded: an OID arc of more than",
    ),
    # open() of a FIFO waited for a writer: --check hung.
    "a-fifo": (lambda path: os.mkfifo(path), "not a regular file"),
    # Read whole: /dev/zero never ends (/dev/null here, which does: the same refusal).
    "a-device": (lambda path: path.symlink_to("/dev/null"), "not a regular file"),
}


@pytest.mark.parametrize("kind", HOSTILE)
def test_check_describes_a_hostile_certificate_file_quickly(kind: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "certificates" / DOMAIN).mkdir(parents=True, mode=0o700)
    for directory in (state, state / "certificates"):
        directory.chmod(0o700)
    chain = state / "certificates" / DOMAIN / "fullchain.pem"
    make, said = HOSTILE[kind]
    make(chain)
    command = [
        *(PYTHON, "-m", "aioserver", "--check", "--acme-domain", DOMAIN, "--redirect-http", "0"),
        *("--acme-directory", "https://127.0.0.1:9/dir", "--acme-state-dir", str(state)),
    ]
    env = {k: v for k, v in os.environ.items() if k != "STATE_DIRECTORY"}
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert time.monotonic() - started < BOUND, "--check took too long"
    assert done.returncode == 0, done.stderr
    assert said in done.stdout, done.stdout
    assert "Traceback" not in done.stdout + done.stderr


# -- the DER reader, fuzzed


LEAF = ssl.PEM_cert_to_DER_cert(
    trustme.CA()
    .issue_cert(DOMAIN, "127.0.0.1", "ops@aioserver.test", not_after=datetime.now(UTC) + timedelta(days=3))
    .cert_chain_pems[0]
    .bytes()
    .decode()
)


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    """A real certificate's DER with a few bytes changed, cut, or inserted."""
    blob = bytearray(LEAF)
    for _ in range(draw(st.integers(1, 6))):
        if not blob:
            break
        where = draw(st.integers(0, len(blob) - 1))
        how = draw(st.sampled_from(["set", "cut", "insert", "truncate"]))
        if how == "set":
            blob[where] = draw(st.integers(0, 255))
        elif how == "cut":
            del blob[where : where + draw(st.integers(1, 40))]
        elif how == "insert":
            blob[where:where] = draw(st.binary(max_size=20))
        else:
            del blob[where:]
    return bytes(blob)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(damaged(), st.binary(max_size=2000)))
def test_the_der_reader_fails_only_with_value_or_index_errors(blob: bytes) -> None:
    """What describe_certificates turns into a WARNING line: never another exception, never slow."""
    started = time.monotonic()
    try:
        decode_certificate(blob)
    except (ValueError, IndexError):
        pass
    assert time.monotonic() - started < 1


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000))
def test_describe_certificates_never_raises(tmp_path_factory: pytest.TempPathFactory, garbage: bytes) -> None:
    path = tmp_path_factory.mktemp("pem") / "cert.pem"
    path.write_bytes(b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(garbage) + b"-----END CERTIFICATE-----\n")
    lines = describe_certificates(str(path))
    assert lines and all("\n" not in line for line in lines)
