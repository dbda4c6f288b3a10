"""Instructions per request, counted by valgrind's callgrind: a cost that machine load does not move.

wrk's req/s on a shared 2-core machine moves by 20 % from run to run, and so do ratios to the
floor measured with it. callgrind counts the instructions the server process executes (its
user-space work: Python, aiohttp, OpenSSL; not the kernel's), the same count for the same
build and requests whatever else runs. Each server runs under callgrind, is warmed up, has its
counters zeroed, then serves exactly ``--requests`` POSTs of the echo workflow over
``--connections`` keep-alive HTTPS connections (the handshakes were made while warming up),
and the count is divided by the requests.

    python3 bench/instructions.py             # the floor, aioserver, --no-access-log, --metrics, json logs
    python3 bench/instructions.py --variant "" --variant "--no-access-log"
    python3 bench/instructions.py --aioserver-path /path/to/other/checkout   # an older build, same venv
    python3 bench/instructions.py --floor-variant="--middlewares 1" --floor-variant=--access-log

Run it inside bench/.venv (run.py makes it): ``bench/.venv/bin/python bench/instructions.py``.
Needs valgrind (``apt-get install valgrind``). About 25 s per server.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BODY = b'{"name": "echo", "elements": ["hello"]}'
TOKEN = "bench-instructions-token"
DEFAULT_VARIANTS = ("", "--no-access-log", "--metrics", "--log-format json")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post(connection: http.client.HTTPSConnection) -> None:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    connection.request("POST", "/workflow", BODY, headers)
    answer = connection.getresponse()
    answer.read()
    if answer.status != 200:
        raise RuntimeError(f"POST /workflow answered {answer.status}")


def drive(port: int, connections: int, warm_up: int, requests: int, between: object) -> None:
    """``warm_up`` requests on each connection, ``between()``, then ``requests`` in all."""
    context = ssl._create_unverified_context()  # our own throw-away certificate, on loopback
    opened = [http.client.HTTPSConnection("127.0.0.1", port, context=context) for _ in range(connections)]
    errors: list[BaseException] = []

    def run(connection: http.client.HTTPSConnection, count: int) -> None:
        try:
            for _ in range(count):
                post(connection)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    def all_of(count: int) -> None:
        threads = [threading.Thread(target=run, args=(c, count)) for c in opened]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    all_of(warm_up)
    between()  # type: ignore[operator]
    all_of(requests // connections)
    for connection in opened:
        connection.close()


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("the server did not listen in time")


def count(command: list[str], env: dict[str, str], args: argparse.Namespace, work: Path) -> int:
    """Instructions per request of the server ``command`` (which takes ``--port``)."""
    port = free_port()
    out = work / f"callgrind.{port}"
    process = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command, "--port", str(port)],
        env=env,
        cwd=work,  # not a checkout: python -m would import aioserver from the working directory first
        stdout=subprocess.DEVNULL,
        stderr=open(work / f"server.{port}.log", "wb"),  # noqa: SIM115 (closed with the process)
        start_new_session=True,
    )
    try:
        wait_listening(port, process)

        def zero() -> None:
            subprocess.run(["callgrind_control", "--zero", str(process.pid)], check=True, capture_output=True)

        drive(port, args.connections, args.warm_up, args.requests, zero)
        subprocess.run(["callgrind_control", "--dump", str(process.pid)], check=True, capture_output=True)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)
    dumps = sorted(work.glob(f"callgrind.{port}.*"), key=lambda p: p.stat().st_mtime)
    if not dumps:
        raise RuntimeError("callgrind wrote no dump")
    summary = re.search(rb"^summary: (\d+)", dumps[-1].read_bytes(), re.MULTILINE)
    if summary is None:
        raise RuntimeError(f"no summary in {dumps[-1]}")
    return int(summary.group(1)) // (args.requests // args.connections * args.connections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests counted [2000]")
    parser.add_argument("--connections", type=int, default=4, help="keep-alive connections [4]")
    parser.add_argument("--warm-up", type=int, default=100, help="requests per connection before counting [100]")
    parser.add_argument(
        "--variant", action="append", help="aioserver options, one server each (repeatable) [default set]"
    )
    parser.add_argument(
        "--floor-variant",
        action="append",
        default=[],
        help="options of bench/apps/aiohttp_floor.py (--middlewares N, --access-log), one more floor each (repeatable)",
    )
    parser.add_argument("--aioserver-path", help="import aioserver from this checkout (PYTHONPATH)")
    args = parser.parse_args(argv)
    variants = DEFAULT_VARIANTS if args.variant is None else tuple(args.variant)
    env = dict(os.environ, TOKEN=hashlib.sha256(TOKEN.encode()).hexdigest())
    if args.aioserver_path:
        env["PYTHONPATH"] = str(Path(args.aioserver_path).resolve())
    with tempfile.TemporaryDirectory(prefix="aioserver-instructions-") as tmp:
        work = Path(tmp)
        import trustme

        ca = trustme.CA()
        certificate = ca.issue_cert("127.0.0.1")
        cert, key = work / "cert.pem", work / "key.pem"
        certificate.cert_chain_pems[0].write_to_path(cert)
        certificate.private_key_pem.write_to_path(key)
        floor_command = [sys.executable, str(HERE / "apps" / "aiohttp_floor.py"), "--certfile", str(cert)]
        floor_command += ["--keyfile", str(key)]
        floor = count(floor_command, env, args, work)
        rows = [("bare aiohttp (floor)", floor)]
        print(f"bare aiohttp (floor): {floor:,} instructions/request", flush=True)
        for variant in args.floor_variant:
            value = count([*floor_command, *shlex.split(variant)], env, args, work)
            name = f"bare aiohttp {variant}"
            rows.append((name, value))
            print(f"{name}: {value:,} instructions/request", flush=True)
        for variant in variants:
            command = [sys.executable, "-m", "aioserver", "--host", "127.0.0.1"]
            command += ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key), *shlex.split(variant)]
            value = count(command, env, args, work)
            name = f"aioserver {variant}".strip()
            rows.append((name, value))
            print(f"{name}: {value:,} instructions/request", flush=True)
    print(f"\nHTTPS keep-alive, {args.requests} requests over {args.connections} connections, callgrind")
    print(f"{'server':<34} {'instructions/request':>21} {'floor/this':>10}")
    for name, value in rows:
        print(f"{name:<34} {value:>21,} {floor / value:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
