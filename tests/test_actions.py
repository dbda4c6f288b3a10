"""Action arguments checked at start-up: what would be a TypeError on every request fails --check."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from aioserver import load_config
from aioserver.cli import main

ARTICLE = (
    "Solar power is growing fast across the world. Cheap solar panels have made solar power the cheapest "
    "electricity in many countries. My neighbour painted his fence blue. Storage batteries now let solar power "
    "reach homes at night. The weather was nice yesterday. Analysts expect solar power and batteries to keep growing."
)

# (the task, what the error says)
BAD_ARGUMENTS = [
    # The built-in summary takes txtai's minlength and maxlength, as numbers of tokens, only.
    ("{action: summary, args: {sentences: 2}}", "got an unexpected keyword argument 'sentences'"),
    ("{action: summary, args: {min_length: 2}}", "got an unexpected keyword argument 'min_length'"),
    ("{action: summary, args: [10, 60, 3]}", "too many positional arguments"),
    (
        "{action: summary, args: {minlength: ten}}",
        "minlength must be a number of tokens (an integer, 0 or more), got 'ten'",
    ),
    ("{action: summary, args: [10, -1]}", "maxlength must be a number of tokens (an integer, 0 or more), got -1"),
    ("{action: summary, args: [1.5]}", "minlength must be a number of tokens (an integer, 0 or more), got 1.5"),
    (
        "{action: summary, args: {maxlength: true}}",
        "maxlength must be a number of tokens (an integer, 0 or more), got True",
    ),
    ("{action: summary, args: [10], task: url}", None),  # fine: a kind does not change the arguments
    ("{action: segmentation, args: [1]}", "too many positional arguments"),
    ("{action: textractor, args: {runtime: 1}}", "got an unexpected keyword argument 'runtime' (the server gives it)"),
    ("{action: echo, args: {runtime: 1}}", "got an unexpected keyword argument 'runtime'"),
    ("{action: template}", "missing a required argument: 'template'"),
    ("{action: template, args: {template: '{}', templat: '{}'}}", "got an unexpected keyword argument 'templat'"),
    ("{action: upper, args: [1]}", "too many positional arguments"),
    ("{action: sample_actions.double, args: [1]}", "too many positional arguments"),
    ("{action: sample_actions.scale}", "missing a required argument: 'factor'"),
    ("{action: sample_actions.scale, args: {factor: 2, offst: 1}}", "got an unexpected keyword argument 'offst'"),
    ("{action: sample_actions.Multiplier, args: {factor: 2}}", "got an unexpected keyword argument 'factor'"),
    ("{task: service, url: 'http://127.0.0.1:9/', args: [1]}", "too many positional arguments"),
    (
        "{action: [sample_actions.add, sample_actions.scale], args: [{factor: 3}, {factor: 3}]}",
        "got an unexpected keyword argument 'factor'",
    ),
]


@pytest.mark.parametrize(("task", "problem"), [case for case in BAD_ARGUMENTS if case[1]])
def test_arguments_an_action_cannot_take_fail_the_check(
    tmp_path: Path, task: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yml"
    path.write_text(f"workflow:\n  w:\n    tasks:\n      - {task}\n")
    assert main(["--config", str(path), "--check"], env={}) == 2
    err = capsys.readouterr().err
    assert re.match(rf"aioserver: error: {re.escape(str(path))}: workflow\.w\.tasks\[0\]\.args(\[\d\])?: ", err), err
    assert problem in err
    assert err.count("\n") == 1 and "Traceback" not in err


GOOD_ARGUMENTS = [
    # txtai's summary args: [minlength, maxlength], or by name; null and 0 are none, as in txtai.
    ("{action: summary, args: [10, 60]}", [ARTICLE]),
    ("{action: summary, args: [null, 60]}", [ARTICLE]),
    ("{action: summary, args: [0, 60]}", [ARTICLE]),
    ("{action: summary, args: {maxlength: 60}}", [ARTICLE]),
    ("{action: summary, args: {minlength: 10, maxlength: 60}}", [ARTICLE]),
    ("{action: summary, args: [10], task: url}", [ARTICLE]),
    ("{action: template, args: ['<{}>']}", ["a"]),
    ("{action: sample_actions.add, args: [10, 100, 1000]}", [1]),
    ("{action: sample_actions.scale, args: {factor: 2}}", [1]),
    ("{action: [sample_actions.add, sample_actions.double]}", [1]),
    ("{action: builtins.sorted}", [3, 1, 2]),  # no signature to read: the call tells
]


@pytest.mark.parametrize(("task", "elements"), GOOD_ARGUMENTS)
async def test_arguments_an_action_takes_pass_and_run(task: str, elements: list[object]) -> None:
    config = load_config(f"workflow:\n  w:\n    tasks:\n      - {task}\n")
    results = await config.workflows["w"](elements)
    assert len(results) == len(elements)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # 14 tokens in the best sentence, 10 in the next best: minlength 20 takes both.
        (
            "[20]",
            "Cheap solar panels have made solar power the cheapest electricity in many countries. "
            "Analysts expect solar power and batteries to keep growing.",
        ),
        ("[null, 5]", "Cheap solar panels have made"),
        ("{maxlength: 14}", "Cheap solar panels have made solar power the cheapest electricity in many countries."),
    ],
)
async def test_summary_task_arguments_are_txtais(args: str, expected: str) -> None:
    config = load_config(f"summary: {{sentences: 1}}\nworkflow:\n  w: {{tasks: [{{action: summary, args: {args}}}]}}\n")
    assert await config.workflows["w"]([ARTICLE]) == [expected]
