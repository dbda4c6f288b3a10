"""The oracle of the parity tests: txtai's own API, started from its own venv (tests/txtaioracle.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from txtaioracle import Answer, Txtai, answer

CONFIG = """
workflow:
  upper:
    tasks: [parity_actions.upper]
  describe:
    tasks: [parity_actions.describe]
  merged:
    tasks:
      - action: [parity_actions.upper, parity_actions.words]
        merge: vstack
"""


def test_txtai_answers_workflows_from_the_tests_actions(tmp_path: Path) -> None:
    with Txtai(CONFIG, cwd=tmp_path) as txtai:
        assert txtai.workflow("upper", ["a", "b"]) == Answer(200, ["A", "B"])
        # txtai's API makes JSON arrays tuples: the action sees the text of [id, text, tags].
        assert txtai.workflow("describe", [["id", "x", None]]) == Answer(200, [["id", "str:'x'", None]])
        # Its merges ask the torch stub whether outputs are tensors.
        assert txtai.workflow("merged", ["a b"]) == Answer(200, ["A B", "a", "b"])
        assert answer(txtai.port, "nosuch", []).status == 500
    assert txtai.process.returncode is not None


def test_a_txtai_that_cannot_start_fails_the_test(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="txtai exited or hung before serving"):
        Txtai("workflow:\n  w:\n    tasks: [no_such_module.action]\n", cwd=tmp_path)
