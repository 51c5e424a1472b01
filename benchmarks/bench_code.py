"""Code interpreter costs, sandboxed vs the bare kernel, side by side in one run.

    .venv/bin/python benchmarks/bench_code.py [--n 50] [--rounds 3] [--languages python,bash]

For every language (python, bash, javascript, typescript):

* a warm cell's round trip (``run_code`` of a trivial cell in a warm context)
  vs the same cell sent to the bare, unsandboxed kernel by jupyter_client
  (ipykernel; stock bash_kernel; ``deno jupyter``);
* the cold cell: the first ``run_code`` in a fresh sandbox (kernel start +
  first cell) vs starting the bare kernel and running its first cell;
* memory of one idle Python context (RSS of its kernel; target <= 80 MiB).

The bare side runs with the runtime's own Python and Deno, so both use the
same jupyter_client, kernels and interpreters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from corral import AsyncSandbox, _runtime

CELLS = {"python": "1+1", "bash": "true", "javascript": "1+1", "typescript": "1+1"}
BARE_KERNELS = {
    "python": "python3",
    "bash": "bash",
    "javascript": "corral-deno",
    "typescript": "corral-deno",
}

BARE = r"""
import json, statistics, sys, time
from jupyter_client.manager import KernelManager
kernel, code, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = time.perf_counter()
km = KernelManager(kernel_name=kernel)
km.start_kernel()
kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=60)
kc.execute_interactive(code, timeout=60, output_hook=lambda msg: None)
cold = time.perf_counter() - t
samples = []
for _ in range(n):
    t = time.perf_counter()
    kc.execute_interactive(code, timeout=60, output_hook=lambda msg: None)
    samples.append(time.perf_counter() - t)
rss = int(open(f"/proc/{km.provisioner.pid}/status").read().split("VmRSS:")[1].split()[0]) * 1024
kc.stop_channels(); km.shutdown_kernel(now=True)
print(json.dumps({"cold": cold, "warm": statistics.median(samples), "rss": rss}))
"""


async def sandboxed(language: str, n: int) -> dict[str, float]:
    code = CELLS[language]
    async with AsyncSandbox(timeout_s=300) as sb:
        await sb.commands.run("true")
        start = time.perf_counter()
        await sb.run_code(code, language=language)
        cold = time.perf_counter() - start
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            await sb.run_code(code, language=language)
            samples.append(time.perf_counter() - start)
        rss = 0.0
        if language == "python":
            ps = await sb.commands.run("ps -eo rss=,args= | grep [i]pykernel_launcher")
            rss = int(ps.stdout.split()[0]) * 1024
        return {"cold": cold, "warm": statistics.median(samples), "rss": rss}


def bare_env(runtime: Path, scratch: str) -> dict[str, str]:
    """The bare kernels' environment: Deno's kernelspec names the runtime's
    in-box path, so the bare run gets one naming the host path."""
    spec = Path(scratch) / "kernels" / "corral-deno"
    spec.mkdir(parents=True, exist_ok=True)
    argv = [str(runtime / "bin" / "deno"), "jupyter", "--kernel", "--conn", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "language": "typescript"}))
    env = dict(os.environ, JUPYTER_PATH=scratch, DENO_DIR=f"{scratch}/deno", NO_COLOR="1")
    env["PATH"] = f"{runtime / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--languages", default="python,bash,javascript,typescript")
    args = parser.parse_args()
    runtime = _runtime.require().path
    python = str(runtime / "bin" / "python")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        env = bare_env(runtime, scratch)
        for language in args.languages.split(","):
            bare_runs, box_runs = [], []
            for _ in range(args.rounds):  # interleaved: drift hits both alike
                argv = [python, "-c", BARE, BARE_KERNELS[language], CELLS[language], str(args.n)]
                out = subprocess.run(argv, capture_output=True, check=True, env=env, cwd=scratch)
                bare_runs.append(json.loads(out.stdout.splitlines()[-1]))
                box_runs.append(asyncio.run(sandboxed(language, args.n)))
            keys = ("cold", "warm", "rss")
            bare = {k: statistics.median(r[k] for r in bare_runs) for k in keys}
            box = {k: statistics.median(r[k] for r in box_runs) for k in keys}
            rows.append((language, bare, box))
    print(f"{'':12}{'warm cell (ms)':>32}{'cold cell (ms)':>32}")
    print(
        f"{'language':12}{'bare':>10}{'corral':>10}{'ratio':>12}{'bare':>10}{'corral':>10}{'ratio':>12}"
    )
    for language, bare, box in rows:
        print(
            f"{language:12}{bare['warm'] * 1e3:10.2f}{box['warm'] * 1e3:10.2f}"
            f"{box['warm'] / bare['warm']:11.2f}x"
            f"{bare['cold'] * 1e3:10.0f}{box['cold'] * 1e3:10.0f}"
            f"{box['cold'] / bare['cold']:11.2f}x"
        )
    for language, bare, box in rows:
        if language == "python":
            print("idle Python context (kernel RSS)")
            print(f"  bare ipykernel    {bare['rss'] / (1 << 20):8.1f} MiB")
            print(f"  corral            {box['rss'] / (1 << 20):8.1f} MiB   (target <= 80 MiB)")


if __name__ == "__main__":
    main()
