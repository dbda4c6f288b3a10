"""Reading the small files the server is pointed at (certificates, keys, ACME state): regular
files of a bounded size only, and an open that never blocks.

``open(path).read()`` trusts what is at ``path``: a FIFO put there blocks ``open`` until a
writer comes (a reload thread stuck for good, holding the TLS lock; the event loop itself when
the plain listener answers a challenge), ``/dev/zero`` fills the memory, and a file of
gigabytes is read whole at every look of the file watcher.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping
from typing import Any

CHUNK = 65536

# The largest certificate, key, CA or password file read (a bundle of every public CA is ~250 KB).
TLS_FILE_LIMIT = 10 << 20


def read_small_file(path: str, limit: int, follow_symlinks: bool = True) -> bytes:
    """The bytes of the regular file at ``path``, at most ``limit`` of them (blocking).

    Raises OSError, its ``strerror`` saying why: the usual ones (no such file, permission
    denied), "not a regular file" (a FIFO, a device, a directory), "larger than N bytes", and
    with ``follow_symlinks`` false, ELOOP for a symbolic link.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    descriptor = os.open(path, flags)  # O_NONBLOCK: a FIFO opens at once, to be refused below
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        if status.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
        chunks, size = [], 0
        while size <= limit:  # st_size is what it was: a file growing meanwhile stops here too
            chunk = os.read(descriptor, min(CHUNK, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
        return b"".join(chunks)
    finally:
        os.close(descriptor)


def read_config_file(path: str) -> Mapping[str, Any]:
    """The config file at ``path`` as a mapping of sections, read again at a reload (blocking);
    raises ConfigError naming the file and what is wrong."""
    import yaml

    from .errors import ConfigError

    try:
        text = read_small_file(path, TLS_FILE_LIMIT).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, None, f"cannot read config: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        document = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "unreadable"
        raise ConfigError(path, None, f"invalid YAML: {problem}") from None
    if not isinstance(document, Mapping):
        raise ConfigError(path, None, "expected a mapping of sections at the top level")
    auth = document.get("auth")
    if auth is not None and not isinstance(auth, Mapping):
        raise ConfigError(path, "auth", "expected a mapping")
    return document
