"""Per backend: create + first command through corral vs the bare engine's own
``run --rm ... true`` (median of N). One entry per backend in BACKENDS, so
other backends (gvisor) add theirs.

    PYTHONPATH=src python benchmarks/bench_backends.py [N]   (docker needs DOCKER_HOST)
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from corral import Policy
from corral._run import run_async
from corral.backends import get_backend


def _corral(name: str) -> float:
    started = time.perf_counter()
    asyncio.run(run_async(["true"], policy=Policy.preset("default"), backend=name))
    return time.perf_counter() - started


def _bare(name: str) -> Callable[[], float]:
    def once() -> float:
        engine = get_backend(name).engine  # type: ignore[attr-defined]
        argv = [*engine.command, "run", "--rm", "--network=none", "-v", "/usr:/usr:ro"]
        argv += ["--ulimit=nofile=1024:1024", "--ulimit=nproc=128:128", _image(name), "true"]
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env=engine.env())
        return time.perf_counter() - started

    return once


def _image(name: str) -> str:
    out = subprocess.run(
        [name, "images", "--format={{.Repository}}:{{.Tag}}"], capture_output=True, check=True
    )
    return next(line for line in out.stdout.decode().split() if "corral-base" in line)


BACKENDS: dict[str, Callable[[], dict[str, Callable[[], float]]]] = {
    "podman": lambda: {"corral": lambda: _corral("podman"), "bare": _bare("podman")},
    "docker": lambda: {"corral": lambda: _corral("docker"), "bare": _bare("docker")},
}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    for name, make in BACKENDS.items():
        if any(c.status == "fail" for c in get_backend(name).doctor()):
            print(f"{name}: skipped (doctor)")
            continue
        _corral(name)  # warm: base image imported
        for label, fn in make().items():
            times = [fn() for _ in range(n)]
            print(f"{name:8} {label:7} median {statistics.median(times) * 1000:7.1f} ms (n={n})")


if __name__ == "__main__":
    main()
