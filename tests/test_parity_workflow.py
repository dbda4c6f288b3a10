"""txtai parity, workflow semantics: txtai's own API and aioserver, on the same config, give the
same answers (issue 13). txtai is the oracle (tests/txtaioracle.py); every case sends one
request to each and compares, where txtai's answer needs no model.

Each server starts once per module (aioserver once per deployment), on :data:`CONFIG`; only the
retrieve task of URLs differs, by one key txtai needs to reach 127.0.0.1 at all. Where
aioserver deliberately differs (safeopen; the README's "Coming from txtai"), the tests say so.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import DEPLOYMENTS, Deployment, Server
from txtaioracle import Answer, Txtai, answer, same_answer

CONFIG = """
safeopen:
  directory: {data}
  allow: ["127.0.0.1:{port}"]
segmentation:
  lines: true
workflow:
  words:
    tasks: [parity_actions.words]
  lines:
    tasks: [segmentation]
  describe:
    tasks: [parity_actions.describe]
  describe_whole:
    tasks: [{{action: parity_actions.describe, unpack: false}}]
  upper:
    tasks: [parity_actions.upper]
  paired:
    tasks: [parity_actions.paired, parity_actions.describe]
  wav:
    tasks: [{{action: parity_actions.upper, select: '\\.wav$'}}]
  wav_upper:
    tasks: [{{action: parity_actions.upper, select: 'WAV'}}]
  hstack:
    tasks: [{{action: [parity_actions.upper, parity_actions.words]}}]
  hstack_then:
    tasks: [{{action: [parity_actions.upper, parity_actions.words]}}, parity_actions.describe]
  vstack:
    tasks: [{{action: [parity_actions.upper, parity_actions.words], merge: vstack}}]
  concat:
    tasks: [{{action: [parity_actions.upper, parity_actions.empty], merge: concat}}]
  concat_values:
    tasks: [{{action: [parity_actions.describe, parity_actions.same], merge: concat}}]
  args:
    tasks: [{{action: [parity_actions.add, parity_actions.add], args: [[1], [100]]}}]
  args_kinds:
    tasks:
      - action: [parity_actions.add, parity_actions.scale]
        args: [[1, 2], {{factor: 3, offset: 1}}]
        merge: vstack
  files:
    tasks: [{{task: file, action: parity_actions.read}}]
  urls:
    tasks: [{{task: url, action: parity_actions.upper}}]
  retrieve_tree:
    tasks: [{{task: retrieve, directory: "{downloads}/tree", flatten: false}}]
  retrieve_flat:
    tasks: [{{task: retrieve, directory: "{downloads}/flat"}}]
  retrieve_urls:
    tasks: [{{task: retrieve, directory: "{downloads}/urls", flatten: false{txtai_only}}}]
  words_nested:
    tasks: [{{action: parity_actions.words, onetomany: false}}]
  column:
    tasks: [{{action: parity_actions.upper, unpack: false, column: 1}}]
  columns:
    tasks: [{{action: [parity_actions.upper, parity_actions.describe], unpack: false, column: {{0: 0, 1: 2}}}}]
  file_names:
    tasks: [{{task: file}}]
  url_names:
    tasks: [{{task: url}}]
  template:
    tasks: [{{task: template, template: "This is a {{text}} task"}}]
  template_keys:
    tasks: [{{task: template, template: "{{name}} is {{age}}", rules: {{skip: true}}}}]
  template_lenient:
    tasks: [{{task: template, template: "{{text}}!", strict: false}}]
  template_tuple:
    tasks: [{{task: template, template: "{{arg0}}-{{arg1}}", unpack: false}}]
  template_action:
    tasks: [{{task: template, template: "{{text}}?", action: parity_actions.upper}}]
  template_none:
    tasks: [{{task: template}}]
  inner:
    tasks: [parity_actions.upper, parity_actions.describe]
  splitting:
    tasks: [parity_actions.words]
  outer:
    tasks: [{{task: workflow, action: inner}}, parity_actions.describe]
  outer_by_name:
    tasks: [inner]
  outer_splitting:
    tasks: [{{task: workflow, action: splitting}}]
  console:
    tasks: [{{task: console, action: parity_actions.upper}}]
  console_only:
    tasks: [{{task: console}}]
"""
# txtai's retrieve task refuses private addresses unless told (aioserver: safeopen.allow above).
TXTAI_ONLY = ", safeopen: false"


class Pages(BaseHTTPRequestHandler):
    """An upstream for retrieve tasks: each path's page names the path."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = f"page at {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@dataclass(frozen=True)
class Setup:
    """The files, directories and upstream both servers share."""

    data: Path  # safeopen.directory for aioserver, the working directory for txtai
    downloads: Path
    port: int

    def config(self, txtai: bool) -> str:
        return CONFIG.format(
            data=self.data, downloads=self.downloads, port=self.port, txtai_only=TXTAI_ONLY if txtai else ""
        )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("parity")
    data = root / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("alpha")
    (data / "sub" / "b.txt").write_text("beta")
    downloads = root / "downloads"
    for name in ("tree", "flat", "urls"):
        (downloads / name).mkdir(parents=True)
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    try:
        yield Setup(data=data, downloads=downloads, port=upstream.server_address[1])
    finally:
        upstream.shutdown()
        upstream.server_close()
        thread.join()


@pytest.fixture(scope="module")
def txtai(setup: Setup) -> Iterator[Txtai]:
    """txtai, shared by every deployment of aioserver."""
    with Txtai(setup.config(txtai=True), cwd=setup.data) as oracle:
        yield oracle


@dataclass(frozen=True)
class Pair:
    """txtai's API and aioserver, on the same config."""

    txtai: Txtai
    server: Server


@pytest.fixture(scope="module", params=DEPLOYMENTS, ids=str)
def pair(
    request: pytest.FixtureRequest, setup: Setup, txtai: Txtai, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    path = tmp_path_factory.mktemp("config") / "config.yml"
    path.write_text(setup.config(txtai=False))
    deployment: Deployment = request.param
    with Server("--config", str(path), deployment=deployment) as server:
        yield Pair(txtai, server)


def wait_for_log(server: Server, text: str, timeout: float = 15) -> None:
    """Until the server's log (drained by a thread) holds ``text``."""
    deadline = time.monotonic() + timeout
    while text not in "".join(server.log):
        assert time.monotonic() < deadline, f"{text!r} not logged:\n" + "".join(server.log)
        time.sleep(0.05)


def same(pair: Pair, name: str, elements: list[Any]) -> Answer:
    return same_answer(pair.txtai, pair.server.port, name, elements)


# -- one element, many: onetomany


@pytest.mark.parametrize(
    ("name", "elements"),
    [
        ("words", ["a b", "c", ["id", "d e", None], 3]),  # each word an element, in its tuple
        ("words", ["", "one"]),  # no words: the element is gone
        ("lines", ["One\nTwo", "Three", "Four\n\nFive"]),  # the segmentation built-in too
        ("words_nested", ["a b", "c"]),  # onetomany: false keeps the lists
    ],
)
def test_one_to_many(pair: Pair, name: str, elements: list[Any]) -> None:
    same(pair, name, elements)


def test_the_sentences_demo_gives_one_element_per_sentence() -> None:
    """The embedded config's demo (txtai's Segmentation needs nltk for sentences: no oracle here)."""
    with Server() as server:
        assert answer(server.port, "sentences", ["One. Two.\n\nThree."]) == Answer(200, ["One.", "Two.", "Three."])


# -- elements: tuples (JSON arrays) unpacked and packed; objects whole


@pytest.mark.parametrize(
    ("name", "elements"),
    [
        ("describe", [["id1", "hello", None], ["x", "y"], ["solo"], [], {"id": "a", "text": "b"}, "plain", 5, None]),
        ("describe", [["id", ["nested", "list"], "tags"], ["a", "b", "c", "d"]]),
        ("describe_whole", [["id1", "hello", None], {"id": "a", "text": "b"}]),
        ("upper", [["id1", "hello", None], {"text": "b"}, ["x", "y"]]),
        ("paired", [["id1", "a", None], "b"]),  # a tuple result replaces the element; the next task unpacks it
    ],
)
def test_elements_unpacked_as_txtai(pair: Pair, name: str, elements: list[Any]) -> None:
    same(pair, name, elements)


# -- select: in the element's text, lowered


@pytest.mark.parametrize(
    ("name", "elements"),
    [
        ("wav", ["A.WAV", "b.wav", "c.mp3", None, 3, ["id", "D.Wav", None]]),
        ("wav_upper", ["x.WAV", "b.wav"]),  # a pattern in capitals never matches lowered text
    ],
)
def test_select_looks_in_lowered_text(pair: Pair, name: str, elements: list[Any]) -> None:
    same(pair, name, elements)


# -- merges, arguments and columns of several actions


@pytest.mark.parametrize(
    ("name", "elements"),
    [
        ("hstack", ["a b", "c", ["id", "d e", None]]),
        ("hstack_then", ["a b"]),  # hstack's rows are tuples: the next task unpacks them
        ("vstack", ["a b", "c", ["id", "d e", None]]),
        ("concat", ["a b", "c"]),  # empty results are left out of the text
        ("concat_values", [0, False, None, ""]),
        ("args", [1, 2]),  # one args entry per action
        ("args", [["id", 5, None]]),
        ("args_kinds", [1]),
        ("column", [["a", "b", "c"], "d"]),
        ("columns", [["a", "b", "c"]]),
    ],
)
def test_merges_arguments_and_columns(pair: Pair, name: str, elements: list[Any]) -> None:
    same(pair, name, elements)


# -- file and url tasks


def test_file_task_takes_files_and_passes_the_rest(pair: Pair, setup: Setup) -> None:
    a, b = str(setup.data / "a.txt"), str(setup.data / "sub" / "b.txt")
    missing = str(setup.data / "missing.txt")
    # Relative names: txtai's from its working directory, aioserver's under safeopen.directory (the same here).
    same(pair, "files", [a, "file://" + a, missing, "plain text", "a.txt", "sub/b.txt", 7, ["id", b, None]])


def test_file_task_without_an_action_gives_paths(pair: Pair, setup: Setup) -> None:
    a, b = str(setup.data / "a.txt"), str(setup.data / "sub" / "b.txt")
    missing = str(setup.data / "missing.txt")
    same(pair, "file_names", [a, "file://" + b, "file://" + missing, "plain", ["id", "file://" + a, None]])
    # Deliberate difference: a relative name becomes the path of the file under safeopen.directory,
    # where txtai's stays relative to its working directory (aioserver's is not that directory).
    txtai, server = pair.txtai, pair.server
    assert txtai.workflow("file_names", ["a.txt"]) == Answer(200, ["a.txt"])
    assert answer(server.port, "file_names", ["a.txt"]) == Answer(200, [a])


def test_file_task_passes_files_outside_the_directory_through(pair: Pair, setup: Setup) -> None:
    """Deliberate difference: txtai reads any file it can; aioserver only those under
    safeopen.directory, and leaves the others, like missing ones, as they are."""
    outside = setup.data.parent / "secret.txt"
    outside.write_text("SECRET")
    elements = [str(outside), "../secret.txt", "file://" + str(outside), "/etc/hostname"]
    server = pair.server
    assert answer(server.port, "files", elements) == Answer(200, elements)


def test_url_task(pair: Pair) -> None:
    elements = ["http://a.example/x", "HTTPS://b.example/", "text", 3, ["id", "http://c.example/", None]]
    same(pair, "urls", elements)


def test_url_task_without_an_action_passes_everything(pair: Pair) -> None:
    # Nothing is opened: every element passes, whatever it names.
    same(pair, "url_names", ["http://127.0.0.1/x", "ftp://x/y", "file:///etc/passwd", "text"])


def test_url_task_refuses_what_safeopen_refuses(pair: Pair) -> None:
    """Deliberate difference: txtai hands any scheme:// to the action; aioserver refuses
    (400) what it would not open itself, before the action can open it."""
    txtai, server = pair.txtai, pair.server
    assert txtai.workflow("urls", ["ftp://x.example/y"]) == Answer(200, ["FTP://X.EXAMPLE/Y"])
    for element in ["ftp://x.example/y", "file:///etc/passwd", "http://127.0.0.2/"]:
        refused = answer(server.port, "urls", [element])
        assert refused.status == 400 and refused.body["error"].startswith("refused"), refused


# -- template, workflow and console tasks


@pytest.mark.parametrize(
    ("name", "elements"),
    [
        ("template", ["x", {"text": "y"}, ["id", "z", None], 5, None, 1.5]),
        ("template", [["solo"]]),  # a tuple of one item is not unpacked: it has {arg0}, no {text}
        ("template", [{"text": "y", "id": 1}]),  # strict: the id is unused
        ("template", [{"name": "y"}]),  # no {text}
        ("template_keys", [{"name": "Ada", "age": 36}, {"skip": True, "name": "x"}, {"skip": False, "name": "x"}]),
        ("template_lenient", [{"text": "a", "id": 1}, "b"]),
        ("template_tuple", [["a", "b"]]),
        ("template_tuple", [["a", "b", "c"]]),  # strict: arg2 unused
        ("template_action", ["x", ["id", "y", None]]),
        ("template_none", ["x", {"a": 1}, ["id", "y", None]]),
    ],
)
def test_template_task(pair: Pair, name: str, elements: list[Any]) -> None:
    same(pair, name, elements)


@pytest.mark.parametrize("name", ["outer", "outer_by_name"])
def test_workflow_task_runs_another_workflow(pair: Pair, name: str) -> None:
    same(pair, name, ["a b", "c", ["id", "d", None]])


def test_a_workflow_task_whose_workflow_changes_the_count_fails(pair: Pair) -> None:
    """Deliberate difference: txtai pairs the results with the elements in order, dropping or
    shifting them (here "c" became "b"); aioserver cannot tell which belongs to which: a 500."""
    txtai, server = pair.txtai, pair.server
    assert txtai.workflow("outer_splitting", ["a b", "c"]) == Answer(200, ["a", "b"])
    failed = answer(server.port, "outer_splitting", ["a b", "c"])
    assert failed.status == 500
    wait_for_log(server, "'splitting' returned 3 results for 2 elements")


def test_console_task_answers_as_txtai_and_logs(pair: Pair) -> None:
    same(pair, "console", ["x", ["id", "y", None]])
    same(pair, "console_only", ["x", {"a": 1}])
    server = pair.server
    wait_for_log(server, 'workflow.console.tasks[0] inputs: ["x", ["id", "y", null]]')
    wait_for_log(server, 'workflow.console.tasks[0] outputs: ["X", ["id", "Y", null]]')


# -- retrieve: the same paths, the same content


def retrieved(port: int, name: str, elements: list[Any], root: Path) -> tuple[Answer, dict[str, str]]:
    """The answer of one server, and the files it wrote (by path under ``root``), then removed."""
    result = answer(port, name, elements)
    files = {str(p.relative_to(root)): p.read_text() for p in root.rglob("*") if p.is_file()}
    for child in root.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    return result, files


@pytest.mark.parametrize(
    ("name", "elements"),
    [
        ("retrieve_tree", ["{b}", "file://{a}"]),  # local files copied, their path kept
        ("retrieve_flat", ["{b}", "file://{a}"]),
        ("retrieve_urls", ["{url}/docs/page.html", "{url}/top.txt"]),  # the URL's path kept, not its host
        ("retrieve_flat", ["not a url"]),  # neither a URL nor a file: an error (txtai's safeopen)
        ("retrieve_flat", ["{data}/missing.txt"]),
    ],
)
def test_retrieve(pair: Pair, setup: Setup, name: str, elements: list[str]) -> None:
    values = {"a": setup.data / "a.txt", "b": setup.data / "sub" / "b.txt", "url": f"http://127.0.0.1:{setup.port}"}
    elements = [e.format(**values, data=setup.data) for e in elements]
    root = setup.downloads / name.rpartition("_")[2]
    txtai, server = pair.txtai, pair.server
    expected, expected_files = retrieved(txtai.port, name, elements, root)
    actual, files = retrieved(server.port, name, elements, root)
    if expected.status == 200:
        assert (actual, files) == (expected, expected_files)
        assert files  # something was retrieved, the same way
    else:
        assert actual.status == 400 and files == {}, actual
