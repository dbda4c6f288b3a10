"""Parity of the pipeline routes and of tokens: txtai's own API and aioserver on one config.

txtai runs from its own venv (tests/txtaioracle.py). Where txtai's behaviour needs no model
(``/segment``, ``/batchsegment`` on every option but ``sentences``, which needs NLTK), the
answers must be the same. Where it needs one (``/summary``, ``/textract``: a model, and
BeautifulSoup), txtai's own routes run on stand-ins that keep its pipelines' contract
(tests/parity_pipelines.py), and the shapes of the answers are compared, not their values.
Deliberate differences (README's "Coming from txtai") are asserted as such.
"""

from __future__ import annotations

import hashlib
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from conftest import Server
from txtaioracle import Answer, Txtai, request

TEXTS = [
    "  a  b  ",
    "a\nb\n\nc",
    "one\r\ntwo\r\n\r\nthree",
    "x\n\n\ny\fz\f",
    "tab\there  and\t\tthere",
    "ab\n  \ncd",
    "",
    "\n\n",
    "short\nlonger line\n\n\nsection two\n\n\n\nthree",
    "é ü  ñ\n\nünïcödé",
    "a\rb\r\rc",
    "The city council met on Monday.  It approved the budget.\n\nResidents asked for it.\nOk.",
]
SEGMENTATIONS = [
    "{}",
    "{lines: true}",
    "{paragraphs: true}",
    "{sections: true}",
    "{lines: true, minlength: 3}",
    "{paragraphs: true, minlength: 4}",
    "{minlength: 5}",
    "{paragraphs: true, join: true}",
    "{lines: true, cleantext: false}",
    "{paragraphs: true, minlength: 4, cleantext: false}",
]


def servers(
    tmp_path: Path, config: str, env: dict[str, str] | None = None, api: str | None = None
) -> tuple[Txtai, Server]:
    """txtai and aioserver on ``config``; each in a directory of its own."""
    (tmp_path / "txtai").mkdir()
    txtai_env = {**(env or {}), **({"API_CLASS": api} if api else {})}
    txtai = Txtai(config, cwd=tmp_path / "txtai", env=txtai_env)
    path = tmp_path / "config.yml"
    path.write_text(config)
    try:
        server = Server("--config", str(path), env=env)
    except BaseException:
        txtai.close()
        raise
    return txtai, server


def both(
    txtai: Txtai, port: int, method: str, path: str, body: Any = None, token: str | None = None
) -> tuple[Answer, Answer]:
    return (
        request(txtai.port, path, body, token=token, method=method),
        request(port, path, body, token=token, method=method),
    )


def same(txtai: Txtai, port: int, method: str, path: str, body: Any = None, token: str | None = None) -> Answer:
    """The same answer from both; where txtai refuses (its 422), aioserver refuses with a JSON error."""
    expected, actual = both(txtai, port, method, path, body, token)
    context = f"{method} {path} {body!r}: txtai {expected}, aioserver {actual}"
    if expected.status == 200:
        assert actual == expected, context
    else:
        assert expected.status in (401, 403, 422), context
        assert actual.status in (400, 401, 403) and isinstance(actual.body, dict) and "error" in actual.body, context
    return actual


def query(path: str, **params: Any) -> str:
    return f"{path}?{urllib.parse.urlencode(params)}"


@pytest.mark.parametrize("options", SEGMENTATIONS)
def test_segment_answers_as_txtais(tmp_path: Path, options: str) -> None:
    txtai, server = servers(tmp_path, f"segmentation: {options}\n")
    with txtai, server:
        for text in TEXTS:
            same(txtai, server.port, "GET", query("/segment", text=text))
        same(txtai, server.port, "POST", "/batchsegment", TEXTS)
        same(txtai, server.port, "POST", "/batchsegment", [])


def test_segment_requests_as_txtais(tmp_path: Path) -> None:
    txtai, server = servers(tmp_path, "segmentation: {lines: true}\n")
    with txtai, server:
        port = server.port
        # Query strings decoded alike: + is a space, %2B a plus, bad escapes kept or replaced.
        for raw in ("a+b", "a%2Bb", "%E2%82%AC", "", "%FF", "a%00b", "%ZZ", "a;b", "a%0Ab"):
            same(txtai, port, "GET", f"/segment?text={raw}")
        same(txtai, port, "GET", "/segment?text")
        same(txtai, port, "GET", "/segment?other=1&text=a")  # other parameters are ignored
        # Both refuse (txtai 422, aioserver 400 with a JSON error).
        for body in ([1], ["a", None], {"texts": ["a"]}, "a", {}):
            same(txtai, port, "POST", "/batchsegment", body)
        same(txtai, port, "GET", "/segment")
        # Deliberate difference: a repeated parameter is the last one to txtai, a 400 here.
        expected, actual = both(txtai, port, "GET", "/segment?text=a&text=b")
        assert expected == Answer(200, ["b"])
        assert actual == Answer(400, {"error": "query parameter 'text' given 2 times; give it once"})


def shape(value: Any) -> Any:
    """The shape of a JSON value: its type, and for a list the shape of each item."""
    if isinstance(value, list):
        return [shape(item) for item in value]
    return type(value).__name__


SHAPE_REQUESTS: list[tuple[str, str, Any]] = [
    ("GET", query("/summary", text="One. Two. Three."), None),
    ("GET", query("/summary", text="One. Two. Three.", minlength=2, maxlength=5), None),
    ("GET", query("/summary", text="One.", maxlength=0), None),
    ("POST", "/batchsummary", {"texts": ["One. Two.", "Three."]}),
    ("POST", "/batchsummary", {"texts": ["One. Two."], "minlength": 1, "maxlength": 3}),
    ("POST", "/batchsummary", {"texts": [], "maxlength": None}),
    ("GET", query("/textract", file="First line\nsecond line\n\nAnother paragraph."), None),
    ("POST", "/batchtextract", ["One paragraph.\n\nTwo.", "Three."]),
    ("POST", "/batchtextract", []),
]
REFUSED_REQUESTS: list[tuple[str, str, Any]] = [
    ("GET", "/summary", None),
    ("GET", query("/summary", text="a", minlength="ten"), None),
    ("GET", query("/summary", text="a", maxlength="1.5"), None),
    ("POST", "/batchsummary", ["a"]),
    ("POST", "/batchsummary", {"texts": "a"}),
    ("POST", "/batchsummary", {"texts": [1]}),
    ("POST", "/batchsummary", {"texts": ["a"], "minlength": "x"}),
    ("GET", "/textract", None),
    ("POST", "/batchtextract", {"files": ["a"]}),
    ("POST", "/batchtextract", [1]),
]


@pytest.mark.parametrize("textractor", ["{}", "{paragraphs: true}", "{lines: true, join: true}"])
def test_summary_and_textract_answer_in_txtais_shapes(tmp_path: Path, textractor: str) -> None:
    config = f"summary: {{}}\ntextractor: {textractor}\n"
    txtai, server = servers(tmp_path, config, api="parity_pipelines.ShapeAPI")
    with txtai, server:
        for method, path, body in SHAPE_REQUESTS:
            expected, actual = both(txtai, server.port, method, path, body)
            context = f"{method} {path} {body!r}: txtai {expected}, aioserver {actual}"
            assert expected.status == actual.status == 200, context
            assert shape(actual.body) == shape(expected.body), context
        for method, path, body in REFUSED_REQUESTS:
            same(txtai, server.port, method, path, body)


# Tokens as txtai takes them: any visible ASCII characters.
TOKENS = ["p@ss!w#rd", "".join(map(chr, range(0x21, 0x7F))), "plain-token_1.2~3"]


@pytest.mark.parametrize("token", TOKENS)
def test_tokens_as_txtais(tmp_path: Path, token: str) -> None:
    env = {"TOKEN": hashlib.sha256(token.encode()).hexdigest()}
    config = "segmentation: {}\nworkflow:\n  echo: {tasks: [parity_actions.upper]}\n"
    txtai, server = servers(tmp_path, config, env=env)
    with txtai, server:
        assert same(txtai, server.port, "GET", query("/segment", text="a  b"), token=token) == Answer(200, "a b")
        assert same(
            txtai, server.port, "POST", "/workflow", {"name": "echo", "elements": ["a"]}, token=token
        ) == Answer(200, ["A"])
        # A wrong token, or none: both refuse (txtai says 401 or 403, aioserver 401).
        for presented in (token + "x", None):
            expected, actual = both(txtai, server.port, "GET", query("/segment", text="a"), token=presented)
            assert expected.status in (401, 403) and actual.status == 401, (expected, actual)
        # Deliberate difference: txtai's document is open to all, aioserver's authorized like every route.
        expected, actual = both(txtai, server.port, "GET", "/openapi.json")
        assert (expected.status, actual.status) == (200, 401)
        expected, actual = both(txtai, server.port, "GET", "/openapi.json", token=token)
        assert expected.status == actual.status == 200
        assert {"/segment", "/batchsegment", "/workflow"} <= set(expected.body["paths"]) & set(actual.body["paths"])
