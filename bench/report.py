"""The benchmark's pure parts: reading wrk's result line, medians, ratios and the table.

Nothing here starts a process or opens a socket, so ``tests/test_bench.py`` covers it
without wrk. ``post.lua`` makes wrk print one ``BENCH_RESULT {json}`` line at the end of a
run, with exact percentiles, so that nothing depends on wrk's human-readable report.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

RESULT_MARK = "BENCH_RESULT "
ERROR_KINDS = ("connect", "read", "write", "timeout", "status")


class WrkOutputError(ValueError):
    """wrk's output has no usable result line (wrk failed, or the Lua script was not ours)."""


@dataclass(frozen=True, slots=True)
class Run:
    """One wrk run against one stack in one mode."""

    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    errors: Mapping[str, int]

    @property
    def rate(self) -> float:
        """Completed requests per second (handshakes per second when each has its own connection)."""
        return self.requests / self.duration_s

    @property
    def bad_status(self) -> int:
        """Answers that were not 2xx/3xx: a stack that counts 401s as throughput is broken."""
        return self.errors.get("status", 0)


def parse_wrk(output: str) -> Run:
    """The :class:`Run` in wrk's standard output (the line ``post.lua`` prints when done)."""
    lines = [line for line in output.splitlines() if line.startswith(RESULT_MARK)]
    if len(lines) != 1:
        raise WrkOutputError(f"expected one {RESULT_MARK.strip()} line in wrk's output, found {len(lines)}")
    try:
        data = json.loads(lines[0][len(RESULT_MARK) :])
        requests, duration_us = int(data["requests"]), int(data["duration_us"])
        p50_us, p99_us = float(data["p50_us"]), float(data["p99_us"])
        errors = {kind: int(data[kind]) for kind in ERROR_KINDS}
    except (ValueError, KeyError, TypeError) as exc:
        raise WrkOutputError(f"malformed {RESULT_MARK.strip()} line: {exc}") from None
    if duration_us <= 0 or requests < 0:
        raise WrkOutputError(f"impossible result: {requests} requests in {duration_us} µs")
    return Run(requests, duration_us / 1e6, p50_us / 1000, p99_us / 1000, errors)


@dataclass(frozen=True, slots=True)
class Summary:
    """The medians of a stack's runs in one mode."""

    rate: float
    p50_ms: float
    p99_ms: float
    runs: int
    bad_status: int  # summed over the runs
    socket_errors: int  # summed over the runs


def summarize(runs: Sequence[Run]) -> Summary:
    """Medians of rate, p50 and p99 (each on its own), and the errors summed."""
    if not runs:
        raise ValueError("no runs to summarize")
    return Summary(
        rate=statistics.median(r.rate for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        runs=len(runs),
        bad_status=sum(r.bad_status for r in runs),
        socket_errors=sum(v for r in runs for k, v in r.errors.items() if k != "status"),
    )


def ratio(summaries: Mapping[str, Summary], stack: str, reference: str) -> float | None:
    """``stack``'s median rate over ``reference``'s, or None when either was not measured."""
    if stack not in summaries or reference not in summaries or summaries[reference].rate == 0:
        return None
    return summaries[stack].rate / summaries[reference].rate


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the results table."""

    mode: str
    stack: str
    pinning: str
    summary: Summary | None  # None: not measured
    ratio: float | None
    reference: str
    note: str = ""


def rows(
    results: Mapping[tuple[str, str], Sequence[Run]],
    modes: Iterable[tuple[str, str]],
    stacks: Iterable[tuple[str, str, str, str]],
    notes: Mapping[tuple[str, str], str] | None = None,
) -> list[Row]:
    """The table's rows, mode by mode.

    ``results`` maps (mode, stack) to its runs; ``modes`` gives (key, label) and ``stacks``
    gives (key, label, pinning, reference stack key) in display order; ``notes`` says why a
    cell is missing or what is special about it.
    """
    notes = notes or {}
    stacks = list(stacks)
    table = []
    for mode, mode_label in modes:
        summaries = {s: summarize(results[mode, s]) for s, *_ in stacks if results.get((mode, s))}
        for stack, label, pinning, reference in stacks:
            table.append(
                Row(
                    mode=mode_label,
                    stack=label,
                    pinning=pinning,
                    summary=summaries.get(stack),
                    ratio=ratio(summaries, stack, reference),
                    reference=reference,
                    note=notes.get((mode, stack), ""),
                )
            )
    return table


HEADERS = ("mode", "stack", "pinning", "req/s", "p50 ms", "p99 ms", "× ref", "runs", "non-2xx", "sock err", "note")


def _cells(row: Row) -> tuple[str, ...]:
    s = row.summary
    if s is None:
        measured = ("-", "-", "-", "-", "0", "-", "-")
    else:
        measured = (
            f"{s.rate:,.0f}",
            f"{s.p50_ms:.2f}",
            f"{s.p99_ms:.2f}",
            "-" if row.ratio is None else f"{row.ratio:.2f}",
            str(s.runs),
            str(s.bad_status),
            str(s.socket_errors),
        )
    return (row.mode, row.stack, row.pinning, *measured, row.note)


def _numeric(column: int) -> bool:
    return 3 <= column <= 9


def text_table(table: Sequence[Row]) -> str:
    """The rows as aligned plain text, numbers right-aligned."""
    cells = [HEADERS, *(_cells(r) for r in table)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADERS))]
    lines = []
    for line in cells:
        parts = [c.rjust(w) if _numeric(i) else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def markdown_table(table: Sequence[Row]) -> str:
    """The rows as a GitHub-flavoured markdown table."""
    align = ["---:" if _numeric(i) else "---" for i in range(len(HEADERS))]
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join(align) + "|"]
    for row in table:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(row)) + " |")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Target:
    """One of the issue's targets: ``stack`` over ``reference`` in ``mode`` at least ``minimum``."""

    description: str
    mode: str
    stack: str
    reference: str
    minimum: float


def check_targets(
    results: Mapping[tuple[str, str], Sequence[Run]], targets: Iterable[Target]
) -> list[tuple[Target, float | None]]:
    """Each target with the ratio measured in this run (None: a side was not measured)."""
    checked = []
    for target in targets:
        summaries = {
            s: summarize(results[target.mode, s])
            for s in (target.stack, target.reference)
            if results.get((target.mode, s))
        }
        checked.append((target, ratio(summaries, target.stack, target.reference)))
    return checked


def target_lines(checked: Sequence[tuple[Target, float | None]]) -> list[str]:
    """One line per target: met, NOT met, or not measured."""
    lines = []
    for target, value in checked:
        if value is None:
            verdict = "not measured"
        else:
            verdict = f"{value:.2f}× (≥ {target.minimum:g}×): " + ("met" if value >= target.minimum else "NOT met")
        lines.append(f"{target.description}: {verdict}")
    return lines
