"""Request bodies: admission before reading, exact size limits, bounded parsing, nesting, log lines.

In-process tests run the app behind the runner the CLI uses, on a real port, on asyncio's loop;
black-box tests run ``python -m aioserver`` (on uvloop) and watch its memory and its log.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from aioserver import create_app, jsoncodec, load_config
from aioserver.errors import UpstreamError
from aioserver.limits import LimitedRunner
from aioserver.logtext import LONGEST_PATH, loggable, logged_path

from conftest import Server, exchange

JSON = b"Content-Type: application/json\r\n"
MAX = 2048  # the in-process server's --max-body-size
CONFIG = f"""
server:
  max_body_size: {MAX}
  limit_concurrency: 1
  timeout_request_body: 2
workflow:
  echo: {{tasks: [echo]}}
  nap: {{tasks: [{{action: sample_actions.async_sleepy, args: [1]}}]}}
  deep: {{tasks: [test_bodies.deep_results]}}
"""
BIG = 2 * 1024 * 1024  # a --max-body-size over views.INLINE_BODY: bodies parsed off the loop
BIG_CONFIG = f"""
server:
  max_body_size: {BIG}
workflow:
  echo: {{tasks: [echo]}}
"""
MAX_VALUES = BIG // 16  # views.BYTES_PER_VALUE


def deep_results(batch: list[Any]) -> list[Any]:
    """An action answering each element with lists nested 2000 deep: more than json.dumps can."""
    results = []
    for _ in batch:
        result: list[Any] = []
        for _ in range(2000):
            result = [result]
        results.append(result)
    return results


Serve = Callable[..., Awaitable[int]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start the app for a config behind LimitedRunner on a real port; give the port."""
    runners: list[LimitedRunner] = []

    async def start(yaml_text: str, setup: Callable[[web.Application], None] | None = None) -> int:
        config = load_config(yaml_text)
        app = create_app(config)
        if setup is not None:
            setup(app)
        runner = LimitedRunner(app, config.settings, handle_signals=False)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return int(runner.addresses[0][1])

    yield start
    for runner in runners:
        await runner.cleanup()


def head(length: int | None, path: bytes = b"/workflow") -> bytes:
    """A POST head: a declared length, or chunked when None."""
    framing = b"Transfer-Encoding: chunked\r\n" if length is None else b"Content-Length: %d\r\n" % length
    return b"POST " + path + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n" + JSON + framing + b"\r\n"


def chunked(body: bytes, size: int = 500) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


ECHO_FRAME = (b'{"name": "echo", "elements": ["', b'", 1]}')


def echo_body(length: int) -> bytes:
    """A valid echo request of exactly ``length`` bytes: a string of x, and 1."""
    start, end = ECHO_FRAME
    return start + b"x" * (length - len(start) - len(end)) + end


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def payload(answer: bytes) -> Any:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])


# -- exact size limits (a 413 off by one byte or by a factor of two must fail a test)


@pytest.mark.parametrize("framing", ["declared", "chunked"])
async def test_body_of_exactly_the_limit_is_accepted(serve: Serve, framing: str) -> None:
    port = await serve(CONFIG)
    body = echo_body(MAX)
    assert len(body) == MAX
    sent = head(len(body)) + body if framing == "declared" else head(None) + chunked(body)
    answer = await exchange(port, sent)
    assert status(answer) == 200
    assert payload(answer) == ["x" * (MAX - len(b"".join(ECHO_FRAME))), 1]


async def test_one_byte_over_declared_is_413_before_the_body_is_sent(serve: Serve) -> None:
    port = await serve(CONFIG)
    started = time.monotonic()
    answer = await exchange(port, head(MAX + 1))  # no body: the answer does not wait for it
    assert status(answer) == 413, answer
    assert payload(answer) == {"error": f"Maximum request body size {MAX} exceeded."}
    assert time.monotonic() - started < 1.5  # not the 408 that waiting for the body would give at 2 s


async def test_one_byte_over_chunked_is_413(serve: Serve) -> None:
    port = await serve(CONFIG)
    answer = await exchange(port, head(None) + chunked(echo_body(MAX + 1)))
    assert status(answer) == 413
    assert f"Maximum request body size {MAX} exceeded" in payload(answer)["error"]


# -- --limit-concurrency admits before reading the body


async def test_over_the_concurrency_limit_is_503_before_the_body_is_read(serve: Serve) -> None:
    port = await serve(CONFIG)  # limit_concurrency: 1
    nap = b'{"name": "nap", "elements": ["z"]}'
    running = asyncio.create_task(exchange(port, head(len(nap)) + nap))
    await asyncio.sleep(0.3)  # the nap workflow (1 s) holds the only slot
    started = time.monotonic()
    answer = await exchange(port, head(MAX))  # a head, and no body
    assert status(answer) == 503
    assert b"\r\nRetry-After: 1\r\n" in answer
    assert payload(answer) == {"error": "too many workflows running, retry later"}
    assert time.monotonic() - started < 1.5  # not the 408 that waiting for the body would give at 2 s
    assert status(await running) == 200


async def test_a_slow_upload_holds_its_slot_and_no_more(serve: Serve) -> None:
    port = await serve(CONFIG)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head(MAX) + b'{"name": "echo", ')  # the rest never comes
    await asyncio.sleep(0.2)
    body = b'{"name": "echo", "elements": [1]}'
    assert status(await exchange(port, head(len(body)) + body)) == 503
    writer.close()  # the slow upload gives up: its slot is free again
    await reader.read()
    await asyncio.sleep(0.1)
    assert payload(await exchange(port, head(len(body)) + body)) == [1]


# -- nesting: bounded on the way in, so that an echo always serializes; cleanly refused


def nested(depth: int, pad: int = 0) -> bytes:
    """A request body ``depth`` levels deep in all (its object counting as one), padded with spaces."""
    return b'{"name": "echo", "elements": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b" " * pad + b"}"


@pytest.mark.parametrize("pad", [0, 100_000], ids=["inline", "off-loop"])
async def test_nesting_up_to_the_limit_is_accepted_one_more_is_400(
    serve: Serve, caplog: pytest.LogCaptureFixture, pad: int
) -> None:
    port = await serve(BIG_CONFIG)
    deepest = nested(jsoncodec.MAX_DEPTH, pad)
    answer = await exchange(port, head(len(deepest)) + deepest)
    assert status(answer) == 200
    assert answer.endswith(b"[" * (jsoncodec.MAX_DEPTH - 1) + b"]" * (jsoncodec.MAX_DEPTH - 1))
    with caplog.at_level(logging.DEBUG):
        for body in (nested(jsoncodec.MAX_DEPTH + 1, pad), nested(1100, pad), b"[" * 5000 + b" " * pad):
            answer = await exchange(port, head(len(body)) + body)
            assert status(answer) == 400
            assert payload(answer) == {"error": f"body is nested deeper than {jsoncodec.MAX_DEPTH} levels"}
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("use_orjson", [True, False], ids=["orjson", "json"])
def test_codec_refuses_deep_documents_without_recursion_error(
    monkeypatch: pytest.MonkeyPatch, use_orjson: bool
) -> None:
    if not use_orjson:
        monkeypatch.setattr(jsoncodec, "orjson", None)
    for depth in (jsoncodec.MAX_DEPTH + 1, 1000, 1100, 100_000):
        with pytest.raises(jsoncodec.TooDeep):
            jsoncodec.loads(b"[" * depth + b"]" * depth)
    assert jsoncodec.loads(b"[" * jsoncodec.MAX_DEPTH + b"]" * jsoncodec.MAX_DEPTH) is not None
    with pytest.raises(ValueError, match="nested too deeply"):
        jsoncodec.dumps(deep_results([1]))


async def test_a_result_too_deep_to_serialize_is_a_clean_500(serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    port = await serve(CONFIG)
    body = b'{"name": "deep", "elements": [1]}'
    with caplog.at_level(logging.ERROR):
        answer = await exchange(port, head(len(body)) + body)
    assert status(answer) == 500
    error = payload(answer)
    assert set(error) == {"error", "id"} and b"Traceback" not in answer
    records = [r for r in caplog.records if error["id"] in r.getMessage()]
    assert len(records) == 1
    assert records[0].exc_info is not None and "nested too deeply to serialize" in str(records[0].exc_info[1])
    assert "RecursionError" not in caplog.text


# -- big bodies: a bounded number of values, parsed off the loop


def zeros(count: int) -> bytes:
    """An echo request with exactly ``count`` of the bytes , : [ { (JSON values, as counted)."""
    return b'{"name": "echo", "elements": [' + b",".join([b"0"] * (count - 4)) + b"]}"


def _empty_objects(size: int) -> bytes:
    """``{"name": "echo", "elements": [{}, {}, ...]}`` of ``size`` bytes: 24 bytes of Python per byte."""
    start, end = b'{"name": "echo", "elements": [', b"{}]}"
    return start + b"{}," * ((size - len(start) - len(end)) // 3) + end


def _strings(size: int) -> bytes:
    """An echo request of ``size`` bytes, of short strings: nearly as many values as allowed at 16 MiB."""
    start, end = b'{"name": "echo", "elements": [', b'""]}'
    return start + b'"abcdefghijklmn",' * ((size - len(start) - len(end)) // 17) + end


# A probe of its own process: a thread of the test's, in-process, would wait for the GIL while a
# server's thread held it, and start its clock only once it had it back: it never saw the stall.
# Each line it prints is when a /health request started and ended (CLOCK_MONOTONIC, which every
# process shares) and the answer's status line. It asks every 10 ms: a refusal (413) of a big body
# takes some 20 ms, which a probe every 50 ms missed about half the time (no probe overlapped).
_PROBE = """
import socket, sys, time
while True:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30) as sock:
        sock.sendall(b"GET /health HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n")
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    print(started, time.monotonic(), answer.split(b"\\r\\n", 1)[0].decode(), flush=True)
    time.sleep(0.01)
"""


async def _health_while_posting(port: int, body: bytes, count: int = 1, within: float = 1) -> list[tuple[int, bytes]]:
    """POST ``body`` ``count`` times at once while another process asks /health every 10 ms:
    each answer must come within ``within`` seconds. Gives each POST's status and answer."""
    probe = subprocess.Popen([sys.executable, "-c", _PROBE, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert probe.stdout is not None
        await asyncio.to_thread(probe.stdout.readline)  # it answers: the server is idle, the probe running
        started = time.monotonic()
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:

            async def post() -> tuple[int, bytes]:
                data = io.BytesIO(body)  # as aiohttp wants a big body, not as one bytes object
                async with session.post("/workflow", data=data, headers={"Content-Type": "application/json"}) as post:
                    return post.status, await post.read()

            answers = await asyncio.gather(*(post() for _ in range(count)))
        ended = time.monotonic()
    finally:
        probe.terminate()
        output, _ = await asyncio.to_thread(probe.communicate)
    probes = [
        (float(begin), float(end), line) for begin, end, line in (row.split(" ", 2) for row in output.splitlines())
    ]
    assert any(begin < ended and end > started for begin, end, _ in probes)  # asked while the bodies were handled
    assert {line for _, _, line in probes} == {"HTTP/1.1 200 OK"}
    slowest = max(end - begin for begin, end, _ in probes)
    assert slowest < within, f"/health took {slowest:.2f}s while big bodies were handled ({count} at once)"
    return answers


async def test_big_body_of_the_most_values_allowed_is_accepted_one_more_is_413(serve: Serve) -> None:
    port = await serve(BIG_CONFIG)
    allowed = zeros(MAX_VALUES)
    assert len(allowed) > 64 * 1024  # parsed off the loop, with the count
    answer = await exchange(port, head(len(allowed)) + allowed)
    assert status(answer) == 200 and payload(answer) == [0] * (MAX_VALUES - 4)
    over = zeros(MAX_VALUES + 1)
    answer = await exchange(port, head(len(over)) + over)
    assert status(answer) == 413
    assert payload(answer) == {"error": f"body holds more than {MAX_VALUES} JSON values"}


async def test_health_answers_while_big_bodies_are_parsed(serve: Serve) -> None:
    port = await serve(BIG_CONFIG.replace(str(BIG), str(16 * 1024 * 1024)))
    [(refused, _)] = await _health_while_posting(port, _empty_objects(16 * 1024 * 1024))
    [(accepted, _)] = await _health_while_posting(port, _strings(16 * 1024 * 1024))
    assert (refused, accepted) == (413, 200)


# -- numbers: integers of at most MAX_INT_DIGITS digits, finite floats, exact echoes; and the
# standard library's slow work (parsing, serializing what orjson cannot) letting the loop in

DIGITS = 100  # jsoncodec.MAX_INT_DIGITS, as the README says
# The attacker's body: integers just under Python's 4,300-digit limit, whose conversions to and
# from text are quadratic (0.5 s to parse, 1.2 s to echo with json.dumps, all holding the GIL).
HUGE_INTEGERS = b'{"name":"echo","elements":[' + b",".join([b"9" * 4299] * 3800) + b"]}"
# Integers orjson cannot hold exactly (past 64 bits, or a 19-digit negative past -2**63), and
# the most digits allowed: echoed as sent, through whichever parser and serializer.
EXACT = [10 ** (DIGITS - 1), -(10**DIGITS - 1), 2**64, -(2**63) - 1, -(10**18) * 9, 10**19, 123456789 * 10**40, 0]


def _slow_floats(size: int) -> bytes:
    """An echo request of about ``size`` bytes of the floats slowest to format (2.4 us each in
    repr), after a lone surrogate, which orjson refuses: the standard library parses and answers."""
    start, end = b'{"name": "echo", "elements": ["\\ud800"', b"]}"
    return start + b", 2.2250738585072014e-308" * ((size - len(start) - len(end)) // 25) + end


def _body(elements: bytes, pad: int) -> bytes:
    return b'{"name": "echo", "elements": [' + elements + b"]" + b" " * pad + b"}"


@pytest.mark.parametrize("use_orjson", [True, False], ids=["orjson", "json"])
@pytest.mark.parametrize("pad", [0, 100_000], ids=["inline", "off-loop"])
async def test_integers_of_up_to_max_digits_are_echoed_exactly(
    serve: Serve, monkeypatch: pytest.MonkeyPatch, use_orjson: bool, pad: int
) -> None:
    if not use_orjson:
        monkeypatch.setattr(jsoncodec, "orjson", None)
    port = await serve(BIG_CONFIG)
    body = _body(json.dumps(EXACT)[1:-1].encode(), pad)
    answer = await exchange(port, head(len(body)) + body)
    assert status(answer) == 200
    echoed = payload(answer)
    assert echoed == EXACT and all(type(value) is int for value in echoed)  # not 1e+99, nor 1.8446744073709552e+19
    for number in (b"1" + b"0" * DIGITS, b"-" + b"9" * (DIGITS + 1), b"9" * 4299, b"9" * 5000):
        body = _body(b'"x", ' + number, pad)
        answer = await exchange(port, head(len(body)) + body)
        assert status(answer) == 400
        assert payload(answer) == {"error": f"body holds an integer of more than {DIGITS} digits"}


@pytest.mark.parametrize("use_orjson", [True, False], ids=["orjson", "json"])
@pytest.mark.parametrize("pad", [0, 100_000], ids=["inline", "off-loop"])
@pytest.mark.parametrize(
    "number",
    [b"1e999999", b"-1E400", b"NaN", b"Infinity", b"-Infinity", b"1" * 400 + b".5"],
    ids=["1e999999", "-1E400", "NaN", "Infinity", "-Infinity", "400-digit-float"],
)
async def test_numbers_past_a_double_are_400(
    serve: Serve, monkeypatch: pytest.MonkeyPatch, use_orjson: bool, pad: int, number: bytes
) -> None:
    # NaN and Infinity are not JSON (RFC 8259, 6), and past 1.8e308 a double holds neither: orjson
    # answered null for them, json.dumps NaN or Infinity, which no JSON parser takes.
    if not use_orjson:
        monkeypatch.setattr(jsoncodec, "orjson", None)
    port = await serve(BIG_CONFIG)
    body = _body(b"1, " + number, pad)
    answer = await exchange(port, head(len(body)) + body)
    assert status(answer) == 400
    assert payload(answer) == {"error": "body holds a number that is not finite (NaN, Infinity, or past 1.8e308)"}


@pytest.mark.parametrize("use_orjson", [True, False], ids=["orjson", "json"])
def test_codec_numbers_and_surrogates(monkeypatch: pytest.MonkeyPatch, use_orjson: bool) -> None:
    if not use_orjson:
        monkeypatch.setattr(jsoncodec, "orjson", None)
    assert jsoncodec.MAX_INT_DIGITS == DIGITS
    value = jsoncodec.loads(json.dumps(EXACT).encode())
    assert value == EXACT and all(type(number) is int for number in value)
    assert json.loads(jsoncodec.dumps(value)) == EXACT
    for number in (b"1" + b"0" * DIGITS, b"-" + b"9" * (DIGITS + 1), b"9" * 4299):
        with pytest.raises(jsoncodec.TooLongInteger, match=f"an integer of more than {DIGITS} digits"):
            jsoncodec.loads(b"[1, " + number + b"]")
    for number in (b"1e999999", b"-1e999999", b"NaN", b"Infinity", b"-Infinity"):
        with pytest.raises(jsoncodec.NotFinite):
            jsoncodec.loads(b"[1, " + number + b"]")
    # Long decimals and exponents cost a float() in linear time: accepted, as a double.
    decimals = "0." + "3" * 10_000
    assert jsoncodec.loads(f"[{decimals}, 1e-999999, 1.5{'0' * 10_000}e-{'0' * 10_000}1]".encode()) == [
        float(decimals),
        0.0,
        0.15,
    ]
    # Lone surrogates are JSON's grammar, if not Unicode: kept, and escaped again on the way out.
    text = jsoncodec.loads(b'["\\ud800", "a\\udc00b", "\\ud83d\\ude00"]')
    assert text == ["\ud800", "a\udc00b", "\U0001f600"]
    assert json.loads(jsoncodec.dumps(text)) == text


PIECE, FLAT = jsoncodec._PIECE, jsoncodec._FLAT
# Where dumps_off_loop cuts its pieces: around PIECE values, FLAT-sized containers, containers
# between values, at the start and end, keys of every kind json.dumps takes, tuples, emptiness.
PIECES_CASES: list[Any] = [
    [],
    {},
    [[]],
    {"a": {}},
    list(range(PIECE - 1)),
    list(range(PIECE)),
    list(range(PIECE + 1)),
    [[1] * FLAT] * (PIECE // FLAT + 3),
    [[1] * (FLAT + 1), [[1]], (1, 2), {"k": [1]}, "\ud800"],
    [[[1] * 3] * 2] * 3,
    ["x", [list(range(PIECE * 2))], 2.5, None, True, {"a": list(range(FLAT + 1)), "b": 1}],
    {str(i): (i if i % 7 else [i, [i]]) for i in range(PIECE * 2 + 5)},
    {2: [1, [2]], 2.5: {"x": [3]}, True: [4] * 20, False: 0, None: "n", "s": [5], -(10**30): (6, [7])},
    ([1, 2], (3, [4, (5,)])),
    [10**99, -(2**70), 1e-300, 2.2250738585072014e-308, "\u00e9\U0001f600\udc00"] * 500,
]


@pytest.mark.parametrize("value", PIECES_CASES, ids=range(len(PIECES_CASES)))
async def test_dumps_off_loop_in_pieces_answers_as_json_dumps(monkeypatch: pytest.MonkeyPatch, value: Any) -> None:
    monkeypatch.setattr(jsoncodec, "orjson", None)
    assert await jsoncodec.dumps_off_loop(value) == json.dumps(value).encode()


async def test_dumps_off_loop_refuses_what_json_dumps_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsoncodec, "orjson", None)
    with pytest.raises(ValueError, match="nested too deeply"):
        await jsoncodec.dumps_off_loop(deep_results([1]))
    for value in ([1] * 3000 + [object()], {"a": [[1] * 20, {1j: 1}]}, [[1] * 20, {(1, 2): [1]}]):
        with pytest.raises(TypeError):
            await jsoncodec.dumps_off_loop(value)
    circular: list[Any] = [1] * 20
    circular.append(circular)
    with pytest.raises(ValueError):
        await jsoncodec.dumps_off_loop(circular)


# The longest /health may take while numbers are handled: they stalled it 1.6 to 2.2 s before
# they were bounded, and take well under 0.5 s now; 1.5 s leaves room for a loaded machine (a
# suite in four processes beside other work on two cores saw 1.2 s) and still fails those stalls.
STALL = 1.5


async def test_health_answers_while_huge_integers_are_refused(serve: Serve) -> None:
    port = await serve(BIG_CONFIG.replace(str(BIG), str(16 * 1024 * 1024)))
    answers = await _health_while_posting(port, HUGE_INTEGERS, 4, within=STALL)
    refused = {"error": f"body holds an integer of more than {DIGITS} digits"}
    assert [(code, json.loads(text)) for code, text in answers] == [(400, refused)] * 4


async def test_health_answers_while_the_standard_library_parses_and_answers(serve: Serve) -> None:
    port = await serve(BIG_CONFIG.replace(str(BIG), str(16 * 1024 * 1024)))
    body = _slow_floats(16 * 1024 * 1024)
    [(code, text)] = await _health_while_posting(port, body, within=STALL)
    assert code == 200 and json.loads(text) == json.loads(body)["elements"]


# -- log lines: what a client sent stays encoded, on its own line


@pytest.mark.parametrize(
    ("text", "logged"),
    [
        ("/workflow", "/workflow"),
        ("/a%0Ab", "/a%0Ab"),
        ("/a\nb\r", "/a\\nb\\r"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("a\x85b\u2028c\u2029d", "a\\x85b\\u2028c\\u2029d"),
        ("a\udcffb", "a\\udcffb"),
        ("caf\u00e9 \u6587", "caf\u00e9 \u6587"),
    ],
)
def test_loggable(text: str, logged: str) -> None:
    assert loggable(text) == logged


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        ("/workflow", "/workflow"),
        ("/a%0Ab?", "/a%0Ab?"),
        ('/a"b\\c', "/a%22b%5Cc"),  # the quoted request of a text line stays one field
        ("/a\u2028b\x85", "/a\\u2028b\\x85"),
        ("/caf\u00e9", "/caf\\xe9"),  # ASCII only: a path as sent is percent-encoded
        ("/" + "a" * 1023, "/" + "a" * 1023),
        ("/" + "a" * 1024, "/" + "a" * 1023 + "..."),
        ("/" + '"' * 1023, "/" + "%22" * 341 + "..."),
        ("/" + "\u2028" * 5000, "/" + "\\u2028" * 170 + "\\u2..."),
    ],
)
def test_logged_path(path: str, logged: str) -> None:
    assert logged_path(path) == logged
    assert len(logged) <= LONGEST_PATH + 3


def _failing_routes(app: web.Application) -> None:
    async def upstream(request: web.Request) -> web.Response:
        raise UpstreamError("fetch: http://example.org/x answered HTTP 500\nforged line")

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("broken")

    app.router.add_get("/upstream/{tail}", upstream)
    app.router.add_get("/broken/{tail}", broken)


@pytest.mark.parametrize(("path", "level"), [("/broken", logging.ERROR), ("/upstream", logging.WARNING)])
async def test_error_lines_log_the_path_encoded(
    serve: Serve, caplog: pytest.LogCaptureFixture, path: str, level: int
) -> None:
    port = await serve(CONFIG, _failing_routes)
    request = f"GET {path}/a%0Aforged%20line HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
    with caplog.at_level(logging.WARNING, logger="aioserver.error"):
        answer = await exchange(port, request)
    assert status(answer) in (500, 502)
    [record] = [r for r in caplog.records if r.name == "aioserver.error"]
    assert record.levelno == level
    message = record.getMessage()
    assert f"GET {path}/a%0Aforged%20line" in message and "\n" not in message


# -- the real thing: python -m aioserver on uvloop


SERVER_CONFIG = """
workflow:
  echo: {tasks: [echo]}
  nap: {tasks: [{action: sample_actions.async_sleepy, args: [2]}]}
"""
# The most VmHWM may reach after the two 16 MiB bodies below: the process at rest (~45 MB),
# the body as aiohttp buffers it (its chunks, then one bytes object: ~3 x 16 MiB), what the
# parse makes of it (at most ~90 MiB for 1 Mi values; ~70 here) and the 16 MiB answer.
# Before values were bounded, the first body alone took it past 560 MB.
MAX_RSS = 256 * 1024 * 1024


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(SERVER_CONFIG)
    return path


async def test_server_big_bodies_leave_health_answering_and_memory_bounded(config_file: Path) -> None:
    with Server("--config", str(config_file)) as server:
        size = 16 * 1024 * 1024  # the default --max-body-size
        [(refused, _)] = await _health_while_posting(server.port, _empty_objects(size))
        [(accepted, _)] = await _health_while_posting(server.port, _strings(size))
        assert (refused, accepted) == (413, 200)
        assert _peak_rss(server.process.pid) < MAX_RSS
        assert "Traceback" not in "".join(server.log)


async def test_server_numbers_leave_health_answering(config_file: Path) -> None:
    with Server("--config", str(config_file)) as server:
        answers = await _health_while_posting(server.port, HUGE_INTEGERS, 4, within=STALL)
        refused = {"error": f"body holds an integer of more than {DIGITS} digits"}
        assert [(code, json.loads(text)) for code, text in answers] == [(400, refused)] * 4
        body = _slow_floats(16 * 1024 * 1024)
        [(code, text)] = await _health_while_posting(server.port, body, within=STALL)
        assert code == 200 and json.loads(text) == json.loads(body)["elements"]
        body = _body(json.dumps(EXACT)[1:-1].encode(), 100_000)
        answer = await exchange(server.port, head(len(body)) + body)
        assert status(answer) == 200
        assert payload(answer) == EXACT and all(type(value) is int for value in payload(answer))
        assert "Traceback" not in "".join(server.log)


async def test_server_admits_before_reading_the_body(config_file: Path) -> None:
    with Server("--config", str(config_file), "--limit-concurrency", "1") as server:
        body = b'{"name": "nap", "elements": [1]}'
        running = asyncio.create_task(exchange(server.port, head(len(body)) + body))
        await asyncio.sleep(0.5)  # the nap (2 s) holds the only slot
        answer = await exchange(server.port, head(10_000_000), wait=1.5)  # a big upload's head, no body
        assert status(answer) == 503 and payload(answer) == {"error": "too many workflows running, retry later"}
        assert status(await running) == 200


async def test_server_deep_json_is_400_without_a_traceback(config_file: Path) -> None:
    with Server("--config", str(config_file)) as server:
        body = b"[" * 5000
        answer = await exchange(server.port, head(len(body)) + body)
        assert status(answer) == 400
        assert payload(answer) == {"error": f"body is nested deeper than {jsoncodec.MAX_DEPTH} levels"}
        await asyncio.sleep(0.3)  # the access line is written within 0.1 s
        assert "Traceback" not in "".join(server.log)


async def test_server_logs_an_encoded_path_on_one_line(config_file: Path) -> None:
    env = {"DEPENDENCIES": "sample_plugins.crash"}  # every request but /health fails: 500
    with Server("--config", str(config_file), env=env) as server:
        forged = "2026-01-01 00:00:00,000 ERROR aioserver.error: forged"
        path = "/workflow%0A" + forged.replace(" ", "%20")
        body = b'{"name": "echo", "elements": [1]}'
        answer = await exchange(server.port, head(len(body), path.encode()) + body)
        assert status(answer) == 500
        error_id = payload(answer)["id"]
        deadline = time.monotonic() + 5
        while not any(path in line and " 500 " in line for line in server.log) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the access log is written in batches
        log = list(server.log)
        [error_line] = [line for line in log if error_id in line and " ERROR " in line]  # and its access line
        assert error_line.rstrip().endswith(f"error {error_id} while handling POST {path}")
        assert sum(path in line and " 500 " in line for line in log) == 1  # and one access line
        assert not any(line.startswith(forged) for line in log)
        assert all(path in line for line in log if "forged" in line)  # only ever mentioned encoded


async def test_server_access_line_escapes_what_the_pure_python_parser_lets_through(config_file: Path) -> None:
    # aiohttp's C parser refuses bytes over 0x7f in a request target; its pure-Python one (where
    # no wheel fits, or AIOHTTP_NO_EXTENSIONS is set) lets a raw U+2028 LINE SEPARATOR through.
    with Server("--config", str(config_file), env={"AIOHTTP_NO_EXTENSIONS": "1"}) as server:
        request = b"GET /a\xe2\x80\xa8b\xc2\x85c HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        assert status(await exchange(server.port, request)) == 404
        deadline = time.monotonic() + 5
        while not any(" 404 " in line for line in server.log) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the access log is written in batches
        [line] = [line for line in server.log if " 404 " in line]
        assert '"GET /a\\u2028b\\x85c HTTP/1.1" 404 ' in line
        assert not any("\u2028" in line or "\x85" in line for line in server.log)
