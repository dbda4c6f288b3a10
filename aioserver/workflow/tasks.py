"""Task kinds (txtai's ``task:``): which elements a task takes and how it prepares them, and
the actions of the kinds that bring their own (``service``, ``retrieve``).

    - task: url            # elements with a scheme (name://) reach the action, if safeopen allows
    - task: file           # names of files under safeopen.directory (file:// stripped); others pass
    - task: template       # each element put into a template (see templates.py); no action needed
      template: "This is a {text} task"
    - task: workflow       # the action names another workflow of the config
      action: other
    - task: console        # log the task's inputs and outputs
    - task: service        # POST or GET each element (or the batch) to an HTTP endpoint
      url: http://127.0.0.1:9000/api
      method: post
      batch: true
      extract: [data, result]
    - task: retrieve       # copy URLs and files into a directory, give back the local paths
      directory: /srv/downloads   # default: $STATE_DIRECTORY (systemd's StateDirectory=)
      flatten: true

Without an action, a task's results are its prepared elements: ``url`` and ``console`` pass
them through, ``file`` gives files' paths, ``template`` the filled templates.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import json
import logging
import os
import posixpath
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from yarl import URL

from ..errors import InvalidElement, UpstreamError
from ..logtext import loggable
from .safeopen import NOT_A_FILE, Refused, SafeOpen, fetch, is_url

if TYPE_CHECKING:
    from .runtime import Runtime

logger = logging.getLogger("aioserver.workflow.tasks")
console_logger = logging.getLogger("aioserver.workflow.console")

TASK_KINDS = ("default", "url", "file", "template", "workflow", "console", "service", "retrieve")
# Keys each kind adds to a task's (besides the shared ones in spec.TASK_KEYS).
KIND_KEYS: Mapping[str, tuple[str, ...]] = {
    "template": ("template", "rules", "strict"),
    "service": ("url", "method", "params", "extract"),
    "retrieve": ("directory", "flatten", "safeopen"),
}
# txtai's test of a URL: a scheme, then "://" (any scheme: safeopen refuses all but http and https).
_SCHEME = re.compile(r"\w+://")
FILE_SCHEME = "file://"
# What the console kind logs of a task's inputs, and of its outputs, at most.
CONSOLE_CHARACTERS = 64 * 1024


def is_scheme_url(element: Any) -> bool:
    """Whether an element is a URL to txtai's url task: a string starting with ``name://``."""
    return isinstance(element, str) and _SCHEME.match(element.lower()) is not None


def without_file_scheme(name: str) -> str:
    """A file name without the ``file://`` txtai allows in front of it."""
    return name[len(FILE_SCHEME) :] if name.startswith(FILE_SCHEME) else name


def selection(
    kind: str, policy: SafeOpen, has_action: bool = True
) -> tuple[Callable[[Any], bool] | None, Callable[[Any], Any] | None]:
    """The kind's (accept, prepare): which elements the task takes, and what they become first.

    ``url``: URLs, which safeopen checks before an action opens them (without an action,
    nothing is opened, so nothing is checked). ``file``: names of files under
    ``safeopen.directory``, as txtai takes names of files that exist; a name that is not one
    (missing, outside, unreadable: they look alike) passes through unchanged, and a file taken
    becomes its resolved path, so that the action opens that very file.
    """
    if kind == "url":

        def check_url(element: Any) -> Any:
            policy.check_url(element)
            return element

        return is_scheme_url, check_url if has_action else None
    if kind == "file":

        def is_file(element: Any) -> bool:
            return isinstance(element, str) and policy.find_file(without_file_scheme(element)) is not None

        def resolve(element: Any) -> Any:
            if not isinstance(element, str):  # unpack: false hands the whole tuple over, as txtai
                return element
            return str(policy.check_file(without_file_scheme(element)))

        return is_file, resolve
    return None, None


def console(task: str) -> Callable[[list[Any], list[Any]], None]:
    """The console kind's report of each call: its inputs and outputs, one log line each.

    txtai prints them to standard output; a server logs them (through its log's handlers,
    escaped into one line each, bounded), under ``aioserver.workflow.console`` at info level.
    """

    def report(inputs: list[Any], outputs: list[Any]) -> None:
        if console_logger.isEnabledFor(logging.INFO):
            console_logger.info("%s inputs: %s", task, _shown(inputs))
            console_logger.info("%s outputs: %s", task, _shown(outputs))

    return report


def _shown(values: list[Any]) -> str:
    """``values`` as JSON (what is not JSON, as its repr), on one line, bounded."""
    try:
        text = json.dumps(values, ensure_ascii=False, default=repr)
    except (ValueError, RecursionError):  # an action's circular or too deep result
        text = repr(values)
    text = loggable(text)  # JSON leaves U+2028, U+0085 and the like raw; no forged lines
    if len(text) > CONSOLE_CHARACTERS:
        return f"{text[:CONSOLE_CHARACTERS]}... ({len(text) - CONSOLE_CHARACTERS} characters more)"
    return text


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
    """Copies each URL's content, or file, into ``directory`` and gives back the local path.

    An element is an http(s) URL (fetched through safeopen), or the name of a file under
    ``safeopen.directory`` (``file://`` allowed in front; a relative name is relative to that
    directory). Anything else is the client's error, as it is txtai's with its safeopen on.
    ``flatten`` (default true) names the copy after the last segment of the URL's path or of
    the file's name; false keeps that path, as subdirectories (the URL's host is left out, as
    txtai leaves it out). Names are sanitized, so that no element can write outside.
    """

    task: str
    directory: Path
    flatten: bool = True
    wants_runtime = True

    async def __call__(self, batch: list[Any], *, runtime: Runtime | None = None) -> list[str]:
        runtime = _runtime(runtime, self.task)
        return list(await asyncio.gather(*(self._retrieve(element, runtime) for element in batch)))

    async def _retrieve(self, element: Any, runtime: Runtime) -> str:
        who = f"task {self.task} (retrieve)"
        if not isinstance(element, str):
            raise InvalidElement(f"{who} takes URLs and file names, got an element of type {type(element).__name__}")
        name = without_file_scheme(element)
        if is_url(name):
            body, _ = await fetch(runtime.session, runtime.safeopen, name, who=who)
            path = self.directory / self.relative_path(URL(name))
            store = functools.partial(_write, path, body)
        else:
            if is_scheme_url(name):
                runtime.safeopen.check_url(name)  # refuses any other scheme, with the reason
            source = await runtime.to_thread(runtime.safeopen.check_file, name)  # it stats the file system
            path = self.directory / self.file_path(name)
            store = functools.partial(_copy, path, source)
        try:
            await runtime.to_thread(store)  # never asyncio's default executor (reloads use it)
        except Unreadable as exc:  # as check_file answers for what it cannot read: one answer for all
            logger.warning("%s: %r cannot be read: %s", who, element[:1000], exc)
            raise Refused(f"refused {element[:200]!r}: {NOT_A_FILE}") from None
        except OSError as exc:
            problem = _UNSTORABLE.get(exc.errno or 0)
            if problem is None:  # a full disk, a permission: the operator's to see, a 500
                raise
            # The client's element decided the path: its error, naming neither the path nor the directory.
            logger.warning("%s: %r cannot be stored: %s (%s)", who, element[:1000], problem, type(exc).__name__)
            raise InvalidElement(f"{who} failed: {element[:200]!r} cannot be stored: {problem}") from None
        return str(path)

    def relative_path(self, url: URL) -> Path:
        """Where a URL's content goes, relative to ``directory``."""
        return self._relative(url.path, url.query_string)

    def file_path(self, name: str) -> Path:
        """Where a copy of the file ``name`` goes, relative to ``directory``."""
        return self._relative(name)

    def _relative(self, path: str, query: str = "") -> Path:
        parts = [_safe_name(p) for p in posixpath.normpath("/" + path).split("/") if p not in ("", ".", "..")]
        name = parts[-1] if parts else "index.html"
        if query:  # distinct queries, distinct files
            stem, dot, ext = name.rpartition(".")
            tag = hashlib.sha256(query.encode()).hexdigest()[:8]
            name = f"{stem}-{tag}.{ext}" if dot else f"{name}-{tag}"
        if self.flatten:
            return Path(name)
        return Path(*parts[:-1], name)


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
    _store(path, lambda file: file.write(body))


class Unreadable(Exception):
    """A file that safeopen lets a task open, but that cannot be read (its permissions, say)."""


def _copy(path: Path, source: Path) -> None:
    try:
        origin = open(source, "rb")
    except OSError as exc:
        raise Unreadable(exc.strerror or type(exc).__name__) from None
    with origin:
        _store(path, lambda file: shutil.copyfileobj(origin, file))


def _store(path: Path, fill: Callable[[IO[bytes]], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary file of its own per download, in the same directory (os.replace stays a rename):
    # downloads of one URL at once never write, rename or remove each other's. Its name starts with
    # a dot, which no download's has (_safe_name), so it is never mistaken for one. Not mkstemp:
    # its 0600 would make the download unreadable to the group that reads the others.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.part")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            fill(file)
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
