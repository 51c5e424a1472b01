"""What every box run as a host process tree in a corral cgroup shares (the
bwrap and gvisor backends): its pipes, its exit, its usage read from the
cgroup, pause and resume by the cgroup freezer, the util-linux tools it is
started through. (The process helpers themselves, which the engine backend
uses too, are in ``backends/_process.py``.)"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import re
import shutil
import subprocess
from collections.abc import Mapping

from corral._errors import CorralError, HostToolMissing, SandboxError
from corral._policy import Policy
from corral._result import not_run_message
from corral.backends._base import BoxExit, Usage
from corral.backends._process import fileno
from corral.backends.linux import _cgroups, _workdir
from corral.plan import Plans, _mounts

# what the POSIX shell launcher (``sh -c '... exec "$@"' corral``, bwrap's
# and gvisor's) says when its exec fails: dash's words (a Python launcher
# says not_run_message's itself)
_SHELL_NOT_RUN = re.compile(rb"corral: 1: exec: (.*): ([^\n]*)\n")


@functools.cache
def find_util(name: str) -> str:
    """A util-linux tool a process box is started through (setpriv, prlimit)."""
    path = shutil.which(name, path="/usr/local/bin:/usr/bin:/bin")
    if path is None:
        raise HostToolMissing(name, "install it with: sudo apt-get install util-linux")
    return path


class CgroupProcessBox:
    """The part of the Box interface a process tree in ``cgroup`` gives alike.
    Subclasses set the attributes when they launch."""

    policy: Policy
    plans: Plans
    workdir: _workdir.Workdir | None
    proc: subprocess.Popen[bytes] | None
    cgroup: _cgroups.SandboxCgroup | None
    _channel: tuple[int, int] | None
    _exited: asyncio.Future[int] | None
    _closing: asyncio.Future[None] | None
    _usage: Usage

    async def prepare_workdir(self, source: str, *, uid: int, gid: int, fresh: bool) -> Plans:
        """As root: ``source`` made the box's workspace, an idmapped view in
        which ``uid``/``gid`` own what its owner on disk owns (bounded by an
        image when ``fresh``: see _workdir), and the plans' workspace mount
        pointed at it. Sets ``workdir`` and ``plans``; returns the plans."""
        self.workdir = await asyncio.to_thread(
            _workdir.prepare,
            source,
            uid=uid,
            gid=gid,
            fresh=fresh,
            workspace_bytes=self.policy.workspace_bytes,
        )
        self.plans = dataclasses.replace(
            self.plans,
            mounts=_mounts.with_workspace_source(
                self.plans.mounts, self.policy.filesystem.workspace, self.workdir.path
            ),
        )
        return self.plans

    @property
    def channel(self) -> tuple[int, int] | None:
        return self._channel

    @property
    def stdout(self) -> int | None:
        return fileno(self.proc.stdout if self.proc is not None else None)

    @property
    def stderr(self) -> int | None:
        return fileno(self.proc.stderr if self.proc is not None else None)

    @property
    def env(self) -> Mapping[str, str]:
        return dict(self.policy.env)

    def exec_failure(self, exit_code: int, stderr: bytes) -> bytes | None:
        found = _SHELL_NOT_RUN.fullmatch(stderr) if exit_code in (126, 127) else None
        if found is None:
            return None
        name, reason = (g.decode(errors="replace") for g in found.groups())
        return not_run_message(name, exit_code, reason)

    async def wait(self) -> BoxExit:
        assert self._exited is not None, "the box was not started"
        return BoxExit.from_code(await asyncio.shield(self._exited))

    def usage(self) -> Usage:
        if self.cgroup is not None:
            with contextlib.suppress(CorralError, OSError):
                stats = self.cgroup.stats()
                self._usage = Usage(
                    cpu_time_s=stats.cpu_time_s,
                    peak_memory_bytes=stats.peak_memory_bytes,
                    oom_kills=stats.oom_kills,
                    pids_limit_hits=stats.pids_limit_hits,
                    memory_bytes=stats.memory_bytes,
                    pids=stats.pids,
                )
        return self._usage  # the last reading, once the cgroup is gone

    async def pause(self) -> None:
        """Freeze the box's cgroup (the freezer: ``freezer.state`` on v1,
        ``cgroup.freeze`` on v2), waiting in a thread until the kernel says frozen."""
        if self.cgroup is None:
            raise SandboxError(
                "cannot pause: the box has no cgroup here (cgroups unavailable to this user)"
            )
        if self._closing is not None or (self._exited is not None and self._exited.done()):
            raise SandboxError("cannot pause: the box has ended")
        await asyncio.to_thread(self.cgroup.freeze)

    async def resume(self) -> None:
        if self.cgroup is not None:
            await asyncio.to_thread(self.cgroup.thaw)
