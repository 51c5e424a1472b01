"""Abuse from inside a real box: every limit stops it, and the host stays fine."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import time

import pytest

import corral
from corral import Policy

from .conftest import Runner, py

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root on this host")


def _host_processes_matching(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if marker in line and "ps -eo" not in line]


def test_memory_bomb(box: Runner) -> None:
    policy = Policy.preset("default").with_limits(memory_bytes=64 << 20)
    result = box(
        py("x = bytearray(1 << 30)\nx[::4096] = b'a' * len(x[::4096])\nprint('survived')"), policy
    )
    assert b"survived" not in result.stdout
    if box.mode == "user":
        # no memory cgroup for an ordinary user here: RLIMIT_AS stands in, and says so
        assert any("no memory cgroup" in d for d in result.degraded), result.degraded
        assert b"MemoryError" in result.stderr
    else:
        assert result.limit_hit == "memory", result
        assert result.exit_code == 137
        assert result.signal == 9
        assert result.peak_memory_bytes is not None
        assert result.peak_memory_bytes <= (64 << 20) + (1 << 20)


def test_fork_bomb_is_capped(box: Runner) -> None:
    policy = Policy.preset("default").with_limits(pids=32, wall_time_s=5.0)
    script = (
        "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
        "            time.sleep(30)\n            os._exit(0)\n        n += 1\n"
        "except OSError as e:\n    print('capped', n, e.errno)"
    )
    result = box(py(script), policy)
    assert b"capped" in result.stdout, result
    forked = int(result.stdout.split()[1])
    if box.mode == "user":
        assert forked < 64
    else:
        assert forked <= 32
        assert "pids" in result.limits_hit


@ROOT_ONLY
def test_busy_threads_are_throttled_to_the_cpu_quota() -> None:
    policy = Policy.preset("default").with_limits(cpu_cores=0.5, wall_time_s=2.0, cpu_time_s=None)
    loops = " ".join(["while :; do :; done &"] * 16)
    result = corral.run(["/bin/sh", "-c", f"{loops} wait"], policy=policy)
    assert result.limit_hit == "timeout"
    assert result.cpu_time_s is not None
    # 16 busy loops for ~2 s would burn ~4 CPU-seconds on this 2-core host; the
    # quota allows 0.5 core: ~1 s. Generous margin for scheduler granularity.
    assert result.cpu_time_s < 0.5 * result.duration_s * 1.5 + 0.2, result


def test_cpu_time_limit(box: Runner) -> None:
    policy = Policy.preset("default").with_limits(cpu_time_s=1.0, wall_time_s=20.0)
    result = box(py("while True: pass"), policy)
    assert result.limit_hit == "cpu_time", result
    assert result.duration_s < 10


def test_wall_clock_kills_sleep_and_setsid_daemons(box: Runner) -> None:
    marker = f"98765{os.getpid() % 1000}"
    policy = Policy.preset("default").with_limits(wall_time_s=1.0)
    started = time.monotonic()
    result = box(["/bin/sh", "-c", f"setsid sh -c 'sleep {marker}' & sleep 1000"], policy)
    assert result.limit_hit == "timeout"
    assert result.exit_code == 137
    assert time.monotonic() - started < 10
    assert _host_processes_matching(f"sleep {marker}") == []


def test_daemon_left_by_a_finished_command_dies_with_the_box(box: Runner) -> None:
    marker = f"87654{os.getpid() % 1000}"
    result = box(
        [
            "/bin/sh",
            "-c",
            f"setsid sh -c 'sleep {marker}' </dev/null >/dev/null 2>&1 & echo started",
        ]
    )
    assert result.exit_code == 0
    assert result.stdout == b"started\n"
    assert result.limit_hit is None
    assert _host_processes_matching(f"sleep {marker}") == []


@ROOT_ONLY
def test_output_flood_is_capped_with_bounded_host_memory() -> None:
    policy = Policy.preset("default").with_limits(output_bytes=1 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = corral.run(["/bin/sh", "-c", "head -c 10G /dev/zero"], policy=policy)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert result.limit_hit == "output"
    assert result.truncated
    assert len(result.stdout) == 1 << 20
    assert (after - before) * 1024 < 64 << 20  # ru_maxrss is KiB


def test_output_flood_via_cli(box: Runner) -> None:
    policy = Policy.preset("default").with_limits(output_bytes=64 << 10)
    result = box(["/bin/sh", "-c", "yes corral"], policy)
    assert result.limit_hit == "output"
    assert result.truncated


def test_disk_fill_stops_at_the_limit(box: Runner) -> None:
    policy = (
        Policy.preset("default").with_filesystem(tmp_bytes=8 << 20).with_limits(disk_bytes=64 << 20)
    )
    script = (
        "for d in /tmp /dev/shm /workspace; do "
        "dd if=/dev/zero of=$d/fill bs=1M count=200 2>&1 | grep -q 'No space left' && echo ENOSPC; "
        "du -k $d/fill | cut -f1; done"
    )
    result = box(["/bin/sh", "-c", script], policy)
    lines = result.stdout_text.splitlines()
    assert lines.count("ENOSPC") == 3, lines
    sizes_kib = [int(line) for line in lines if line.isdigit()]
    assert sizes_kib[0] <= 8 << 10
    assert sizes_kib[1] <= 8 << 10
    assert sizes_kib[2] <= (64 - 16) << 10


def test_file_size_limit_is_a_disk_limit_hit(box: Runner) -> None:
    policy = Policy.preset("default").with_limits(file_size_bytes=1 << 20)
    result = box(["/bin/sh", "-c", "dd if=/dev/zero of=/tmp/big bs=1M count=4"], policy)
    assert result.limit_hit == "disk"
    assert result.signal == 25  # SIGXFSZ


def test_signals_map_to_shell_status(box: Runner) -> None:
    result = box(["/bin/sh", "-c", "kill -TERM $$"])
    assert result.exit_code == 143
    assert result.signal == 15
    assert result.limit_hit is None


def test_stdin_is_delivered_and_never_blocks() -> None:
    assert corral.run(["/bin/cat"], stdin=b"hello").stdout == b"hello"
    # 32 MiB offered to a command that never reads: the run still ends promptly
    result = corral.run(["/bin/true"], stdin=b"x" * (32 << 20))
    assert result.exit_code == 0


def test_binary_output_is_bytes() -> None:
    result = corral.run(py("import sys; sys.stdout.buffer.write(bytes(range(256)))"))
    assert result.stdout == bytes(range(256))
    assert "\ufffd" in result.stdout_text


# -- one label per cause, on every path --------------------------------------------

_LIMITED = Policy.preset("default").with_limits(memory_bytes=128 << 20, pids=48, wall_time_s=20)
_MEMORY_BOMB = "x = b'a' * 10**9"
_FORK_BOMB = (
    "import os, time\n"
    "while True:\n"
    "    try:\n"
    "        if os.fork() == 0:\n"
    "            time.sleep(60); os._exit(0)\n"
    "    except OSError:\n"
    "        time.sleep(0.01)\n"
)


async def _every_path(script: str, policy: Policy, timeout_s: float) -> dict[str, str | None]:
    """``limit_hit`` of the same Python script run every way corral offers."""
    shell = f'python3 -c "{script}"'
    seen: dict[str, str | None] = {}
    run = await corral.run_async(["python3", "-c", script], policy=policy, timeout_s=timeout_s)
    seen["run argv"] = run.limit_hit
    run = await corral.run_async(["/bin/sh", "-c", shell], policy=policy, timeout_s=timeout_s)
    seen["run shell"] = run.limit_hit
    async with corral.AsyncSandbox(policy, runtime=None) as sb:
        # a shell string: sh -c survives its child's kill and exits 137 itself
        seen["commands shell"] = (await sb.commands.run(shell, timeout_s=timeout_s)).limit_hit
        argv = ["python3", "-c", script]
        seen["commands argv"] = (await sb.commands.run(argv, timeout_s=timeout_s)).limit_hit
        handle = await sb.commands.run(shell, background=True, timeout_s=timeout_s)
        seen["background"] = (await handle.wait()).limit_hit
        async for event in sb.commands.stream(shell, timeout_s=timeout_s):
            if isinstance(event, corral.CommandExit):
                seen["stream"] = event.result.limit_hit
    return seen


@ROOT_ONLY
async def test_a_memory_kill_says_memory_on_every_path() -> None:
    seen = await _every_path(_MEMORY_BOMB, _LIMITED, 20)
    assert seen == dict.fromkeys(seen, "memory"), seen


@ROOT_ONLY
async def test_a_fork_bomb_says_pids_on_every_path() -> None:
    seen = await _every_path(_FORK_BOMB, _LIMITED, 2)
    assert seen == dict.fromkeys(seen, "pids"), seen


@ROOT_ONLY
async def test_a_cpu_time_kill_says_cpu_time_in_a_long_lived_box() -> None:
    policy = Policy.preset("default").with_limits(cpu_time_s=1, wall_time_s=30)
    async with corral.AsyncSandbox(policy, runtime=None) as sb:
        result = await sb.commands.run("python3 -c 'while True: pass'")
        assert result.exit_code in (128 + 9, 128 + 24), result
        assert result.limit_hit == "cpu_time", result


def test_the_cli_names_the_fork_bomb() -> None:
    cli = [sys.executable, "-m", "corral", "run", "--json", "--pids", "48", "--timeout", "2"]
    proc = subprocess.run(
        [*cli, "--", "python3", "-c", _FORK_BOMB],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert json.loads(proc.stdout)["limit_hit"] == ("pids" if os.geteuid() == 0 else "timeout")


# -- what a killed Python printed is not lost ------------------------------------

_PRINT_THEN_BLOW = "print('got this far'); x = b'a' * 10**9"


@ROOT_ONLY
async def test_a_python_killed_by_a_limit_keeps_what_it_printed() -> None:
    run = await corral.run_async(["python3", "-c", _PRINT_THEN_BLOW], policy=_LIMITED)
    assert (run.limit_hit, run.stdout) == ("memory", b"got this far\n")
    async with corral.AsyncSandbox(_LIMITED, runtime=None) as sb:
        result = await sb.commands.run(["python3", "-c", _PRINT_THEN_BLOW])
        assert (result.limit_hit, result.stdout) == ("memory", b"got this far\n")
        # the policy's env can still ask for buffering
        result = await sb.commands.run(
            ["python3", "-c", _PRINT_THEN_BLOW], env={"PYTHONUNBUFFERED": ""}
        )
        assert (result.limit_hit, result.stdout) == ("memory", b"")


async def test_a_streamed_python_delivers_lines_as_it_prints_them() -> None:
    async with corral.AsyncSandbox(runtime=None) as sb:
        script = "import time\nprint('first')\ntime.sleep(300)"
        events = sb.commands.stream(["python3", "-c", script])
        seen = b""

        async def first_line() -> None:
            nonlocal seen
            async for event in events:
                assert isinstance(event, corral.CommandOutput), event
                seen += event.data
                if seen.endswith(b"\n"):
                    return

        # block-buffered, 'first' would come only with the exit, 300 s later
        await asyncio.wait_for(first_line(), 20)
        assert seen == b"first\n"
        await events.aclose()
