"""Live usage of each sandbox as a short time series: CPU, memory, pids, disk.

``UsageHistory`` is a bounded ring of ``UsageSample``: the ``Service`` samples
every live sandbox each ``UsageConfig.interval_s`` (the box's cgroup through
``Box.usage()``, and the workspace size its disk check measured), stops when
the box ends, and keeps an ended box's ring for ``UsageConfig.keep_ended_s``
(at most ``keep_ended`` of them). Memory is bounded: ``samples`` per ring,
one ring per live sandbox plus the kept ended ones.

Read through ``Service.usage(key, sandbox_id)`` (the API's
``GET /v1/sandboxes/{id}/metrics``, the dashboard's charts): a key sees only
its own sandboxes' series.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from corral.backends import Usage


@dataclass(frozen=True, slots=True)
class UsageConfig:
    interval_s: float = 1.0  # between two samples of one sandbox
    samples: int = 300  # kept per sandbox (5 minutes at 1 s)
    keep_ended_s: float = 600.0  # an ended sandbox's series stays this long
    keep_ended: int = 64  # and at most this many ended series


@dataclass(frozen=True, slots=True)
class UsageSample:
    """One reading. ``None``: this backend or host does not count it.

    ``time``: Unix seconds. ``cpu_time_s``: CPU seconds used since the box
    started (all its processes). ``cpu_used_pct``: CPU used since the previous
    sample, in percent of one core (200 = two cores busy), as ``top`` shows it;
    None for the first sample. ``memory_bytes``: memory charged to the box now
    (page cache included, as its limit counts it). ``pids``: its tasks now.
    ``disk_bytes``: its workspace's size at the last disk check.
    """

    time: float
    cpu_time_s: float | None
    cpu_used_pct: float | None
    memory_bytes: int | None
    pids: int | None
    disk_bytes: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "cpu_time_s": self.cpu_time_s,
            "cpu_used_pct": self.cpu_used_pct,
            "memory_bytes": self.memory_bytes,
            "pids": self.pids,
            "disk_bytes": self.disk_bytes,
        }


@dataclass(eq=False, slots=True)
class UsageHistory:
    """The recent samples of one sandbox, oldest first; at most ``maxlen``."""

    interval_s: float
    samples: deque[UsageSample]
    ended_at: float | None = None  # monotonic: when the box ended (None: live)
    _last_cpu: tuple[float, float] | None = field(default=None)  # (monotonic, cpu_time_s)

    @classmethod
    def new(cls, config: UsageConfig) -> UsageHistory:
        return cls(config.interval_s, deque(maxlen=config.samples))

    def add(self, usage: Usage, disk_bytes: int | None) -> UsageSample:
        """Record ``usage`` (read now) and the workspace size; the sample."""
        mono = time.monotonic()
        pct: float | None = None
        cpu = usage.cpu_time_s
        if cpu is not None:
            if self._last_cpu is not None and mono > self._last_cpu[0]:
                then, used = self._last_cpu
                pct = round(max(0.0, cpu - used) / (mono - then) * 100, 1)
            self._last_cpu = (mono, cpu)
        sample = UsageSample(
            time=time.time(),
            cpu_time_s=cpu,
            cpu_used_pct=pct,
            memory_bytes=usage.memory_bytes,
            pids=usage.pids,
            disk_bytes=disk_bytes,
        )
        self.samples.append(sample)
        return sample

    def since(self, after: float | None) -> list[UsageSample]:
        """The samples taken after Unix time ``after`` (all when None)."""
        if after is None:
            return list(self.samples)
        return [sample for sample in self.samples if sample.time > after]
