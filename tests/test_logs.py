"""The process's log (SPEC section 8): text or one JSON object a line, every line through one
batching handler, written whole; on the real ``python -m aioserver`` and in-process."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from typing import Any

import pytest
from test_requestids import BEARER, ECHO, ask, post, request_id

from aioserver import logs
from aioserver.logs import PIPE_BUF, BatchingHandler, JSONFormatter, TextFormatter

from conftest import TOKEN, TOKEN_HASH, Server, aioserver_command

CONFIG = "workflow:\n  echo: {tasks: [echo]}\n  boom: {tasks: [sample_actions.boom]}\n"
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d")
ACCESS_FIELDS = {
    "time", "level", "logger", "message", "pid", "client", "scheme", "method", "path", "status", "bytes",
    "duration", "identity", "request_id", "workflow",
}  # fmt: skip


def parsed(lines: list[str]) -> list[dict[str, Any]]:
    """Each line as the JSON object it must be, its time RFC 3339 with an offset."""
    objects = []
    for line in lines:
        assert line.endswith("\n"), line
        record = json.loads(line)
        assert isinstance(record, dict) and {"time", "level", "logger", "message", "pid"} <= record.keys(), line
        assert RFC3339.fullmatch(record["time"]) and datetime.fromisoformat(record["time"]).utcoffset() is not None
        objects.append(record)
    return objects


@pytest.mark.workers
@pytest.mark.parametrize("how", ["option", "environment"])
def test_json_logs_one_object_per_line_for_every_line(how: str) -> None:
    args, env = (("--log-format", "json"), {}) if how == "option" else ((), {"LOG_FORMAT": "JSON"})
    clients, each = 4, 150  # more than a batch per process; with workers, two processes write at once
    failures: list[BaseException] = []

    def client(port: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for i in range(each):
                headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
                connection.request("POST", f"/workflow?n={i}", ECHO, headers)
                response = connection.getresponse()
                assert response.status == 200 and response.read() == b"[1]"
        except BaseException as exc:
            failures.append(exc)
        finally:
            connection.close()

    with Server("--config", CONFIG, *args, env={"TOKEN": TOKEN_HASH, **env}) as server:
        threads = [threading.Thread(target=client, args=(server.port,)) for _ in range(clients)]
        for thread in threads:
            thread.start()
        boom = ask(server.port, post(b'{"name": "boom", "elements": [1]}', BEARER, b"X-Request-ID: boom-1\r\n"))
        unauthorized = ask(server.port, b"GET /health/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        for thread in threads:
            thread.join()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=20) == 0
    assert not failures, failures
    records = parsed(server.log)
    loggers = {record["logger"] for record in records}
    assert {"aioserver", "aiohttp.access", "aioserver.error"} <= loggers
    assert any(record["message"].startswith("serving on http://127.0.0.1:") for record in records)
    assert any(record["message"] == "stopped" for record in records)
    # Access lines: every field, of its type.
    access = [record for record in records if record["logger"] == "aiohttp.access"]
    assert len(access) == clients * each + 2 and all(record.keys() == ACCESS_FIELDS for record in access)
    echo = next(record for record in access if record["path"] == "/workflow" and record["status"] == 200)
    assert {k: echo[k] for k in ("level", "client", "scheme", "method", "bytes", "identity", "workflow")} == {
        "level": "INFO",
        "client": "127.0.0.1",
        "scheme": "http",
        "method": "POST",
        "bytes": 3,
        "identity": "token",
        "workflow": "echo",
    }
    assert isinstance(echo["duration"], float) and re.fullmatch(r"[0-9a-f]{16}", echo["request_id"])
    assert len({record["request_id"] for record in access}) == len(access)
    [failed] = [record for record in access if record["request_id"] == "boom-1"]
    assert (failed["status"], failed["workflow"]) == (500, "boom")
    [denied] = [record for record in access if record["request_id"] == request_id(unauthorized)]
    assert (denied["status"], denied["identity"], denied["workflow"]) == (401, None, None)
    # The error line: its request id as a field, the traceback as one field of the same line.
    [error] = [record for record in records if record["logger"] == "aioserver.error"]
    assert error["level"] == "ERROR" and error["request_id"] == "boom-1" and boom[0] == 500
    assert error["message"] == "error boom-1 while handling POST /workflow"
    assert error["traceback"].startswith("Traceback (most recent call last):") and "RuntimeError" in error["traceback"]
    if server.workers > 1:
        assert len({record["pid"] for record in access}) <= server.workers


@pytest.mark.workers
def test_a_failure_to_start_is_a_json_line_too() -> None:
    # Logging is set up by then: a pipeline reading JSON from the journal must not lose the one
    # line that says why the service is down. (A configuration error comes before the log's
    # format is known: it stays the command line's plain "aioserver: error: ...".)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = aioserver_command("--port", str(port), "--log-format", "json")
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    records = parsed(done.stderr.splitlines(keepends=True))
    assert (records[-1]["level"], records[-1]["logger"]) == ("CRITICAL", "aioserver"), records
    assert re.fullmatch(rf"cannot listen on 127\.0\.0\.1:{port}: .*in use", records[-1]["message"]), records


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_an_actions_worker_process_logs_as_the_server_does(log_format: str) -> None:
    # A sync action with concurrency: process runs in a process of its own: its lines too.
    config = "workflow:\n  warn: {tasks: [{action: sample_actions.warn, concurrency: process}]}\n"
    args = ("--config", config, "--log-format", log_format)
    with Server(*args, env={"TOKEN": TOKEN_HASH}) as server:
        assert ask(server.port, post(b'{"name": "warn", "elements": [1, 2]}', BEARER))[0] == 200
        deadline = time.monotonic() + 5
        while (
            not any("UserWarning: a warning of Python's own" in line for line in server.log)
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
    [line] = [line for line in server.log if "warned about 2 elements" in line]
    [python] = [
        line for line in server.log if "UserWarning: a warning of Python's own" in line
    ]  # logging's too (py.warnings)
    if log_format == "json":
        [record] = parsed([line])
        assert (record["level"], record["logger"]) == ("WARNING", "sample_actions")
        assert record["pid"] != server.process.pid and record["message"].endswith(f"process {record['pid']}")
        assert parsed([python])[0]["logger"] == "py.warnings"
    else:
        assert re.match(rf"{RFC3339.pattern} WARNING sample_actions: warned about 2 elements in process \d+\n", line)


def test_text_times_carry_the_utc_offset() -> None:
    # A zone 5 h 30 min east of UTC, written as POSIX TZ (no zone database needed): +05:30.
    with Server("--config", CONFIG, env={"TOKEN": TOKEN_HASH, "TZ": "IST-05:30"}) as server:
        assert ask(server.port, post(ECHO, BEARER))[0] == 200
        deadline = time.monotonic() + 5
        while not any("aiohttp.access" in line for line in server.log) and time.monotonic() < deadline:
            time.sleep(0.05)
    lines = list(server.log)
    assert lines and all(
        re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+05:30 (INFO|WARNING) [\w.]+: ", line) for line in lines
    ), lines


# -- in-process: the handler and the formatters


class Stream:
    """A stream that records each write and flush."""

    encoding = "utf-8"

    def __init__(self) -> None:
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        self.flushes += 1


def handler_on(stream: Stream, formatter: logging.Formatter | None = None) -> tuple[BatchingHandler, logging.Logger]:
    logger = logging.getLogger(f"test_logs.{id(stream)}")
    handler = BatchingHandler(stream, batched=logger.name)  # type: ignore[arg-type]
    handler.setFormatter(formatter or TextFormatter())
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.handlers[:] = [handler]
    return handler, logger


async def test_access_lines_wait_for_a_batch_and_any_other_line_writes_all_in_order() -> None:
    stream = Stream()
    _, logger = handler_on(stream)
    logger.info("one")
    logger.debug("two")
    assert stream.writes == []  # on the loop's thread: batched
    await asyncio.sleep(logs.BATCH_DELAY * 3)
    assert [w.count("\n") for w in stream.writes] == [2] and stream.writes[0].endswith(": two\n")
    logger.info("three")
    logger.warning("four")  # at once, after what waited
    assert [line.split(": ")[1] for line in "".join(stream.writes).splitlines()] == ["one", "two", "three", "four"]
    # Only the batched logger's lines wait: any other's is written at once, after them.
    other = logging.getLogger("test_logs.other")
    other.propagate = False
    other.setLevel(logging.DEBUG)
    other.handlers[:] = logger.handlers
    logger.info("five")
    other.info("six")
    assert [line.split(": ")[1] for line in "".join(stream.writes).splitlines()][-2:] == ["five", "six"]


async def test_a_line_from_another_thread_is_written_at_once_in_order() -> None:
    stream = Stream()
    _, logger = handler_on(stream)
    logger.info("from the loop")
    thread = threading.Thread(target=logger.info, args=("from a thread",))
    thread.start()
    thread.join()
    assert [line.split(": ")[1] for line in "".join(stream.writes).splitlines()] == ["from the loop", "from a thread"]


def test_a_line_waiting_on_a_loop_that_ended_is_written_by_the_next_loop_of_the_thread() -> None:
    """The batch's write is due on the loop that was running: once that loop is gone (its timer
    never fires), a line logged on a new loop of the same thread sets a timer there."""
    stream = Stream()
    _, logger = handler_on(stream)

    async def log(message: str, wait: float) -> None:
        logger.info(message)
        await asyncio.sleep(wait)

    asyncio.run(log("on the first loop", 0))  # ended before its write was due
    assert stream.writes == []
    asyncio.run(log("on the second loop", logs.BATCH_DELAY * 3))
    assert [line.split(": ")[1] for line in "".join(stream.writes).splitlines()] == [
        "on the first loop",
        "on the second loop",
    ]


def test_outside_a_loop_each_line_is_written_at_once() -> None:
    stream = Stream()
    _, logger = handler_on(stream)
    logger.info("started")
    assert stream.writes and stream.writes[-1].endswith(": started\n")


async def test_writes_hold_whole_lines_of_at_most_pipe_buf_bytes() -> None:
    stream = Stream()
    handler, logger = handler_on(stream)
    for i in range(logs.BATCH - 1):
        logger.info("%03d %s", i, "é" * (40 + i % 50))  # two bytes each in UTF-8
    logger.info("long %s", "x" * (2 * PIPE_BUF))  # the 256th: the batch is written
    assert stream.writes, "a full batch is written at once"
    assert all(w.endswith("\n") for w in stream.writes)
    long_lines = [w for w in stream.writes if len(w.encode()) > PIPE_BUF]
    assert len(long_lines) == 1 and long_lines[0].count("\n") == 1  # a line longer than that is written alone
    assert "".join(stream.writes).count("\n") == logs.BATCH and stream.flushes >= len(stream.writes)


def test_ascii_batches_are_cut_at_line_ends_within_pipe_buf() -> None:
    """The ASCII batch's pieces (cut by searching for line ends) hold whole lines, at most PIPE_BUF bytes
    but for a longer line alone, in order; a record of several lines (a traceback) is never cut."""
    lines = [f"{i:04d} {'x' * (i * 37 % 300)}\n" for i in range(200)]
    lines[50] = "y" * (PIPE_BUF + 10) + "\n"  # longer than a piece: alone
    lines[120] = "z" * (PIPE_BUF - 1) + "\n"  # exactly PIPE_BUF bytes: a piece of its own
    pieces = logs._chunks(lines, "utf-8")
    assert "".join(pieces) == "".join(lines)
    assert all(p.endswith("\n") for p in pieces)
    assert [p for p in pieces if len(p) > PIPE_BUF] == [lines[50]]
    assert lines[120] in pieces
    # Each piece but the last could not take the next line too.
    for i, piece in enumerate(pieces[:-1]):
        following = "".join(pieces[i + 1 :]).split("\n", 1)[0] + "\n"
        assert len(piece) + len(following) > PIPE_BUF or len(following) > PIPE_BUF, (i, len(piece))
    even = ["a" * 240 + "\n"] * 40  # 17 of them are PIPE_BUF + 1 bytes: the 17th goes to the next piece
    pieces = logs._chunks(even, "utf-8")
    assert "".join(pieces) == "".join(even) and max(map(len, pieces)) == 16 * 241
    traceback = "first\n  a frame\nValueError: x\n"
    many = [f"{i:03d} {'w' * 100}\n" for i in range(60)] + [traceback]
    pieces = logs._chunks(many, "utf-8")
    assert "".join(pieces) == "".join(many) and any(p.endswith(traceback) for p in pieces)
    assert all(len(p.encode()) <= PIPE_BUF for p in pieces)


def test_a_json_line_never_fails_and_carries_the_traceback() -> None:
    formatter = JSONFormatter()
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "bad \udc80 %s", (object(),), None)
    record.status = {1, 2}  # an attribute of one of our field names, of any type: its str()
    line = json.loads(formatter.format(record))
    assert line["message"].startswith("bad \udc80 <object object") and line["status"] in ("{1, 2}", "{2, 1}")
    try:
        raise ValueError("line\nfeed")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = formatter.format(record)
    assert "\n" not in text and json.loads(text)["traceback"].endswith("ValueError: line\nfeed")


def test_an_access_line_skips_the_record_only_while_our_handler_is_the_only_one() -> None:
    # A hierarchy of its own: aiohttp.access -> aiohttp -> root, as logging links them.
    root, parent, access = (logging.Logger(name) for name in ("root", "aiohttp", "aiohttp.access"))
    parent.parent, access.parent = root, parent
    ours = BatchingHandler(Stream())  # type: ignore[arg-type]
    ours.setFormatter(TextFormatter())
    root.addHandler(ours)
    assert logs.sole_handler(access) is ours
    ours.setFormatter(JSONFormatter())
    assert logs.sole_handler(access) is ours

    class Anyones(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            pass

    # Anything of anyone else's on the way: the record goes through logging.
    for where in (root, parent, access):
        other = Anyones()
        where.addHandler(other)
        assert logs.sole_handler(access) is None
        where.removeHandler(other)
    for where in (ours, access):
        where.addFilter(lambda record: True)
        assert logs.sole_handler(access) is None
        where.filters.clear()
    ours.setFormatter(logging.Formatter("%(message)s"))  # one of the user's
    assert logs.sole_handler(access) is None
    ours.setFormatter(TextFormatter())
    ours.setLevel(logging.WARNING)  # it would not take the record
    assert logs.sole_handler(access) is None
    ours.setLevel(logging.NOTSET)
    parent.propagate = False  # no handler at all: logging's last resort decides
    assert logs.sole_handler(access) is None
    parent.propagate = True
    assert logs.sole_handler(access) is ours
