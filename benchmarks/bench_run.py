"""One-shot run cost, side by side in one run: bare, raw bwrap, corral library, corral CLI.

    .venv/bin/python benchmarks/bench_run.py [--n 40]

Prints medians and ratios. Targets (issue 2): the library's ``true`` within
3 ms of the raw bwrap median; the CLI under 60 ms; fib(30) ratio <= 1.02;
200k os.stat loop ratio <= 1.10. Timings never go into tests: this machine is
noisy, so read the numbers, do not assert on them.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import corral
from corral import Policy
from corral.backends.bwrap._argv import _Fds, find_bwrap, render_argv
from corral.backends.linux._facts import gather_host_facts
from corral.backends.linux._identity import acquire_host_identity, release_host_identity
from corral.plan import make_plans

PY = "/usr/bin/python3"
FIB = (
    "import time\n"
    "def fib(n): return n if n < 2 else fib(n-1) + fib(n-2)\n"
    "t = time.perf_counter(); fib(30); print(time.perf_counter() - t)"
)
STAT = (
    "import os, time\n"
    "t = time.perf_counter()\n"
    "for _ in range(200_000): os.stat('/usr/bin/python3')\n"
    "print(time.perf_counter() - t)"
)


def timeit(fn: Callable[[], object], n: int) -> float:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def raw_bwrap(policy: Policy, command: list[str]) -> Callable[[], object]:
    """A bwrap command line with the flags corral renders (namespaces, mounts,
    seccomp, env), run directly: no cgroup, no rlimits, no supervision."""
    plans = make_plans(policy, gather_host_facts())

    def go() -> None:
        fds = _Fds()
        identity = acquire_host_identity() if os.geteuid() == 0 else None
        try:
            argv = render_argv(plans, policy, command, fds)
            argv = argv[argv.index(find_bwrap().path) :]  # drop setpriv and prlimit
            subprocess.run(
                argv,
                pass_fds=tuple(fds.pass_),
                check=True,
                stdout=subprocess.DEVNULL,
                user=identity.uid if identity else None,
                group=identity.gid if identity else None,
                extra_groups=[] if identity else None,
            )
        finally:
            fds.close_all()
            if identity:
                release_host_identity(identity)

    return go


def inner_seconds(command: list[str], n: int) -> tuple[float, float]:
    """Medians of the program's own timing, native and sandboxed, sampled
    alternately so that drift in the machine's speed hits both alike."""
    native, boxed = [], []
    for _ in range(n):
        native.append(float(subprocess.run(command, capture_output=True, check=True).stdout))
        boxed.append(float(corral.run(command, policy="default").stdout))
    return statistics.median(native), statistics.median(boxed)


def _cpu(argv: list[str], n: int) -> tuple[float, float]:
    """(p50, min) CPU seconds (user + system) of ``argv`` and the children it
    waited for: unlike wall time, barely moved by other work on the machine."""
    samples = []
    for _ in range(n):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        _, _, usage = os.wait4(proc.pid, 0)
        proc.returncode = 0
        samples.append(usage.ru_utime + usage.ru_stime)
    return statistics.median(samples), min(samples)


def _instructions(argv: list[str]) -> int | None:
    """Instructions the process itself executed (valgrind's callgrind; its
    children are not traced): exact, whatever the load. None without valgrind."""
    if shutil.which("valgrind") is None:
        return None
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Collected : (\d+)", out.stderr)
    return int(found[1]) if found else None


def cli_cpu(n: int, *, instructions: bool) -> None:
    """``corral run -- true``'s own cost, as CPU time and instructions, beside
    the interpreter's floor (``python -c pass``) and asyncio's import, which
    the one-shot path needs (the launch is asyncio's; no sync copy of it).
    This environment sets PYTHONDONTWRITEBYTECODE=1: without __pycache__ every
    corral module is compiled at each start; a pip install compiles them once."""
    py = sys.executable
    rows = (
        ("python -c pass", [py, "-c", "pass"]),
        ("python -c 'import asyncio'", [py, "-c", "import asyncio"]),
        ("corral run -- true", [py, "-m", "corral", "run", "--", "/bin/true"]),
    )
    cached = any(Path(corral.__file__).parent.glob("__pycache__/_policy.*.pyc"))
    print(f"\nCLI start-up, CPU time (user+sys, with children; corral bytecode cached: {cached})")
    for label, argv in rows:
        p50, low = _cpu(argv, n)
        line = f"  {label:28} p50 {p50 * 1e3:7.1f} ms   min {low * 1e3:7.1f} ms"
        count = _instructions(argv) if instructions else None
        if count is not None:
            line += f"   {count / 1e6:6.0f} M instructions (the process alone)"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument(
        "--instructions", action="store_true", help="also count instructions (valgrind)"
    )
    args = parser.parse_args()
    n = args.n
    policy = Policy.preset("default")
    cli = [sys.executable, "-m", "corral", "run", "--"]
    for label, cmd in (("true", ["/bin/true"]), ("python3 -c pass", [PY, "-c", "pass"])):
        corral.run(cmd)  # warm-up: seccomp compile, cgroup parents
        bare = timeit(functools.partial(subprocess.run, cmd, check=True), n)
        raw = timeit(raw_bwrap(policy, cmd), n)
        lib = timeit(functools.partial(corral.run, cmd, policy=policy), n)
        cli_t = timeit(functools.partial(subprocess.run, [*cli, *cmd], check=True), max(5, n // 4))
        print(f"\n{label}")
        print(f"  bare            {bare * 1e3:8.2f} ms")
        print(f"  raw bwrap       {raw * 1e3:8.2f} ms")
        print(f"  corral.run      {lib * 1e3:8.2f} ms   +{(lib - raw) * 1e3:.2f} ms over raw bwrap")
        print(f"  corral run CLI  {cli_t * 1e3:8.2f} ms")
    imports = timeit(
        functools.partial(subprocess.run, [sys.executable, "-c", "import corral._cli"], check=True),
        max(5, n // 4),
    )
    print(f"\n  (floor of any CLI run: interpreter start + imports {imports * 1e3:.2f} ms)")
    print("  targets: corral.run within 3 ms of raw bwrap; CLI under 60 ms")
    cli_cpu(max(10, n // 2), instructions=args.instructions)
    print("\nin-box speed (median of the program's own timing)")
    for label, code, target in (("fib(30)", FIB, 1.02), ("200k os.stat", STAT, 1.10)):
        native, boxed = inner_seconds([PY, "-c", code], max(5, n // 4))
        print(
            f"  {label:14} native {native * 1e3:8.1f} ms  sandboxed {boxed * 1e3:8.1f} ms  "
            f"ratio {boxed / native:.3f} (target <= {target})"
        )


if __name__ == "__main__":
    main()
