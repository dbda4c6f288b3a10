"""main(argv) in-process, and the real ``python -m aioserver`` as a user runs it."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aioserver.cli import main

from conftest import KEY_PASSWORD, PYTHON, TOKEN, TOKEN_HASH, PemFiles, Server

GOOD = "server:\n  port: 9100\nworkflow:\n  twice: {tasks: [sample_actions.double]}\n"


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(GOOD)
    return path


def test_check_prints_summary_with_origins(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["--config", str(config_file), "--check", "--host", "0.0.0.0"], env={"LOG_LEVEL": "debug"})
    out = capsys.readouterr().out
    assert status == 0
    assert f"config: {config_file}" in out
    assert "host = 0.0.0.0  (command line)" in out
    assert f"port = 9100  ({config_file})" in out
    assert "log_level = debug  (environment)" in out
    assert "timeout_keep_alive = 15.0  (default)" in out
    assert "workflow twice: sample_actions.double" in out


def test_check_says_what_runs_outside_safeopen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yml"
    path.write_text(
        "sample_actions.Multiplier: {factor: 2}\nsegmentation: {}\nsummary: {}\n"
        "workflow:\n  w: {tasks: [textractor, sample_actions.double, sample_actions.Multiplier, summary]}\n"
    )
    assert main(["--config", str(path), "--check"], env={}) == 0
    out = capsys.readouterr().out
    assert (
        "  outside safeopen: sample_actions.Multiplier, sample_actions.double (dotted paths: what they open,"
        " files or URLs, they open themselves; only the built-ins go through safeopen)\n"
    ) in out
    assert "  pipeline segmentation: GET /segment?text=, POST /batchsegment\n" in out
    assert "  pipeline summary: GET /summary?text=, POST /batchsummary\n" in out
    assert "textract" not in out.replace("workflow w: textractor", "")  # no section, no route


def test_check_of_builtins_only_names_nothing_outside_safeopen(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--check"], env={}) == 0
    out = capsys.readouterr().out
    assert "outside safeopen" not in out
    assert "  pipeline segmentation: GET /segment?text=, POST /batchsegment\n" in out


def test_config_from_environment(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--check"], env={"CONFIG": str(config_file)}) == 0
    assert "workflow twice" in capsys.readouterr().out


def test_command_line_config_beats_environment(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--check", "--config", str(config_file)], env={"CONFIG": "/nonexistent.yml"}) == 0


def test_check_default_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--check"], env={}) == 0
    assert "config: <embedded default config>" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--port", "http"], {}, "aioserver: error: command line: --port: expected an integer, got 'http'\n"),
        ([], {"PORT": "99999"}, "aioserver: error: environment: PORT: expected a TCP port from 0 to 65535"),
        (["--bogus"], {}, "aioserver: error: command line: unrecognized arguments: --bogus\n"),
        (["--log-level"], {}, "aioserver: error: command line: argument --log-level"),
        (["--config", "/no/such.yml"], {}, "aioserver: error: /no/such.yml: cannot read config"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--check"], env=env) == 2
    err = capsys.readouterr().err
    assert err.startswith(message)
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yml"
    path.write_text("workflow:\n  sumfrench:\n    tasks:\n      - echo\n      - action: translation.nope\n")
    assert main(["--config", str(path), "--check"], env={}) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"aioserver: error: {path}: workflow.sumfrench.tasks[1].action: cannot import")


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_exit_0(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([flag], env={}) == 0
    assert "aioserver" in capsys.readouterr().out


def test_port_in_use_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--port", str(port)], env={}) == 1
    err = capsys.readouterr().err
    assert re.search(rf"aioserver: error: cannot listen on 127.0.0.1:{port}: .*in use", err)


# -- the real thing: a subprocess as a user starts it


@pytest.fixture
def sleepy_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yml"
    path.write_text("workflow:\n  sleepy:\n    tasks: [{action: sample_actions.sleepy, args: [1.5]}]\n")
    return path


@pytest.fixture
def server(sleepy_config: Path) -> Iterator[Server]:
    with Server("--config", str(sleepy_config)) as running:
        yield running


@pytest.mark.workers
def test_sigterm_lets_the_request_in_flight_finish(server: Server) -> None:
    result: list[tuple[int, bytes]] = []
    client = threading.Thread(target=lambda: result.append(server.post(b'{"name": "sleepy", "elements": [7]}')))
    client.start()
    time.sleep(0.5)  # the request is now inside the 1.5 s action
    server.process.send_signal(signal.SIGTERM)
    client.join(timeout=10)
    assert server.process.wait(timeout=10) == 0
    assert result == [(200, b"[7]")]
    log = "".join(server.log)
    assert "shutting down" in log and "stopped" in log and "Traceback" not in log
    # New connections are refused once it has stopped.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


@pytest.mark.workers
def test_sigint_exits_0(server: Server) -> None:
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(timeout=10) == 0


def test_bad_config_subprocess_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_text("workflow:\n  w:\n    tasks: [{action: echo, batch: many}]\n")
    done = subprocess.run([PYTHON, "-m", "aioserver", "--config", str(path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert (
        done.stderr == f"aioserver: error: {path}: workflow.w.tasks[0].batch: expected a positive integer, got 'many'\n"
    )
    assert done.stdout == ""


def test_console_script_serves_default_config(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("aioserver")
    with Server() as running:  # python -m aioserver, embedded default config
        assert running.post(b'{"name": "shout", "elements": [" hi "]}') == (200, b'["HI!"]')
        running.process.terminate()
        assert running.process.wait(timeout=10) == 0
    done = subprocess.run([str(script), "--check"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and "workflow shout" in done.stdout


@pytest.mark.workers
def test_shutdown_is_bounded_even_with_a_stuck_sync_action(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_text("workflow:\n  stuck:\n    tasks: [{action: sample_actions.sleepy, args: [60]}]\n")
    with Server("--config", str(path), "--timeout-graceful-shutdown", "0.5") as server:
        client = threading.Thread(target=lambda: _ignore_errors(server), daemon=True)
        client.start()
        time.sleep(0.5)  # the request now sits in a thread that sleeps for a minute
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=15) == 0
        assert time.monotonic() - started < 10
    log = "".join(server.log)
    assert log.count("INFO aioserver: stopped") == server.workers
    if server.workers == 1:  # a worker leaves by os._exit, its threads with it, unannounced
        assert "exiting with 1 action threads still running" in log


def _ignore_errors(server: Server) -> None:
    try:
        server.post(b'{"name": "stuck", "elements": [1]}')
    except OSError:
        pass  # the server went away mid-request, as intended


# -- secrets that must not outlive start-up or reach an error message

SECRET = "s3cret-Pa55word-7f3a"


@pytest.mark.parametrize(
    "argv",
    [
        # Once a prefix of --ssl-keyfile-password-file (argparse's abbreviations): the secret
        # was taken for a file name and printed in "cannot read".
        ["--ssl-keyfile-password", SECRET],
        [f"--ssl-keyfile-password={SECRET}"],
        [f"--ssl={SECRET}"],  # a prefix of several options: "ambiguous option: --ssl=..."
        ["--token", SECRET],
        [f"--token={SECRET}"],
        ["--token", f"--{SECRET}"],
        [SECRET],
        ["--", SECRET],
        [f"-{SECRET}"],
        [f"--allow-insecure-http={SECRET}"],
        [f"--version={SECRET}"],
        [f"-h{SECRET}"],
        ["--port", "8000", SECRET],
    ],
)
def test_usage_errors_never_show_a_value(
    argv: list[str], pem_files: PemFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    tls = ["--ssl-certfile", str(pem_files.cert), "--ssl-keyfile", str(pem_files.encrypted_key)]
    assert main([*tls, *argv, "--check"], env={}) == 2
    err = capsys.readouterr().err
    assert err.startswith("aioserver: error: command line: ") and err.count("\n") == 1
    assert SECRET not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ssl-keyfile-password", SECRET], "unrecognized arguments: --ssl-keyfile-password (and 1 more, not shown"),
        ([f"--token={SECRET}"], "unrecognized arguments: --token (and 1 more, not shown"),
        ([SECRET, "--bogus"], "unrecognized arguments: --bogus (and 1 more, not shown"),
        ([f"--check={SECRET}"], "argument --check: ignored explicit argument (not shown"),
    ],
)
def test_usage_errors_name_the_unknown_option(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--check"], env={}) == 2
    assert capsys.readouterr().err.startswith(f"aioserver: error: command line: {message}")


def test_mistyped_password_option_subprocess(pem_files: PemFiles) -> None:
    argv = ["--ssl-certfile", str(pem_files.cert), "--ssl-keyfile", str(pem_files.encrypted_key)]
    done = subprocess.run(
        [PYTHON, "-m", "aioserver", *argv, "--ssl-keyfile-password", SECRET], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert done.stderr.startswith("aioserver: error: command line: unrecognized arguments: --ssl-keyfile-password")
    assert SECRET not in done.stderr + done.stdout


def https_post(port: int, context: ssl.SSLContext, body: dict[str, object]) -> tuple[int, object]:
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=30)
    try:
        connection.request("POST", "/workflow", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize(("concurrency", "workers"), [("thread", 1), ("process", 1), ("thread", 2), ("process", 2)])
def test_keyfile_password_leaves_the_environment(
    tmp_path: Path, pem_files: PemFiles, client_ssl_ctx: ssl.SSLContext, concurrency: str, workers: int
) -> None:
    """Read once at start-up, SSL_KEYFILE_PASSWORD is gone before any action, worker or pool runs."""
    config = tmp_path / "config.yml"
    task = "{action: sample_environment.%s, concurrency: " + concurrency + "}"
    config.write_text(
        f"workflow:\n  env: {{tasks: [{task % 'keyfile_password'}]}}\n  proc: {{tasks: [{task % 'environ_holds'}]}}\n"
    )
    args = (
        "--config", str(config), "--workers", str(workers),
        "--ssl-certfile", str(pem_files.cert), "--ssl-keyfile", str(pem_files.encrypted_key),
    )  # fmt: skip
    elements = [KEY_PASSWORD, "SSL_KEYFILE_PASSWORD="]
    with Server(*args, env={"SSL_KEYFILE_PASSWORD": KEY_PASSWORD}, listeners=workers) as server:
        try:
            # It serves HTTPS with the encrypted key, so the password was read.
            seen = https_post(server.port, client_ssl_ctx, {"name": "env", "elements": [1, 2]})
            in_proc = https_post(server.port, client_ssl_ctx, {"name": "proc", "elements": elements})
        finally:
            # A clean stop (not the fixture's kill) also stops the process pool, whose children
            # would otherwise keep the log pipe open.
            server.process.terminate()
            assert server.process.wait(timeout=20) == 0
    assert seen == (200, [None, None])
    # Nor do its bytes linger where /proc/self/environ would show them (the name does, emptied,
    # in this process and the forked workers; a spawned process never had it).
    assert in_proc == (200, [False, concurrency == "thread"])


@pytest.mark.parametrize("concurrency", ["thread", "process"])
def test_token_hash_leaves_the_environment(tmp_path: Path, concurrency: str) -> None:
    """TOKEN (a token's hash) is read once: no action or process of the server sees it."""
    config = tmp_path / "config.yml"
    config.write_text(
        f"workflow:\n  env: {{tasks: [{{action: sample_environment.variables, concurrency: {concurrency}}}]}}\n"
        f"  proc: {{tasks: [{{action: sample_environment.environ_holds, concurrency: {concurrency}}}]}}\n"
    )
    with Server("--config", str(config), env={"TOKEN": TOKEN_HASH}) as server:
        try:
            seen = server.post(b'{"name": "env", "elements": ["TOKEN"]}', token=TOKEN)
            in_proc = server.post(json.dumps({"name": "proc", "elements": [TOKEN_HASH]}).encode(), token=TOKEN)
        finally:
            server.process.terminate()
            assert server.process.wait(timeout=20) == 0
    assert seen == (200, b"[null]")
    assert in_proc == (200, b"[false]")
