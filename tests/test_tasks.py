"""Task keys (select, unpack, merge, initialize/finalize, concurrency), kinds, and schedules."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web

from aioserver import create_app, load_config
from aioserver.cli import main, summary
from aioserver.errors import ConfigError, InvalidElement
from aioserver.workflow import tasks
from aioserver.workflow.safeopen import SafeOpen
from aioserver.workflow.schedules import HostSchedules, Scheduler

import sample_actions
from test_processes import cpu_seconds, descendants


async def run(yaml_text: str, elements: list, name: str = "w") -> list:  # type: ignore[type-arg]
    return await load_config(yaml_text).workflows[name](elements)


@pytest.mark.parametrize(
    ("task", "elements", "expected"),
    [
        ("{action: upper, select: '^a'}", ["ab", "b", 3, "ac"], ["AB", "b", 3, "AC"]),
        ("{action: upper, select: ['x$', '^a']}", ["ab", "bx", "c"], ["AB", "BX", "c"]),
        # txtai's (id, data, tags) tuples: the action gets the data, its result goes back in.
        ("{action: upper}", [(1, "a", "t"), ("solo",)], None),
        ("{action: upper}", [(1, "a", "t"), (2, "b")], [(1, "A", "t"), (2, "B")]),
        ("{action: length, unpack: false}", [(1, "abc", None)], [3]),
        ("{action: length}", [{"id": 1, "text": "abc"}], [2]),  # an object goes whole, as in txtai
        ("{action: [upper, lower]}", ["Ab", "Cd"], [("AB", "ab"), ("CD", "cd")]),
        ("{action: [upper, lower], merge: hstack}", ["Ab"], [("AB", "ab")]),
        ("{action: [upper, lower], merge: hstack}", [(1, "Ab", None)], [(1, ("AB", "ab"), None)]),
        ("{action: [upper, lower], merge: vstack}", ["Ab", "Cd"], ["AB", "ab", "CD", "cd"]),
        ("{action: [upper, lower], merge: vstack}", [(1, "Ab", None)], [(1, "AB", None), (1, "ab", None)]),
        ("{action: [upper, lower], merge: concat}", ["Ab", "Cd"], ["AB. ab", "CD. cd"]),
        ("{action: [upper, lower], merge: vstack, select: '^c'}", ["Ab", "Cd"], ["Ab", "CD", "cd"]),
        ("{action: upper, select: '^C'}", ["Cd"], ["Cd"]),  # select looks in the text lowered
        ("{action: sample_actions.pair}", ["a", 1], ["a", "a", 1, 1]),  # a list: one element per item
        ("{action: sample_actions.pair, onetomany: false}", ["a"], [["a", "a"]]),
        ("{action: sample_actions.pair, batch: 1}", ["a", (0, "b", None)], ["a", "a", (0, "b", None), (0, "b", None)]),
        ("{action: upper, unpack: false, column: 1}", [("a", "b", "c"), "d"], ["B", "D"]),
        ("{action: [upper, lower], unpack: false, column: {0: 0, 1: 2}}", [("a", "b", "C")], [("A", "c")]),
        (
            "{task: url, action: upper}",
            ["http://x.example/a", "text", "HTTPS://Y.example/"],
            ["HTTP://X.EXAMPLE/A", "text", "HTTPS://Y.EXAMPLE/"],
        ),
        ("{task: url}", ["ftp://x", "text"], ["ftp://x", "text"]),
        ("{task: template, template: '<{text}>'}", ["x", {"text": "y"}], ["<x>", "<y>"]),
        ("{task: template, template: '{a}', rules: {skip: 1}}", [{"skip": 1, "a": 2}, {"a": 3}], [1, "3"]),
        ("{task: template}", ["x", 1], ["x", 1]),
        ("{task: console}", ["x"], ["x"]),
        ("{action: echo}", [], []),
    ],
)
async def test_task_keys(task: str, elements: list, expected: list | None) -> None:  # type: ignore[type-arg]
    text = f"workflow:\n  w:\n    tasks: [{task}]\n"
    if expected is None:  # a tuple of one item is not unpacked: upper gets the tuple
        with pytest.raises(InvalidElement):
            await run(text, elements)
    else:
        assert await run(text, elements) == expected


async def test_initialize_and_finalize_run_around_the_workflow() -> None:
    sample_actions.HOOKS.clear()
    text = "workflow:\n  w:\n    tasks: [{action: echo, initialize: sample_actions.start,"
    text += " finalize: sample_actions.stop}]\n"
    assert await run(text, [1]) == [1]
    assert sample_actions.HOOKS == ["start", "stop"]
    sample_actions.HOOKS.clear()
    with pytest.raises(RuntimeError):  # finalize runs even when the workflow fails
        await run(text.replace("action: echo", "action: sample_actions.boom"), [1])
    assert sample_actions.HOOKS == ["start", "stop"]


@pytest.mark.parametrize(
    ("task", "key"),
    [
        ("{action: echo, merge: zip}", "workflow.w.tasks[0].merge"),
        ("{action: echo, select: '('}", "workflow.w.tasks[0].select"),
        ("{action: echo, select: [1]}", "workflow.w.tasks[0].select"),
        ("{action: echo, unpack: 'yes'}", "workflow.w.tasks[0].unpack"),
        ("{action: echo, concurrency: fiber}", "workflow.w.tasks[0].concurrency"),
        ("{action: echo, concurrency: process}", "workflow.w.tasks[0].concurrency"),
        ("{action: sample_actions.AsyncPrefixer, concurrency: process}", "workflow.w.tasks[0].concurrency"),
        ("{action: echo, initialize: nohook}", "workflow.w.tasks[0].initialize"),
        ("{action: echo, finalize: sample_actions.NOT_CALLABLE}", "workflow.w.tasks[0].finalize"),
        ("{action: echo, finalize: no_such_module.f}", "workflow.w.tasks[0].finalize"),
        ("{task: service}", "workflow.w.tasks[0].url"),
        ("{task: service, url: 'file:///etc/passwd'}", "workflow.w.tasks[0].url"),
        ("{task: service, url: 'http://a.example', method: put}", "workflow.w.tasks[0].method"),
        ("{task: service, url: 'http://a.example', params: [1]}", "workflow.w.tasks[0].params"),
        ("{task: service, url: 'http://a.example', extract: {a: 1}}", "workflow.w.tasks[0].extract"),
        ("{task: service, url: 'http://a.example', action: echo}", "workflow.w.tasks[0].action"),
        ("{task: retrieve}", "workflow.w.tasks[0].directory"),
        ("{task: retrieve, directory: /no/such/dir}", "workflow.w.tasks[0].directory"),
        ("{task: retrieve, directory: /tmp, flatten: 2}", "workflow.w.tasks[0].flatten"),
        ("{task: url, action: echo, directory: /tmp}", "workflow.w.tasks[0].directory"),
        ("{task: retrieve, directory: /tmp, safeopen: false}", "workflow.w.tasks[0].safeopen"),
        ("{task: retrieve, directory: /tmp, safeopen: /tmp}", "workflow.w.tasks[0].safeopen"),
        ("{task: teleport, action: echo}", "workflow.w.tasks[0].task"),
        ("{task: file, action: echo}", "workflow.w.tasks[0].task"),  # no safeopen.directory
        ("{action: echo, onetomany: 1}", "workflow.w.tasks[0].onetomany"),
        ("{action: echo, column: a}", "workflow.w.tasks[0].column"),
        ("{action: echo, column: true}", "workflow.w.tasks[0].column"),
        ("{action: [echo, upper], column: {0: 1}}", "workflow.w.tasks[0].column"),
        ("{action: [echo, upper], column: {0: 1, 1: 0, 2: 0}}", "workflow.w.tasks[0].column"),
        ("{action: [echo, upper], args: {a: 1}}", "workflow.w.tasks[0].args"),
        ("{action: [echo, upper], args: [[1]]}", "workflow.w.tasks[0].args"),
        ("{action: [echo, upper], args: [[1], 2]}", "workflow.w.tasks[0].args[1]"),
        ("{task: template, args: [1]}", "workflow.w.tasks[0].args"),
        ("{task: template, template: 3}", "workflow.w.tasks[0].template"),
        ("{task: template, template: 'This is {}'}", "workflow.w.tasks[0].template"),
        ("{task: template, template: '{0} and {1}'}", "workflow.w.tasks[0].template"),
        ("{task: template, template: 'unclosed {text'}", "workflow.w.tasks[0].template"),
        ("{task: template, rules: [a]}", "workflow.w.tasks[0].rules"),
        ("{task: template, strict: 'no'}", "workflow.w.tasks[0].strict"),
        ("{action: echo, template: '{text}'}", "workflow.w.tasks[0].template"),  # a template task's key
        ("{task: workflow, action: echo}", "workflow.w.tasks[0].action"),
        ("{task: workflow}", "workflow.w.tasks[0].action"),
        ("{task: stream, action: echo}", "workflow.w.tasks[0].task"),
    ],
)
def test_bad_task_keys(task: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(f"workflow:\n  w:\n    tasks: [{task}]\n")
    assert info.value.key == key


@pytest.mark.parametrize(
    ("section", "key", "problem"),
    [
        ("a: {tasks: [b]}\n  b: {tasks: [a]}", "workflow.b.tasks[0].action", "in a loop: a -> b -> a"),
        ("a: {tasks: [echo, a]}", "workflow.a.tasks[1].action", "in a loop: a -> a"),
        (
            "a: {tasks: [b]}\n  b: {tasks: [c]}\n  c: {tasks: [{task: workflow, action: a}]}",
            "workflow.c.tasks[0].action",
            "in a loop: a -> b -> c -> a",
        ),
        ("a: {tasks: [{action: b, args: [1]}]}\n  b: {tasks: [echo]}", "workflow.a.tasks[0].args", "no arguments"),
        ("a: {tasks: [{task: workflow, action: upper}]}", "workflow.a.tasks[0].action", "known: a"),
    ],
)
def test_bad_workflow_references(section: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(f"workflow:\n  {section}\n")
    assert info.value.key == key and problem in info.value.problem


async def test_a_task_runs_another_workflow_by_name() -> None:
    # Named before it is defined (txtai wants it before); a built-in's name stays the built-in's.
    text = "workflow:\n  a: {tasks: [b, upper]}\n  b: {tasks: [sample_actions.double]}\n  upper: {tasks: [echo]}\n"
    assert await run(text, ["x", "y"], "a") == ["XX", "YY"]


async def test_a_file_task_looks_at_the_file_system_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.txt").write_text("a")
    seen: list[str] = []
    find_file = SafeOpen.find_file

    def recording(self: SafeOpen, element: str) -> Path | None:
        seen.append(threading.current_thread().name)
        return find_file(self, element)

    monkeypatch.setattr(SafeOpen, "find_file", recording)
    text = f"safeopen: {{directory: '{tmp_path}'}}\nworkflow:\n  w: {{tasks: [{{task: file}}]}}\n"
    assert await run(text, ["a.txt", "b"]) == [str(tmp_path.resolve() / "a.txt"), "b"]
    assert len(seen) == 2 and threading.current_thread().name not in seen


async def test_console_logs_one_bounded_line_each(caplog: pytest.LogCaptureFixture) -> None:
    text = "workflow:\n  w: {tasks: [{task: console, action: upper}]}\n"
    elements = ["a\nWARNING forged\u2028é", "x" * (tasks.CONSOLE_CHARACTERS + 10)]
    with caplog.at_level(logging.INFO, logger="aioserver.workflow.console"):
        assert await run(text, elements) == [e.upper() for e in elements]
    inputs, outputs = caplog.messages
    assert inputs.startswith('workflow.w.tasks[0] inputs: ["a\\nWARNING forged\\u2028é", "xxx')
    assert outputs.startswith('workflow.w.tasks[0] outputs: ["A\\nWARNING FORGED\\u2028É", "XXX')
    assert inputs.endswith(" characters more)") and len(inputs) < tasks.CONSOLE_CHARACTERS + 100
    assert "\n" not in inputs + outputs


def test_check_names_the_kind_of_a_task_without_an_action() -> None:
    config = load_config("workflow:\n  t: {tasks: [{task: template, template: '{text}!'}, upper, {task: console}]}\n")
    assert "  workflow t: (template) -> upper -> (console)\n" in summary(config)


def test_a_bad_task_key_exits_2_naming_the_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yml"
    path.write_text("workflow:\n  w:\n    tasks: [{action: [echo, upper], args: [[1]]}]\n")
    assert main(["--config", str(path), "--check"], env={}) == 2
    assert capsys.readouterr().err == (
        f"aioserver: error: {path}: workflow.w.tasks[0].args: expected a list of 2 entries, one per action"
        " (each a list, a mapping or null)\n"
    )


def test_retrieve_writes_in_the_state_directory_without_a_directory(tmp_path: Path) -> None:
    """systemd's $STATE_DIRECTORY (its first path: StateDirectory= may name several)."""
    env = {"STATE_DIRECTORY": f"{tmp_path}:/var/lib/other"}
    config = load_config("workflow:\n  w:\n    tasks: [{task: retrieve}]\n", env=env)
    assert config.workflows["w"].tasks[0].actions[0].function.directory == tmp_path.resolve()
    with pytest.raises(ConfigError) as info:  # without a directory, nowhere to write
        load_config("workflow:\n  w:\n    tasks: [{task: retrieve}]\n", env={})
    assert info.value.problem == "expected a directory to write in (none given, and no $STATE_DIRECTORY)"
    assert list(tmp_path.iterdir()) == []  # the writability check leaves nothing behind


def test_a_failed_download_write_leaves_no_part_file(tmp_path: Path) -> None:
    """A full disk (here: a file size limit, EFBIG; Python ignores SIGXFSZ) keeps no half file."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, hard))
    try:
        with pytest.raises(OSError):
            tasks._write(tmp_path / "sub" / "big.bin", b"x" * 1000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert [p.name for p in tmp_path.rglob("*")] == ["sub"]


@pytest.mark.parametrize(
    ("schedule", "key"),
    [
        ("[1]", "workflow.w.schedule"),
        ("{cron: 'every minute'}", "workflow.w.schedule.cron"),
        ("{cron: '* * * * *', elements: 1}", "workflow.w.schedule.elements"),
        ("{cron: '* * * * *', iterations: 0}", "workflow.w.schedule.iterations"),
        ("{cron: '* * * * *', when: now}", "workflow.w.schedule.when"),
    ],
)
def test_bad_schedules(schedule: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(f"workflow:\n  w:\n    tasks: [echo]\n    schedule: {schedule}\n")
    assert info.value.key == key


SCHEDULED = """workflow:
  w:
    tasks: [sample_actions.count_runs]
    schedule: {cron: "* * * * * *", elements: [1, 2, 3], iterations: 2}
"""


async def test_schedule_runs_the_stated_iterations(caplog: pytest.LogCaptureFixture) -> None:
    sample_actions.RUNS.clear()
    scheduler = Scheduler(load_config(SCHEDULED).workflows, True, 300.0, HostSchedules())
    caplog.set_level("INFO", logger="aioserver.workflow")
    started = time.monotonic()
    scheduler.start(None)
    await asyncio.wait_for(asyncio.gather(*scheduler.tasks.values()), timeout=5)
    assert sample_actions.RUNS == [3, 3]
    assert time.monotonic() - started >= 1.0  # two distinct seconds: the cron was followed
    assert "scheduled run 2 of workflow w: 3 results" in caplog.text
    assert "schedule done after 2 runs" in caplog.text


async def test_schedules_start_with_the_app_and_stop_with_it(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    sample_actions.RUNS.clear()
    forever = SCHEDULED.replace(", iterations: 2", "")
    client = await aiohttp_client(create_app(load_config(forever)))
    for _ in range(50):
        if sample_actions.RUNS:
            break
        await asyncio.sleep(0.1)
    assert sample_actions.RUNS[:1] == [3]
    await client.close()  # cancels the schedule cleanly: no warning, no pending task
    count = len(sample_actions.RUNS)
    await asyncio.sleep(1.2)
    assert len(sample_actions.RUNS) == count


PROCESS = """workflow:
  pid: {tasks: [{action: sample_actions.pid, concurrency: process}]}
  spin: {tasks: [{action: sample_actions.spin, args: {seconds: 1.5}, concurrency: process}]}
"""


async def test_process_concurrency_runs_elsewhere_and_server_stays_responsive(make_client) -> None:  # type: ignore[no-untyped-def]
    client = await make_client(PROCESS)
    response = await client.post("/workflow", json={"name": "pid", "elements": [1, 2]})
    pids = await response.json()
    assert response.status == 200 and len(set(pids)) == 1 and pids[0] != os.getpid()

    spinning = asyncio.create_task(client.post("/workflow", json={"name": "spin", "elements": ["x"]}))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    health = await client.get("/health")
    assert health.status == 200 and time.monotonic() - started < 0.5
    assert not spinning.done()
    response = await spinning
    assert response.status == 200 and await response.json() == ["x"]


async def test_service_answer_errors_name_the_task_never_the_upstream(make_client, aiohttp_server) -> None:  # type: ignore[no-untyped-def]
    async def text(request: web.Request) -> web.Response:
        return web.Response(text="not json")

    async def short(request: web.Request) -> web.Response:
        return web.json_response({"data": ["only one"]})

    app = web.Application()
    app.router.add_post("/text", text)
    app.router.add_post("/short", short)
    upstream = await aiohttp_server(app, host="127.0.0.1")
    base = f"http://127.0.0.1:{upstream.port}"
    who = "task workflow.w.tasks[0] (service) failed"
    for task, problem in [
        (f"{{task: service, url: '{base}/text'}}", "the upstream's answer is not JSON"),
        (
            f"{{task: service, url: '{base}/short', extract: [data, results]}}",
            "the upstream's answer has no 'results' to extract",
        ),
        (f"{{task: service, url: '{base}/short', extract: data}}", "the upstream did not answer a list of 2 results"),
    ]:
        yaml_text = f"safeopen: {{allow: ['127.0.0.1:{upstream.port}']}}\nworkflow:\n  w: {{tasks: [{task}]}}\n"
        client = await make_client(yaml_text)
        response = await client.post("/workflow", json={"name": "w", "elements": ["a", "b"]})
        assert (response.status, await response.json()) == (502, {"error": f"{who}: {problem}"})


async def test_a_process_job_past_the_time_limit_is_killed_with_the_504(make_client) -> None:  # type: ignore[no-untyped-def]
    # 3 s: the next job's limit also covers starting the killed worker's replacement, which
    # took over 1 s on a loaded machine (a full run beside two mutation runs).
    client = await make_client("server: {timeout_workflow: 3}\n" + PROCESS.replace("seconds: 1.5", "seconds: 60"))
    response = await client.post("/workflow", json={"name": "spin", "elements": ["x"]})
    assert response.status == 504
    # The spinning process did not outlive its request (a process pool executor's would spin on).
    await asyncio.sleep(0.3)
    children = descendants(os.getpid())
    before = cpu_seconds(children)
    await asyncio.sleep(1.0)
    assert cpu_seconds(children) - before < 0.3
    response = await client.post("/workflow", json={"name": "pid", "elements": [1]})
    assert response.status == 200
