"""Many concurrent idle sandboxes on one machine: how many, what each costs, how they answer.

    .venv/bin/python benchmarks/bench_idle.py [--n 1000] [--concurrency 4] [--contexts 10]

Starts ``--n`` idle sandboxes (bwrap, policy ``default``, no runtime: the agent
and the box's init only), ``--concurrency`` at a time, in one process; then,
with all of them up:

- command round trip: ``commands.run("true")`` on random boxes, one at a time
  and 16 at a time: p50 / p99;
- PSS per idle box: the sum of ``Pss`` in ``/proc/<pid>/smaps_rollup`` over
  the box's processes (bwrap, the box's init, the agent), p50 over the boxes;
  and the host process's own memory per box (its RSS growth / n);
- PSS per idle Python context: ``--contexts`` further boxes with the default
  runtime, each with its Python kernel started (``prewarm``), minus the same
  box's PSS before the kernel started;
- how many fit in 24 GiB: 24 GiB / (box PSS + host bytes per box), and with a
  Python context each.

Limits it meets, raised here and printed: RLIMIT_NOFILE (each box holds a few
descriptors in the host process: its channel, stderr, pidfd), raised to the
hard limit. If a start fails the run stops there and says at which count and
why; it also stops (and says so) before the host's MemAvailable drops below
3 GiB, the machine being shared.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import statistics
import time
from pathlib import Path

from corral import AsyncSandbox, _runtime

GIB = 1 << 30
_RESERVE = 3 * GIB  # never take the host's available memory below this


def _pss(pid: int) -> int:
    """Bytes of PSS of one process (0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (through /proc/<pid>/task/*/children)."""
    found, stack = [], [pid]
    while stack:
        p = stack.pop()
        found.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            with contextlib.suppress(OSError):
                children = Path(f"/proc/{p}/task/{tid}/children").read_text()
                stack += [int(c) for c in children.split()]
    return found


def _box_pss(sb: AsyncSandbox) -> tuple[int, int]:
    """(PSS bytes, processes) of a bwrap box: bwrap and everything under it."""
    box = sb._box
    proc = getattr(box, "proc", None)
    assert proc is not None, "bench_idle reads the bwrap backend's process tree"
    pids = _tree(proc.pid)
    return sum(_pss(p) for p in pids), len(pids)


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * q))]


def _raise_nofile() -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return f"RLIMIT_NOFILE {soft} -> {hard}"


async def _start_all(n: int, concurrency: int) -> tuple[list[AsyncSandbox], str | None, float]:
    boxes: list[AsyncSandbox] = []
    gate = asyncio.Semaphore(concurrency)
    failure: list[str] = []
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        if failure:
            return
        async with gate:
            if failure:
                return
            if _available() < _RESERVE:  # the machine is shared: stop before it swaps or OOMs
                failure.append(
                    f"stopped at {len(boxes)}: MemAvailable below {_RESERVE / GIB:.0f} GiB"
                )
                return
            sb = AsyncSandbox("default", timeout_s=None, runtime=None)
            try:
                await sb.start()
            except Exception as exc:
                failure.append(f"box {len(boxes) + 1} failed to start: {exc}")
                await sb.close()
                return
            boxes.append(sb)
            if len(boxes) % 100 == 0:
                el = time.perf_counter() - t0
                print(f"  {len(boxes):5d} up after {el:6.1f} s", flush=True)

    await asyncio.gather(*(one(i) for i in range(n)))
    return boxes, (failure[0] if failure else None), time.perf_counter() - t0


async def _round_trips(boxes: list[AsyncSandbox], count: int, parallel: int) -> list[float]:
    times: list[float] = []
    gate = asyncio.Semaphore(parallel)

    async def one() -> None:
        sb = random.choice(boxes)
        async with gate:
            t = time.perf_counter()
            result = await sb.commands.run("true")
            times.append(time.perf_counter() - t)
            assert result.exit_code == 0

    await asyncio.gather(*(one() for _ in range(count)))
    return times


async def _contexts(k: int) -> list[tuple[int, int]]:
    """(box PSS before, box PSS with its Python context) for ``k`` boxes."""
    out = []
    boxes = []
    try:
        for _ in range(k):
            sb = AsyncSandbox("default", timeout_s=None, runtime=_runtime.DEFAULT)
            boxes.append(sb)
            await sb.start()
            await asyncio.sleep(0.5)
            before, _ = _box_pss(sb)
            await sb.prewarm("python")
            ex = await sb.run_code("1+1")
            assert ex.text == "2", ex
            await asyncio.sleep(0.5)
            after, _ = _box_pss(sb)
            out.append((before, after))
    finally:
        await asyncio.gather(*(sb.close() for sb in boxes), return_exceptions=True)
    return out


async def main(n: int, concurrency: int, contexts: int, rounds: int) -> None:
    print(_raise_nofile())
    print(f"pid_max {Path('/proc/sys/kernel/pid_max').read_text().strip()}")
    rss0 = _rss()
    # the same round trips with few boxes first: the load's own cost, side by side
    few, _, _ = await _start_all(10, concurrency)
    baseline = {p: await _round_trips(few, rounds, p) for p in (1, 16)}
    await asyncio.gather(*(sb.close() for sb in few))
    print(f"starting {n} idle sandboxes ({concurrency} at a time)")
    boxes, failure, took = await _start_all(n, concurrency)
    try:
        each = took / max(1, len(boxes)) * 1e3
        print(f"up: {len(boxes)} of {n} in {took:.1f} s ({each:.0f} ms each)")
        if failure:
            print(f"STOPPED: {failure}")
        host_per_box = (_rss() - rss0) / max(1, len(boxes))
        pss = [_box_pss(sb) for sb in boxes]
        per_box = statistics.median(p for p, _ in pss)
        print(
            f"PSS per idle box: p50 {per_box / 2**20:.2f} MiB "
            f"(max {max(p for p, _ in pss) / 2**20:.2f}), "
            f"{statistics.median(c for _, c in pss):.0f} processes; "
            f"host process {host_per_box / 2**20:.2f} MiB per box; "
            f"total {sum(p for p, _ in pss) / GIB:.2f} GiB"
        )
        print(f"open fds in the host process: {len(os.listdir('/proc/self/fd'))}")
        for parallel in (1, 16):
            times = await _round_trips(boxes, rounds, parallel)
            few_times = baseline[parallel]
            print(
                f"commands.run('true'), {parallel:2d} at a time: at {len(boxes)} idle "
                f"p50 {statistics.median(times) * 1e3:.1f} ms  p99 {_pct(times, 0.99) * 1e3:.1f} ms"
                f"  | at 10 boxes p50 {statistics.median(few_times) * 1e3:.1f} ms  "
                f"p99 {_pct(few_times, 0.99) * 1e3:.1f} ms"
            )
    finally:
        t = time.perf_counter()
        await asyncio.gather(*(sb.close() for sb in boxes), return_exceptions=True)
        print(f"closed {len(boxes)} in {time.perf_counter() - t:.1f} s")
    ctx = await _contexts(contexts) if contexts else []
    if ctx:
        deltas = [after - before for before, after in ctx]
        per_ctx = statistics.median(deltas)
        with_ctx = statistics.median(after for _, after in ctx)
        print(
            f"PSS per idle Python context: p50 {per_ctx / 2**20:.1f} MiB over {len(ctx)} "
            f"(box with its context: {with_ctx / 2**20:.1f} MiB)"
        )
        print(
            f"fit in 24 GiB: {int(24 * GIB // (per_box + host_per_box))} idle boxes, "
            f"{int(24 * GIB // (with_ctx + host_per_box))} with a Python context each "
            "(memory only; PIDs, fds and CPU aside)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--contexts", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    asyncio.run(main(args.n, args.concurrency, args.contexts, args.rounds))
