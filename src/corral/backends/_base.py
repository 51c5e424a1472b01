"""The backend seam: what every backend implements, and what it is handed.

A ``Backend`` turns a ``BoxSpec`` (whose only isolation input is the
``Policy``) into a running ``Box``; everything above it (``AsyncSandbox``,
``run``, the audit, the server, ``corral doctor``) talks to these two
Protocols only. Modelled on httpx's transports (one small interface, passed
in) and jupyter_client's provisioners (a Popen-like lifecycle, info to
re-adopt a box, third parties found through an entry-point group).
"""

from __future__ import annotations

import signal as _signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from corral._errors import UnsupportedPolicy
from corral._policy import Policy
from corral.net._events import Approval, NetworkEvent
from corral.plan._mounts import File

Status = Literal["ok", "warn", "fail"]
BoxFile = File  # a read-only file placed in the box: path, content, mode


@dataclass(frozen=True, slots=True)
class Check:
    """One line of ``corral doctor``: what a backend can enforce here, and the fix."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class BoxSpec:
    """What to start. ``policy`` is the only isolation input; the rest is not isolation.

    ``command``: the box's first program (argv, non-empty, no NUL bytes).
    ``workdir``: a host directory bound as the workspace (None: a private,
    size-limited tmpfs). ``own_workdir``: ``workdir`` is a fresh, empty
    directory of corral's own (a server's workspace), which a backend may
    back with a bounded image. ``extra_files``: read-only files placed in the
    box (the agent). ``stdio``: ``"pipes"`` gives the command pipes for
    stdout and stderr (and stdin when ``stdin`` is set; else /dev/null);
    ``"channel"`` gives the first program a private two-pipe channel to the
    host (``Box.channel``) and /dev/null as stdin and stdout, stderr a pipe
    (diagnostics). ``per_command_cpu``: the first program (an agent) applies
    ``limits.cpu_time_s`` to each command itself, so the box gets no
    RLIMIT_CPU of its own. ``on_network_request(host, port)`` and
    ``on_network_event(event)``: the allowlist proxy's approval and event
    callbacks (network mode ``allowlist``). ``image``: a container image
    whose root (read-only) the box runs instead of the host's system
    directories (engine backends; e.g. ``localhost/corral-default:<tag>`` from
    ``corral image build``); it needs only ``python3`` for an agent, and has
    the code runtime at ``/opt/corral/runtime`` if it was built from corral's
    default image. None: the host's ``/usr`` bound read-only. A backend that
    cannot run images refuses one (``UnsupportedPolicy`` naming ``image``)."""

    command: tuple[str, ...]
    policy: Policy
    workdir: str | None = None
    own_workdir: bool = False
    extra_files: tuple[BoxFile, ...] = ()
    stdio: Literal["pipes", "channel"] = "pipes"
    stdin: bytes | None = None
    per_command_cpu: bool = False
    on_network_request: Approval | None = None
    on_network_event: Callable[[NetworkEvent], None] | None = None
    image: str | None = None


def refuse_image(spec: BoxSpec, backend: str) -> None:
    """``UnsupportedPolicy("image", ...)`` from a backend that runs the host's
    system directories only, when ``spec`` names an image."""
    if spec.image is not None:
        raise UnsupportedPolicy(
            "image",
            f"the {backend} backend runs the host's system directories, not images; "
            f"run {spec.image!r} with --backend docker or podman",
        )


@dataclass(frozen=True, slots=True)
class BoxExit:
    """How the box's first program ended. ``exit_code`` as a shell reports it
    (128+N for a program killed by signal N); ``signal`` is N then, else None."""

    exit_code: int
    signal: int | None

    @classmethod
    def from_code(cls, exit_code: int) -> BoxExit:
        """Normalise a status: a negative code (Popen's -N) becomes 128+N."""
        if exit_code < 0:
            exit_code = 128 - exit_code
        sig = exit_code - 128 if 128 < exit_code < 128 + _signal.NSIG else None
        return cls(exit_code, sig)


@dataclass(frozen=True, slots=True)
class Usage:
    """What the box has used so far, from host-side counters. ``None``: this
    backend or host does not count it (no cgroup). ``oom_kills`` and
    ``pids_limit_hits`` are events so far (processes the memory limit killed,
    forks the process limit refused): compare two readings for one run.
    ``memory_bytes`` and ``pids`` are now (the cgroup's ``memory.current`` or
    v1 ``memory.usage_in_bytes``, page cache included; ``pids.current``)."""

    cpu_time_s: float | None = None
    peak_memory_bytes: int | None = None
    oom_kills: int = 0
    pids_limit_hits: int = 0
    memory_bytes: int | None = None
    pids: int | None = None


@runtime_checkable
class BoxNetwork(Protocol):
    """The box's allowlist proxy, run by the backend on the host."""

    @property
    def events(self) -> Sequence[NetworkEvent]:
        """Every decision so far, oldest first (kept after the box closes)."""
        ...

    def update(self, allow: Sequence[str], deny: Sequence[str]) -> None:
        """New rules for new connections (already validated by the Policy)."""
        ...


@runtime_checkable
class Box(Protocol):
    """One running box. Made by ``Backend.launch``; ended by ``aclose``."""

    @property
    def degraded(self) -> tuple[str, ...]:
        """Controls this box enforces more weakly than the policy asks (each says how)."""
        ...

    @property
    def channel(self) -> tuple[int, int] | None:
        """The host's (read, write) fds of the agent channel (``stdio="channel"``)."""
        ...

    @property
    def stdout(self) -> int | None:
        """The host's read fd of the command's stdout (``stdio="pipes"``)."""
        ...

    @property
    def stderr(self) -> int | None:
        """The host's read fd of the command's (or the agent's) stderr."""
        ...

    @property
    def env(self) -> Mapping[str, str]:
        """The first program's environment: the policy's plus the backend's (proxy)."""
        ...

    @property
    def network(self) -> BoxNetwork | None:
        """The allowlist proxy (network mode ``allowlist``), else None."""
        ...

    async def wait(self) -> BoxExit:
        """Until the first program (and so the box) has ended; how it ended."""
        ...

    def usage(self) -> Usage:
        """Counters so far (cheap enough to poll every 0.1 s)."""
        ...

    def info(self) -> Mapping[str, str]:
        """What ``Backend.reattach`` needs to find this box again."""
        ...

    def exec_failure(self, exit_code: int, stderr: bytes) -> bytes | None:
        """corral's words (``corral: NAME: command not found in the box``, 127;
        ``cannot be run in the box (REASON)``, 126) when this box's launcher
        could not exec a one-shot command and ``stderr`` holds nothing but the
        launcher's complaint; None otherwise (the output stands as it is)."""
        ...

    def kill(self) -> None:
        """SIGKILL everything in the box. Idempotent; never blocks."""
        ...

    async def pause(self) -> None:
        """Freeze every process of the box in place: no CPU, memory and state
        kept (and still counted against its limits). Returns once frozen.
        Idempotent. ``SandboxError`` if this host cannot freeze the box."""
        ...

    async def resume(self) -> None:
        """Let a paused box run again. Idempotent."""
        ...

    async def aclose(self) -> None:
        """Kill what still runs and remove every trace of the box. Idempotent;
        never blocks the event loop (blocking teardown runs in a thread)."""
        ...


@runtime_checkable
class Backend(Protocol):
    """A way to run boxes. ``name`` is what ``--backend`` and ``get_backend`` take."""

    @property
    def name(self) -> str: ...

    def check(self, policy: Policy) -> tuple[str, ...]:
        """The controls this host would weaken for ``policy`` (as in
        ``Box.degraded``), or ``UnsupportedPolicy`` naming the field it
        cannot enforce at all. Starts nothing."""
        ...

    async def launch(self, spec: BoxSpec) -> Box:
        """Start a box. On any failure nothing is left behind (processes,
        cgroups, mounts, fds); ``UnsupportedPolicy``, ``HostToolMissing``,
        ``SandboxError`` say why."""
        ...

    async def sweep(self) -> None:
        """Remove what boxes of a killed owner left behind (cgroups, mounts, images)."""
        ...

    def doctor(self) -> list[Check]:
        """What this host can enforce with this backend, and how to fix the rest."""
        ...

    async def reattach(self, info: Mapping[str, str]) -> Box | None:
        """The box ``info`` (from ``Box.info``) names, if it is still there and
        this backend can adopt it; None otherwise."""
        ...
