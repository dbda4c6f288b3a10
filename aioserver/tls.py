"""TLS: one function from files and options to a server ``ssl.SSLContext``.

The context follows Mozilla's "intermediate" configuration (guideline 5.7): TLS 1.2 minimum,
TLS 1.3 preferred, ECDHE with AES-GCM or ChaCha20-Poly1305 for TLS 1.2, key exchange on
X25519, P-256 or P-384 only, no compression, no renegotiation. (Mozilla's DHE suites are
left out: they need a DH parameter file and add nothing for the clients it targets.)
https://wiki.mozilla.org/Security/Server_Side_TLS#Intermediate_compatibility_.28recommended.29
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import ssl
import threading
from dataclasses import dataclass, field
from datetime import datetime

from aiohttp import web

from .certinfo import CertificateFileError, read_certificates
from .files import TLS_FILE_LIMIT, read_small_file

logger = logging.getLogger("aioserver.tls")

TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
GROUPS = "X25519:prime256v1:secp384r1"
CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


class TLSError(Exception):
    """A TLS file or option is unusable; ``option`` names the setting at fault."""

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(option, problem)
        self.option = option
        self.problem = problem

    def __str__(self) -> str:
        return self.problem


class Password(str):
    """A key password: a str that never shows itself in a repr, a log line or a traceback."""

    def __repr__(self) -> str:
        return "'***'"


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """Where the certificate, key and CA are, and how to check clients."""

    certfile: str
    keyfile: str | None = None
    password: Password | None = field(default=None, repr=False)  # given as such (the environment)
    ca_certs: str | None = None
    cert_reqs: str | None = None  # none | optional | required; None: required when ca_certs
    password_file: str | None = None  # read at each load, so that a reload sees a new password


def create_ssl_context(files: TLSFiles) -> ssl.SSLContext:
    """A new server context loaded from ``files``; raises TLSError naming the option at fault.

    Each context has its own session cache and session-ticket keys: a session from another
    context cannot resume in this one.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # CPython 3.10+ already defaults to TLS 1.2, unless built with --with-ssl-default-suites=openssl
    # (as some distributions do, to follow a system policy that may allow less): say it here.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)  # TLS 1.3 suites are OpenSSL's defaults, all allowed
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # SSLContext() ignores SSLKEYLOGFILE today (create_default_context honours it): never
    # write session secrets to a file, whatever creates the context or reads the environment.
    context.keylog_filename = None  # type: ignore[assignment]
    _restrict_groups(context, GROUPS)
    password = _read_password(files.password_file) if files.password_file else files.password
    _load_cert_chain(context, files, password)
    if files.ca_certs:
        _load_ca(context, files.ca_certs)
    reqs = files.cert_reqs or ("required" if files.ca_certs else "none")
    if reqs != "none" and not files.ca_certs:
        raise TLSError("ssl_cert_reqs", f"{reqs!r} needs ssl_ca_certs to verify client certificates against")
    context.verify_mode = CERT_REQS[reqs]
    return context


def _read_password(path: str) -> Password:
    try:
        return Password(read_small_file(path, TLS_FILE_LIMIT).decode("utf-8").rstrip("\r\n"))
    except (OSError, UnicodeDecodeError) as exc:
        raise TLSError(
            "ssl_keyfile_password_file", f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
        ) from None


def _load_cert_chain(context: ssl.SSLContext, files: TLSFiles, password: Password | None) -> None:
    for option, path in (("ssl_certfile", files.certfile), ("ssl_keyfile", files.keyfile)):
        if path is not None:
            _check_readable(option, path)
    try:
        # A callable, so that OpenSSL never prompts on a terminal for a missing password.
        context.load_cert_chain(files.certfile, files.keyfile, password=lambda: password or "")
    except ssl.SSLError as exc:
        raise _diagnose(files, password, exc) from None
    except OSError as exc:  # gone since the check above: a writer replacing it (rm, then cp)
        raise TLSError("ssl_certfile", f"cannot read {files.certfile} or its key: {exc.strerror or exc}") from None


def _diagnose(files: TLSFiles, password: Password | None, exc: ssl.SSLError) -> TLSError:
    """Say which file is at fault and why: OpenSSL's own reason is often just "PEM lib"."""
    key_option = "ssl_keyfile" if files.keyfile else "ssl_certfile"
    if "KEY_VALUES_MISMATCH" in (exc.reason or ""):
        return TLSError(key_option, "the private key does not match the certificate")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=files.certfile)
        encrypted = b"ENCRYPTED" in read_small_file(files.keyfile or files.certfile, TLS_FILE_LIMIT)
    except ssl.SSLError:
        return TLSError("ssl_certfile", f"{files.certfile} holds no PEM certificate")
    except OSError as error:  # gone since it was loaded (a writer replacing it)
        return TLSError(key_option, f"cannot read the certificate or key file: {error.strerror or error}")
    if encrypted and password:
        return TLSError(key_option, "cannot decrypt the private key: wrong password")
    if encrypted:
        return TLSError(
            key_option,
            "the private key is encrypted: give its password (ssl_keyfile_password_file or SSL_KEYFILE_PASSWORD)",
        )
    return TLSError(key_option, f"cannot load the private key: {exc.reason or exc}")


def _load_ca(context: ssl.SSLContext, path: str) -> None:
    _check_readable("ssl_ca_certs", path)
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise TLSError("ssl_ca_certs", f"{path} holds no CA certificate: {exc.reason or exc}") from None
    except OSError as exc:  # gone since the check above: a writer replacing it
        raise TLSError("ssl_ca_certs", f"cannot read {path}: {exc.strerror or exc}") from None
    if not context.get_ca_certs():
        raise TLSError("ssl_ca_certs", f"{path} holds no CA certificate")


def _check_readable(option: str, path: str) -> None:
    """Raise TLSError unless ``path`` is a regular file we can read: OpenSSL would block on a
    FIFO for good (a reload thread, holding the context's lock) or read /dev/zero for ever."""
    try:
        read_small_file(path, TLS_FILE_LIMIT)
    except OSError as exc:
        raise TLSError(option, f"cannot read {path}: {exc.strerror or exc}") from None


def _restrict_groups(context: ssl.SSLContext, groups: str) -> None:
    """Offer only ``groups`` for key exchange.

    Python only gained SSLContext.set_groups in 3.15; before that, ``set_ecdh_curve`` keeps a
    single group. So we call OpenSSL's SSL_CTX_set1_groups_list on the context's SSL_CTX,
    after checking that the pointer really is it (its options must read back the same).
    """
    set_groups = getattr(context, "set_groups", None)
    if set_groups is not None:  # Python 3.15+
        set_groups(groups)
        return
    try:
        library = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]
        library.SSL_CTX_get_options.restype = ctypes.c_uint64
        library.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        library.SSL_CTX_ctrl.restype = ctypes.c_long
        library.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
        # The SSL_CTX pointer follows the object header in CPython's PySSLContext.
        pointer = ctypes.c_void_p.from_address(id(context) + 2 * ctypes.sizeof(ctypes.c_void_p)).value
        if pointer and library.SSL_CTX_get_options(pointer) == context.options:
            ssl_ctrl_set_groups_list = 92
            if library.SSL_CTX_ctrl(pointer, ssl_ctrl_set_groups_list, 0, groups.encode()) == 1:
                return
    except (OSError, AttributeError, ValueError):
        pass
    # P-256 is the group every TLS 1.2 and 1.3 client must support (RFC 8446 section 9.1).
    logger.debug("cannot set the key-exchange group list; using prime256v1 only")
    context.set_ecdh_curve("prime256v1")


# The files a context is made from, by the option naming each: what a fingerprint covers.
Fingerprint = tuple[tuple[str, str, str], ...]  # (option, path, sha256 of its bytes) for each file given


def fingerprint(files: TLSFiles) -> Fingerprint:
    """What ``files`` hold on disk now (blocking): each one's sha256, or why it cannot be read.

    A file that cannot be read has its error for a digest: it differs from any content, and
    from another error.
    """
    given = (
        ("ssl_certfile", files.certfile),
        ("ssl_keyfile", files.keyfile),
        ("ssl_ca_certs", files.ca_certs),
        ("ssl_keyfile_password_file", files.password_file),
    )
    digests = []
    for option, path in given:
        if path is None:
            continue
        try:
            digest = hashlib.sha256(read_small_file(path, TLS_FILE_LIMIT)).hexdigest()
        except OSError as exc:
            digest = f"unreadable: {exc.strerror or exc}"
        digests.append((option, path, digest))
    return tuple(digests)


class ReloadableContext:
    """The context for new connections; :meth:`reload` replaces it, open connections keep theirs.

    Listeners look ``current`` up for each connection they accept (see
    :mod:`aioserver.connections`), so a reload also starts a new session cache and new ticket
    keys: no session from before it resumes, and a client certificate it no longer trusts
    needs a full handshake, which fails. Reloading the same files rotates the ticket keys.

    ``fingerprint`` is what the files held when ``current`` was loaded from them, read just
    before: a change during a load shows at the next look (:meth:`changed_on_disk`). It
    belongs to the context, so a worker forked with its parent's context sees what changed
    on disk since its parent loaded it.

    ``not_after`` is when the certificate ``current`` serves expires (for the metrics), read
    with it; None before the first load, or if the file cannot be decoded (certinfo.py).
    """

    def __init__(self, files: TLSFiles, load: bool = True) -> None:
        self.files = files
        # Reloads come from SIGHUP, the file watcher and the hourly renewal of session keys,
        # each in a thread: one at a time, so that ``current`` and ``fingerprint`` match.
        self._lock = threading.Lock()
        # None until loaded, for files that do not exist yet (ACME's): no listener serves then.
        self.fingerprint = fingerprint(files) if load else ()
        self.current: ssl.SSLContext | None = create_ssl_context(files) if load else None
        self.not_after = served_until(files.certfile) if load else None

    def reload(self, files: TLSFiles | None = None) -> None:
        """Load the files again (or new ones); raises TLSError and keeps the old context if they fail."""
        with self._lock:
            files = files or self.files
            loaded_from = fingerprint(files)
            self.current = create_ssl_context(files)
            self.not_after = served_until(files.certfile)
            self.files = files
            self.fingerprint = loaded_from

    def changed_on_disk(self) -> bool:
        """Whether the files differ from what ``current`` was loaded from (blocking: reads them).

        Their content decides, not their times: a rewrite with the same bytes is no change, and a
        file that cannot be read is one (a reload then says why).
        """
        return fingerprint(self.files) != self.fingerprint


def served_until(certfile: str) -> datetime | None:
    """The notAfter of a chain file's first certificate, the one served (blocking); None if unreadable."""
    try:
        return read_certificates(certfile)[0].not_after
    except CertificateFileError:
        return None


def client_subject(request: web.BaseRequest) -> dict[str, str] | None:
    """The verified client certificate's subject (``{"commonName": ...}``), or None without one."""
    transport = request.transport
    certificate = transport.get_extra_info("peercert") if transport is not None else None
    if not certificate:
        return None
    return {name: value for rdn in certificate.get("subject", ()) for name, value in rdn}
