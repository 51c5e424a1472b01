"""One gVisor box: ``runsc run`` on a bundle corral wrote, from launch to the last trace.

Launch sequence:

1. Plan from the Policy and the host's facts (``make_plans``, as bwrap);
   refuse what this backend cannot enforce (network modes other than none).
2. Create the box's cgroup (``box-<owner pid>-<n>``, corral's shared cgroup
   code: the same limits, counters and orphan sweep as bwrap).
3. Write the bundle: ``config.json`` and a read-only root of symlinks, mount
   points and corral's own ``/etc`` files, in a 0700 directory.
4. ``setpriv --pdeathsig KILL -- /bin/sh -c 'echo 0 > cgroup.procs…; exec
   runsc …'``: the shell joins the box's cgroup before runsc starts, so the
   gofer, the sentry and everything the box runs are in it from their first
   instruction (and a memory limit counts gVisor's kernel too).

``aclose`` kills the cgroup's processes, ``runsc delete --force``, removes the
bundle, the cgroup and the workdir mount, each step even if one before failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from corral._errors import CorralError, SandboxError
from corral._policy import Policy
from corral.backends._base import BoxSpec, Usage
from corral.backends._process import close_streams, exit_future, feed_stdin
from corral.backends.gvisor._bundle import render_config, write_rootfs
from corral.backends.gvisor._runsc import (
    RUNSC_FLAGS,
    find_runsc,
    host_task_ceiling,
    pids_note,
    runsc_root,
)
from corral.backends.linux import _cgroups, _workdir
from corral.backends.linux._facts import check_bind_sources
from corral.backends.linux._procbox import CgroupProcessBox, find_util
from corral.plan import HostFacts, Plans, make_plans
from corral.plan._rlimits import Rlimit

_KILL_GRACE_S = 5.0


class GvisorBox(CgroupProcessBox):
    """One running gVisor sandbox. Implements ``corral.backends.Box``."""

    def __init__(
        self, spec: BoxSpec, policy: Policy, plans: Plans, degraded: tuple[str, ...]
    ) -> None:
        self.spec = spec
        self.policy = policy
        self.plans = plans
        self._degraded = degraded
        self.container_id = f"box-{os.getpid()}-{time.monotonic_ns()}"
        self.bundle: str | None = None
        self.cgroup: _cgroups.SandboxCgroup | None = None
        self.workdir: _workdir.Workdir | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._fds: list[int] = []
        self._channel: tuple[int, int] | None = None
        self._exited: asyncio.Future[int] | None = None
        self._usage = Usage()
        self._closing: asyncio.Future[None] | None = None

    # -- the Box interface ---------------------------------------------------------------

    @property
    def degraded(self) -> tuple[str, ...]:
        return self._degraded

    @property
    def network(self) -> None:
        return None

    def info(self) -> Mapping[str, str]:
        return {"backend": "gvisor", "container": self.container_id, "owner_pid": str(os.getpid())}

    def kill(self) -> None:
        """SIGKILL runsc, the sentry, the gofer and so the whole box (never waits)."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        if self.cgroup is not None:
            # every process of the box (sentry, gofer, runsc) is in its cgroup
            with contextlib.suppress(SandboxError, OSError):
                self.cgroup.signal_all()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()

    async def aclose(self) -> None:
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        # shielded: a caller cancelled while closing does not leave half a box behind
        await asyncio.shield(self._closing)

    # -- launch ------------------------------------------------------------------------

    @classmethod
    async def start(
        cls, spec: BoxSpec, facts: HostFacts, degraded_extra: tuple[str, ...]
    ) -> GvisorBox:
        command = spec.command
        if not command:
            raise ValueError("command must not be empty")
        if any("\0" in str(arg) for arg in command):
            raise ValueError("a command argument must not contain NUL bytes")
        from corral.backends.gvisor import refuse_network

        policy = spec.policy
        refuse_network(policy)
        workspace_source = None
        if spec.workdir is not None:
            path = Path(spec.workdir).resolve()
            if not path.is_dir():
                raise FileNotFoundError(
                    errno.ENOENT, "workdir is not a directory", str(spec.workdir)
                )
            workspace_source = str(path)
        check_bind_sources(policy)
        find_runsc()
        plans = make_plans(
            policy,
            facts,
            workspace_source=workspace_source,
            extra_files=spec.extra_files,
            per_command_cpu=spec.per_command_cpu,
            fresh_workdir=spec.own_workdir,
        )
        plans = _sentry_pids(plans, policy)
        box = cls(
            dataclasses.replace(spec, workdir=workspace_source),
            policy,
            plans,
            plans.degraded + degraded_extra,
        )
        try:
            await box._launch(workspace_source)
        except BaseException:
            box.kill()
            await box.aclose()
            raise
        return box

    async def _launch(self, workspace_source: str | None) -> None:
        spec, plans = self.spec, self.plans
        if workspace_source is not None and os.geteuid() == 0:
            # the box's uid (in the sentry) writes the caller's directory through
            # an idmapped view: the owner on disk appears as that uid (see _workdir)
            plans = await self.prepare_workdir(
                workspace_source,
                uid=self.policy.identity.uid,
                gid=self.policy.identity.gid,
                fresh=spec.own_workdir,
            )
        if plans.cgroups:
            self.cgroup = await asyncio.to_thread(
                _cgroups.SandboxCgroup.create,
                _cgroups.detect_cgroups(),
                self.container_id,
                plans.cgroups,
            )
        root = runsc_root()
        self.bundle = bundle = os.path.join(root, "bundles", self.container_id)
        channel = spec.stdio == "channel"
        config = render_config(plans, self.policy, spec.command, channel=channel)
        await asyncio.to_thread(_write_bundle, bundle, plans, config)
        procs = " ".join(f"{d}/cgroup.procs" for d in (self.cgroup.paths if self.cgroup else ()))
        argv = [
            find_util("setpriv"),
            "--pdeathsig",
            "KILL",  # runsc dies with corral; the sandbox dies with runsc (its own pdeathsig)
            "--",
            "/bin/sh",
            "-c",
            # join the box's cgroup first: nothing of the box runs outside it
            'for f in $CORRAL_CGROUP_PROCS; do echo 0 > "$f" || exit 125; done; exec "$@"',
            "corral",
            find_runsc().path,
            *RUNSC_FLAGS,
            "--root",
            os.path.join(root, "state"),
            "run",
            "--bundle",
            bundle,
            self.container_id,
        ]
        if channel:
            to_box_r, to_box_w = os.pipe2(os.O_CLOEXEC)
            from_box_r, from_box_w = os.pipe2(os.O_CLOEXEC)
            self._fds += [to_box_w, from_box_r]
            self._channel = (from_box_r, to_box_w)
            stdin: int = to_box_r
            stdout: int = from_box_w
        else:
            stdin = subprocess.PIPE if spec.stdin is not None else subprocess.DEVNULL
            stdout = subprocess.PIPE
        try:
            self.proc = proc = await asyncio.to_thread(
                subprocess.Popen,
                argv,
                stdin=stdin,
                stdout=stdout,
                stderr=subprocess.PIPE,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CORRAL_CGROUP_PROCS": procs},
            )
        except OSError as exc:
            raise SandboxError(f"cannot start runsc: {exc}") from exc
        finally:
            if channel:
                os.close(to_box_r)
                os.close(from_box_w)
        self._exited = exit_future(proc)
        if spec.stdin is not None and proc.stdin is not None:
            feed_stdin(asyncio.get_running_loop(), proc.stdin, spec.stdin)

    # -- teardown ------------------------------------------------------------------------

    async def _close(self) -> None:
        proc = self.proc
        try:
            if proc is not None and self._exited is not None and not self._exited.done():
                self.kill()
                try:
                    await asyncio.wait_for(asyncio.shield(self._exited), _KILL_GRACE_S)
                except TimeoutError:
                    self.kill()
                    await asyncio.shield(self._exited)
            if proc is not None:
                if proc.stdin is not None and not proc.stdin.closed:
                    asyncio.get_running_loop().remove_writer(proc.stdin.fileno())
                close_streams(proc)
        finally:
            self.usage()  # the last counters, kept for callers reading them after close
            await asyncio.to_thread(self._remove_traces)

    def _remove_traces(self) -> None:
        try:
            if self.bundle is not None:
                delete_container(self.container_id)
                shutil.rmtree(self.bundle, ignore_errors=True)
                self.bundle = None
        finally:
            try:
                if self.cgroup is not None:
                    self.cgroup.remove()
            finally:
                try:
                    if self.workdir is not None:
                        self.workdir.close()
                        self.workdir = None
                finally:
                    for fd in self._fds:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                    self._fds.clear()


def _write_bundle(bundle: str, plans: Plans, config: dict[str, object]) -> None:
    os.makedirs(os.path.dirname(bundle), mode=0o700, exist_ok=True)
    # 0700: config.json holds the box's environment and command (tokens, for some callers)
    os.mkdir(bundle, 0o700)
    rootfs = os.path.join(bundle, "rootfs")
    os.mkdir(rootfs, 0o755)
    write_rootfs(plans, rootfs)
    fd = os.open(os.path.join(bundle, "config.json"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "w", encoding="utf-8") as f:
        json.dump(config, f)


def _sentry_pids(plans: Plans, policy: Policy) -> Plans:
    """The policy's pids limit enforced inside gVisor's kernel, on the box's
    own tasks, and a ceiling on gVisor's host tasks in the host cgroup.

    The host cgroup counts the sentry's own threads and the ptrace stubs (over
    a hundred before the box runs anything): a box limit of 128 there made the
    sentry's Go runtime fail to start a thread and die with the box (the
    agent "exited silently" when a command ended beside a background one).
    Threat stopped either way: a fork bomb exhausting the host's process
    table. The box's cap is RLIMIT_NPROC in the sentry (gVisor enforces it;
    every box process has the box's one uid), so a fork fails with EAGAIN
    there; the host cgroup bounds what gVisor's tasks can take of the host."""
    pids = policy.limits.pids
    if pids is None:
        return plans
    ceiling = str(host_task_ceiling(pids))
    cgroups = tuple(
        dataclasses.replace(w, value=ceiling) if w.file == "pids.max" else w for w in plans.cgroups
    )
    rlimits = tuple(r for r in plans.rlimits if r.resource != "RLIMIT_NPROC")
    rlimits += (
        Rlimit("RLIMIT_NPROC", pids, pids, "fork bomb (gVisor's kernel counts the box's tasks)"),
    )
    degraded = (*plans.degraded, pids_note(pids))
    return dataclasses.replace(plans, cgroups=cgroups, rlimits=rlimits, degraded=degraded)


def delete_container(container_id: str) -> None:
    """``runsc delete --force``: the sandbox's processes and runsc's state go (blocking)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError, CorralError):
        subprocess.run(
            [
                find_runsc().path,
                *RUNSC_FLAGS,
                "--root",
                os.path.join(runsc_root(), "state"),
                "delete",
                "--force",
                container_id,
            ],
            capture_output=True,
            timeout=30,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
