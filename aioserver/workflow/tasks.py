"""Task kinds (txtai's ``task:``): which elements a task takes, and the actions of the kinds
that bring their own (``service``, ``retrieve``).

    - task: url            # only http(s) URLs reach the action; others pass through
    - task: file           # only paths (checked against safeopen.directory) reach it
    - task: service        # POST or GET each element (or the batch) to an HTTP endpoint
      url: http://127.0.0.1:9000/api
      method: post
      batch: true
      extract: [data, result]
    - task: retrieve       # download URLs into a directory, give back the local paths
      directory: /srv/downloads   # default: $STATE_DIRECTORY (systemd's StateDirectory=)
      flatten: true
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from yarl import URL

from ..errors import InvalidElement, UpstreamError
from .safeopen import SafeOpen, fetch, is_path, is_url

if TYPE_CHECKING:
    from .runtime import Runtime

logger = logging.getLogger("aioserver.workflow.tasks")

TASK_KINDS = ("default", "url", "file", "service", "retrieve")
# Keys each kind adds to a task's (besides the shared ones in spec.TASK_KEYS).
KIND_KEYS: Mapping[str, tuple[str, ...]] = {
    "service": ("url", "method", "params", "extract"),
    "retrieve": ("directory", "flatten"),
}


def selection(kind: str, policy: SafeOpen) -> tuple[Callable[[Any], bool] | None, Callable[[Any], Any] | None]:
    """The kind's (accept, prepare): which elements the action sees, and their safeopen check."""
    if kind in ("url", "retrieve"):

        def check_url(element: Any) -> Any:
            policy.check_url(element)
            return element

        return is_url, check_url
    if kind == "file":
        return is_path, lambda element: str(policy.check_file(element))
    return None, None


def _runtime(runtime: Runtime | None, who: str) -> Runtime:
    if runtime is None:
        raise RuntimeError(f"{who} needs the server's runtime (its client session)")
    return runtime


@dataclass(frozen=True, slots=True)
class Service:
    """Calls an HTTP endpoint: ``get`` puts each element in the ``params`` left null (txtai's
    convention), ``post`` sends it as JSON; ``batch`` sends the whole batch in one call.
    ``extract`` is a path of keys into the JSON answer."""

    task: str  # the task's key path, to name it in errors
    url: str
    method: str = "post"
    params: Mapping[str, Any] | None = None
    batch: bool = True
    extract: tuple[str | int, ...] = ()
    wants_runtime = True

    async def __call__(self, batch: list[Any], *, runtime: Runtime | None = None) -> list[Any]:
        runtime = _runtime(runtime, self.task)
        if self.batch:
            results = await self._call(batch, runtime)
            if not isinstance(results, list) or len(results) != len(batch):
                raise UpstreamError(
                    f"task {self.task} (service) failed: the upstream did not answer a list of {len(batch)} results"
                )
            return results
        return list(await asyncio.gather(*(self._call(element, runtime) for element in batch)))

    async def _call(self, data: Any, runtime: Runtime) -> Any:
        # Errors name the task, never self.url: that is the operator's, and may be inside.
        who = f"task {self.task} (service)"
        if self.method == "get":
            values = data if self.batch else [data]
            params = [(k, str(v)) for k, v in (self.params or {}).items() if v is not None]
            params += [(k, _param(value)) for k, v in (self.params or {}).items() if v is None for value in values]
            body, _ = await fetch(runtime.session, runtime.safeopen, self.url, who=who, internal=True, params=params)
        else:
            payload = {**self.params, **{k: data for k, v in self.params.items() if v is None}} if self.params else data
            body, _ = await fetch(
                runtime.session, runtime.safeopen, self.url, method="POST", who=who, internal=True, json=payload
            )
        try:
            answer = json.loads(body)
        except ValueError:
            raise UpstreamError(f"{who} failed: the upstream's answer is not JSON") from None
        for key in self.extract:
            try:
                answer = answer[key]
            except (KeyError, IndexError, TypeError):
                raise UpstreamError(f"{who} failed: the upstream's answer has no {key!r} to extract") from None
        return answer


def _param(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@dataclass(frozen=True, slots=True)
class Retrieve:
    """Downloads each URL into ``directory`` and gives back the local path.

    ``flatten`` (default true) names files after the URL's last path segment; false keeps the
    host and path as subdirectories. Names are sanitized, so a URL can never write outside.
    """

    task: str
    directory: Path
    flatten: bool = True
    wants_runtime = True

    async def __call__(self, batch: list[Any], *, runtime: Runtime | None = None) -> list[str]:
        runtime = _runtime(runtime, self.task)
        return list(await asyncio.gather(*(self._retrieve(url, runtime) for url in batch)))

    async def _retrieve(self, url: str, runtime: Runtime) -> str:
        who = f"task {self.task} (retrieve)"
        body, _ = await fetch(runtime.session, runtime.safeopen, url, who=who)
        path = self.directory / self.relative_path(URL(url))
        try:
            await runtime.to_thread(_write, path, body)  # never asyncio's default executor (reloads use it)
        except OSError as exc:
            problem = _UNSTORABLE.get(exc.errno or 0)
            if problem is None:  # a full disk, a permission: the operator's to see, a 500
                raise
            # The client's URL decided the path: its error, naming neither the path nor the directory.
            logger.warning("%s: %r cannot be stored: %s (%s)", who, url[:1000], problem, type(exc).__name__)
            raise InvalidElement(f"{who} failed: {url[:200]!r} cannot be stored: {problem}") from None
        return str(path)

    def relative_path(self, url: URL) -> Path:
        """Where a URL's content goes, relative to ``directory``."""
        parts = [_safe_name(p) for p in url.path.split("/") if p not in ("", ".", "..")]
        name = parts[-1] if parts else "index.html"
        if url.query_string:  # distinct queries, distinct files
            stem, dot, ext = name.rpartition(".")
            tag = hashlib.sha256(url.query_string.encode()).hexdigest()[:8]
            name = f"{stem}-{tag}.{ext}" if dot else f"{name}-{tag}"
        if self.flatten:
            return Path(name)
        host = _safe_name(f"{url.host}_{url.port}" if url.explicit_port else str(url.host))
        return Path(host, *parts[:-1], name)


def _safe_name(part: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", part).lstrip(".")
    return cleaned[:200] or "_"


# Why a path a URL leads to cannot be a file, with flatten: false: .../x is a file and .../x/y
# wants it as a directory (EEXIST, ENOTDIR), or the reverse (EISDIR); or it is over PATH_MAX.
_UNSTORABLE = {
    errno.EEXIST: "its path conflicts with another download's",
    errno.ENOTDIR: "its path conflicts with another download's",
    errno.EISDIR: "its path conflicts with another download's",
    errno.ENAMETOOLONG: "its path is too long",
}


def _write(path: Path, body: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary file of its own per download, in the same directory (os.replace stays a rename):
    # downloads of one URL at once never write, rename or remove each other's. Its name starts with
    # a dot, which no download's has (_safe_name), so it is never mistaken for one. Not mkstemp:
    # its 0600 would make the download unreadable to the group that reads the others.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.part")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(body)
        os.replace(temporary, path)  # readers never see half a file
    except BaseException:
        os.unlink(temporary)  # a full disk, a conflict keeps no half file either
        raise


def unwritable(directory: str) -> str | None:
    """Why a retrieve task could not write in ``directory`` (blocking), or None if it can.

    A file is made and removed there, as the task will do: the permission bits, ACLs and a
    read-only mount (systemd's ``ProtectSystem=``) all have their say, which ``os.access``
    (asking for the real user, and blind to some mounts) would not tell.
    """
    try:
        descriptor, name = tempfile.mkstemp(prefix=".aioserver-check-", dir=directory)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(descriptor)
    os.unlink(name)
    return None
