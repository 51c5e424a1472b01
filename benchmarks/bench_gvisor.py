"""gVisor backend: start-up against ``runsc do true``, CPU and system-call cost against native.

    PYTHONPATH=src python benchmarks/bench_gvisor.py [--repeat N]

Prints medians (seconds). ``create+first`` is a one-shot ``run(["true"])``
through corral (bundle, cgroup, runsc run, teardown); ``runsc do true`` is the
bare runtime. fib(30) is CPU-bound (the sentry is not involved); the 200k
``os.stat`` loop is system calls, each trapped by ptrace and served by the
sentry: gVisor's cost, stated rather than hidden. Needs root and runsc.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import time

from corral import Policy
from corral._run import run_async
from corral.backends import get_backend
from corral.backends.gvisor._runsc import PLATFORM, find_runsc

FIB = "def f(n): return n if n < 2 else f(n-1) + f(n-2)\nf(30)"
STAT = "import os\nfor _ in range(200_000): os.stat('/usr')"


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def _native(code: str) -> float:
    t = time.perf_counter()
    subprocess.run(["/usr/bin/python3", "-c", code], check=True)
    return time.perf_counter() - t


async def _boxed(code: str | None) -> float:
    argv = ["true"] if code is None else ["/usr/bin/python3", "-c", code]
    t = time.perf_counter()
    result = await run_async(argv, policy=Policy.preset("default"), backend=get_backend("gvisor"))
    assert result.exit_code == 0, result
    return time.perf_counter() - t


def _runsc_do() -> float:
    t = time.perf_counter()
    subprocess.run(
        [find_runsc().path, f"--platform={PLATFORM}", "--network=none", "do", "true"], check=True
    )
    return time.perf_counter() - t


async def main(repeat: int) -> None:
    rows = [
        ("create+first command (corral)", [await _boxed(None) for _ in range(repeat)]),
        ("runsc do true (bare)", [_runsc_do() for _ in range(repeat)]),
        ("fib(30) native", [_native(FIB) for _ in range(repeat)]),
        ("fib(30) gvisor", [await _boxed(FIB) for _ in range(repeat)]),
        ("200k stat native", [_native(STAT) for _ in range(repeat)]),
        ("200k stat gvisor", [await _boxed(STAT) for _ in range(repeat)]),
    ]
    print(f"runsc {find_runsc().version}, platform {PLATFORM}, median of {repeat}")
    for name, samples in rows:
        print(f"{name:32s} {_median(samples):8.3f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    asyncio.run(main(parser.parse_args().repeat))
