#!/usr/bin/env python3
"""Benchmark aioserver against the txtai stack on this machine's loopback.

    python3 bench/run.py [--duration 5] [--repetitions 3] [--markdown results.md]

On first use it apt-installs wrk and nginx if missing, creates ``bench/.venv`` with
FastAPI, uvicorn and aioserver (editable, from this repository), and runs itself again
inside that venv. See bench/README.md.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import json
import os
import platform
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV = BENCH / ".venv"
# uvicorn[standard] brings uvloop and httptools, which uvicorn uses when present: the txtai
# stack at its fastest. trustme makes the certificates.
REQUIREMENTS = ("fastapi>=0.110", "uvicorn[standard]>=0.29", "trustme>=1.1")
# aioserver's extras the bench installs, when this build declares them: speed (uvloop, orjson)
# for every aioserver stack, metrics (prometheus-client) for aioserver-metrics.
EXTRAS = ("speed", "metrics")
DEBIAN_TOOLS = {"wrk": "wrk", "nginx": "nginx", "taskset": "util-linux"}
SBIN = ("/usr/sbin", "/sbin")


# -- bootstrap: stdlib only, runs with whatever python3 the user has ------------------------


def find_tool(name: str) -> str | None:
    """A program on PATH, or in sbin (where Debian puts nginx, outside a user's PATH)."""
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def ensure_debian_tools() -> None:
    """apt-get install wrk, nginx (and venv support) when missing; exit with a hint if we cannot."""
    missing = [package for tool, package in DEBIAN_TOOLS.items() if find_tool(tool) is None]
    try:
        import ensurepip  # noqa: F401  (Debian ships venv's pip separately)
    except ImportError:
        missing.append("python3-venv")
    if not missing:
        return
    if shutil.which("apt-get") is None:
        sys.exit(f"bench: please install {' '.join(missing)} (no apt-get here)")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    if sudo and shutil.which("sudo") is None:
        sys.exit(f"bench: please run: apt-get install {' '.join(missing)}  (as root)")
    print(f"bench: installing {' '.join(missing)} with apt-get", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


def ensure_venv() -> Path:
    """bench/.venv with the reference stacks and aioserver; reinstalled when their list changes."""
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"bench: creating {VENV}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    extras = declared_extras((REPO / "setup.cfg").read_text())
    packages = [*REQUIREMENTS, "-e", f"{REPO}[{','.join(extras)}]" if extras else str(REPO)]
    stamp = hashlib.sha256(json.dumps([packages, (REPO / "setup.cfg").read_text()]).encode()).hexdigest()
    stamp_file = VENV / "bench-installed"
    if not stamp_file.exists() or stamp_file.read_text() != stamp:
        print(f"bench: installing {' '.join(REQUIREMENTS)} and aioserver into {VENV}", file=sys.stderr)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
        stamp_file.write_text(stamp)
    return python


def declared_extras(setup_cfg: str) -> list[str]:
    """Those of EXTRAS that setup.cfg declares (``[options.extras_require]``)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(setup_cfg)
    declared = parser.options("options.extras_require") if parser.has_section("options.extras_require") else []
    return [extra for extra in EXTRAS if extra in declared]


def in_bench_venv() -> bool:
    """Whether this interpreter is bench/.venv's."""
    return Path(sys.prefix).resolve() == VENV.resolve()


# -- the benchmark proper: runs inside the venv ----------------------------------------------


@dataclass(frozen=True)
class Mode:
    """How wrk talks to a stack."""

    key: str
    label: str
    scheme: str
    close: bool  # Connection: close on every request: each one pays a TLS handshake


MODES = (
    Mode("http", "HTTP keep-alive", "http", False),
    Mode("https", "HTTPS keep-alive", "https", False),
    Mode("https-close", "HTTPS conn/request (handshakes/s)", "https", True),
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement [5]")
    parser.add_argument("--repetitions", type=int, default=3, help="measurements per stack and mode, >= 3 [3]")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up before the first round [1]")
    parser.add_argument("--connections", type=int, default=64, help="wrk's open connections [64]")
    parser.add_argument("--modes", default=",".join(m.key for m in MODES), help="comma-separated subset of modes")
    parser.add_argument("--stacks", default=None, help="comma-separated subset of stacks [all]")
    parser.add_argument("--key-type", choices=("ecdsa", "rsa"), default="ecdsa", help="server key, all stacks [ecdsa]")
    parser.add_argument(
        "--floor-loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop of the bare aiohttp app; auto = uvloop when installed [auto]",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers and wrk to cores")
    parser.add_argument("--markdown", type=Path, help="also write the results as markdown to this file")
    parser.add_argument(
        "--allow-missing-auth",
        action="store_true",
        help="measure a stack that does not refuse requests without a token (marked in the table)",
    )
    parser.add_argument(
        "--no-install", action="store_true", help="use this interpreter as is: no apt-get, no bench/.venv"
    )
    args = parser.parse_args(argv)
    if args.repetitions < 3:
        parser.error("--repetitions must be at least 3 (the median of fewer means little)")
    if args.duration <= 0 or args.warmup < 0 or args.connections < 1:
        parser.error("--duration and --connections must be positive, --warmup not negative")
    return args


def stacks_table() -> tuple:  # type: ignore[type-arg]
    """Every stack, in display order."""
    from stacks import (
        Stack,
        aioserver_launcher,
        floor_launcher,
        launch_floor,
        launch_nginx,
        launch_txtai,
        no_access_lines,
        serves_metrics,
    )

    # FastAPI's HTTPBearer answers 403 to a request without credentials (401 from 0.117).
    fastapi_denials = frozenset({401, 403})
    return (
        Stack("txtai", "txtai: FastAPI + uvicorn", True, "aioserver", launch_txtai, fastapi_denials),
        Stack("nginx", "txtai behind nginx", True, "aioserver", launch_nginx, fastapi_denials),
        Stack("aiohttp", "bare aiohttp (floor)", True, "aioserver", launch_floor),
        # What aiohttp itself charges for one middleware layer and for its own access log: the
        # budget the targets below leave (bench/README.md, "The cost of observability").
        Stack(
            "aiohttp-middleware",
            "bare aiohttp + 1 middleware doing nothing",
            True,
            "aioserver",
            floor_launcher("--middlewares", "1"),
        ),
        Stack("aiohttp-access-log", "bare aiohttp + its access log", True, "aioserver", floor_launcher("--access-log")),
        # The least SPEC section 8 asks, the cheapest way, in the floor's handler: a lower bound.
        Stack("aiohttp-headers", "bare aiohttp + request id, headers", True, "aioserver", floor_launcher("--headers")),
        Stack(
            "aiohttp-headers-lines",
            "bare aiohttp + request id, headers, lines",
            True,
            "aioserver",
            floor_launcher("--headers", "--lines"),
        ),
        Stack("aioserver", "aioserver, 1 worker", True, "aioserver", aioserver_launcher(1)),
        Stack(
            "aioserver-no-access-log",
            "aioserver, --no-access-log",
            True,
            "aioserver",
            aioserver_launcher(1, "--no-access-log"),
            verify=no_access_lines,
        ),
        Stack(
            "aioserver-metrics",
            "aioserver, --metrics",
            True,
            "aioserver",
            aioserver_launcher(1, "--metrics"),
            verify=serves_metrics,
        ),
        Stack("aioserver-unpinned", "aioserver, 1 worker", False, "aioserver-unpinned", aioserver_launcher(1)),
        Stack("aioserver-w2", "aioserver, --workers 2", False, "aioserver-unpinned", aioserver_launcher(2)),
    )


def targets() -> list:  # type: ignore[type-arg]
    """The issue's targets, each a ratio measured in this run."""
    from report import Target

    return [
        Target("aioserver ≥ 3.5× the txtai stack, HTTPS keep-alive", "https", "aioserver", "txtai", 3.5),
        # The cost of observability (issue 12): each configuration against the floor.
        Target("aioserver ≥ 0.90× the bare-aiohttp floor, HTTPS keep-alive", "https", "aioserver", "aiohttp", 0.9),
        Target(
            "aioserver --no-access-log ≥ 0.95× the floor, HTTPS keep-alive",
            "https",
            "aioserver-no-access-log",
            "aiohttp",
            0.95,
        ),
        Target(
            "aioserver --metrics ≥ 0.85× the floor, HTTPS keep-alive", "https", "aioserver-metrics", "aiohttp", 0.85
        ),
        Target("aioserver handshakes/s ≥ nginx→uvicorn's", "https-close", "aioserver", "nginx", 1.0),
        Target(
            "--workers 2 ≥ 1.4× one worker (unpinned), HTTPS keep-alive",
            "https",
            "aioserver-w2",
            "aioserver-unpinned",
            1.4,
        ),
    ]


def make_certificate(work: Path, key_type: str) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1, in the temporary directory."""
    import trustme

    kind = trustme.KeyType.ECDSA if key_type == "ecdsa" else trustme.KeyType.RSA
    ca = trustme.CA(key_type=kind)
    cert = ca.issue_cert("127.0.0.1", "localhost", key_type=kind)
    certfile, keyfile, cafile = work / "server.pem", work / "server.key", work / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    for blob in cert.cert_chain_pems[1:]:
        blob.write_to_path(str(certfile), append=True)
    cert.private_key_pem.write_to_path(str(keyfile))
    ca.cert_pem.write_to_path(str(cafile))
    keyfile.chmod(0o600)
    return certfile, keyfile, cafile


def run_wrk(
    wrk: str, url: str, seconds: float, args: argparse.Namespace, token: str, close: bool, cpus: str | None
) -> str:
    """One wrk run; its standard output."""
    command = [
        wrk,
        "-t1",
        f"-c{args.connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(BENCH / "post.lua"),
        url,
    ]
    if cpus is not None:
        command = ["taskset", "-c", cpus, *command]
    # The token goes through the environment: never on a command line that ps can show.
    env = {**os.environ, "BENCH_TOKEN": token, "BENCH_CLOSE": "1" if close else "0"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=seconds + 60)
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def versions(wrk: str, nginx: str | None) -> str:
    """One line of what was measured with what."""
    from importlib import metadata

    found = []
    for name in ("aioserver", "aiohttp", "fastapi", "uvicorn", "uvloop", "httptools", "orjson"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    wrk_version = subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.split("[")[0].strip()
    nginx_version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip() if nginx else ""
    return ", ".join(
        [f"Python {platform.python_version()}", *found, wrk_version, nginx_version.replace("nginx version: ", "")]
    )


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def bench(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Start the stacks, check them, measure them interleaved, print the table; 0 if complete."""
    sys.path.insert(0, str(BENCH))
    import report
    import stacks as st

    modes = [m for m in MODES if m.key in args.modes.split(",")]
    unknown = set(args.modes.split(",")) - {m.key for m in MODES}
    all_stacks = stacks_table()
    chosen = set(args.stacks.split(",")) if args.stacks else {s.key for s in all_stacks}
    unknown |= chosen - {s.key for s in all_stacks}
    if unknown:
        print(
            f"bench: unknown mode or stack: {', '.join(sorted(unknown))}; stacks: "
            f"{', '.join(s.key for s in all_stacks)}; modes: {', '.join(m.key for m in MODES)}",
            file=sys.stderr,
        )
        return 2
    stacks = [s for s in all_stacks if s.key in chosen]

    wrk, nginx = find_tool("wrk"), find_tool("nginx")
    if wrk is None:
        print("bench: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    cores = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cores) >= 2 and find_tool("taskset") is not None
    server_cpus, wrk_cpus = (str(cores[0]), str(cores[1])) if pin else (None, None)

    work = Path(tempfile.mkdtemp(prefix="aioserver-bench-"))
    (work / "logs").mkdir()
    processes = st.Processes(work / "logs")
    problems: list[str] = []
    notes: dict[tuple[str, str], str] = {}
    results: dict[tuple[str, str], list] = {}  # type: ignore[type-arg]
    token = secrets.token_urlsafe(32)
    try:
        certfile, keyfile, cafile = make_certificate(work, args.key_type)
        ctx = st.Context(
            python=sys.executable,
            processes=processes,
            work=work,
            certfile=certfile,
            keyfile=keyfile,
            cafile=cafile,
            token=token,
            token_hash=hashlib.sha256(token.encode()).hexdigest(),
            server_cpus=server_cpus,
            aioserver_flags=st.aioserver_flags(sys.executable),
            floor_loop=args.floor_loop,
            nginx=nginx or "nginx",
        )

        # Start everything, then wait: start-ups overlap.
        servers: dict[tuple[str, str], st.Server] = {}
        schemes = sorted({m.scheme for m in modes})
        for stack in stacks:
            for scheme in schemes:
                if stack.key == "nginx" and nginx is None:
                    problems.append("nginx is not installed (apt-get install nginx)")
                    break
                try:
                    servers[stack.key, scheme] = stack.launch(ctx, scheme, server_cpus if stack.pinned else None)
                except st.Unavailable as exc:
                    problems.append(f"{stack.key} over {scheme}: {exc}")
                    for mode in modes:
                        if mode.scheme == scheme:
                            notes[mode.key, stack.key] = "unavailable, see below"
        usable: dict[tuple[str, str], str] = {}
        for (key, scheme), server in servers.items():
            stack = next(s for s in stacks if s.key == key)
            try:
                st.wait_until_listening(ctx, server)
                wrong = st.check(ctx, stack, server)
            except st.StartFailed as exc:
                wrong = [f"did not start: {exc}"]
            auth_only = st.auth_only(wrong)
            for mode in (m for m in modes if m.scheme == scheme):
                if not wrong or (auth_only and args.allow_missing_auth):
                    usable[mode.key, key] = server.url
                    if wrong:
                        notes[mode.key, key] = "NO AUTH: measured without the 401 check"
                else:
                    notes[mode.key, key] = "failed its check, see below"
            if wrong:
                message = f"{key} over {scheme} answered wrongly: " + "; ".join(wrong)
                if auth_only and args.allow_missing_auth:
                    message += " (measured anyway: --allow-missing-auth)"
                problems.append(message)
            else:
                print(f"bench: {key} over {scheme} answers correctly at {server.url}", file=sys.stderr)

        # Interleaved: every round measures each stack once per mode, starting each round
        # with a different stack so that none is always measured first (or on a warmer core).
        for rep in range(args.repetitions):
            for mode in modes:
                order = [s for s in stacks if (mode.key, s.key) in usable]
                if not order:
                    continue
                order = order[rep % len(order) :] + order[: rep % len(order)]
                for stack in order:
                    url = usable[mode.key, stack.key]
                    cpus = wrk_cpus if stack.pinned else None
                    if rep == 0 and args.warmup > 0:
                        run_wrk(wrk, url, args.warmup, args, token, mode.close, cpus)
                    try:
                        run = report.parse_wrk(run_wrk(wrk, url, args.duration, args, token, mode.close, cpus))
                    except (RuntimeError, report.WrkOutputError) as exc:
                        problems.append(f"{stack.key} {mode.key} round {rep + 1}: {exc}")
                        continue
                    results.setdefault((mode.key, stack.key), []).append(run)
                    print(
                        f"bench: round {rep + 1}/{args.repetitions} {mode.key:<11} {stack.key:<19} "
                        f"{run.rate:8,.0f}/s  p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms"
                        + (f"  non-2xx {run.bad_status}" if run.bad_status else ""),
                        file=sys.stderr,
                    )
        for (mode_key, stack_key), runs in results.items():
            bad = sum(r.bad_status for r in runs)
            if bad:
                problems.append(f"{stack_key} {mode_key}: {bad} answers were not 2xx; its rate is not comparable")
    except KeyboardInterrupt:
        print("bench: interrupted; stopping every server", file=sys.stderr)
        processes.stop_all()
        shutil.rmtree(work, ignore_errors=True)
        return 130
    finally:
        processes.stop_all()  # a no-op when already stopped
        (work / "server.key").unlink(missing_ok=True)

    def pinning(stack: st.Stack) -> str:
        if stack.pinned and pin:
            return f"core {server_cpus}"
        return "unpinned"

    table = report.rows(
        results,
        [(m.key, m.label) for m in modes],
        [(s.key, s.label, pinning(s), s.reference) for s in stacks],
        notes,
    )
    checked = report.check_targets(results, targets())
    preamble = [
        f"command: python3 bench/run.py {shlex.join(argv)}".rstrip(),
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        f"software: {versions(wrk, nginx)}",
        f"load: wrk -t1 -c{args.connections}, {args.duration:g} s per measurement, {args.repetitions} rounds "
        f"interleaved, medians; POST /workflow echo with the Bearer token; {args.key_type.upper()} certificate",
        (
            f"pinning: 'core {server_cpus}' servers (nginx and its uvicorn included) ran under taskset -c "
            f"{server_cpus} with wrk under taskset -c {wrk_cpus}; 'unpinned' servers and their wrk shared all cores"
            if pin
            else "pinning: none (fewer than 2 cores, taskset missing, or --no-pin)"
        ),
        "× ref: median req/s over aioserver 1 worker's with the same pinning, same mode, same run",
    ]
    print("\n".join(preamble))
    print()
    print(report.text_table(table))
    print()
    print("targets:")
    for line in report.target_lines(checked):
        print(f"  {line}")
    if problems:
        print("\nINCOMPLETE:")
        for problem in problems:
            print(f"  - {problem}")
        print(f"  server logs: {work / 'logs'}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    if args.markdown:
        lines = ["```", *preamble, "```", "", report.markdown_table(table), "", "Targets:", ""]
        lines += [f"- {line}" for line in report.target_lines(checked)]
        if problems:
            lines += ["", "Not measured or measured with caveats:", ""] + [f"- {p}" for p in problems]
        args.markdown.write_text("\n".join(lines) + "\n")
        print(f"\nbench: markdown written to {args.markdown}", file=sys.stderr)
    return 1 if problems else 0


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM (or a closed terminal) ends the run like Ctrl-C does: through the finally
    # clause that stops every server.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Bootstrap when needed, then benchmark; the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not args.no_install and not in_bench_venv():
        ensure_debian_tools()
        python = ensure_venv()
        os.execv(str(python), [str(python), str(Path(__file__).resolve()), *argv])
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    started = time.monotonic()
    status = bench(args, argv)
    print(f"bench: finished in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
