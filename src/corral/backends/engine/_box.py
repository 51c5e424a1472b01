"""One engine box: the engine's ``run`` CLI process, its container, its traces.

The box is the container ``ENGINE run`` starts and stays attached to: its
stdin/stdout/stderr are the CLI's pipes, so ``stdio="pipes"`` reads the
command's output and ``stdio="channel"`` gives the agent its channel (moved
to fds 3 and 4 by the launcher in ``_argv``). The CLI exits with the
container's status. ``aclose`` removes the container (``rm -f``), the box's
files, its workdir view and its uid; ``sweep_orphans`` removes what a killed
owner left, by label and by the owner named in each container's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import glob
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from corral._errors import CorralError, HostToolMissing, SandboxError
from corral._policy import Policy
from corral.backends._base import BoxExit, BoxSpec, Usage
from corral.backends._process import close_streams, exit_future, feed_stdin
from corral.backends._process import fileno as _fileno
from corral.backends.engine import _argv, _dockerapi
from corral.backends.engine._engine import Engine
from corral.backends.engine._seccomp import render as render_seccomp
from corral.backends.linux import _cgroups, _workdir
from corral.backends.linux._facts import check_bind_sources
from corral.backends.linux._identity import (
    HostIdentity,
    acquire_host_identity,
    release_host_identity,
)
from corral.plan import HostFacts, Plans, _mounts, make_plans
from corral.plan._mounts import File, Hide, Symlink

STATE_DIR = "/run/corral-engine"  # per-box files (seccomp profile, /etc files): root only
_KILL_GRACE_S = 5.0


def _owner_tag(pid: int) -> str | None:
    """``<pid>-<start time>`` of a live process (a recycled pid has another start)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f"{pid}-{int(f.read().rsplit(b')', 1)[1].split()[19])}"
    except (OSError, IndexError, ValueError):
        return None


class EngineBox:
    """One running container. Implements ``corral.backends.Box``."""

    def __init__(self, engine: Engine, spec: BoxSpec, policy: Policy, plans: Plans) -> None:
        self.engine = engine
        self.spec = spec
        self.policy = policy
        self.plans = plans
        owner = _owner_tag(os.getpid()) or str(os.getpid())
        self.name = f"corral-{owner}-{time.monotonic_ns()}"
        self.state_dir = os.path.join(STATE_DIR, self.name)
        self.identity: HostIdentity | None = None
        self.workdir: _workdir.Workdir | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._exited: asyncio.Future[int] | None = None
        self._killers: list[subprocess.Popen[bytes]] = []
        self._cgroup: _cgroups.SandboxCgroup | None = None
        self._usage = Usage()
        self._oom_checked: asyncio.Future[None] | None = None
        self._closing: asyncio.Future[None] | None = None
        self._created = False  # docker: a container exists before the CLI runs

    # -- the Box interface ---------------------------------------------------------------

    @property
    def degraded(self) -> tuple[str, ...]:
        return self.plans.degraded

    @property
    def channel(self) -> tuple[int, int] | None:
        if self.spec.stdio != "channel" or self.proc is None:
            return None
        out, inp = _fileno(self.proc.stdout), _fileno(self.proc.stdin)
        return None if out is None or inp is None else (out, inp)

    @property
    def stdout(self) -> int | None:
        if self.spec.stdio == "channel" or self.proc is None:
            return None
        return _fileno(self.proc.stdout)

    @property
    def stderr(self) -> int | None:
        return _fileno(self.proc.stderr if self.proc is not None else None)

    @property
    def env(self) -> Mapping[str, str]:
        return dict(self.policy.env)

    @property
    def network(self) -> None:
        return None

    async def wait(self) -> BoxExit:
        assert self._exited is not None, "the box was not started"
        code = await asyncio.shield(self._exited)
        if self._oom_checked is None:
            self._oom_checked = asyncio.ensure_future(asyncio.to_thread(self._read_oom_flag))
        await asyncio.shield(self._oom_checked)
        return BoxExit.from_code(code)

    def usage(self) -> Usage:
        cgroup = self._cgroup or self._find_cgroup()
        if cgroup is not None:
            with contextlib.suppress(CorralError, OSError):
                stats = cgroup.stats()
                if stats.cpu_time_s is not None:  # gone once the container ended
                    self._usage = Usage(
                        cpu_time_s=stats.cpu_time_s,
                        peak_memory_bytes=stats.peak_memory_bytes,
                        oom_kills=max(stats.oom_kills, self._usage.oom_kills),
                        pids_limit_hits=max(stats.pids_limit_hits, self._usage.pids_limit_hits),
                        memory_bytes=stats.memory_bytes,
                        pids=stats.pids,
                    )
        return self._usage

    def info(self) -> Mapping[str, str]:
        return {
            "backend": self.engine.kind,
            "runtime": self.engine.runtime,
            "container": self.name,
            "owner_pid": str(os.getpid()),
        }

    def exec_failure(self, exit_code: int, stderr: bytes) -> bytes | None:
        # the engine's init (tini) reports a failed exec in its own words:
        # not translated yet
        return None

    def kill(self) -> None:
        """SIGKILL the container (its pid 1, so everything in it). Never waits."""
        if self.proc is None or (self._exited is not None and self._exited.done()):
            return
        with contextlib.suppress(OSError):
            self._killers.append(
                # retried: a kill right after launch may come before the engine
                # has created the container (then it would miss it)
                subprocess.Popen(
                    [
                        "/bin/sh",
                        "-c",
                        'for i in $(seq 100); do "$@" 2>/dev/null && exit; sleep 0.05; done',
                        "corral-kill",
                        *self.engine.command,
                        "kill",
                        "--signal=KILL",
                        self.name,
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env=self.engine.env(),
                )
            )

        # and the CLI itself: it may be blocked writing output nobody reads
        # any more (an output cap), and would never see its container end
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    async def pause(self) -> None:
        """The engine's own ``pause`` (its cgroup freezer). Idempotent."""
        await self._pause_cli("pause", "paused")

    async def resume(self) -> None:
        await self._pause_cli("unpause", "not paused")

    async def _pause_cli(self, verb: str, already: str) -> None:
        if self._exited is not None and self._exited.done():
            if verb == "pause":
                raise SandboxError("cannot pause: the box has ended")
            return
        proc = await asyncio.create_subprocess_exec(
            *self.engine.command,
            verb,
            self.name,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=self.engine.env(),
        )
        _, err = await proc.communicate()
        message = err.decode(errors="replace").strip()
        if proc.returncode != 0 and already not in message.lower():
            raise SandboxError(f"cannot {verb} the container: {message or 'no message'}")

    async def aclose(self) -> None:
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    # -- evidence ------------------------------------------------------------------------

    def _find_cgroup(self) -> _cgroups.SandboxCgroup | None:
        """The container's v1 cgroup directories (docker: ``<parent>/<id>``,
        podman: ``<parent>/libpod-<id>``), once its id is in the cidfile."""
        try:
            cid = Path(self.state_dir, "cid").read_text().strip()
        except OSError:
            return None
        if not cid:
            return None
        dirs: dict[str, str] = {}
        for ctrl in ("memory", "pids", "cpuacct", "cpu"):
            for leaf in (cid, f"libpod-{cid}"):
                path = f"/sys/fs/cgroup/{ctrl}{_argv.CGROUP_PARENT}/{leaf}"
                if os.path.isdir(path):
                    dirs[ctrl] = path
        if not dirs:
            return None
        self._cgroup = _cgroups.SandboxCgroup(1, self.name, dirs)
        return self._cgroup

    def _read_oom_flag(self) -> None:
        """The engine's own record that the memory limit killed the box."""
        if self.policy.limits.memory_bytes is None:
            return
        out = subprocess.run(
            [*self.engine.command, "inspect", "--format={{.State.OOMKilled}}", self.name],
            capture_output=True,
            env=self.engine.env(),
            check=False,
        )
        if out.stdout.strip() == b"true":
            self._usage = dataclasses.replace(self._usage, oom_kills=max(1, self._usage.oom_kills))

    # -- launch --------------------------------------------------------------------------

    @classmethod
    async def start(cls, engine: Engine, spec: BoxSpec, facts: HostFacts) -> EngineBox:
        command = spec.command
        if not command:
            raise ValueError("command must not be empty")
        if any("\0" in str(arg) for arg in command):
            raise ValueError("a command argument must not contain NUL bytes")
        engine.refuse_unsupported(spec.policy)
        workspace_source = None
        if spec.workdir is not None:
            path = Path(spec.workdir).resolve()
            if not path.is_dir():
                raise FileNotFoundError(errno.ENOENT, "workdir is not a directory", spec.workdir)
            workspace_source = str(path)
        check_bind_sources(spec.policy)
        await engine.ready()
        identity = acquire_host_identity() if os.geteuid() == 0 else None
        uid, gid = (identity.uid, identity.gid) if identity else (os.getuid(), os.getgid())
        policy = spec.policy
        plans = make_plans(
            policy,
            facts,
            workspace_source=workspace_source,
            extra_files=spec.extra_files,
            per_command_cpu=spec.per_command_cpu,
            fresh_workdir=spec.own_workdir,
            image_root=spec.image is not None,
        )
        plans = dataclasses.replace(
            plans,
            mounts=_own_resolv_conf(_own_ids(plans.mounts, policy, uid, gid)),
            degraded=plans.degraded + runtime_notes(engine.runtime, policy),
        )
        box = cls(engine, dataclasses.replace(spec, workdir=workspace_source), policy, plans)
        box.identity = identity
        try:
            await box._launch(workspace_source)
        except BaseException:
            await box.aclose()
            raise
        return box

    async def _launch(self, workspace_source: str | None) -> None:
        spec, engine = self.spec, self.engine
        if workspace_source is not None and self.identity is not None:
            # the box's uid may write the workdir through an idmapped, nosuid,
            # nodev view of it (the bwrap backend's, see linux/_workdir)
            self.workdir = await asyncio.to_thread(
                _workdir.prepare,
                workspace_source,
                uid=self.identity.uid,
                gid=self.identity.gid,
                fresh=spec.own_workdir,
                workspace_bytes=self.policy.workspace_bytes,
            )
            self.plans = dataclasses.replace(
                self.plans,
                mounts=_mounts.with_workspace_source(
                    self.plans.mounts, self.policy.filesystem.workspace, self.workdir.path
                ),
            )
        files = await asyncio.to_thread(self._write_files)
        init_path, init_source = engine.init_path, None
        if spec.image is not None:
            # the image's root, read-only: nothing of the host's /usr
            image = await engine.user_image(spec.image)
            if spec.stdio == "pipes":
                init_path, init_source = engine.image_init_path, engine.image_init_source
                if not os.path.isfile(init_source):
                    raise HostToolMissing(
                        "tini-static", "install it with: sudo apt-get install tini"
                    )
        else:
            symlinks = tuple(op for op in self.plans.mounts if isinstance(op, Symlink))
            image = await engine.base_image(symlinks, self.policy.filesystem.workspace)
        inputs = _argv.RunInputs(
            kind=engine.kind,
            name=self.name,
            owner=str(os.getpid()),
            image=image,
            uid=self.identity.uid if self.identity else os.getuid(),
            gid=self.identity.gid if self.identity else os.getgid(),
            cidfile=os.path.join(self.state_dir, "cid"),
            seccomp_file=os.path.join(self.state_dir, "seccomp.json"),
            files=files,
            channel=spec.stdio == "channel",
            stdin=spec.stdin is not None,
            init_path=init_path,
            nproc=engine.default_nproc,
            init_source=init_source,
            # an image's python3 is wherever its PATH says
            python="python3" if spec.image is not None else "/usr/bin/python3",
            runtime=engine.runtime,
        )
        run = _argv.render_run(self.plans, self.policy, spec.command, inputs)
        channel = spec.stdio == "channel"
        env = {**dict(self.policy.env), **engine.env()}
        if not channel:
            env.update(_argv.command_env(spec.command))
        sock = _dockerapi.socket_path(engine.env()) if engine.kind == "docker" else None
        if sock is not None:
            # docker: created through the Engine API, from the same flags, with
            # the masks its CLI cannot add (see _dockerapi); attached by the CLI
            name, body = _dockerapi.create_body(run[1:], env)
            self._created = True
            cid = await asyncio.to_thread(_dockerapi.create, sock, name, body)
            _dockerapi.write_cidfile(inputs.cidfile, cid)
            attach = ["--interactive"] if "--interactive" in run else []
            argv = [*engine.command, "start", "--attach", *attach, name]
            env = engine.env()
        else:
            argv = [*engine.command, *run]
        try:
            self.proc = proc = await asyncio.to_thread(
                subprocess.Popen,
                argv,
                stdin=subprocess.PIPE if channel or spec.stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
        except OSError as exc:
            raise SandboxError(f"cannot start {engine.kind}: {exc}") from exc
        self._exited = exit_future(proc)
        if spec.stdin is not None and proc.stdin is not None:
            feed_stdin(asyncio.get_running_loop(), proc.stdin, spec.stdin)

    def _write_files(self) -> dict[str, str]:
        """corral's files for the box (generated /etc, the agent, the profile), root only."""
        os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
        os.mkdir(self.state_dir, 0o700)
        with open(os.path.join(self.state_dir, "seccomp.json"), "w", encoding="utf-8") as f:
            f.write(render_seccomp(self.plans.seccomp))
        files: dict[str, str] = {}
        for i, op in enumerate(self.plans.mounts):
            if isinstance(op, File | Hide) and not (
                isinstance(op, Hide) and os.path.isdir(op.host_path)
            ):
                host = os.path.join(self.state_dir, f"file-{i}")
                fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(op.content if isinstance(op, File) else b"")
                # readable by the box's uid through the bind; never writable
                os.chmod(host, op.mode & 0o555 if isinstance(op, File) else 0o444)
                files[op.path] = host
        return files

    # -- teardown ------------------------------------------------------------------------

    async def _close(self) -> None:
        proc = self.proc
        try:
            if proc is not None and self._exited is not None:
                if not self._exited.done():
                    self.kill()
                    try:
                        await asyncio.wait_for(asyncio.shield(self._exited), _KILL_GRACE_S)
                    except TimeoutError:
                        with contextlib.suppress(ProcessLookupError):
                            proc.kill()
                        await asyncio.shield(self._exited)
                if proc.stdin is not None and not proc.stdin.closed:
                    asyncio.get_running_loop().remove_writer(proc.stdin.fileno())
                close_streams(proc)
        finally:
            self.usage()
            await asyncio.to_thread(self._remove_traces)

    def _remove_traces(self) -> None:
        try:
            if self.proc is not None or self._created:
                # the container and anything it held (anonymous volumes)
                subprocess.run(
                    [*self.engine.command, "rm", "--force", "--volumes", self.name],
                    capture_output=True,
                    env=self.engine.env(),
                    check=False,
                )
            for killer in self._killers:
                with contextlib.suppress(ProcessLookupError):
                    killer.kill()  # the container is gone: nothing left to kill
                killer.wait()
            self._killers.clear()
        finally:
            try:
                shutil.rmtree(self.state_dir, ignore_errors=True)
                if self.workdir is not None:
                    self.workdir.close()
                    self.workdir = None
            finally:
                if self.identity is not None:
                    release_host_identity(self.identity)
                    self.identity = None


def _own_ids(
    ops: tuple[_mounts.MountOp, ...], policy: Policy, uid: int, gid: int
) -> tuple[_mounts.MountOp, ...]:
    """The generated /etc/passwd and /etc/group naming the uid and gid the box
    really runs as: with no user namespace, the policy's ids are not the box's."""
    ident = policy.identity
    swaps = {
        "/etc/passwd": (
            f"{ident.username}:x:{ident.uid}:{ident.gid}:",
            f"{ident.username}:x:{uid}:{gid}:",
        ),
        "/etc/group": (f"{ident.username}:x:{ident.gid}:", f"{ident.username}:x:{gid}:"),
    }
    out: list[_mounts.MountOp] = []
    for op in ops:
        if isinstance(op, File) and op.path in swaps:
            old, new = swaps[op.path]
            op = dataclasses.replace(op, content=op.content.replace(old.encode(), new.encode(), 1))
        out.append(op)
    return tuple(out)


def runtime_notes(runtime: str, policy: Policy) -> tuple[str, ...]:
    """``degraded`` notes of boxes on gVisor (``runtime="runsc"``)."""
    if runtime != "runsc":
        return ()
    from corral.backends.gvisor import _DEGRADED
    from corral.backends.gvisor._runsc import pids_note

    pids = policy.limits.pids
    return _DEGRADED + ((pids_note(pids),) if pids is not None else ())


def _own_resolv_conf(ops: tuple[_mounts.MountOp, ...]) -> tuple[_mounts.MountOp, ...]:
    """An empty /etc/resolv.conf of corral's where the plans have none (no
    network): the engine's own is bound from its data root, a host path
    (threat: the box learning the host's layout from /proc/self/mountinfo)."""
    if any(isinstance(op, File) and op.path == "/etc/resolv.conf" for op in ops):
        return ops
    return (*ops, File("/etc/resolv.conf", b"", 0o444))


def sweep_orphans(engine: Engine) -> list[str]:
    """Remove the containers (and their files) of corral processes that are gone.

    A container's name carries its owner's pid and start time; one whose owner
    is not that live process is removed (``rm -f``), whatever its state."""
    out = subprocess.run(
        [*engine.command, "ps", "--all", f"--filter=label={_argv.LABEL}", "--format={{.Names}}"],
        capture_output=True,
        env=engine.env(),
        check=False,
    )
    removed = []
    names = set(out.stdout.decode(errors="replace").split()) if out.returncode == 0 else set()
    for name in names:
        if _orphaned(name):
            subprocess.run(
                [*engine.command, "rm", "--force", "--volumes", name],
                capture_output=True,
                env=engine.env(),
                check=False,
            )
            removed.append(name)
    for path in glob.glob(os.path.join(STATE_DIR, "corral-*")):
        if _orphaned(os.path.basename(path)) and os.path.basename(path) not in names - set(removed):
            shutil.rmtree(path, ignore_errors=True)
    if os.geteuid() == 0:
        _workdir.sweep_orphans()
    return removed


def _orphaned(name: str) -> bool:
    parts = name.split("-")  # corral-<pid>-<start>-<ns>
    if len(parts) != 4 or parts[0] != "corral":
        return False
    try:
        pid = int(parts[1])
    except ValueError:
        return False
    return _owner_tag(pid) != f"{parts[1]}-{parts[2]}"
