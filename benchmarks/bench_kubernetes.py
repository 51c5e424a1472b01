"""Kubernetes backend: a cold Pod, a pooled Pod and bwrap side by side; exec round trips; a burst.

    KUBECONFIG=... CORRAL_K8S_IMAGE=... PYTHONPATH=src python benchmarks/bench_kubernetes.py \
        [--namespace corral-bench] [--repeat 3] [--burst 100] [--code]

Prints medians (seconds) and ratios to bwrap:

- create + first command: ``AsyncSandbox.start()`` + ``commands.run("true")``
  for a cold Pod (created, scheduled, started, agent streamed in over exec),
  a pooled Pod (``AsyncPool(backend="kubernetes")`` handing out a ready
  one), and bwrap's local box;
- with ``--code``: create + first ``run_code("1+1")`` the same three ways (the
  image must carry corral's code runtime, as ``corral image build`` makes);
- a command's round trip (``commands.run("true")`` in a running sandbox)
  over the exec stream against the same on bwrap;
- ``--burst N``: N sandboxes started at once, the time until all are ready
  (with ``CORRAL_K8S_REQUEST_RATIO`` at 0.01 so N Pods fit a small node's
  CPU requests: limits stay as the policy says).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from corral import AsyncPool, AsyncSandbox, Policy
from corral.backends import Backend, get_backend
from corral.backends.kubernetes import KubernetesBackend, facts_from_env

POLICY = Policy.preset("default")


async def _cold(backend: Backend | str, code: bool) -> float:
    t = time.perf_counter()
    sb = AsyncSandbox(POLICY, runtime="default" if code else None, backend=backend)
    await sb.start()
    try:
        if code:
            await sb.run_code("1+1")
        else:
            await sb.commands.run("true")
        return time.perf_counter() - t
    finally:
        await sb.close()


async def _pooled(backend: Backend | str, code: bool, repeat: int) -> list[float]:
    samples = []
    kernels = ("python",) if code else ()
    runtime = "default" if code else None
    async with AsyncPool(POLICY, runtime=runtime, kernels=kernels, size=1, backend=backend) as pool:
        for _ in range(repeat):
            await pool.wait_ready(300)
            t = time.perf_counter()
            sb = await pool.take()
            try:
                if code:
                    await sb.run_code("1+1")
                else:
                    await sb.commands.run("true")
                samples.append(time.perf_counter() - t)
            finally:
                await sb.close()
    return samples


async def _round_trips(backend: Backend | str, n: int = 50) -> float:
    async with AsyncSandbox(POLICY, runtime=None, backend=backend) as sb:
        await sb.commands.run("true")
        t = time.perf_counter()
        for _ in range(n):
            await sb.commands.run("true")
        return (time.perf_counter() - t) / n


async def _burst(backend: Backend, n: int) -> tuple[float, int]:
    boxes = [AsyncSandbox(POLICY, runtime=None, backend=backend) for _ in range(n)]
    t = time.perf_counter()
    results = await asyncio.gather(*(sb.start() for sb in boxes), return_exceptions=True)
    elapsed = time.perf_counter() - t
    errors = [r for r in results if isinstance(r, BaseException)]
    for why in sorted({str(e)[:300] for e in errors}):
        print(f"  a start failed: {why}")
    await asyncio.gather(*(sb.close() for sb in boxes), return_exceptions=True)
    return elapsed, len(errors)


def _row(name: str, samples: list[float], base: float | None) -> None:
    med = statistics.median(samples)
    ratio = f"  {med / base:6.1f}x bwrap" if base else ""
    print(f"{name:<44} {med:8.3f} s{ratio}   (n={len(samples)})")


async def main(args: argparse.Namespace) -> None:
    k8s = KubernetesBackend(args.namespace)
    bwrap = get_backend("bwrap")
    for code in (False, True) if args.code else (False,):
        what = "run_code" if code else "command"
        base = [await _cold(bwrap, code) for _ in range(args.repeat)]
        _row(f"create + first {what}: bwrap", base, None)
        cold = [await _cold(k8s, code) for _ in range(args.repeat)]
        _row(f"create + first {what}: cold Pod", cold, statistics.median(base))
        pooled = await _pooled(k8s, code, args.repeat)
        _row(f"create + first {what}: pooled Pod", pooled, statistics.median(base))
    local = await _round_trips(bwrap)
    remote = await _round_trips(k8s)
    print(f"{'command round trip: bwrap':<44} {local * 1000:8.2f} ms")
    print(
        f"{'command round trip: exec stream':<44} {remote * 1000:8.2f} ms  {remote / local:6.1f}x"
    )
    if args.burst:
        os.environ["CORRAL_K8S_REQUEST_RATIO"] = "0.01"
        small = KubernetesBackend(args.namespace, facts=facts_from_env())
        elapsed, failed = await _burst(small, args.burst)
        name = f"{args.burst} sandboxes at once: all ready"
        print(f"{name:<44} {elapsed:8.2f} s  ({failed} failed)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", default=os.environ.get("CORRAL_K8S_NAMESPACE"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--burst", type=int, default=0)
    parser.add_argument("--code", action="store_true")
    asyncio.run(main(parser.parse_args()))
