"""Warm pool vs cold sandbox vs bare ipykernel, and pause/resume, side by side in one run.

    .venv/bin/python benchmarks/bench_pool.py [--n 20] [--size 4]

Per sample, the time to a first ``1+1`` result:
  pool        ``pool.take()`` (a ready box, kernel up) + ``run_code("1+1")``
  cold        ``AsyncSandbox()`` start + ``run_code("1+1")`` (the kernel's cold start)
  bare        a bare ipykernel started by jupyter_client on the host, + ``1+1``
plus ``pool.take()`` + ``commands.run("true")`` vs raw bwrap ``true``, and the
latency of ``pause()`` and ``resume()``. Prints p50 (and p90). The pool is
given time to refill between samples (a hand-out is never timed against a
start). Timings never go into tests: this machine is noisy, read the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
import time

from corral import AsyncPool, AsyncSandbox, _runtime

BARE = r"""
import json, time
t = time.perf_counter()
from jupyter_client.manager import KernelManager
km = KernelManager(kernel_name="python3")
km.start_kernel()
kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=60)
kc.execute_interactive("1+1", timeout=60, output_hook=lambda msg: None)
print(json.dumps(time.perf_counter() - t))
kc.stop_channels(); km.shutdown_kernel(now=True)
"""
RAW_BWRAP = ["bwrap", "--ro-bind", "/", "/", "--unshare-all", "--die-with-parent", "true"]


def _ms(samples: list[float]) -> str:
    s = sorted(samples)
    p90 = s[min(len(s) - 1, int(len(s) * 0.9))]
    return f"p50 {statistics.median(s) * 1e3:8.1f} ms   p90 {p90 * 1e3:8.1f} ms"


async def pooled(n: int, size: int) -> tuple[list[float], list[float], list[float], list[float]]:
    cells, commands, pauses, resumes = [], [], [], []
    async with AsyncPool("default", size=size, kernels=("python",), timeout_s=120) as pool:
        for _ in range(n):
            await pool.wait_ready(120)
            start = time.perf_counter()
            sb = await pool.take()
            ex = await sb.run_code("1+1")
            cells.append(time.perf_counter() - start)
            assert ex.text == "2", ex
            await sb.close()
        for _ in range(n):
            await pool.wait_ready(120)
            start = time.perf_counter()
            sb = await pool.take()
            await sb.commands.run("true")
            commands.append(time.perf_counter() - start)
            start = time.perf_counter()
            await sb.pause()
            pauses.append(time.perf_counter() - start)
            start = time.perf_counter()
            await sb.resume()
            resumes.append(time.perf_counter() - start)
            await sb.close()
    return cells, commands, pauses, resumes


async def cold(n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        async with AsyncSandbox(timeout_s=120) as sb:
            await sb.run_code("1+1")
            samples.append(time.perf_counter() - start)
    return samples


def bare(n: int, python: str) -> list[float]:
    samples = []
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(n):
            out = subprocess.run(
                [python, "-c", BARE], capture_output=True, check=True, cwd=scratch, text=True
            )
            samples.append(json.loads(out.stdout.splitlines()[-1]))
    return samples


def raw_bwrap(n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run(RAW_BWRAP, check=True)
        samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--size", type=int, default=4)
    args = parser.parse_args()
    python = str(_runtime.require().path / "bin" / "python")
    cells, commands, pauses, resumes = asyncio.run(pooled(args.n, args.size))
    cold_cells = asyncio.run(cold(args.n))
    bare_cells = bare(args.n, python)
    raw = raw_bwrap(args.n)
    print("first 1+1 result")
    print(f"  pool hand-out + cell      {_ms(cells)}   (target p50 <= 30 ms)")
    print(f"  cold sandbox + cell       {_ms(cold_cells)}")
    print(f"  bare ipykernel + cell     {_ms(bare_cells)}")
    print("first command")
    print(f"  pool hand-out + true      {_ms(commands)}")
    print(f"  raw bwrap true            {_ms(raw)}")
    print("pause / resume (a box with an idle kernel)")
    print(f"  pause                     {_ms(pauses)}")
    print(f"  resume                    {_ms(resumes)}")


if __name__ == "__main__":
    main()
