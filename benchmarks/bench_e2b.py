"""The E2B-compatible API vs corral's own client vs the local library, side
by side in one run.

    .venv/bin/python benchmarks/bench_e2b.py [--n 30]

The same operations three ways, each timed call by call: create, a warm
``commands.run("true")``, a 1 KB file write and read, a warm
``run_code("1+1")``, kill.

* **E2B**: the unmodified ``e2b-code-interpreter`` SDK (its sync ``Sandbox``,
  from .venv-e2b, made by ``scripts/bootstrap test``) pointed at the server by
  ``E2B_API_URL``, ``E2B_SANDBOX_URL`` and ``E2B_API_KEY``, in a subprocess
  that reports its timings as JSON;
* **native**: corral's sync ``Client`` against the same server;
* **local**: corral's sync ``Sandbox``, in this process, no server.

The server is a real ``corral serve`` subprocess on 127.0.0.1 (fresh data
directory). Target (issue 15): E2B adds at most 2 ms per call over native at
p50. Printed per operation: p50 and p90 each way, E2B minus native, and the
ratios E2B / native and native / local.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import start_server
from corral import Client, Sandbox

E2B_PYTHON = Path(__file__).resolve().parent.parent / ".venv-e2b" / "bin" / "python"
OPS = ("create", "commands.run('true')", "write 1 KB", "read 1 KB", "run_code('1+1')", "kill")
KB = b"x" * 1024

# Run by .venv-e2b's Python: the E2B SDK's timings, one JSON object on stdout.
E2B_SCRIPT = """
import json, sys, time
from e2b_code_interpreter import Sandbox

n = int(sys.argv[1])
times = {op: [] for op in %(ops)r}
data = b"x" * 1024

def timed(op, call):
    start = time.perf_counter()
    out = call()
    times[op].append(time.perf_counter() - start)
    return out

warm = Sandbox.create(timeout=600)
warm.commands.run("true"); warm.run_code("1+1"); warm.files.write("f.txt", data)
for _ in range(n):
    timed("commands.run('true')", lambda: warm.commands.run("true"))
    timed("write 1 KB", lambda: warm.files.write("f.txt", data))
    timed("read 1 KB", lambda: warm.files.read("f.txt", format="bytes"))
    timed("run_code('1+1')", lambda: warm.run_code("1+1"))
warm.kill()
for _ in range(max(5, n // 3)):
    sb = timed("create", lambda: Sandbox.create(timeout=600))
    timed("kill", sb.kill)
print(json.dumps(times))
"""


def e2b_times(url: str, key: str, n: int) -> dict[str, list[float]]:
    env = {
        "PATH": "/usr/bin:/bin",
        "E2B_API_URL": f"{url}/e2b/api",
        "E2B_SANDBOX_URL": f"{url}/e2b/sandbox",
        "E2B_API_KEY": key,
    }
    out = subprocess.run(
        [str(E2B_PYTHON), "-c", E2B_SCRIPT % {"ops": OPS}, str(n)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the E2B SDK run failed:\n{out.stderr}")
    times: dict[str, list[float]] = json.loads(out.stdout.strip().splitlines()[-1])
    return times


def corral_times(new: Callable[[], Sandbox], n: int) -> dict[str, list[float]]:
    """The same operations through corral's sync API (remote or local)."""
    times: dict[str, list[float]] = {op: [] for op in OPS}

    def timed(op: str, call: Callable[[], object]) -> None:
        start = time.perf_counter()
        call()
        times[op].append(time.perf_counter() - start)

    warm = new()
    warm.start()
    try:
        warm.commands.run("true")
        warm.run_code("1+1")
        warm.files.write("f.txt", KB)
        for _ in range(n):
            timed("commands.run('true')", lambda: warm.commands.run("true"))
            timed("write 1 KB", lambda: warm.files.write("f.txt", KB))
            timed("read 1 KB", lambda: warm.files.read("f.txt"))
            timed("run_code('1+1')", lambda: warm.run_code("1+1"))
    finally:
        warm.close()
    for _ in range(max(5, n // 3)):
        sb = new()
        timed("create", sb.start)
        timed("kill", sb.close)
    return times


def p50(values: list[float]) -> float:
    return statistics.median(values) * 1000


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * 0.9) - 1)] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=30)
    args = parser.parse_args()
    if not E2B_PYTHON.exists():
        sys.exit(f"{E2B_PYTHON} is missing: scripts/bootstrap test makes .venv-e2b")
    root = Path(tempfile.mkdtemp(prefix="corral-bench-e2b-"))
    root.chmod(0o755)
    proc, url, key = start_server(root)
    try:
        print(f"corral serve at {url}; n={args.n} warm calls, {max(5, args.n // 3)} lifecycles")
        e2b = e2b_times(url, key, args.n)
        with Client(url, api_key=key) as client:
            native = corral_times(client.sandbox, args.n)
        local = corral_times(Sandbox, args.n)
        print(
            f"\n{'operation':22} {'E2B p50/p90 ms':>16} {'native p50/p90':>16} "
            f"{'local p50/p90':>16} {'E2B-native':>11} {'E2B/native':>10} {'native/local':>12}"
        )
        for op in OPS:
            e, nat, loc = e2b[op], native[op], local[op]
            delta = p50(e) - p50(nat)
            print(
                f"{op:22} {p50(e):7.2f}/{p90(e):8.2f} {p50(nat):7.2f}/{p90(nat):8.2f} "
                f"{p50(loc):7.2f}/{p90(loc):8.2f} {delta:+9.2f} ms {p50(e) / p50(nat):9.2f}x "
                f"{p50(nat) / p50(loc):11.2f}x"
            )
        worst = max(p50(e2b[op]) - p50(native[op]) for op in OPS if op not in ("create", "kill"))
        verdict = "met" if worst <= 2 else "MISSED"
        print(f"\nwarm calls: E2B adds at most {worst:+.2f} ms at p50 (target <= 2 ms: {verdict})")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if os.geteuid() != 0:
        print("note: not root; boxes run without per-box uids")
    main()
