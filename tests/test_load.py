"""A bounded load test on 127.0.0.1: many clients mixing good, bad-token, malformed, slow and
over-long requests against a real ``python -m aioserver`` for about 20 seconds. No connection is
reset, no 5xx but the intended 503/504, and memory comes back to where it started."""

from __future__ import annotations

import asyncio
import collections
import os
import time
from pathlib import Path

import aiohttp

from conftest import TOKEN, TOKEN_HASH, Server

SECONDS = float(os.environ.get("AIOSERVER_LOAD_SECONDS", "20"))
CONFIG = """
server:
  limit_concurrency: 16
  timeout_workflow: 1
  timeout_request_body: 1
workflow:
  echo: {tasks: [echo]}
  upper: {tasks: [upper]}
  nap: {tasks: [{action: sample_actions.async_sleepy, args: [0.2]}]}
  stuck: {tasks: [{action: sample_actions.async_sleepy, args: [5]}]}
  think: {tasks: [{action: sample_actions.sleepy, args: [0.05]}]}
"""
GOOD = {"Authorization": f"Bearer {TOKEN}"}
# Which answers each kind of request may get. 503 and 504 are the limits at work.
ALLOWED = {
    "echo": {200, 503},
    "think": {200, 503},
    "nap": {200, 503},
    "stuck": {503, 504},
    "bad_token": {401, 429},
    "malformed": {400},
    "wrong_type": {400, 503},
    "slow_body": {408},
}


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


async def client(kind: str, url: str, deadline: float, seen: collections.Counter[tuple[str, object]]) -> None:
    # Bad tokens come from another loopback address: the throttle works per client address,
    # and would otherwise (rightly) lock the good clients out too.
    source = "127.0.0.2" if kind == "bad_token" else "127.0.0.1"
    connector = aiohttp.TCPConnector(local_addr=(source, 0), limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        while time.monotonic() < deadline:
            try:
                if kind == "slow_body":
                    status = await _slow_body(url)
                else:
                    status = await _request(session, kind, url)
                seen[(kind, status)] += 1
            except (aiohttp.ClientError, ConnectionError, asyncio.IncompleteReadError) as exc:
                seen[(kind, type(exc).__name__)] += 1


async def _request(session: aiohttp.ClientSession, kind: str, url: str) -> int:
    if kind == "bad_token":
        kwargs = {"json": {"name": "echo", "elements": [1]}, "headers": {"Authorization": "Bearer nope"}}
    elif kind == "malformed":
        kwargs = {"data": b'{"name": "echo", "elements": [', "headers": {**GOOD, "Content-Type": "application/json"}}
    elif kind == "wrong_type":
        kwargs = {"json": {"name": "upper", "elements": [1, 2]}, "headers": GOOD}
    else:
        kwargs = {"json": {"name": kind, "elements": ["x"] * 10}, "headers": GOOD}
    async with session.post(f"{url}/workflow", **kwargs) as response:  # type: ignore[arg-type]
        body = await response.json()
        assert isinstance(body, list) or "error" in body
        return response.status


async def _slow_body(url: str) -> int:
    """A client that trickles its body: cut off with 408 once timeout_request_body passes."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        head = (
            f"POST /workflow HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        )
        writer.write(head.encode())
        for _ in range(30):
            if reader.at_eof() or len(reader._buffer):  # type: ignore[attr-defined]  # the answer came
                break
            writer.write(b" ")
            await asyncio.sleep(0.1)
        line = await asyncio.wait_for(reader.readline(), 5)
        return int(line.split()[1])
    finally:
        writer.close()


async def drive(url: str, seconds: float) -> collections.Counter[tuple[str, object]]:
    seen: collections.Counter[tuple[str, object]] = collections.Counter()
    deadline = time.monotonic() + seconds
    mix = ["echo"] * 16 + ["think"] * 4 + ["nap"] * 6 + ["stuck"] * 2 + ["bad_token"] * 4 + ["malformed"] * 4
    mix += ["wrong_type"] * 2 + ["slow_body"] * 2
    await asyncio.gather(*(client(kind, url, deadline, seen) for kind in mix))
    return seen


def test_mixed_load_keeps_its_promises(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_text(CONFIG)
    with Server("--config", str(path), env={"TOKEN": TOKEN_HASH}) as server:
        url = f"http://127.0.0.1:{server.port}"
        pid = server.process.pid
        asyncio.run(drive(url, 2))  # warm-up: pools, caches and allocator arenas reach their size
        time.sleep(1)
        before = rss_kib(pid)
        seen = asyncio.run(drive(url, SECONDS))
        time.sleep(2)
        after = rss_kib(pid)
        assert server.process.poll() is None

    unexpected = {key: n for key, n in seen.items() if key[1] not in ALLOWED[key[0]]}
    assert not unexpected, (unexpected, seen)
    served = {kind: sum(n for (k, s), n in seen.items() if k == kind and s == 200) for kind in ("echo", "nap")}
    assert served["echo"] > 1000 and served["nap"] > 50, seen
    assert seen[("stuck", 504)] > 0 and seen[("slow_body", 408)] > 0 and seen[("bad_token", 429)] > 0, seen
    assert after <= before * 1.15 + 10_240, f"RSS grew from {before} KiB to {after} KiB"
    print(f"\nload: {sum(seen.values())} requests in {SECONDS:g}s, RSS {before} -> {after} KiB: {dict(seen)}")
