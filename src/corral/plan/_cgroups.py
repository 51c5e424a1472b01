"""Plan the cgroup writes that enforce ``Policy.limits``: pure data, no I/O.

cgroup v1 and v2 spell the same limits differently, so the planner takes the
version the runtime detected (``corral._cgroups.detect_cgroups``). The result is
ordered and the runtime applies it in order: on v1 the kernel refuses a
``memory.memsw.limit_in_bytes`` below ``memory.limit_in_bytes``, so when a
limit is lowered the plain limit goes first and memory+swap after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from corral._errors import UnsupportedPolicy
from corral._policy import Limits

CPU_PERIOD_US = 100_000
# CFS refuses quotas below 1 ms per period: 0.01 cores at the 100 ms period.
_MIN_CPU_QUOTA_US = 1_000


@dataclass(frozen=True, slots=True)
class CgroupWrite:
    """Write ``value`` to ``file`` in the sandbox's cgroup of ``controller``.

    ``threat`` names what the write stops. ``fallback`` is applied instead when
    ``file`` does not exist on this kernel (v1 without swap accounting has no
    ``memory.memsw.*``); a write without a fallback whose file is absent is a
    refusal to start, never a silent skip.
    """

    controller: str
    file: str
    value: str
    threat: str
    fallback: CgroupWrite | None = None


def plan_cgroups(limits: Limits, version: Literal[1, 2]) -> tuple[CgroupWrite, ...]:
    """The writes, in order, that enforce ``limits`` on a cgroup of ``version``.

    ``None`` limits produce no write; swap is always off (``Limits`` accepts
    only ``swap_bytes == 0``). Raises ``UnsupportedPolicy`` for a CPU share
    the kernel cannot express.
    """
    if version not in (1, 2):
        raise ValueError(f"cgroup version must be 1 or 2, not {version!r}")
    quota_us = None
    if limits.cpu_cores is not None:
        quota_us = round(limits.cpu_cores * CPU_PERIOD_US)
        if quota_us < _MIN_CPU_QUOTA_US:
            raise UnsupportedPolicy(
                "limits.cpu_cores",
                f"{limits.cpu_cores} is below 0.01 cores, the smallest CFS quota (1 ms per 100 ms)",
            )
    return _plan_v1(limits, quota_us) if version == 1 else _plan_v2(limits, quota_us)


_MEMORY_BOMB = "memory bomb exhausts host RAM"
_SWAP = "box pushes memory into swap, evading its memory limit and thrashing the host"
_FORK_BOMB = "fork bomb exhausts the host's process table"
_CPU_HOG = "busy loops starve the host and other boxes of CPU"


def _plan_v1(limits: Limits, quota_us: int | None) -> tuple[CgroupWrite, ...]:
    swappiness = CgroupWrite("memory", "memory.swappiness", "0", _SWAP)
    writes = [
        # A new v1 cgroup inherits oom_kill_disable: at its limit the box would
        # hang forever instead of being killed.
        CgroupWrite("memory", "memory.oom_control", "0", "box at its memory limit hangs forever"),
    ]
    if limits.memory_bytes is None:
        writes.append(swappiness)
    else:
        memory = str(limits.memory_bytes)
        writes += [
            CgroupWrite("memory", "memory.limit_in_bytes", memory, _MEMORY_BOMB),
            # After limit_in_bytes: the kernel refuses memsw below the plain limit.
            # memsw == limit means no swap at all; without swap accounting, the
            # weaker swappiness=0 keeps reclaim from swapping the box's pages.
            CgroupWrite("memory", "memory.memsw.limit_in_bytes", memory, _SWAP, swappiness),
        ]
    if limits.pids is not None:
        writes.append(CgroupWrite("pids", "pids.max", str(limits.pids), _FORK_BOMB))
    if quota_us is not None:
        writes += [
            CgroupWrite("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US), _CPU_HOG),
            CgroupWrite("cpu", "cpu.cfs_quota_us", str(quota_us), _CPU_HOG),
        ]
    return tuple(writes)


def _plan_v2(limits: Limits, quota_us: int | None) -> tuple[CgroupWrite, ...]:
    writes: list[CgroupWrite] = []
    if limits.memory_bytes is not None:
        writes.append(CgroupWrite("memory", "memory.max", str(limits.memory_bytes), _MEMORY_BOMB))
    writes += [
        CgroupWrite("memory", "memory.swap.max", "0", _SWAP),
        # One OOM kill takes the whole box: no half-killed survivors left running.
        CgroupWrite("memory", "memory.oom.group", "1", "OOM leaves a half-killed box running"),
    ]
    if limits.pids is not None:
        writes.append(CgroupWrite("pids", "pids.max", str(limits.pids), _FORK_BOMB))
    if quota_us is not None:
        writes.append(CgroupWrite("cpu", "cpu.max", f"{quota_us} {CPU_PERIOD_US}", _CPU_HOG))
    return tuple(writes)


def render(writes: tuple[CgroupWrite, ...]) -> str:
    """One line per write, for golden files and debugging."""
    lines = []
    for w in writes:
        line = f"{w.controller}: {w.file} = {w.value}  # {w.threat}"
        if w.fallback is not None:
            line += f" (if absent: {w.fallback.file} = {w.fallback.value})"
        lines.append(line)
    return "".join(f"{line}\n" for line in lines)
