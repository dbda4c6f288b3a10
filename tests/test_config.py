"""Reading and validating the config document: every problem names file, key and problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from aioserver.config import DEFAULT_SOURCE, INLINE_SOURCE, load_config
from aioserver.errors import ConfigError

import sample_actions


def test_embedded_default_config_has_demo_workflows() -> None:
    config = load_config()
    assert config.source == DEFAULT_SOURCE
    assert {"echo", "shout", "inspect", "greet"} <= set(config.workflows)


def test_file_and_inline_yaml(tmp_path: Path) -> None:
    text = "server:\n  port: 9100\nworkflow:\n  twice:\n    tasks: [sample_actions.double]\n"
    path = tmp_path / "config.yml"
    path.write_text(text)
    from_file, inline = load_config(str(path)), load_config(text)
    assert from_file.source == str(path) and inline.source == INLINE_SOURCE
    for config in (from_file, inline):
        assert config.settings.port == 9100
        assert list(config.workflows) == ["twice"]


def test_empty_file_is_an_empty_config(tmp_path: Path) -> None:
    path = tmp_path / "empty.yml"
    path.write_text("# nothing yet\n")
    assert load_config(str(path)).workflows == {}


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("- a\n- b\n", None, "expected a mapping of sections"),
        ("server: [1]\n", "server", "expected a mapping"),
        ("workflow:\n  a: {tasks: [echo]\nb: 1\n", None, "invalid YAML at line"),
        ("serverr:\n  port: 1\n", "serverr", "unknown section"),
        ("server:\n  prot: 1\n", "server.prot", "unknown option"),
        ("workflow: [echo]\n", "workflow", "expected a mapping of workflow names"),
        ("workflow:\n  a: echo\n", "workflow.a", "expected a mapping with 'tasks'"),
        ("workflow:\n  a: {tasks: []}\n", "workflow.a.tasks", "non-empty list"),
        ("workflow:\n  a: {tasks: [echo], batchh: 2}\n", "workflow.a.batchh", "unknown key"),
        ("workflow:\n  a: {tasks: [echo], batch: 0}\n", "workflow.a.batch", "positive integer"),
        ("workflow:\n  a: {tasks: [echo, 7]}\n", "workflow.a.tasks[1]", "expected an action name"),
        ("workflow:\n  a: {tasks: [echo, nosuch]}\n", "workflow.a.tasks[1].action", "unknown action 'nosuch'"),
        (
            "workflow:\n  a:\n    tasks:\n      - echo\n      - action: nosuchmodule.fn\n",
            "workflow.a.tasks[1].action",
            "cannot import 'nosuchmodule.fn': ModuleNotFoundError",
        ),
        (
            "workflow:\n  a: {tasks: [sample_actions.missing]}\n",
            "workflow.a.tasks[0].action",
            "AttributeError",
        ),
        (
            "workflow:\n  a: {tasks: [{action: [echo, sample_actions.nope]}]}\n",
            "workflow.a.tasks[0].action[1]",
            "cannot import",
        ),
        ("workflow:\n  a: {tasks: [{action: []}]}\n", "workflow.a.tasks[0].action", "non-empty list"),
        ("workflow:\n  a: {tasks: [{action: echo, args: 3}]}\n", "workflow.a.tasks[0].args", "expected a list"),
        ("workflow:\n  a: {tasks: [{action: echo, batch: -1}]}\n", "workflow.a.tasks[0].batch", "positive"),
        ("workflow:\n  a: {tasks: [{action: echo, task: nope}]}\n", "workflow.a.tasks[0].task", "unknown task kind"),
        ("workflow:\n  a: {tasks: [{action: echo, when: now}]}\n", "workflow.a.tasks[0].when", "unknown key"),
        ("workflow:\n  a: {tasks: [sample_actions.NOT_CALLABLE]}\n", "workflow.a.tasks[0].action", "not callable"),
        ("sample_actions.Broken: {}\n", "sample_actions.Broken", "cannot create 'sample_actions.Broken': ValueError"),
        ("sample_actions.Multiplier: [1]\n", "sample_actions.Multiplier", "must be a mapping"),
        ("sample_actions.Multiplier: {nope: 1}\n", "sample_actions.Multiplier", "TypeError"),
        ("sample_actions.double: {factor: 1}\n", "sample_actions.double", "is a function, not a class"),
    ],
)
def test_bad_config_names_file_key_and_problem(tmp_path: Path, text: str, key: str | None, problem: str) -> None:
    path = tmp_path / "config.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert error.value.source == str(path)
    assert error.value.key == key
    assert problem in error.value.problem
    assert str(error.value).startswith(f"{path}: ")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yml: cannot read config: No such file"):
        load_config(str(tmp_path / "missing.yml"))


def test_class_instantiated_once_with_its_section() -> None:
    before = sample_actions.Multiplier.instances
    config = load_config(
        "sample_actions.Multiplier: {factor: 5}\n"
        "workflow:\n"
        "  a: {tasks: [sample_actions.Multiplier]}\n"
        "  b: {tasks: [sample_actions.Multiplier, sample_actions.Multiplier]}\n"
    )
    assert sample_actions.Multiplier.instances == before + 1
    functions = {task.actions[0].function for w in config.workflows.values() for task in w.tasks}
    assert len(functions) == 1 and functions.pop().factor == 5


def test_settings_from_server_section_and_env() -> None:
    config = load_config("server:\n  port: 9000\n  host: 0.0.0.0\n", env={"PORT": "9001"})
    assert (config.settings.host, config.settings.port) == ("0.0.0.0", 9001)
    assert config.origins["port"].source == "environment"
