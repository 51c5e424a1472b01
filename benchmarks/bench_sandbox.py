"""Long-lived sandbox costs, side by side in one run.

    .venv/bin/python benchmarks/bench_sandbox.py [--n 30]

* create + first ``commands.run("true")`` vs one-shot ``corral.run(["true"])``
  vs raw bwrap (target: within 5 ms of raw bwrap);
* ``commands.run("true")`` in a running box vs bare ``subprocess.run(["true"])``
  (target: within 2 ms);
* ``files.write`` + ``files.read`` of 256 MiB vs a local file copy (target:
  at least 50% of the local throughput).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time

import corral
from bench_run import raw_bwrap
from corral import AsyncSandbox, Policy

SIZE = 256 << 20


async def create_and_first(policy: Policy) -> float:
    start = time.perf_counter()
    async with AsyncSandbox(policy) as sb:
        await sb.commands.run("true")
        return time.perf_counter() - start


async def round_trips(n: int) -> float:
    async with AsyncSandbox() as sb:
        await sb.commands.run("true")
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            await sb.commands.run(["/bin/true"])
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)


async def file_round_trip(data: bytes) -> float:
    policy = Policy.preset("dev").with_limits(memory_bytes=2 << 30)
    async with AsyncSandbox(policy) as sb:
        start = time.perf_counter()
        await sb.files.write("blob", data)
        back = await sb.files.read("blob")
        elapsed = time.perf_counter() - start
        assert len(back) == len(data)
        return elapsed


def local_copy(data: bytes) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "blob")
        start = time.perf_counter()
        with open(path, "wb") as f:
            f.write(data)
        with open(path, "rb") as f:
            back = f.read()
        elapsed = time.perf_counter() - start
        assert len(back) == len(data)
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=30)
    n = parser.parse_args().n
    policy = Policy.preset("default")
    corral.run(["/bin/true"])  # warm-up
    raw = raw_bwrap(policy, ["/bin/true"])
    raws, ones, creates = [], [], []
    for _ in range(n):  # interleaved: drift in the machine's speed hits all alike
        t = time.perf_counter()
        raw()
        raws.append(time.perf_counter() - t)
        t = time.perf_counter()
        corral.run(["/bin/true"], policy=policy)
        ones.append(time.perf_counter() - t)
        creates.append(asyncio.run(create_and_first(policy)))
    raw_m, one_m, create_m = (statistics.median(x) for x in (raws, ones, creates))
    print("create + first command")
    print(f"  raw bwrap true          {raw_m * 1e3:8.2f} ms")
    print(f"  corral.run(['true'])    {one_m * 1e3:8.2f} ms")
    print(
        f"  Sandbox + run('true')   {create_m * 1e3:8.2f} ms   "
        f"+{(create_m - raw_m) * 1e3:.2f} ms over raw bwrap (target <= 5)"
    )

    bare = statistics.median(
        _time(lambda: subprocess.run(["/bin/true"], check=True)) for _ in range(n)
    )
    trip = asyncio.run(round_trips(n))
    print("command round trip in a running box")
    print(f"  subprocess.run(['true'])  {bare * 1e3:8.2f} ms")
    print(
        f"  sb.commands.run('true')   {trip * 1e3:8.2f} ms   "
        f"+{(trip - bare) * 1e3:.2f} ms (target <= 2)"
    )

    data = os.urandom(SIZE)
    locals_, boxes = [], []
    for _ in range(5):  # interleaved, like the rest
        locals_.append(local_copy(data))
        boxes.append(asyncio.run(file_round_trip(data)))
    local, boxed = statistics.median(locals_), statistics.median(boxes)
    mib = 2 * SIZE / (1 << 20)
    print("256 MiB written and read back")
    print(f"  local file   {mib / local:8.1f} MiB/s")
    print(f"  sandbox      {mib / boxed:8.1f} MiB/s   {local / boxed:.0%} of local (target >= 50%)")


def _time(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
