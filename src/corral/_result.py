"""What a sandboxed run returns: failure of the code inside is data, not an exception."""

from __future__ import annotations

import json
import signal
from dataclasses import asdict, dataclass
from typing import Any, Literal

from .net._events import NetworkEvent

LimitKind = Literal["timeout", "memory", "pids", "cpu_time", "output", "disk"]

# When several limits were hit, the first in this order is ``limit_hit``: the
# most direct cause of the end (an OOM kill explains the exit better than the
# timeout that a thrashing program may also have reached).
# A fork bomb also fills memory and burns CPU: the process limit it hit first
# names it. (pids.max refuses forks, it kills nothing: a run that hit it and
# ended badly was ended by it or by what it set off.)
LIMIT_PRECEDENCE: tuple[LimitKind, ...] = (
    "pids",
    "memory",
    "cpu_time",
    "output",
    "disk",
    "timeout",
)


@dataclass(frozen=True, slots=True)
class LimitEvidence:
    """What the host saw while one run (a box, a command, a cell) went on.

    ``own``: limits corral's own timers and caps enforced (``timeout``,
    ``output``, ``cpu_time`` from polling the cgroup, ``disk``).
    ``oom_kills`` / ``pids_limit_hits``: new OOM kills and refused forks in the
    cgroup during the run. ``cpu_time_s``: CPU seconds the run used (the
    cgroup's total, or the command's rusage), ``None`` when unknown.
    ``exit_code`` / ``signal``: how it ended (128+N counts as signal N: a shell
    reports its killed child so). ``shared``: the cgroup also counted other
    runs (the commands of one long-lived box), so its counters are this run's
    only if the run itself ended badly.
    """

    own: frozenset[LimitKind] = frozenset()
    oom_kills: int = 0
    pids_limit_hits: int = 0
    cpu_time_s: float | None = None
    cpu_time_limit_s: float | None = None
    exit_code: int = 0
    signal: int | None = None
    shared: bool = False


def decide_limits(evidence: LimitEvidence) -> tuple[LimitKind, ...]:
    """Every limit the run reached, most direct cause first (``limit_hit`` is
    the first). The one decision for every path: one-shot runs, commands and
    background commands, code cells, the server and the CLI."""
    e = evidence
    hit: set[LimitKind] = set(e.own)
    sig = e.signal
    if sig is None and 128 < e.exit_code < 128 + signal.NSIG:
        sig = e.exit_code - 128
    if not e.shared or e.exit_code != 0:
        if e.oom_kills > 0:
            hit.add("memory")
        if e.pids_limit_hits > 0:
            hit.add("pids")
    if sig in (signal.SIGXCPU, signal.SIGKILL) and e.cpu_time_limit_s is not None:
        if e.cpu_time_s is None:
            if sig == signal.SIGXCPU:
                hit.add("cpu_time")
        elif e.cpu_time_s >= e.cpu_time_limit_s * 0.5:
            # RLIMIT_CPU counts scheduler ticks, the cgroup exact nanoseconds: on a
            # loaded VM the tick count runs ahead (SIGXCPU came at 0.84 s of cgroup
            # time for a 1 s limit here), so the evidence only needs to be near
            hit.add("cpu_time")
    if sig == signal.SIGXFSZ:
        hit.add("disk")
    return tuple(k for k in LIMIT_PRECEDENCE if k in hit)


def not_run_message(name: str, exit_code: int, reason: str) -> bytes:
    """corral's stderr line for a command that could not start in the box
    (``exit_code`` 127: not found; 126: found but not executable), the same on
    every path (one-shot runs and long-lived sandboxes)."""
    if exit_code == 127:
        return f"corral: {name}: command not found in the box\n".encode(errors="replace")
    return f"corral: {name}: cannot be run in the box ({reason})\n".encode(errors="replace")


class ProcessOutcome:
    """What every finished command has: an exit status, a limit, its output."""

    __slots__ = ()
    exit_code: int
    limit_hit: LimitKind | None
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.limit_hit is None

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", errors="replace")


@dataclass(frozen=True, slots=True)
class RunResult(ProcessOutcome):
    """The outcome of one sandboxed command.

    ``exit_code`` follows the shell: 128+N when the command was killed by
    signal N (then ``signal`` is N), 127 when the command was not found in the
    box. ``limit_hit`` names the limit that ended or crippled the run, if any;
    ``limits_hit`` lists every limit that was reached. ``degraded`` lists the
    controls this host enforced more weakly than the policy asked, and why.
    """

    exit_code: int
    signal: int | None
    limit_hit: LimitKind | None
    limits_hit: tuple[LimitKind, ...]
    stdout: bytes
    stderr: bytes
    truncated: bool
    duration_s: float
    cpu_time_s: float | None
    peak_memory_bytes: int | None
    degraded: tuple[str, ...] = ()
    network: tuple[NetworkEvent, ...] = ()  # every decision of the proxy (mode allowlist)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stdout"] = self.stdout_text
        data["stderr"] = self.stderr_text
        data["limits_hit"] = list(self.limits_hit)
        data["degraded"] = list(self.degraded)
        data["network"] = [asdict(e) for e in self.network]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def result_from_dict(data: dict[str, Any]) -> RunResult:
    """The inverse of :meth:`RunResult.to_dict` (output text re-encoded as UTF-8)."""
    return RunResult(
        exit_code=int(data["exit_code"]),
        signal=data["signal"],
        limit_hit=data["limit_hit"],
        limits_hit=tuple(data["limits_hit"]),
        stdout=str(data["stdout"]).encode(),
        stderr=str(data["stderr"]).encode(),
        truncated=bool(data["truncated"]),
        duration_s=float(data["duration_s"]),
        cpu_time_s=data["cpu_time_s"],
        peak_memory_bytes=data["peak_memory_bytes"],
        degraded=tuple(data["degraded"]),
        network=tuple(NetworkEvent(**e) for e in data.get("network", ())),
    )
