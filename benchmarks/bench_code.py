"""Code interpreter costs, sandboxed vs a bare ipykernel, side by side in one run.

    .venv/bin/python benchmarks/bench_code.py [--n 50]

* ``run_code("1+1")`` round trip in a warm context vs the same cell sent to an
  unsandboxed ipykernel by jupyter_client (target <= 1.10x);
* first ``run_code`` in a fresh sandbox (kernel cold start) vs starting a bare
  ipykernel and running its first cell (target <= 1.10x);
* memory of one idle Python context (RSS of its kernel; target <= 80 MiB).

The bare side runs with the runtime's own Python, so both use the same
jupyter_client, ipykernel and interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import time

from corral import AsyncSandbox, _runtime

BARE = r"""
import json, statistics, sys, time
from jupyter_client.manager import KernelManager
n = int(sys.argv[1])
t = time.perf_counter()
km = KernelManager(kernel_name="python3")
km.start_kernel()
kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=60)
kc.execute_interactive("1+1", timeout=60, output_hook=lambda msg: None)
cold = time.perf_counter() - t
samples = []
for _ in range(n):
    t = time.perf_counter()
    kc.execute_interactive("1+1", timeout=60, output_hook=lambda msg: None)
    samples.append(time.perf_counter() - t)
rss = int(open(f"/proc/{km.provisioner.pid}/status").read().split("VmRSS:")[1].split()[0]) * 1024
kc.stop_channels(); km.shutdown_kernel(now=True)
print(json.dumps({"cold": cold, "warm": statistics.median(samples), "rss": rss}))
"""


async def sandboxed(n: int) -> dict[str, float]:
    async with AsyncSandbox(timeout_s=300) as sb:
        await sb.commands.run("true")
        start = time.perf_counter()
        await sb.run_code("1+1")
        cold = time.perf_counter() - start
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            await sb.run_code("1+1")
            samples.append(time.perf_counter() - start)
        ps = await sb.commands.run("ps -eo rss=,args= | grep [i]pykernel_launcher")
        rss = int(ps.stdout.split()[0]) * 1024
        return {"cold": cold, "warm": statistics.median(samples), "rss": rss}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    python = str(_runtime.require().path / "bin" / "python")
    bare_runs, box_runs = [], []
    for _ in range(args.rounds):  # interleaved: drift hits both alike
        out = subprocess.run([python, "-c", BARE, str(args.n)], capture_output=True, check=True)
        bare_runs.append(json.loads(out.stdout.splitlines()[-1]))
        box_runs.append(asyncio.run(sandboxed(args.n)))
    bare = {k: statistics.median(r[k] for r in bare_runs) for k in ("cold", "warm", "rss")}
    box = {k: statistics.median(r[k] for r in box_runs) for k in ("cold", "warm", "rss")}
    print("warm run_code('1+1') round trip")
    print(f"  bare ipykernel    {bare['warm'] * 1e3:8.2f} ms")
    ratio = box["warm"] / bare["warm"]
    print(f"  corral            {box['warm'] * 1e3:8.2f} ms   {ratio:.2f}x (target <= 1.10x)")
    print("cold start: kernel start + first cell")
    print(f"  bare ipykernel    {bare['cold'] * 1e3:8.1f} ms")
    ratio = box["cold"] / bare["cold"]
    print(f"  corral            {box['cold'] * 1e3:8.1f} ms   {ratio:.2f}x (target <= 1.10x)")
    print("idle Python context (kernel RSS)")
    print(f"  bare ipykernel    {bare['rss'] / (1 << 20):8.1f} MiB")
    print(f"  corral            {box['rss'] / (1 << 20):8.1f} MiB   (target <= 80 MiB)")


if __name__ == "__main__":
    main()
