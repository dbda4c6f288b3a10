"""The deployments server-level tests run in are what they claim to be (see conftest's docstring)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import conftest
from conftest import ROOT, WITH_SPEED, Deployment, aioserver_command, no_extras_python


def test_the_no_extras_venv_is_the_readme_install_of_this_code() -> None:
    python = no_extras_python()
    for extra in ("uvloop", "orjson"):
        found = subprocess.run([python, "-c", f"import {extra}"], capture_output=True, text=True, timeout=60)
        assert f"No module named '{extra}'" in found.stderr
    where = subprocess.run(
        [python, "-c", "import aioserver; print(aioserver.__file__)"], capture_output=True, text=True, timeout=60
    )
    assert where.stdout.strip() == str(ROOT / "aioserver" / "__init__.py")


def test_a_server_on_another_loop_than_intended_fails_its_test() -> None:
    # The test venv has uvloop: --loop auto runs on it, not on the loop this deployment names.
    server = vars(conftest)["Server"]  # a name in a string: the test runs once, in no deployment
    with pytest.raises(AssertionError, match="meant to run on asyncio, ran on uvloop"):
        with server(deployment=Deployment("mislabelled", "asyncio")):  # stopped, should it start
            pass


def test_a_server_outside_a_deployment_fails_its_test() -> None:
    # Out of pytest_generate_tests' sight (a name in a string), so not run in the deployments.
    with pytest.raises(AssertionError, match="outside a deployment"):
        with vars(conftest)["Server"]():  # stopped, should it start
            pass


def _serve() -> None:
    with conftest.Server(deployment=WITH_SPEED):
        pass


def _through_a_helper() -> None:
    _serve()


def _not_serving() -> None:
    conftest.free_port()


@pytest.mark.parametrize(("name", "serves"), [("_through_a_helper", True), ("_not_serving", False)])
def test_server_level_tests_are_found_through_their_helpers(name: str, serves: bool) -> None:
    assert conftest._starts_server(globals()[name], set()) is serves


def test_a_command_of_ones_own_runs_in_the_deployment(deployment: Deployment) -> None:
    process = subprocess.Popen(aioserver_command("--port", "0"), stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        first = process.stderr.readline()
    finally:
        process.kill()
        process.communicate()
    assert first.rstrip().endswith(f"INFO aioserver: event loop: {deployment.loop}")


def test_server_level_tests_run_in_their_deployments_in_a_later_session_of_the_process() -> None:
    """As under mutmut: a second pytest session imports conftest anew, while the test modules of
    the first keep theirs; their servers still run in the deployments of the second."""
    test = "tests/test_conftest.py::test_a_command_of_ones_own_runs_in_the_deployment"
    script = (
        "import sys, pytest\n"
        "options = ['-p', 'no:cacheprovider', '-n', '0', '-q']\n"
        f"assert pytest.main([*options, '--collect-only', {test!r}]) == 0\n"
        f"sys.exit(pytest.main([*options, {test + '[uvloop]'!r}]))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout
