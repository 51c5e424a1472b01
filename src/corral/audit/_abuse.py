"""Abuse probes (``abuse.*``), judged from the host's own measurements (cgroup
counters, its clock, the output it received): fork bombs, disk, inodes,
threads, the wall clock, output floods, descriptors, core dumps.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

from corral._policy import Policy
from corral.audit._probe import (
    BOX_PYTHON,
    Context,
    Outcome,
    ProbeError,
    probe,
    weakened,
)


def _short(ctx: Context, wall_s: float) -> Policy:
    wall = ctx.policy.limits.wall_time_s
    return ctx.policy.with_limits(wall_time_s=min(wall, wall_s) if wall else wall_s)


async def _host_latency() -> float:
    start = time.monotonic()
    await asyncio.to_thread(subprocess.run, ["/bin/true"], check=True)
    return time.monotonic() - start


@probe(
    "abuse.fork_bomb",
    "a fork bomb is capped and the host stays responsive",
    "exhausting the host's process table",
    "pids cgroup (RLIMIT_NPROC without one)",
)
async def _fork_bomb(ctx: Context) -> Outcome:
    pids = ctx.policy.limits.pids
    if pids is None:
        return Outcome("fail", "limits.pids is not set: nothing caps a fork bomb")
    bomb = asyncio.ensure_future(
        ctx.box(
            [
                BOX_PYTHON,
                "-c",
                "import os, time\n"
                "while True:\n"
                "    try:\n"
                "        if os.fork() == 0: time.sleep(30)\n"
                "    except OSError: time.sleep(0.01)",
            ],
            _short(ctx, 2.0),
        )
    )
    await asyncio.sleep(0.5)
    latency = await _host_latency()
    result = await bomb
    if latency > 2.0:
        return Outcome("fail", f"the host took {latency:.1f} s to start a process")
    if "pids" in result.limits_hit:
        return Outcome("pass", f"capped at pids={pids}, host responsive ({latency * 1e3:.0f} ms)")
    if result.degraded and any("pids" in d for d in result.degraded):
        return Outcome("pass", f"capped by RLIMIT_NPROC{weakened(result)}")
    return Outcome("fail", f"no process cap observed (limits hit: {result.limits_hit})")


@probe(
    "abuse.memory_tmpfs",
    "filling /tmp stops at its size",
    "exhausting host RAM through tmpfs",
    "sized tmpfs, charged to the memory cgroup",
)
async def _tmpfs(ctx: Context) -> Outcome:
    return await _fill(ctx, "/tmp", ctx.policy.filesystem.tmp_bytes)


@probe(
    "abuse.memory_shm",
    "filling /dev/shm stops at its size",
    "exhausting host RAM through shared memory",
    "sized tmpfs",
)
async def _shm(ctx: Context) -> Outcome:
    return await _fill(ctx, "/dev/shm", ctx.policy.filesystem.tmp_bytes)


@probe(
    "abuse.disk_fill",
    "filling the workspace stops at the disk limit",
    "filling the host's disk",
    "sized tmpfs workspace",
)
async def _disk(ctx: Context) -> Outcome:
    size = ctx.policy.workspace_bytes
    if size is None:
        return Outcome("fail", "limits.disk_bytes is not set: nothing bounds the workspace")
    return await _fill(ctx, ctx.policy.filesystem.workspace, size)


async def _fill(ctx: Context, where: str, size: int) -> Outcome:
    mib = size // (1 << 20) + 64
    result = await ctx.box(
        [
            "/bin/sh",
            "-c",
            f"dd if=/dev/zero of={where}/fill bs=1M count={mib} 2>&1 | tail -1; "
            f"du -k {where}/fill | cut -f1",
        ],
        _short(ctx, 30.0),
    )
    lines = result.stdout_text.splitlines()
    written = int(lines[-1]) * 1024 if lines and lines[-1].isdigit() else -1
    if result.limit_hit == "memory":
        return Outcome("pass", "stopped by the memory limit first")
    if 0 <= written <= size:
        return Outcome("pass", f"stopped at {written >> 20} MiB of {size >> 20} MiB")
    return Outcome("fail", f"wrote {written} bytes into a {size}-byte space")


@probe(
    "abuse.inode_fill",
    "creating files without end stops",
    "exhausting host memory with inodes",
    "tmpfs in the memory cgroup; wall clock",
)
async def _inodes(ctx: Context) -> Outcome:
    result = await ctx.box(
        [
            BOX_PYTHON,
            "-c",
            "import os\ni = 0\n"
            "try:\n    while True:\n        open(f'/tmp/f{i}', 'w').close(); i += 1\n"
            "except OSError as e:\n    print(i, e.errno)",
        ],
        _short(ctx, 5.0),
    )
    if result.limit_hit in ("memory", "timeout") or result.stdout.strip():
        return Outcome("pass", f"stopped ({result.limit_hit or result.stdout_text.strip()})")
    return Outcome("fail", f"exit {result.exit_code}")


@probe(
    "abuse.cpu_threads",
    "64 busy threads stay within the CPU quota",
    "starving the host's CPUs",
    "cpu cgroup quota",
)
async def _threads(ctx: Context) -> Outcome:
    cores = ctx.policy.limits.cpu_cores
    if cores is None:
        return Outcome("fail", "limits.cpu_cores is not set: nothing caps CPU use")
    if any("no cpu cgroup" in note for note in ctx.backend.check(ctx.policy)):
        return Outcome(
            "skip",
            "no cpu cgroup on this host: the CPU rate is not limited, only "
            "each process's CPU time (see corral doctor)",
        )
    loops = " ".join(["while :; do :; done &"] * 64)
    result = await ctx.box(
        ["/bin/sh", "-c", f"{loops} wait"], _short(ctx, 2.0).with_limits(cpu_time_s=None)
    )
    if result.cpu_time_s is None:
        return Outcome("error", "the cgroup reported no CPU time")
    allowed = cores * result.duration_s * 1.5 + 0.3
    ok = result.cpu_time_s <= allowed
    return Outcome(
        "pass" if ok else "fail",
        f"{result.cpu_time_s:.2f} CPU-s in {result.duration_s:.2f} s at {cores} cores",
    )


async def _wall(ctx: Context, command: list[str], what: str) -> Outcome:
    limit = ctx.policy.limits.wall_time_s
    if limit is None:
        return Outcome("fail", "limits.wall_time_s is not set: nothing ends a stuck process")
    policy = _short(ctx, 1.0)
    started = time.monotonic()
    result = await ctx.box(command, policy)
    elapsed = time.monotonic() - started
    if result.limit_hit == "timeout" and elapsed < (policy.limits.wall_time_s or 1.0) + 5:
        return Outcome("pass", f"{what} killed at the wall limit after {elapsed:.1f} s")
    return Outcome("fail", f"{what}: limit {result.limit_hit}, {elapsed:.1f} s")


@probe(
    "abuse.sleep",
    "a sleeping process ends at the wall limit",
    "holding a box forever",
    "host-side wall clock",
)
async def _sleep(ctx: Context) -> Outcome:
    return await _wall(ctx, ["/bin/sleep", "1000"], "sleep")


@probe(
    "abuse.pause",
    "a paused process ends at the wall limit",
    "holding a box forever",
    "host-side wall clock",
)
async def _pause(ctx: Context) -> Outcome:
    return await _wall(ctx, [BOX_PYTHON, "-c", "import signal; signal.pause()"], "pause()")


@probe(
    "abuse.sigstop_self",
    "a self-stopped process ends at the wall limit",
    "escaping the clock by stopping",
    "SIGKILL works on stopped processes",
)
async def _sigstop(ctx: Context) -> Outcome:
    return await _wall(ctx, ["/bin/sh", "-c", "kill -STOP $$"], "SIGSTOP")


@probe(
    "abuse.blocked_read",
    "a process blocked on a read ends at the wall limit",
    "hanging on a FIFO forever",
    "host-side wall clock",
)
async def _blocked(ctx: Context) -> Outcome:
    return await _wall(ctx, ["/bin/sh", "-c", "mkfifo /tmp/f; cat /tmp/f"], "blocked read")


@probe(
    "abuse.setsid_daemon",
    "a double-forked setsid daemon does not survive",
    "leaving a process running on the host",
    "pid namespace dies with the box's init",
)
async def _daemon(ctx: Context) -> Outcome:
    marker = f"{900000 + os.getpid() % 99999}"
    await ctx.box(["/bin/sh", "-c", f"(setsid sh -c 'sleep {marker}' &) ; sleep 0.2"])
    await asyncio.sleep(0.3)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    survivors = [line for line in ps.stdout.splitlines() if line.strip() == f"sleep {marker}"]
    return Outcome("fail" if survivors else "pass", f"{len(survivors)} survivors")


@probe(
    "abuse.command_tree",
    "a timed-out command takes its setsid and double-forked children along",
    "a command outliving its timeout or kill, unseen by commands.list()",
    "the agent is the box's child subreaper and kills a command's whole tree",
)
async def _command_tree(ctx: Context) -> Outcome:
    tag = f"{800000 + os.getpid() % 99999}"
    escape = f"setsid sleep {tag}1 & (setsid sleep {tag}2 &); sleep 300"
    async with ctx.sandbox(runtime=None) as sb:
        result = await sb.commands.run(escape, timeout_s=1)
        await asyncio.sleep(0.2)
        ps = await sb.commands.run(["ps", "-eo", "stat=,args="], timeout_s=10)
        if ps.exit_code != 0:
            raise ProbeError(f"ps in the box failed: {ps.stderr_text.strip()[-200:]}")
        left = [
            line
            for line in ps.stdout_text.splitlines()
            if f"sleep {tag}" in line and not line.startswith("Z")
        ]
        listed = await sb.commands.list()
    if result.limit_hit != "timeout":
        return Outcome("fail", f"the command ended with limit {result.limit_hit}")
    if left or listed:
        return Outcome("fail", f"survivors: {left}; commands.list(): {listed}")
    return Outcome("pass", "no descendant survived the timeout; commands.list() is empty")


@probe(
    "abuse.output_flood",
    "10 GB of output is capped with host memory bounded",
    "exhausting the host's memory with output",
    "output cap read by the host",
)
async def _flood(ctx: Context) -> Outcome:
    cap = ctx.policy.limits.output_bytes
    if cap is None:
        return Outcome("fail", "limits.output_bytes is not set: nothing bounds output")
    result = await ctx.box(["/bin/sh", "-c", "head -c 10G /dev/zero"], _short(ctx, 30.0))
    size = len(result.stdout) + len(result.stderr)
    if result.limit_hit == "output" and size <= cap:
        return Outcome("pass", f"stopped at {size} bytes")
    return Outcome("fail", f"received {size} bytes, limit {result.limit_hit}")


@probe(
    "abuse.fd_exhaustion",
    "file descriptors are capped",
    "exhausting host file tables",
    "RLIMIT_NOFILE",
)
async def _nofile(ctx: Context) -> Outcome:
    limit = ctx.policy.limits.open_files
    if limit is None:
        return Outcome("fail", "limits.open_files is not set")
    seen = await ctx.observe(
        "fds = []\n"
        "try:\n    while True: fds.append(os.open('/dev/null', os.O_RDONLY))\n"
        "except OSError as e: out['stopped'] = errno.errorcode[e.errno]\n"
        "out['count'] = str(len(fds))"
    )
    ok = seen.get("stopped") == "EMFILE" and int(seen["count"]) <= limit
    return Outcome(
        "pass" if ok else "fail", f"{seen['count']} descriptors, then {seen.get('stopped')}"
    )


@probe(
    "abuse.core_dumps", "core dumps are off", "leaking memory contents to disk", "RLIMIT_CORE = 0"
)
async def _core(ctx: Context) -> Outcome:
    seen = await ctx.observe(
        "import resource\nout['core'] = str(resource.getrlimit(resource.RLIMIT_CORE))"
    )
    return Outcome("pass" if seen["core"] == "(0, 0)" else "fail", f"RLIMIT_CORE {seen['core']}")
