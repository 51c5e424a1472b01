"""Warm pools: a pooled box is a new box, and nothing crosses from one user to the next."""

from __future__ import annotations

import asyncio
import os

import pytest

import corral
from corral import AsyncPool, Pool
from corral.backends.linux._cgroups import leftover_cgroups


def _ours() -> set[str]:
    # other corral processes on the host have boxes of their own: only ours count
    return {p for p in leftover_cgroups() if f"/box-{os.getpid()}-" in p}


def test_public_names_resolve_lazily() -> None:
    assert set(corral._LAZY) | {"__version__"} == set(corral.__all__)
    for name in corral.__all__:
        assert getattr(corral, name) is not None


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="size"):
        AsyncPool(size=-1)
    with pytest.raises(ValueError, match="max_starting"):
        AsyncPool(max_starting=0)
    with pytest.raises(ValueError, match="kernels"):
        AsyncPool(runtime=None, kernels=("python",))


async def test_a_pooled_box_behaves_as_a_new_one() -> None:
    before = _ours()
    async with AsyncPool("default", size=1, kernels=("python",), timeout_s=120) as pool:
        await pool.wait_ready(90)
        async with pool.sandbox() as sb:
            assert await sb.is_running()
            assert (await sb.run_code("1+1")).text == "2"
            assert [c.language for c in await sb.list_code_contexts()] == ["python"]
            assert (await sb.commands.run("ls -A")).stdout == b""  # an empty workspace
            await sb.files.write("f", b"x" * 1000)
            assert (await sb.commands.run("cat f")).stdout == b"x" * 1000
            assert (await sb.commands.run("exit 3")).exit_code == 3
            bg = await sb.commands.run("sleep 30", background=True)
            assert bg.pid in {p.pid for p in await sb.commands.list()}
            await sb.pause()
            await sb.resume()
            assert sb.policy == corral.Policy.preset("default")
        # the pool refills in the background, bounded, and hands out another box
        await pool.wait_ready(90)
    assert _ours() <= before  # closing the pool ends the boxes never handed out


async def test_no_state_crosses_from_one_user_to_the_next() -> None:
    async with AsyncPool("default", size=1, kernels=("python",), timeout_s=120) as pool:
        seen: set[str] = set()
        for user in range(3):
            await pool.wait_ready(90)
            async with pool.sandbox() as sb:
                assert sb.id not in seen  # never a used box
                seen.add(sb.id)
                # nothing of the previous user: files, processes, kernel variables, env
                assert (await sb.commands.run("ls -A")).stdout == b""
                cmds = [p.argv for p in await sb.commands.list()]
                assert not any("sleep 1234" in " ".join(c) for c in cmds), cmds
                ex = await sb.run_code("secret")
                assert ex.error is not None
                assert ex.error.name == "NameError"
                env = await sb.run_code("import os; os.environ.get('SECRET', 'unset')")
                assert env.text == "'unset'"
                # this user's state, which the next one must not see
                await sb.files.write("secret.txt", f"user {user}")
                await sb.commands.run("sleep 1234", background=True)
                await sb.run_code(f"secret = {user}; import os; os.environ['SECRET'] = 'x'")


async def test_a_broken_box_is_not_handed_out() -> None:
    async with AsyncPool("default", size=1, kernels=(), timeout_s=60) as pool:
        await pool.wait_ready(60)
        broken = pool._ready[0]
        assert broken._box is not None
        broken._box.kill()
        await asyncio.sleep(0.2)
        async with pool.sandbox() as sb:
            assert sb is not broken
            assert (await sb.commands.run("echo ok")).stdout == b"ok\n"


def test_the_sync_pool() -> None:
    with Pool("default", size=1, kernels=("python",), timeout_s=60) as pool:
        pool.wait_ready(90)
        with pool.sandbox() as sb:
            assert sb.run_code("1+1").text == "2"
            assert sb.commands.run("echo hi").stdout == b"hi\n"
