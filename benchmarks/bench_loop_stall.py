"""How long sandbox start and close stall the event loop (issue 13).

A ticker task sleeps 1 ms in a loop and records how late each wake-up is;
the largest lateness while a sandbox starts (or closes) is how long every
other sandbox in the same process (``corral serve``) was held up. Reported
as the median over runs of that worst lateness, and the worst of all.

    PYTHONPATH=src python benchmarks/bench_loop_stall.py [runs]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

from corral import AsyncSandbox

TICK_S = 0.001


async def worst_stall_s(action: Callable[[], Awaitable[object]]) -> float:
    """The longest the loop went without running a 1 ms ticker during ``action``."""
    worst = 0.0
    running = True

    async def ticker() -> None:
        nonlocal worst
        while running:
            before = time.perf_counter()
            await asyncio.sleep(TICK_S)
            worst = max(worst, time.perf_counter() - before - TICK_S)

    task = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.01)  # the ticker is ticking
    worst = 0.0
    try:
        await action()
    finally:
        running = False
        await task
    return worst


async def main(runs: int) -> None:
    starts: list[float] = []
    closes: list[float] = []
    for _ in range(runs):
        sb = AsyncSandbox(runtime=None, timeout_s=60)
        starts.append(await worst_stall_s(sb.start))
        await sb.commands.run("true")
        closes.append(await worst_stall_s(sb.close))
    for name, values in (("start", starts), ("close", closes)):
        ms = [v * 1000 for v in values]
        print(
            f"{name}: event-loop stall median {statistics.median(ms):.1f} ms, "
            f"worst {max(ms):.1f} ms over {runs} runs"
        )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20))
