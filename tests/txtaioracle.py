"""txtai itself as the oracle of the parity tests: its API, on 127.0.0.1, on the same config.

    from txtaioracle import Txtai, answer, same_answer

    with Txtai(config_yaml, cwd=tmp_path) as txtai, Server("--config", path) as server:
        same_answer(txtai, server.port, "w", ["a", "b"])

txtai runs as its users run it (``CONFIG=app.yml uvicorn txtai.api:app``), from a venv of its own
that the suite makes once, as it makes ``.venv-no-extras/`` (see conftest): ``.venv-txtai/`` in
the worktree's root, kept while :data:`REQUIREMENTS` and the Python version do not change. It
holds txtai's minimal install (``txtai-minimal``: txtai's code without its required
dependencies, torch, transformers, faiss) with the ``api`` extra its API imports, and the three
of txtai's default dependencies that its API and workflows import without a model: msgpack
(its responses), numpy (its merges) and PyYAML (its config). torch, imported by txtai's tasks
only to ask ``torch.is_tensor`` in merges, is :file:`txtaistub/torch`, put on its PYTHONPATH.

A test that cannot make the venv or start txtai fails; it never skips. Every call here is
blocking (subprocesses, urllib): call them from sync tests, or through ``asyncio.to_thread``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import made_venv

TESTS = Path(__file__).parent
ROOT = TESTS.parent
VENV = ROOT / ".venv-txtai"
STUBS = TESTS / "txtaistub"
# txtai pinned: it is the oracle, so its answers must not move under the tests.
REQUIREMENTS = ("txtai-minimal[api]==9.14.0", "msgpack", "numpy", "pyyaml")
# What txtai reads from the environment: never inherited from the test's, only given.
TXTAI_VARIABLES = ("CONFIG", "TOKEN", "DEPENDENCIES", "EXTENSIONS", "API_CLASS", "PYTHONPATH")

_python: str | BaseException | None = None
_lock = threading.Lock()


def txtai_python() -> str:
    """The interpreter of the txtai venv, made on first use; AssertionError if it cannot be made."""
    global _python
    with _lock:
        if _python is None:
            try:
                _python = _make_venv()
            except BaseException as exc:  # once: every test needing it fails with the same reason
                _python = exc
    if isinstance(_python, BaseException):
        raise AssertionError(f"no txtai venv: {_python}") from _python
    return _python


def _make_venv() -> str:
    wanted = hashlib.sha256("\n".join((*REQUIREMENTS, sys.version)).encode()).hexdigest()

    def imports_the_api(python: str) -> None:
        found = subprocess.run(
            [python, "-c", "import txtai.api, uvicorn"],
            env={**_environment(), "PYTHONPATH": str(STUBS)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert found.returncode == 0, f"txtai's API does not import:\n{found.stderr}"

    return made_venv(VENV, wanted, list(REQUIREMENTS), imports_the_api)


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in TXTAI_VARIABLES}


@dataclass(frozen=True)
class Answer:
    """An HTTP answer: its status and its body, parsed as JSON when it is JSON."""

    status: int
    body: Any


class Txtai:
    """txtai's API (``uvicorn txtai.api:app``) on ``config``, written to ``cwd/app.yml``.

    ``cwd`` is its working directory (txtai opens relative paths from there); ``pythonpath``
    adds directories to import actions from (tests/ always: the parity actions live there);
    ``env`` adds variables (``TOKEN``, say).
    """

    def __init__(
        self,
        config: str,
        cwd: Path,
        env: dict[str, str] | None = None,
        pythonpath: tuple[Path, ...] = (),
        timeout: float = 120,
    ) -> None:
        python = txtai_python()
        (cwd / "app.yml").write_text(config)
        environment = {
            **_environment(),
            "CONFIG": "app.yml",
            "PYTHONPATH": os.pathsep.join(str(p) for p in (STUBS, TESTS, *pythonpath)),
            **(env or {}),
        }
        self.log: list[str] = []
        self.process = subprocess.Popen(
            [python, "-m", "uvicorn", "txtai.api:app", "--host", "127.0.0.1", "--port", "0"],
            cwd=cwd,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        # A txtai that never says it serves is killed, so that the test fails instead of hanging.
        watchdog = threading.Timer(timeout, self.process.kill)
        watchdog.start()
        try:
            self.port = self._read_port()
        finally:
            watchdog.cancel()
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()

    def _read_port(self) -> int:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if found:
                return int(found.group(1))
        self.close()
        raise AssertionError("txtai exited or hung before serving:\n" + "".join(self.log))

    def _drain(self) -> None:
        assert self.process.stderr is not None
        self.log.extend(self.process.stderr)

    def __enter__(self) -> Txtai:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop txtai (it holds no state worth a graceful stop)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        assert self.process.stderr is not None
        if getattr(self, "_drainer", None) is not None and self._drainer.is_alive():
            self._drainer.join()
        self.process.stderr.close()

    def workflow(self, name: str, elements: list[Any], token: str | None = None) -> Answer:
        """txtai's answer to ``POST /workflow {"name", "elements"}``."""
        return answer(self.port, name, elements, token=token)


def request(
    port: int,
    path: str,
    body: Any = None,
    token: str | None = None,
    method: str | None = None,
    timeout: float = 30,
) -> Answer:
    """One request to 127.0.0.1:port (JSON body, when given), answered as an :class:`Answer`."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    call = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(call, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return Answer(status, json.loads(raw))
    except ValueError:
        return Answer(status, raw.decode("utf-8", "replace"))


def answer(port: int, name: str, elements: list[Any], token: str | None = None) -> Answer:
    """The answer of the server on ``port`` (txtai's or aioserver's) to one workflow request."""
    return request(port, "/workflow", {"name": name, "elements": elements}, token=token)


def same_answer(txtai: Txtai, port: int, name: str, elements: list[Any], token: str | None = None) -> Answer:
    """Run the same request on txtai and on the aioserver on ``port``: the same answer, or both fail.

    Where txtai answers 200, aioserver must answer 200 with the same JSON. Where txtai fails
    (its 500 for any exception an action raises), aioserver must fail too, with a JSON error
    (its status may say better what went wrong: 400 for the client's element). Returns
    aioserver's answer.
    """
    expected = txtai.workflow(name, elements, token=token)
    actual = answer(port, name, elements, token=token)
    context = f"workflow {name!r} on {elements!r}: txtai {expected}, aioserver {actual}"
    if expected.status == 200:
        assert actual == expected, context
    else:
        assert actual.status >= 400 and isinstance(actual.body, dict) and "error" in actual.body, context
    return actual
