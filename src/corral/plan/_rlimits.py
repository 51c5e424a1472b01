"""rlimits: per-process limits, always applied, and the fallback when cgroups are absent.

rlimits are inherited by every process of the box. Some bound what cgroups
cannot (file size, open files, core dumps); others (address space, process
count) stand in for cgroup limits on hosts without cgroups, and the result then
says the control was weakened (``degraded``), never silently dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from corral._policy import Limits

# Default stack limit: finite, so a runaway recursion fails fast and the stack
# cannot be grown into the rest of the address space.
STACK_BYTES = 8 << 20
# With RLIMIT_AS standing in for a memory cgroup, leave room for the address
# space that is reserved but never touched (thread stacks, allocator arenas).
AS_SLACK_BYTES = 256 << 20


@dataclass(frozen=True, slots=True)
class Rlimit:
    resource: str  # the name in the resource module, e.g. "RLIMIT_NOFILE"
    soft: int | None  # None: unlimited
    hard: int | None
    threat: str


def plan_rlimits(limits: Limits, *, cgroups: frozenset[str]) -> tuple[Rlimit, ...]:
    """``cgroups`` names the controllers (memory, pids) that will be enforced by cgroups."""
    ops = [Rlimit("RLIMIT_CORE", 0, 0, "core dumps leak the box's memory and fill the disk")]
    ops.append(Rlimit("RLIMIT_STACK", STACK_BYTES, STACK_BYTES, "unbounded stack growth"))
    if limits.open_files is not None:
        ops.append(Rlimit("RLIMIT_NOFILE", limits.open_files, limits.open_files, "fd exhaustion"))
    if limits.file_size_bytes is not None:
        size = limits.file_size_bytes
        ops.append(Rlimit("RLIMIT_FSIZE", size, size, "one file fills a writable mount"))
    if limits.cpu_time_s is not None:
        # soft: SIGXCPU, hard a second later: SIGKILL for a process that ignores it
        seconds = math.ceil(limits.cpu_time_s)
        ops.append(Rlimit("RLIMIT_CPU", seconds, seconds + 1, "a busy loop burns CPU forever"))
    if limits.memory_bytes is not None and "memory" not in cgroups:
        size = limits.memory_bytes + AS_SLACK_BYTES
        ops.append(Rlimit("RLIMIT_AS", size, size, "memory bomb (no memory cgroup: per process)"))
    if limits.pids is not None and "pids" not in cgroups:
        ops.append(
            Rlimit("RLIMIT_NPROC", limits.pids, limits.pids, "fork bomb (no pids cgroup: per uid)")
        )
    return tuple(ops)


def render(ops: tuple[Rlimit, ...]) -> str:
    return "".join(
        f"{op.resource} soft={op.soft} hard={op.hard} threat={op.threat}\n" for op in ops
    )
