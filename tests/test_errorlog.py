"""The log of unexpected errors (500s): each one a line with its id; each distinct traceback in
full once, then counted, so that a failing workflow under load does not flood the log."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import uvloop

from aioserver.errorlog import LONGEST_MESSAGE, TracebackLog, describe, formatted, signature
from aioserver.workflow.processes import RemoteTraceback

from conftest import Server

FAILING = """workflow:
  boom: {tasks: [sample_actions.boom]}
  process_boom: {tasks: [{action: sample_actions.boom, concurrency: process}]}
  object: {tasks: [sample_actions.not_json]}
"""
BOOM = "RuntimeError: the action broke: secret-detail-42"


def post(port: int, name: str) -> tuple[int, Any]:
    body = json.dumps({"name": name, "elements": [1]}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/workflow", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def error_ids(port: int, name: str, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        status, answer = post(port, name)
        assert status == 500 and answer["id"] in answer["error"], answer
        ids.append(answer["id"])
    return ids


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_repeated_traceback_is_logged_once_then_counted(loop: str, workers: int, tmp_path: Path) -> None:
    config = tmp_path / "config.yml"
    config.write_text(FAILING)
    with Server("--config", str(config), "--loop", loop, "--workers", str(workers), listeners=workers) as server:
        ids = {name: error_ids(server.port, name, 30) for name in ("boom", "process_boom")}
        ids["object"] = error_ids(server.port, "object", 3)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
    lines = "".join(server.log).splitlines()

    # Every 500 keeps its line, with its id and what failed.
    for error_id in [error_id for expected in ids.values() for error_id in expected]:
        (line,) = [line for line in lines if f"error {error_id} while handling POST /workflow" in line]
        assert " ERROR aioserver.error: " in line
    # Each distinct traceback in full once per worker process at most (each counts its own).
    full = [i for i, line in enumerate(lines) if line == "Traceback (most recent call last):"]
    assert 3 <= len(full) <= 3 * workers, "\n".join(lines)
    # Local and worker-process actions differ (the latter shows its traceback in the worker process too).
    assert 1 <= sum(line == BOOM for line in lines) <= 3 * workers
    assert 1 <= sum("not JSON-serializable" in line and line.startswith("TypeError") for line in lines) <= workers
    # The others are counted, and the counts (logged at the latest when the server stops) add up.
    repeats = [line for line in lines if "(traceback as error " in line]
    assert len(repeats) == 63 - len(full)
    counted = [re.search(r"(\d+) more like error ([0-9a-f]+) in the last [0-9.]+ s$", line) for line in lines]
    assert sum(int(found[1]) for found in counted if found) == len(repeats)
    firsts = {found[2] for found in counted if found}
    assert all(line.endswith(tuple(f"(traceback as error {first})" for first in firsts)) for line in repeats)


# -- the log itself, in-process on both loops


def failure(message: str) -> BaseException:
    try:
        raise RuntimeError(message)
    except RuntimeError as exc:
        return exc


def other_failure() -> BaseException:
    try:
        raise RuntimeError("elsewhere")
    except RuntimeError as exc:
        return exc


def test_tracebacks_are_the_same_by_types_and_places_not_messages() -> None:
    assert signature(failure("a")) == signature(failure("b"))
    assert signature(failure("a")) != signature(other_failure())
    remote = 'Traceback (most recent call last):\n  File "x.py", line {}, in f\nRuntimeError: {}'
    carried = [ValueError("one"), ValueError("two"), ValueError("three")]
    for exc, (line, message) in zip(carried, [(1, "a"), (1, "b"), (2, "a")], strict=True):
        exc.__cause__ = RemoteTraceback(remote.format(line, message))
    assert signature(carried[0]) == signature(carried[1]) != signature(carried[2])
    # Frame-like lines in the message are the message's: no new kind.
    forged = [ValueError("four"), ValueError("five")]
    for exc, message in zip(forged, ['a\n  File "r1", line 1', 'a\n  File "r2", line 1'], strict=True):
        exc.__cause__ = RemoteTraceback(remote.format(1, message))
    assert signature(forged[0]) == signature(forged[1]) == signature(carried[0])


class Unprintable(Exception):
    def __str__(self) -> str:
        raise ValueError("no text")


def test_an_exception_that_cannot_say_what_it_is_is_still_described() -> None:
    exc = Unprintable()
    exc.__cause__ = Unprintable()  # as a worker process's would come, without a traceback
    assert describe(exc) == "Unprintable: <unprintable Unprintable>"
    assert signature(exc) == signature(Unprintable())[:1] * 2


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[str, bool]] = []  # (message, with a traceback)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.getMessage(), record.exc_info is not None))


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_repeats_are_counted_each_interval_and_a_quiet_traceback_is_forgotten(run: Any) -> None:
    records = Records()
    logger = logging.getLogger("test_errorlog")
    logger.addHandler(records)
    logger.propagate = False

    async def scenario() -> None:
        log = TracebackLog(logger, interval=0.2)
        for number in range(5):
            log.error(f"id{number}", "while testing", failure(f"message {number}"))
        log.error("other", "while testing", other_failure())
        assert records.lines[:3] == [
            ("error id0 while testing", True),
            ("error id1 while testing: RuntimeError: message 1 (traceback as error id0)", False),
            ("error id2 while testing: RuntimeError: message 2 (traceback as error id0)", False),
        ]
        assert records.lines[5] == ("error other while testing", True)
        # The timers of the intervals are due long before this sleep ends: counted, then forgotten.
        await asyncio.sleep(3)
        (count,) = [message for message, _ in records.lines[6:]]
        assert re.fullmatch(r"4 more like error id0 in the last 0\.\d+ s", count), count
        log.error("id5", "while testing", failure("again"))
        assert records.lines[-1] == ("error id5 while testing", True)
        log.error("id6", "while testing", failure("and again"))
        log.flush()  # as the server stops: the count so far
        assert records.lines[-1][0].startswith("1 more like error id5 in the last ")

    try:
        run(scenario())
    finally:
        logger.removeHandler(records)


# -- client text in an exception's message: escaped in the full traceback, and no new kind of it

ELEMENTS = """workflow:
  bad: {tasks: [sample_actions.bad_element]}
  process_bad: {tasks: [{action: sample_actions.bad_element, concurrency: process}]}
"""
FORGED = '2026-01-01 00:00:00,000 INFO aioserver.access: 127.0.0.1 "GET /forged HTTP/1.1" 200'


def post_elements(port: int, name: str, elements: list[Any]) -> tuple[int, Any]:
    body = json.dumps({"name": name, "elements": elements}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/workflow", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("name", ["bad", "process_bad"])
def test_an_exception_message_cannot_forge_a_log_line(loop: str, name: str, tmp_path: Path) -> None:
    """The message (and its cause's, and a worker process's traceback text) is escaped in the
    full traceback: the client's line feeds stay on the message's line."""
    config = tmp_path / "config.yml"
    config.write_text(ELEMENTS)
    with Server("--config", str(config), "--loop", loop) as server:
        assert post_elements(server.port, name, ["x\n" + FORGED + "\n\x1b[2J"])[0] == 500
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
    lines = "".join(server.log).splitlines()
    assert not [line for line in lines if line.startswith(FORGED) or "\x1b" in line], "\n".join(lines)
    # Still there, escaped, with the traceback's own lines as they were.
    shown = [line for line in lines if "\\n" + FORGED + "\\n\\x1b[2J" in line]
    # The message and its cause's; a worker's text has both in its message, which is all its rest.
    assert len(shown) == 2, "\n".join(lines)
    headers = [line for line in lines if line.endswith("Traceback (most recent call last):")]
    if name == "bad":
        assert headers == ["Traceback (most recent call last):"] * 2, "\n".join(lines)
    else:
        assert headers == [
            "aioserver.workflow.processes.RemoteTraceback: Traceback (most recent call last):",
            "Traceback (most recent call last):",
        ], "\n".join(lines)
    # The action's frames stay lines (a worker's text: those before its first message).
    frames = sum(line.startswith('  File "') and "sample_actions.py" in line for line in lines)
    assert frames == {"bad": 2, "process_bad": 1}[name], "\n".join(lines)


@pytest.mark.parametrize("name", ["bad", "process_bad"])
def test_a_clients_megabyte_in_a_message_makes_no_megabyte_log_line(name: str, tmp_path: Path) -> None:
    """An action naming the client's element in its message (and its cause's): the full
    traceback, logged once, carries at most LONGEST_MESSAGE characters of each message. A JSON
    line of megabytes is cut into pieces by journald (LineMax, 48 KiB) and by log shippers."""
    config = tmp_path / "config.yml"
    config.write_text(ELEMENTS)
    element = "x" * 1_000_000
    with Server("--config", str(config), "--log-format", "json") as server:
        assert post_elements(server.port, name, [element])[0] == 500
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
    records = [json.loads(line) for line in server.log]
    [error] = [record for record in records if record["logger"] == "aioserver.error"]
    assert len(json.dumps(error)) < 4 * LONGEST_MESSAGE + 8192, len(json.dumps(error))
    more = f"... ({len(element) + len('bad: ') - LONGEST_MESSAGE} more characters)"
    assert f"ValueError: bad: {'x' * (LONGEST_MESSAGE - 5)}{more}" in error["traceback"]
    assert "RuntimeError: cause: xxx" in error["traceback"]


@pytest.mark.parametrize("workers", [1, 2])
def test_frames_in_a_worker_processs_message_make_no_new_kind_of_traceback(workers: int, tmp_path: Path) -> None:
    """The kind of a worker process's traceback is its frames, not lines of its message that look
    like frames: 30 failures whose messages hold distinct such lines are one kind."""
    config = tmp_path / "config.yml"
    config.write_text(ELEMENTS)
    with Server("--config", str(config), "--workers", str(workers), listeners=workers) as server:
        for number in range(30):
            element = f'x\n  File "r{number}", line 1'
            assert post_elements(server.port, "process_bad", [element])[0] == 500
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
    lines = "".join(server.log).splitlines()
    full = sum(line == "Traceback (most recent call last):" for line in lines)
    assert 1 <= full <= workers, "\n".join(lines)
    assert sum("(traceback as error " in line for line in lines) == 30 - full


def test_a_full_traceback_escapes_every_message_and_keeps_its_lines() -> None:
    """In-process: messages of the chain, notes and an ExceptionGroup's members are escaped;
    the frames, the chain's links and the members' tracebacks keep their lines."""

    def fail(message: str) -> BaseException:
        try:
            try:
                raise KeyError("k")
            except KeyError:
                raise ValueError(message) from None
        except ValueError as exc:
            exc.add_note("note\n" + FORGED)
            return exc

    group = ExceptionGroup("group\n" + FORGED, [fail("member\n" + FORGED)])
    try:
        raise RuntimeError("top\n" + FORGED) from group
    except RuntimeError as exc:
        text = formatted(exc)
    lines = text.split("\n")
    assert not [line for line in lines if FORGED in line and "\\n" + FORGED not in line], text
    assert sum(FORGED in line for line in lines) == 4, text  # top, group, member, note
    assert "| ValueError: member\\n" + FORGED in lines, text
    assert "Traceback (most recent call last):" in lines and "| Traceback (most recent call last):" in lines
    assert "The above exception was the direct cause of the following exception:" in lines
    assert "KeyError" not in text  # suppressed by "from None", as Python prints it
