"""``corral serve`` vs the local library, side by side in one run.

    .venv/bin/python benchmarks/bench_server.py [--n 30] [--clients 16] [--seconds 10]

* create + ``run_code("1+1")`` + close, through the HTTP API (``AsyncClient``)
  vs through the local library (``AsyncSandbox``);
* a warm ``run_code("1+1")`` and a ``commands.run("true")`` round trip, both ways
  (target: HTTP adds at most 5 ms per call at p50);
* sustained ``run_code`` throughput from ``--clients`` concurrent clients, each
  with its own sandbox, over HTTP and locally.

The server is a real ``corral serve`` subprocess on 127.0.0.1 with a fresh data
directory; the client is the real ``corral.AsyncClient``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from corral import AsyncClient, AsyncSandbox


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(root: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    data = root / "data"
    data.mkdir(mode=0o711)
    cli = [sys.executable, "-m", "corral._cli"]
    key = subprocess.run(
        [*cli, "keys", "create", "--name", "bench", "--data-dir", str(data)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()[-1]
    port = _port()
    proc = subprocess.Popen(
        [*cli, "serve", "--port", str(port), "--data-dir", str(data), "--log-level", "warning"]
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url, key
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError("corral serve did not start")


async def samples(n: int, call: Callable[[], Awaitable[object]]) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        out.append(time.perf_counter() - start)
    return out


def ms(values: list[float]) -> str:
    values = sorted(values)
    p50 = statistics.median(values) * 1000
    p90 = values[int(len(values) * 0.9) - 1] * 1000
    return f"p50 {p50:8.2f} ms  p90 {p90:8.2f} ms"


async def throughput(
    clients: int, seconds: float, open_box: Callable[[], object]
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    done = warm = 0

    async def worker() -> None:
        nonlocal done, warm
        async with open_box() as sb:  # type: ignore[attr-defined]
            await sb.run_code("1+1")  # its kernel is warm before the clock starts
            warm += 1
            await ready.wait()
            while time.perf_counter() < stop:
                start = time.perf_counter()
                await sb.run_code("1+1")
                latencies.append(time.perf_counter() - start)
                done += 1

    ready = asyncio.Event()
    stop = float("inf")
    tasks = [asyncio.ensure_future(worker()) for _ in range(clients)]
    while warm < clients:  # every box up and warm
        await asyncio.sleep(0.1)
        for task in tasks:
            if task.done():
                task.result()  # a worker that failed to start says why
    start = time.perf_counter()
    stop = start + seconds
    ready.set()
    await asyncio.gather(*tasks)
    return done / (time.perf_counter() - start), latencies


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="corral-bench-serve-"))
    root.chmod(0o755)
    proc, url, key = start_server(root)
    try:
        async with AsyncClient(url, api_key=key) as client:
            print(f"corral serve at {url}; n={args.n}")

            async def local_lifecycle() -> None:
                async with AsyncSandbox() as sb:
                    await sb.run_code("1+1")

            async def http_lifecycle() -> None:
                async with client.sandbox() as sb:
                    await sb.run_code("1+1")

            await local_lifecycle()
            await http_lifecycle()
            lifecycle = max(5, args.n // 3)
            local = await samples(lifecycle, local_lifecycle)
            remote = await samples(lifecycle, http_lifecycle)
            print("\ncreate + run_code('1+1') + close")
            print(f"  local  {ms(local)}")
            print(f"  HTTP   {ms(remote)}")
            delta = (statistics.median(remote) - statistics.median(local)) * 1000
            print(f"  HTTP adds {delta:+.2f} ms at p50")

            async with AsyncSandbox() as lsb, client.sandbox() as rsb:
                for sb in (lsb, rsb):
                    await sb.run_code("1+1")
                    await sb.commands.run("true")
                rows = [
                    ("run_code('1+1')", lambda: lsb.run_code("1+1"), lambda: rsb.run_code("1+1")),
                    (
                        "commands.run('true')",
                        lambda: lsb.commands.run("true"),
                        lambda: rsb.commands.run("true"),
                    ),
                ]
                for name, local_call, remote_call in rows:
                    local = await samples(args.n, local_call)
                    remote = await samples(args.n, remote_call)
                    delta = (statistics.median(remote) - statistics.median(local)) * 1000
                    verdict = "met" if delta <= 5 else "MISSED"
                    print(f"\n{name}, warm")
                    print(f"  local  {ms(local)}")
                    print(f"  HTTP   {ms(remote)}")
                    print(f"  HTTP adds {delta:+.2f} ms at p50 (target <= 5 ms: {verdict})")

            print(f"\nthroughput: {args.clients} clients, {args.seconds:g} s of run_code('1+1')")
            rate_local, lat_local = await throughput(args.clients, args.seconds, AsyncSandbox)
            rate_http, lat_http = await throughput(args.clients, args.seconds, client.sandbox)
            print(f"  local  {rate_local:7.1f} calls/s  {ms(lat_local)}")
            print(f"  HTTP   {rate_http:7.1f} calls/s  {ms(lat_http)}")
            print(f"  HTTP / local: {rate_http / rate_local:.2f}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if os.geteuid() != 0:
        print("note: not root; boxes run without per-box uids")
    asyncio.run(main())
