"""Task keys (select, unpack, merge, initialize/finalize, concurrency), kinds, and schedules."""

from __future__ import annotations

import asyncio
import os
import resource
import time
from pathlib import Path

import pytest
from aiohttp import web

from aioserver import create_app, load_config
from aioserver.errors import ConfigError
from aioserver.workflow import tasks
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
        ("{action: upper}", [{"id": 1, "text": "a", "tags": "t"}], [{"id": 1, "text": "A", "tags": "t"}]),
        ("{action: length, unpack: false}", [{"id": 1, "text": "abc"}], [2]),
        ("{action: [upper, lower]}", ["Ab", "Cd"], [["AB", "ab"], ["CD", "cd"]]),
        ("{action: [upper, lower], merge: hstack}", ["Ab"], [["AB", "ab"]]),
        ("{action: [upper, lower], merge: vstack}", ["Ab", "Cd"], ["AB", "ab", "CD", "cd"]),
        ("{action: [upper, lower], merge: concat}", ["Ab", "Cd"], ["AB. ab", "CD. cd"]),
        ("{action: [upper, lower], merge: vstack, select: '^C'}", ["Ab", "Cd"], ["Ab", "CD", "cd"]),
        (
            "{task: url, action: upper}",
            ["http://x.example/a", "text", "HTTPS://Y.example/"],
            ["HTTP://X.EXAMPLE/A", "text", "HTTPS://Y.EXAMPLE/"],
        ),
        ("{task: file, action: upper}", ["not/a/path", "words"], ["not/a/path", "words"]),
    ],
)
async def test_task_keys(task: str, elements: list, expected: list) -> None:  # type: ignore[type-arg]
    assert await run(f"workflow:\n  w:\n    tasks: [{task}]\n", elements) == expected


async def test_initialize_and_finalize_run_around_the_workflow() -> None:
    sample_actions.HOOKS.clear()
    text = "workflow:\n  w:\n    tasks: [{action: echo, initialize: sample_actions.start, finalize: sample_actions.stop}]\n"
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
        ("{task: teleport, action: echo}", "workflow.w.tasks[0].task"),
    ],
)
def test_bad_task_keys(task: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(f"workflow:\n  w:\n    tasks: [{task}]\n")
    assert info.value.key == key


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
    client = await make_client("server: {timeout_workflow: 1}\n" + PROCESS.replace("seconds: 1.5", "seconds: 60"))
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
