"""Pause and resume: the cgroup freezer, through the seam, the sandbox and all four surfaces."""

from __future__ import annotations

import asyncio
import os

import pytest

from corral import AsyncSandbox, Policy
from corral.backends import BoxSpec, get_backend
from corral.backends.linux._cgroups import detect_cgroups, leftover_cgroups

# the import makes the four-surface fixture (and its server) available here
from .test_surfaces import OpenSandbox, api_key, open_sandbox, server  # noqa: F401

pytestmark = pytest.mark.skipif(
    "freezer" not in detect_cgroups().controllers and detect_cgroups().version != 2,
    reason="no cgroup freezer on this host",
)


async def _cpu(box: object) -> float:
    usage = box.usage()  # type: ignore[attr-defined]
    assert usage.cpu_time_s is not None
    return float(usage.cpu_time_s)


async def test_a_paused_box_uses_no_cpu() -> None:
    box = await get_backend("bwrap").launch(
        BoxSpec(command=("sh", "-c", "while :; do :; done"), policy=Policy.preset("default"))
    )
    try:
        await asyncio.sleep(0.3)
        await box.pause()
        before = await _cpu(box)
        await asyncio.sleep(0.5)
        grown = await _cpu(box) - before
        assert grown < 0.02, grown  # frozen: not scheduled (running, it would be ~0.5 s)
        await box.pause()  # idempotent
        await box.resume()
        await box.resume()  # idempotent
        resumed = await _cpu(box)
        await asyncio.sleep(0.3)
        assert await _cpu(box) - resumed > 0.05  # the loop runs again
    finally:
        await box.aclose()


async def test_commands_wait_for_resume_and_state_is_kept() -> None:
    async with AsyncSandbox() as sb:
        await sb.commands.run("echo kept > f", timeout_s=10)
        bg = await sb.commands.run("sleep 60", background=True)
        await sb.pause()
        await sb.pause()  # idempotent
        call = asyncio.ensure_future(sb.commands.run("cat f", timeout_s=30))
        await asyncio.sleep(0.5)
        assert not call.done()  # the agent is frozen: nothing answers
        await sb.resume()
        result = await asyncio.wait_for(call, 10)
        assert (result.exit_code, result.stdout) == (0, b"kept\n")
        assert bg.pid in {p.pid for p in await sb.commands.list()}  # processes kept
        await sb.resume()  # idempotent


def _ours() -> set[str]:
    # other corral processes on the host have boxes of their own: only ours count
    return {p for p in leftover_cgroups() if f"/box-{os.getpid()}-" in p}


async def test_a_paused_box_can_be_closed() -> None:
    before = _ours()
    sb = AsyncSandbox()
    await sb.start()
    await sb.commands.run("sleep 60", background=True)
    await sb.pause()
    await asyncio.wait_for(sb.close(), 10)
    assert _ours() <= before  # killed, thawed, removed


async def test_pause_resume_on_every_surface(open_sandbox: OpenSandbox) -> None:  # noqa: F811
    async with open_sandbox() as sb:
        await sb.pause()
        await sb.pause()
        await sb.resume()
        await sb.resume()
        result = await sb.commands.run("echo back")
        assert result.stdout == b"back\n"
