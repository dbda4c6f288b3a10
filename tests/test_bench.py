"""The benchmark's pure parts (bench/report.py): wrk's result line, medians, ratios, tables.

No wrk, no servers, no network: the harness itself is exercised by running bench/run.py.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).parent.parent / "bench"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


report = _load("report")
run_script = _load("run")

LINE = (
    'BENCH_RESULT {"requests": 25000, "duration_us": 5000000, "p50_us": 1500, "p99_us": 9250, '
    '"connect": 0, "read": 2, "write": 0, "timeout": 1, "status": 0}'
)


def make_run(rate: float, p50: float = 1.0, p99: float = 2.0, status: int = 0, read: int = 0):  # type: ignore[no-untyped-def]
    errors = {"connect": 0, "read": read, "write": 0, "timeout": 0, "status": status}
    return report.Run(requests=int(rate * 10), duration_s=10.0, p50_ms=p50, p99_ms=p99, errors=errors)


def test_parse_wrk_reads_the_result_line_among_wrk_s_report() -> None:
    output = (
        f"Running 5s test @ https://127.0.0.1:8000\n  1 threads and 64 connections\n{LINE}\nRequests/sec: 5000.00\n"
    )
    run = report.parse_wrk(output)
    assert run.requests == 25000
    assert run.duration_s == 5.0
    assert run.rate == 5000.0
    assert (run.p50_ms, run.p99_ms) == (1.5, 9.25)
    assert run.errors == {"connect": 0, "read": 2, "write": 0, "timeout": 1, "status": 0}
    assert run.bad_status == 0


@pytest.mark.parametrize(
    "output, problem",
    [
        ("Running 5s test\nRequests/sec: 5000.00\n", "found 0"),
        (f"{LINE}\n{LINE}\n", "found 2"),
        ("BENCH_RESULT {not json}", "malformed"),
        ('BENCH_RESULT {"requests": 1, "duration_us": 10}', "malformed"),
        (
            'BENCH_RESULT {"requests": "many", "duration_us": 1, "p50_us": 1, "p99_us": 1, '
            '"connect": 0, "read": 0, "write": 0, "timeout": 0, "status": 0}',
            "malformed",
        ),
        (LINE.replace('"duration_us": 5000000', '"duration_us": 0'), "impossible"),
        ("  BENCH_RESULT " + LINE[len("BENCH_RESULT ") :], "found 0"),  # only at the start of a line
    ],
)
def test_parse_wrk_rejects_output_without_one_good_result_line(output: str, problem: str) -> None:
    with pytest.raises(report.WrkOutputError, match=problem):
        report.parse_wrk(output)


def test_the_lua_script_prints_what_parse_wrk_reads() -> None:
    # post.lua's format string, with its %d filled in, must parse: the two files agree on keys.
    lua = (BENCH / "post.lua").read_text()
    template = "".join(re.findall(r"'((?:BENCH_RESULT )?[^']*)'", lua.split("function done", 1)[1]))
    assert template.startswith("BENCH_RESULT {")
    fields = template.count("%d")
    line = template.replace("\\n", "") % tuple(range(1, fields + 1))
    run = report.parse_wrk(line)
    assert run.requests == 1 and run.duration_s == 2e-6


def test_the_lua_script_sends_the_echo_workflow_with_the_bearer_token() -> None:
    lua = (BENCH / "post.lua").read_text()
    assert 'wrk.method = "POST"' in lua
    assert 'wrk.path = "/workflow"' in lua
    assert '{"name": "echo", "elements": ["hello"]}' in lua
    assert '"Bearer " .. ' in lua


@pytest.mark.parametrize(
    "rates, median",
    [([3.0, 1.0, 2.0], 2.0), ([4.0, 1.0, 2.0, 3.0], 2.5), ([7.0], 7.0)],
)
def test_summarize_takes_medians(rates: list[float], median: float) -> None:
    summary = report.summarize([make_run(r, p50=r, p99=10 * r) for r in rates])
    assert summary.rate == pytest.approx(median)
    assert summary.p50_ms == pytest.approx(median)
    assert summary.p99_ms == pytest.approx(10 * median)
    assert summary.runs == len(rates)


def test_summarize_sums_errors_and_refuses_nothing() -> None:
    summary = report.summarize([make_run(1, status=3, read=1), make_run(2, status=1), make_run(3, read=4)])
    assert (summary.bad_status, summary.socket_errors) == (4, 5)
    with pytest.raises(ValueError):
        report.summarize([])


RESULTS = {
    ("https", "txtai"): [make_run(1000), make_run(1400), make_run(1500)],
    ("https", "aioserver"): [make_run(5000), make_run(4000), make_run(6000)],
    ("https", "aiohttp"): [make_run(5200), make_run(5400), make_run(5300)],
    ("https", "aioserver-unpinned"): [make_run(4000)] * 3,
    ("https", "aioserver-w2"): [make_run(6000)] * 3,
}
STACKS = [
    ("txtai", "txtai", "core 0", "aioserver"),
    ("nginx", "nginx", "core 0", "aioserver"),
    ("aioserver", "aioserver", "core 0", "aioserver"),
    ("aioserver-unpinned", "aioserver", "unpinned", "aioserver-unpinned"),
    ("aioserver-w2", "aioserver w2", "unpinned", "aioserver-unpinned"),
]


def test_rows_give_ratios_to_the_reference_of_the_same_pinning_and_mode() -> None:
    table = report.rows(RESULTS, [("https", "HTTPS"), ("http", "HTTP")], STACKS, {("https", "nginx"): "no nginx"})
    by = {(r.mode, r.stack, r.pinning): r for r in table}
    assert len(table) == 10
    assert by["HTTPS", "txtai", "core 0"].ratio == pytest.approx(1400 / 5000)
    assert by["HTTPS", "aioserver", "core 0"].ratio == pytest.approx(1.0)
    assert by["HTTPS", "aioserver w2", "unpinned"].ratio == pytest.approx(1.5)
    nginx = by["HTTPS", "nginx", "core 0"]
    assert (nginx.summary, nginx.ratio, nginx.note) == (None, None, "no nginx")
    assert all(r.summary is None and r.ratio is None for r in table if r.mode == "HTTP")


def test_ratio_is_none_without_both_sides() -> None:
    summaries = {"a": report.summarize([make_run(10)]), "zero": report.Summary(0, 0, 0, 1, 0, 0)}
    assert report.ratio(summaries, "a", "a") == 1.0
    assert report.ratio(summaries, "a", "missing") is None
    assert report.ratio(summaries, "missing", "a") is None
    assert report.ratio(summaries, "a", "zero") is None


def test_text_table_aligns_columns_and_shows_missing_cells() -> None:
    table = report.rows(RESULTS, [("https", "HTTPS keep-alive")], STACKS)
    lines = report.text_table(table).splitlines()
    assert lines[0].split() == [
        "mode",
        "stack",
        "pinning",
        "req/s",
        "p50",
        "ms",
        "p99",
        "ms",
        "×",
        "ref",
        "runs",
        "non-2xx",
        "sock",
        "err",
        "note",
    ]
    assert len(lines) == 1 + len(STACKS)
    txtai = lines[1]
    assert "1,400" in txtai and "0.28" in txtai
    assert lines[2].split()[-7:] == ["-", "-", "-", "-", "0", "-", "-"]  # nginx: not measured
    # right-aligned numbers: the req/s column ends at the same place on every line
    end = lines[0].index("req/s") + len("req/s")
    assert all(line[end - 1] != " " for line in lines[1:])


def test_markdown_table_has_a_row_per_stack_and_escapes_pipes() -> None:
    table = report.rows(RESULTS, [("https", "HTTPS")], STACKS, {("https", "txtai"): "a|b"})
    lines = report.markdown_table(table).splitlines()
    assert lines[0].startswith("| mode | stack |")
    assert lines[1].count("---:") == 7
    assert len(lines) == 2 + len(STACKS)
    assert "a\\|b" in lines[2]


def test_targets_are_checked_on_this_run_s_medians() -> None:
    targets = [
        report.Target("fast", "https", "aioserver", "txtai", 3.5),
        report.Target("floor", "https", "aioserver", "aiohttp", 0.9),
        report.Target("workers", "https", "aioserver-w2", "aioserver-unpinned", 1.4),
        report.Target("handshakes", "https-close", "aioserver", "nginx", 1.0),
    ]
    checked = report.check_targets(RESULTS, targets)
    values = [value for _, value in checked]
    assert values[0] == pytest.approx(5000 / 1400)
    assert values[1] == pytest.approx(5000 / 5300)
    assert values[2] == pytest.approx(1.5)
    assert values[3] is None
    lines = report.target_lines(checked)
    assert lines[0] == "fast: 3.57× (≥ 3.5×): met"
    assert lines[1] == "floor: 0.94× (≥ 0.9×): met"
    assert lines[3] == "handshakes: not measured"
    assert report.target_lines([(targets[0], 3.0)]) == ["fast: 3.00× (≥ 3.5×): NOT met"]


@pytest.mark.parametrize(
    "argv, problem",
    [
        (["--repetitions", "2"], "at least 3"),
        (["--duration", "0"], "must be positive"),
        (["--connections", "0"], "must be positive"),
    ],
)
def test_run_refuses_too_few_repetitions_and_empty_runs(argv: list[str], problem: str, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exc:
        run_script.parse_args(argv)
    assert exc.value.code == 2
    assert problem in capsys.readouterr().err


def test_run_defaults_measure_every_mode_three_times() -> None:
    args = run_script.parse_args([])
    assert args.repetitions == 3
    assert args.modes.split(",") == ["http", "https", "https-close"]


# -- the observability stacks (issue 12): their options detected, their effect checked

stacks = _load("stacks")


@pytest.mark.parametrize(
    "extras, expected",
    [
        ("speed =\n    uvloop\ntest =\n    pytest\n", ["speed"]),
        ("speed =\n    uvloop\nmetrics =\n    prometheus-client\n", ["speed", "metrics"]),
        ("acme =\n    acme\n", []),
    ],
)
def test_the_bench_venv_installs_the_extras_setup_cfg_declares(extras: str, expected: list[str]) -> None:
    setup_cfg = f"[metadata]\nname = aioserver\n\n[options.extras_require]\n{extras}"
    assert run_script.declared_extras(setup_cfg) == expected
    assert run_script.declared_extras("[metadata]\nname = aioserver\n") == []


def test_each_aioserver_configuration_is_measured_against_the_floor(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.syspath_prepend(str(BENCH))  # as run.py runs: bench/ on the path
    table = {stack.key: stack for stack in run_script.stacks_table()}
    for key, option in [("aioserver-no-access-log", "--no-access-log"), ("aioserver-metrics", "--metrics")]:
        assert table[key].pinned and table[key].reference == "aioserver" and option in table[key].label
        assert table[key].verify is not None
    floor = {(t.stack, t.minimum) for t in run_script.targets() if t.reference == "aiohttp" and t.mode == "https"}
    assert floor == {("aioserver", 0.9), ("aioserver-no-access-log", 0.95), ("aioserver-metrics", 0.85)}


def _context(tmp_path: Path, flags: set[str]):  # type: ignore[no-untyped-def]
    return stacks.Context(
        python=sys.executable,
        processes=stacks.Processes(tmp_path),
        work=tmp_path,
        certfile=tmp_path / "cert",
        keyfile=tmp_path / "key",
        cafile=tmp_path / "ca",
        token="t",
        token_hash="h",
        server_cpus=None,
        aioserver_flags=frozenset(flags),
        floor_loop="auto",
    )


def test_an_option_this_build_lacks_makes_its_stack_unavailable(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    launch = stacks.aioserver_launcher(1, "--metrics")
    with pytest.raises(stacks.Unavailable, match="no --metrics option yet"):
        launch(_context(tmp_path, {"--ssl-certfile", "--ssl-keyfile"}), "https", None)
    # Listed in --help, but its library is not installed: unavailable too, saying which extra.
    monkeypatch.setitem(stacks.NEEDS, "--metrics", ("no_such_module_for_the_bench", "metrics"))
    with pytest.raises(stacks.Unavailable, match="no_such_module_for_the_bench.*'metrics' extra"):
        launch(_context(tmp_path, {"--metrics", "--ssl-certfile", "--ssl-keyfile"}), "https", None)


def test_access_lines_are_found_as_text_or_json() -> None:
    text = '127.0.0.1 https "POST /workflow HTTP/1.1" 200 9 0.001s ci\n'
    json_line = '{"message": "access", "method": "POST", "path": "/workflow", "status": 200}\n'
    assert stacks.access_lines("INFO aioserver: serving on https://127.0.0.1:8443\n") == 0
    assert stacks.access_lines(text * 3) == 3
    assert stacks.access_lines(json_line) == 1


def test_only_missing_token_checks_may_be_measured_anyway() -> None:
    assert stacks.auth_only(["without a token: 200, expected 401", "with a wrong token: 200, expected 401"])
    assert not stacks.auth_only([])
    assert not stacks.auth_only(["without a token: 200, expected 401", "--metrics did not act: GET /metrics ..."])
    assert not stacks.auth_only(["with the token: 500 b'', expected 200 [\"hello\"]"])
