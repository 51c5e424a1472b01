"""The bubblewrap backend: render the plans into a bwrap command line and run it.

Launch sequence (one linear containment sequence, like nsjail's):

1. Plan everything from the Policy (pure); refuse to start if a field cannot be
   enforced here.
2. As root, take a fresh unprivileged host uid for the box (bwrap started by
   root keeps host uid 0 for file permissions).
3. Create the box's cgroup and apply its limits.
4. Start bwrap with ``--block-fd``: it builds the namespaces and mounts, then
   waits before running anything. Its ``--info-fd`` tells us the box's init pid.
5. Put that pid into the cgroup and set its rlimits (inherited by everything
   the box will start), then release the block.
6. Collect output with a cap, enforce the wall clock and total CPU time, and
   on the way out kill the whole tree and remove every trace.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import errno
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from . import _cgroups, _seccomp, _workdir
from ._errors import HostToolMissing, SandboxError, UnsupportedPolicy
from ._identity import HostIdentity, acquire_host_identity, release_host_identity
from ._netrules import Rules
from ._policy import Policy
from ._proxy import PORT as PROXY_PORT
from ._proxy import Approval, NetworkEvent, Proxy, listen_in_box
from ._result import LimitEvidence, LimitKind, RunResult, decide_limits, not_run_message
from .plan import _capabilities, _mounts, _namespaces, _rlimits
from .plan import _cgroups as _plan_cgroups
from .plan import _seccomp as _plan_seccomp

BWRAP_INSTALL_HINT = (
    "install it with: sudo apt-get install bubblewrap (Fedora: dnf install bubblewrap)"
)
MIN_BWRAP = (0, 8, 0)  # --disable-userns, --size, --perms, --ro-bind-data
_CPU_POLL_S = 0.1
_DRAIN_AFTER_EXIT_S = 2.0
_PROXY_URL = f"http://127.0.0.1:{PROXY_PORT}"
PROXY_ENV = {
    name: value
    for base, value in (
        ("http_proxy", _PROXY_URL),
        ("https_proxy", _PROXY_URL),
        ("all_proxy", _PROXY_URL),
        ("no_proxy", "localhost,127.0.0.1,::1"),
    )
    for name in (base, base.upper())
}
_KILL_GRACE_S = 2.0


@dataclass(frozen=True, slots=True)
class BwrapInfo:
    path: str
    version: tuple[int, int, int]


@functools.cache
def find_bwrap() -> BwrapInfo:
    """The bwrap binary and its version, or HostToolMissing saying how to install it."""
    path = shutil.which("bwrap", path="/usr/local/bin:/usr/bin:/bin")
    if path is None:
        raise HostToolMissing("bubblewrap", BWRAP_INSTALL_HINT)
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, check=True, timeout=10, env={}
        ).stdout.decode()
    except (OSError, subprocess.SubprocessError) as exc:
        raise HostToolMissing(
            "bubblewrap", f"{path} does not run ({exc}); {BWRAP_INSTALL_HINT}"
        ) from exc
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", out)
    if match is None:
        raise HostToolMissing("bubblewrap", f"cannot read the version of {path}: {out!r}")
    major, minor, patch = (int(g) for g in match.groups())
    version = (major, minor, patch)
    if version < MIN_BWRAP:
        need = ".".join(map(str, MIN_BWRAP))
        raise HostToolMissing(
            "bubblewrap", f"version {need} or newer is needed, found {out.strip()}"
        )
    return BwrapInfo(path, version)


@functools.cache
def host_layout() -> _mounts.HostLayout:
    symlinks: list[tuple[str, str]] = []
    dirs: list[str] = []
    for path in _mounts.SYSTEM_DIRS:
        if os.path.islink(path):
            symlinks.append((path, os.readlink(path)))
        elif os.path.isdir(path):
            dirs.append(path)
    etc = tuple(p for p in _mounts.ETC_ALLOWLIST if os.path.exists(p))
    return _mounts.HostLayout(tuple(symlinks), tuple(dirs), etc)


@dataclass(frozen=True, slots=True)
class Plans:
    mounts: tuple[_mounts.MountOp, ...]
    namespaces: tuple[_namespaces.NamespaceOp, ...]
    capabilities: tuple[_capabilities.CapabilityOp, ...]
    rlimits: tuple[_rlimits.Rlimit, ...]
    seccomp: _plan_seccomp.SeccompPlan
    cgroups: tuple[_plan_cgroups.CgroupWrite, ...]
    cgroup_controllers: frozenset[str]
    degraded: tuple[str, ...]


def make_plans(
    policy: Policy,
    *,
    workspace_source: str | None,
    extra_files: tuple[_mounts.File, ...] = (),
    per_command_cpu: bool = False,
    fresh_workdir: bool = False,
) -> Plans:
    """Every plan for one box, and the list of controls this host weakens.

    ``per_command_cpu``: the box's first program (a long-lived box's agent)
    applies RLIMIT_CPU to each command it starts, so the agent's own CPU over
    a long life does not end the box. ``fresh_workdir``: ``workspace_source``
    is an empty directory corral made for this box (see ``_workdir``)."""
    limits = policy.limits
    for section in ("read_only", "writable"):
        for i, bind in enumerate(getattr(policy.filesystem, section)):
            if not os.path.exists(bind.source):
                raise UnsupportedPolicy(
                    f"filesystem.{section}[{i}].source",
                    f"{bind.source} does not exist on this host",
                )
    support = _cgroups.detect_cgroups()
    wanted = {
        "memory": limits.memory_bytes is not None,
        "pids": limits.pids is not None,
        "cpu": limits.cpu_cores is not None,
    }
    usable = frozenset(c for c in ("memory", "pids", "cpu") if c in support.controllers)
    degraded: list[str] = []
    fallbacks = {
        "memory": "RLIMIT_AS per process; shared memory (memfd, pipes) is not bounded",
        "pids": "RLIMIT_NPROC per uid",
        "cpu": "nothing for the rate; each process gets cpu_time_s of CPU (RLIMIT_CPU)",
    }
    for controller, needed in wanted.items():
        if needed and controller not in usable:
            degraded.append(
                f"limits: no {controller} cgroup ({support.reason}); "
                f"bounded by {fallbacks[controller]}"
            )
    if wanted["cpu"] and "cpu" not in usable and limits.cpu_time_s is None:
        # no quota and no CPU-time cap would be no CPU control at all: refuse
        raise UnsupportedPolicy(
            "limits.cpu_cores",
            f"cannot enforce a CPU quota without a cpu cgroup ({support.reason}) and "
            "limits.cpu_time_s is not set; set one of them to a finite value or cpu_cores to none",
        )
    if policy.network.mode == "open" and not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        raise UnsupportedPolicy(
            "network.mode",
            "'open' needs /dev/net/tun usable by this user for slirp4netns "
            "(it is mode 0666 on most hosts; here it is not): run as root, or use 'allowlist'",
        )
    if workspace_source is not None and limits.disk_bytes is not None:
        why = _workdir.image_support() if fresh_workdir else "it holds the caller's files in place"
        if why is not None:  # else: a bounded image backs it (_workdir.prepare)
            degraded.append(
                "limits.disk_bytes: the host workspace directory is not bounded in total "
                f"({why}), only per file (limits.file_size_bytes); /tmp and /dev/shm are "
                "bounded; corral serve's reaper ends a box whose workspace outgrows it"
            )
    cgroup_writes = (
        tuple(
            w
            for w in _plan_cgroups.plan_cgroups(limits, support.version or 2)
            if w.controller in usable
        )
        if support.version is not None
        else ()
    )
    seccomp = _plan_seccomp.plan_seccomp(policy.syscalls)
    for name, why in _seccomp.skipped_rules(seccomp):
        if "NOT filtered" in why:  # an old libseccomp: say so, on every result
            degraded.append(f"syscalls: {name} is {why}")
    return Plans(
        mounts=_mounts.plan_mounts(
            policy.filesystem,
            policy.identity,
            host_layout(),
            workspace_source=workspace_source,
            workspace_bytes=policy.workspace_bytes,
            extra_files=extra_files,
            resolv_conf=b"nameserver 10.0.2.3\n" if policy.network.mode == "open" else None,
        ),
        namespaces=_namespaces.plan_namespaces(policy.network, policy.identity),
        capabilities=_capabilities.plan_capabilities(policy.identity),
        rlimits=tuple(
            r
            for r in _rlimits.plan_rlimits(limits, cgroups=usable)
            if not (per_command_cpu and r.resource == "RLIMIT_CPU")
        ),
        seccomp=seccomp,
        cgroups=cgroup_writes,
        cgroup_controllers=usable,
        degraded=tuple(degraded),
    )


_PRLIMIT_FLAGS = {
    "RLIMIT_AS": "as",
    "RLIMIT_CORE": "core",
    "RLIMIT_CPU": "cpu",
    "RLIMIT_FSIZE": "fsize",
    "RLIMIT_NOFILE": "nofile",
    "RLIMIT_NPROC": "nproc",
    "RLIMIT_STACK": "stack",
}


def _limit(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


@functools.cache
def find_util(name: str) -> str:
    """A util-linux tool (prlimit, setpriv)."""
    path = shutil.which(name, path="/usr/local/bin:/usr/bin:/bin")
    if path is None:
        raise HostToolMissing(name, "install it with: sudo apt-get install util-linux")
    return path


class _Fds:
    """File descriptors handed to bwrap; all closed on exit, whatever happens."""

    def __init__(self) -> None:
        self.keep: list[int] = []  # our ends
        self.pass_: list[int] = []  # bwrap's ends, closed right after spawn

    def data(self, content: bytes) -> int:
        fd = os.memfd_create("corral-data", os.MFD_CLOEXEC)
        os.write(fd, content)
        os.lseek(fd, 0, os.SEEK_SET)
        self.pass_.append(fd)
        return fd

    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe2(os.O_CLOEXEC)
        return r, w

    def close_passed(self) -> None:
        for fd in self.pass_:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pass_.clear()

    def close_all(self) -> None:
        self.close_passed()
        for fd in self.keep:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.keep.clear()


_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ARG_VAR = "CORRAL_ARGV_"
_LAUNCH_SHELL = "/bin/sh"
_LAUNCH_PYTHON = "/usr/bin/python3"
# bwrap refuses more than 9000 arguments in all (options and --args): the
# policy's take a few hundred, the rest is the command's share through --setenv
_MAX_ENV_ARGS = 1000
# the fallback launcher, for an environment with names no POSIX shell passes
# on (dash drops them) or a long argv: the argv comes NUL-separated on an
# inherited memfd (above 2: bwrap's init closes it), 13 ms slower here
_PY_LAUNCHER = (
    "import os\n"
    f"fd = int(os.environ.pop('{_ARG_VAR}FD'))\n"
    "with open(fd, 'rb') as f:\n"
    "    argv = f.read().split(b'\\0')[:-1]\n"
    "try:\n"
    "    os.execvp(argv[0], argv)\n"
    "except OSError as e:\n"
    "    said = b': command not found in the box' if e.errno == 2 else (\n"
    "        f': cannot be run in the box ({e.strerror})'.encode())\n"
    "    os.write(2, b'corral: ' + argv[0] + said + b'\\n')\n"
    "    os._exit(127 if e.errno == 2 else 126)\n"
)
# what dash says when the shell launcher's exec fails ($0 is "corral"); the
# Python launcher says it in corral's words (not_run_message) itself
_SHELL_NOT_RUN = re.compile(rb"corral: 1: exec: (.*): ([^\n]*)\n")


def _launcher(
    command: Sequence[str], env: Sequence[tuple[str, str]], fds: _Fds
) -> tuple[list[str], list[str]]:
    """The box's first command line, which carries none of ``command``, and
    the ``--setenv`` options that carry ``command`` in its place.

    ``/proc/<pid>/cmdline`` of bwrap (and of setpriv and prlimit before it) is
    readable by every local user for the box's whole life, so the command's
    arguments (secrets, for some callers) must not be on it: they travel as
    environment variables inside the ``--args`` memfd, and a fixed shell line
    in the box turns them back into an argv, unsets them and execs it (or, see
    ``_PY_LAUNCHER``, in a memfd of their own). Only the command's own process
    then shows its argv, as any process does."""
    args = [os.fsencode(str(a)) for a in command]
    for arg in args:
        # a NUL would end the argument inside the NUL-separated --args memfd
        # and turn the rest into bwrap options (a bind of the host's /)
        if b"\0" in arg:
            raise ValueError("a command argument must not contain NUL bytes")
    shell_env = all(_SHELL_NAME.match(name) for name, _ in env)
    if len(args) <= _MAX_ENV_ARGS and shell_env:
        setenv: list[str] = []
        for i, arg in enumerate(args):
            setenv += ["--setenv", f"{_ARG_VAR}{i}", os.fsdecode(arg)]
        names = " ".join(f"{_ARG_VAR}{i}" for i in range(len(args)))
        quoted = " ".join(f'"${_ARG_VAR}{i}"' for i in range(len(args)))
        # $0 is "corral": a command that is not found reads
        # "corral: 1: exec: NAME: not found" (exit 127; 126 cannot run),
        # put in corral's words by _supervise (_SHELL_NOT_RUN)
        line = f'set -- {quoted}; unset {names}; exec "$@"'
        return [_LAUNCH_SHELL, "-c", line, "corral"], setenv
    argv_fd = fds.data(b"".join(arg + b"\0" for arg in args))
    return [_LAUNCH_PYTHON, "-I", "-S", "-c", _PY_LAUNCHER], [
        "--setenv",
        f"{_ARG_VAR}FD",
        str(argv_fd),
    ]


def render_argv(
    plans: Plans,
    policy: Policy,
    command: Sequence[str],
    fds: _Fds,
    extra_options: Sequence[str] = (),
    extra_env: Sequence[tuple[str, str]] = (),
) -> list[str]:
    """The command line that starts the box for ``plans``.

    bwrap's options travel in a memfd (``--args``), not on its command line:
    ``/proc/<pid>/cmdline`` is readable by every local user, and the options
    carry the box's environment (API keys, tokens). So does ``command``: the
    command line names only a fixed launcher (see ``_launcher``). Generated
    files and the seccomp program travel through memfds too; all are
    registered in ``fds``. ``extra_env`` is for the box's first program only.
    """
    # setpriv --pdeathsig: bwrap dies with the corral process that started it
    # (and takes the box with it, --die-with-parent): a box never outlives the
    # host-side supervisor that enforces its wall clock and output cap.
    argv: list[str] = [find_util("setpriv"), "--pdeathsig", "KILL", "--"]
    # rlimits are set by util-linux's prlimit just before bwrap starts, so the
    # box inherits them: root here may lack CAP_SYS_RESOURCE, which setting
    # them on the box's pid from outside would need.
    argv.append(find_util("prlimit"))
    for rl in plans.rlimits:
        argv.append(f"--{_PRLIMIT_FLAGS[rl.resource]}={_limit(rl.soft)}:{_limit(rl.hard)}")
    args: list[str] = [*extra_options]
    for nop in plans.namespaces:
        match nop:
            case _namespaces.Unshare(namespace="mount"):
                pass  # bwrap always unshares the mount namespace
            case _namespaces.Unshare(namespace=ns):
                args.append(f"--unshare-{ns}")
            case _namespaces.MapIdentity(uid=uid, gid=gid):
                args += ["--uid", str(uid), "--gid", str(gid)]
            case _namespaces.Hostname(name=name):
                args += ["--hostname", name]
            case _namespaces.DisableNestedUserns():
                args.append("--disable-userns")
            case _namespaces.DieWithParent():
                args.append("--die-with-parent")
            case _namespaces.NewSession():
                args.append("--new-session")
    for cop in plans.capabilities:
        match cop:
            case _capabilities.DropAllCapabilities():
                args += ["--cap-drop", "ALL"]
            case _capabilities.NoNewPrivs():
                pass  # bwrap sets PR_SET_NO_NEW_PRIVS unconditionally
    for mop in plans.mounts:
        match mop:
            case _mounts.RoBind(source=src, target=dst):
                args += ["--ro-bind", src, dst]
            case _mounts.Bind(source=src, target=dst):
                args += ["--bind", src, dst]
            case _mounts.Tmpfs(target=dst, size_bytes=size, mode=mode):
                args += ["--perms", f"{mode:04o}"]
                if size is not None:
                    args += ["--size", str(size)]
                args += ["--tmpfs", dst]
            case _mounts.Proc(target=dst):
                args += ["--proc", dst]
                # /proc/keys lists every key whose owner uid is mapped in the
                # box with the owner's "view" bit (a key's description names
                # what it is for): as an ordinary user the box's uid is the
                # caller's, so the host user's keys showed. key-users: their
                # uids and counts. Both become empty files (as in Docker).
                for name in ("keys", "key-users"):
                    args += [
                        "--perms",
                        "0444",
                        "--ro-bind-data",
                        str(fds.data(b"")),
                        f"{dst}/{name}",
                    ]
            case _mounts.Dev(target=dst):
                args += ["--dev", dst]
            case _mounts.Symlink(link_to=target, path=path):
                args += ["--symlink", target, path]
            case _mounts.Dir(path=path, mode=mode):
                args += ["--perms", f"{mode:04o}", "--dir", path]
            case _mounts.File(path=path, content=content, mode=mode):
                args += ["--perms", f"{mode:04o}", "--ro-bind-data", str(fds.data(content)), path]
            case _mounts.Hide(path=path, host_path=host_path):
                # the host path is under a read-only bind: the box cannot swap
                # it for a symlink or rename it between runs
                if os.path.isdir(host_path):
                    args += ["--perms", "0000", "--tmpfs", path, "--remount-ro", path]
                elif os.path.lexists(host_path):
                    args += ["--ro-bind", "/dev/null", path]
                # absent on the host: nothing to hide
            case _mounts.RemountRo(path=path):
                args += ["--remount-ro", path]
            case _mounts.Chdir(path=path):
                args += ["--chdir", path]
    args += ["--seccomp", str(fds.data(_seccomp.compile_bpf(plans.seccomp)))]
    args.append("--clearenv")
    for name, value in policy.env:
        args += ["--setenv", name, value]
    for name, value in extra_env:
        args += ["--setenv", name, value]
    launcher, carried = _launcher(command, policy.env, fds)
    args += carried
    options = fds.data(b"".join(os.fsencode(arg) + b"\0" for arg in args))
    return [*argv, "--", find_bwrap().path, "--args", str(options), "--", *launcher]


class _Output:
    """stdout and stderr with one shared cap: a flood costs the host bounded memory."""

    def __init__(self, cap: int | None) -> None:
        self.cap = cap
        self.chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self.total = 0
        self.truncated = False

    def add(self, stream: str, data: bytes) -> bool:
        """Keep ``data``; False once the cap is reached."""
        if self.cap is not None and self.total + len(data) > self.cap:
            data = data[: max(0, self.cap - self.total)]
            self.truncated = True
        self.chunks[stream].append(data)
        self.total += len(data)
        return not self.truncated

    def get(self, stream: str) -> bytes:
        return b"".join(self.chunks[stream])


async def _read_until_json(loop: asyncio.AbstractEventLoop, fd: int) -> dict[str, object] | None:
    """Read bwrap's --info-fd document; None if bwrap closed it without one (setup failed)."""
    buf = b""
    while True:
        fut: asyncio.Future[bytes] = loop.create_future()

        def ready(fut: asyncio.Future[bytes] = fut) -> None:
            if not fut.done():
                try:
                    fut.set_result(os.read(fd, 4096))
                except OSError as exc:
                    fut.set_exception(exc)

        loop.add_reader(fd, ready)
        try:
            chunk = await fut
        finally:
            loop.remove_reader(fd)
        if not chunk:
            return None
        buf += chunk
        with contextlib.suppress(ValueError):
            data = json.loads(buf)
            if isinstance(data, dict):
                return data


class Box:
    """One running box: bwrap, the box's init (a pidfd), its cgroup, its host uid.

    ``Box.start`` runs the launch sequence of the module docstring; ``close``
    tears everything down and is safe to call at any point, any number of times.
    """

    def __init__(self, policy: Policy, plans: Plans) -> None:
        self.policy = policy
        self.plans = plans
        self.fds = _Fds()
        self.identity: HostIdentity | None = None
        self.cgroup: _cgroups.SandboxCgroup | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.pidfd: int | None = None
        self.proxy: Proxy | None = None
        self.slirp: subprocess.Popen[bytes] | None = None
        self.approve: Approval | None = None
        self.on_network_event: Callable[[NetworkEvent], None] | None = None
        self.workspace_owned: str | None = None  # a fresh host workdir of corral's own
        self.workdir: _workdir.Workdir | None = None  # the host workdir, prepared as root
        self.workspace_source: str | None = None
        # the host's ends of the agent's channel (from the box, to the box)
        self.channel: tuple[int, int] | None = None
        self.started = 0.0
        self._closed = False

    @classmethod
    async def start(
        cls,
        command: Sequence[str],
        policy: Policy,
        *,
        workdir: str | os.PathLike[str] | None = None,
        extra_files: tuple[_mounts.File, ...] = (),
        stdin_pipe: bool = False,
        approve: Approval | None = None,
        on_network_event: Callable[[NetworkEvent], None] | None = None,
        own_workdir: bool = False,
        per_command_cpu: bool = False,
        channel: bool = False,
    ) -> Box:
        """``own_workdir``: ``workdir`` is a fresh, empty directory of corral's
        own (a server's workspace): as root it is backed by a bounded image for
        the run (``_workdir``), and can be mode 0700 (no other user or box reads it).

        ``channel``: give the box's first program a private two-pipe channel to
        the host (``Box.channel``: the host's read and write fds), named in its
        environment as ``CORRAL_CHANNEL_FDS=READ,WRITE``; the box's stdin and
        stdout are then /dev/null. The pipes sit above fd 2, which bwrap's init
        (pid 1 in the box, dumpable) closes: no process in the box but the
        first one holds them, and it must not pass them on."""
        if not command:
            raise ValueError("command must not be empty")
        if any("\0" in str(arg) for arg in command):
            raise ValueError("a command argument must not contain NUL bytes")
        if policy.network.mode == "allowlist":
            # every common tool finds the proxy from these (curl, pip, npm, git,
            # Python, Node): upper and lower case both; the policy's own win
            policy = policy.with_env({**PROXY_ENV, **dict(policy.env)}, replace=True)
        workspace_source = None
        if workdir is not None:
            path = Path(workdir).resolve()
            if not path.is_dir():
                raise FileNotFoundError(errno.ENOENT, "workdir is not a directory", str(workdir))
            workspace_source = str(path)
        box = cls(
            policy,
            make_plans(
                policy,
                workspace_source=workspace_source,
                extra_files=extra_files,
                per_command_cpu=per_command_cpu,
                fresh_workdir=own_workdir,
            ),
        )
        box.approve = approve
        box.on_network_event = on_network_event
        box.workspace_owned = workspace_source if own_workdir else None
        box.workspace_source = workspace_source
        try:
            await box._launch(command, stdin_pipe, channel)
        except BaseException:
            box.close()
            raise
        return box

    async def _launch(self, command: Sequence[str], stdin_pipe: bool, channel: bool) -> None:
        plans, fds = self.plans, self.fds
        if os.geteuid() == 0:
            self.identity = acquire_host_identity()
            if self.workspace_source is not None:
                # the box's uid may write the workdir through an idmapped view
                # of it (and a fresh one is bounded by an image): see _workdir
                _sweep_once()
                self.workdir = _workdir.prepare(
                    self.workspace_source,
                    uid=self.identity.uid,
                    gid=self.identity.gid,
                    fresh=self.workspace_owned is not None,
                    workspace_bytes=self.policy.workspace_bytes,
                )
                self.plans = plans = dataclasses.replace(
                    plans,
                    mounts=_mounts.with_workspace_source(
                        plans.mounts, self.policy.filesystem.workspace, self.workdir.path
                    ),
                )
        if plans.cgroups:
            _sweep_once()
            self.cgroup = _cgroups.SandboxCgroup.create(
                _cgroups.detect_cgroups(), f"box-{os.getpid()}-{time.monotonic_ns()}", plans.cgroups
            )
        info_r, info_w = fds.pipe()
        block_r, block_w = fds.pipe()
        fds.keep += [info_r, block_w]
        fds.pass_ += [info_w, block_r]
        extra_env: list[tuple[str, str]] = []
        if channel:
            from_box_r, from_box_w = fds.pipe()
            to_box_r, to_box_w = fds.pipe()
            fds.keep += [from_box_r, to_box_w]
            fds.pass_ += [to_box_r, from_box_w]
            self.channel = (from_box_r, to_box_w)
            extra_env.append(("CORRAL_CHANNEL_FDS", f"{to_box_r},{from_box_w}"))
        argv = render_argv(
            plans,
            self.policy,
            command,
            fds,
            ["--info-fd", str(info_w), "--block-fd", str(block_r)],
            extra_env,
        )
        identity = self.identity
        self.started = time.monotonic()

        def spawn() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin_pipe and not channel else subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if channel else subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=tuple(fds.pass_),
                env={},
                # root never runs a box as itself: see _identity
                user=identity.uid if identity else None,
                group=identity.gid if identity else None,
                extra_groups=[] if identity else None,
            )

        self.proc = proc = _spawn_in_fresh_keyring(spawn)
        fds.close_passed()
        info = await _read_until_json(asyncio.get_running_loop(), info_r)
        if info is None or not isinstance(info.get("child-pid"), int):
            raise _setup_failed(proc, identity)
        box_pid = int(str(info["child-pid"]))
        self.pidfd = _open_box(proc, box_pid)
        if self.pidfd is None:
            raise _setup_failed(proc, identity)
        fds.keep.append(self.pidfd)
        if self.cgroup is not None:
            try:
                self.cgroup.add_process(box_pid)
            except SandboxError:
                if proc.poll() is not None:  # bwrap gave up while we were placing it
                    raise _setup_failed(proc, identity) from None
                raise
        if self.policy.network.mode == "open":
            self.slirp = await _start_slirp(box_pid, fds)
        if self.policy.network.mode == "allowlist":
            net = self.policy.network
            self.proxy = Proxy(
                Rules(net.allow, net.deny),
                hosts=dict(net.hosts),
                approve=self.approve,
                on_event=self.on_network_event,
            )
            await self.proxy.serve(listen_in_box(self.pidfd))
        try:
            os.write(block_w, b"\0")
        except BrokenPipeError:
            raise _setup_failed(proc, identity) from None

    def kill(self) -> None:
        """SIGKILL everything in the box (idempotent; the box then ends)."""
        if self.pidfd is not None:
            _kill_box(self.pidfd, self.cgroup)

    def close(self) -> None:
        """Kill what still runs and remove every trace. Safe at any point, repeatedly."""
        if self._closed:
            return
        self._closed = True
        proc = self.proc
        if self.proxy is not None:
            self.proxy.shutdown()
        if self.slirp is not None:
            with contextlib.suppress(ProcessLookupError):
                self.slirp.kill()
            self.slirp.communicate()  # reaps it and closes its stderr pipe
        try:
            if proc is not None and proc.returncode is None:
                # The box may still be blocked: kill it BEFORE the block pipe
                # closes, because bwrap takes EOF on --block-fd as "go" and
                # would run the command unsupervised.
                if self.pidfd is not None:
                    _kill_box(self.pidfd, self.cgroup)
                else:
                    _abort_unopened(proc)
                try:
                    proc.wait(timeout=_KILL_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc is not None:
                for stream in (proc.stdin, proc.stdout, proc.stderr):
                    if stream is not None:
                        stream.close()
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
                    if self.identity is not None:
                        release_host_identity(self.identity)
                        self.identity = None
                    self.fds.close_all()


async def run_bwrap(
    command: Sequence[str],
    policy: Policy,
    *,
    workdir: str | os.PathLike[str] | None = None,
    stdin: bytes | None = None,
    approve: Approval | None = None,
) -> RunResult:
    """Run ``command`` once in a fresh box under ``policy`` and tear the box down."""
    box = await Box.start(
        command, policy, workdir=workdir, stdin_pipe=stdin is not None, approve=approve
    )
    try:
        assert box.proc is not None
        assert box.pidfd is not None
        result = await _supervise(
            asyncio.get_running_loop(),
            box.proc,
            box.pidfd,
            policy,
            box.plans,
            box.cgroup,
            stdin,
            box.started,
        )
        if box.proxy is not None:
            await box.proxy.close()  # every connection cut and on record
            result = dataclasses.replace(result, network=tuple(box.proxy.events))
    finally:
        box.close()
    return result


def sweep_orphans() -> None:
    """Clear the cgroups, workdir mounts and images of boxes whose owner was
    killed (a fresh workspace's content is copied out of its image first)."""
    _cgroups.sweep_orphans()
    if os.geteuid() == 0:
        _workdir.sweep_orphans()


@functools.cache
def _sweep_once() -> None:
    """Once per process, before its first box: :func:`sweep_orphans`."""
    sweep_orphans()


async def _start_slirp(box_pid: int, fds: _Fds) -> subprocess.Popen[bytes]:
    """Network mode open: slirp4netns gives the box's own namespace a tap device
    with outbound NAT in user space. --disable-host-loopback keeps the host's
    127.0.0.1 services out of reach; --enable-sandbox and --enable-seccomp
    confine slirp4netns itself, which parses the box's packets. It is handed
    the namespace as a descriptor corral opened (the box is still blocked), not
    a pid to look up."""
    path = shutil.which("slirp4netns", path="/usr/local/bin:/usr/bin:/bin")
    if path is None:
        raise HostToolMissing("slirp4netns", "install it with: sudo apt-get install slirp4netns")
    netns = os.open(f"/proc/{box_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    fds.pass_.append(netns)
    passed = [netns]
    argv = [
        find_util("setpriv"),
        "--pdeathsig",
        "KILL",
        "--",  # dies with corral
        path,
        "--configure",
        "--mtu=65520",
        "--disable-host-loopback",
        "--enable-sandbox",
        "--enable-seccomp",
    ]
    if os.geteuid() != 0:
        userns = os.open(f"/proc/{box_pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        fds.pass_.append(userns)
        passed.append(userns)
        argv.append(f"--userns-path=/proc/self/fd/{userns}")
    ready_r, ready_w = fds.pipe()
    fds.keep.append(ready_r)
    fds.pass_.append(ready_w)
    passed.append(ready_w)
    argv += [f"--ready-fd={ready_w}", "--netns-type=path", f"/proc/self/fd/{netns}", "tap0"]
    try:
        proc = subprocess.Popen(
            argv,
            pass_fds=tuple(passed),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={},
        )
    except OSError as exc:
        raise SandboxError(f"cannot start slirp4netns: {exc}") from exc
    fds.close_passed()
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[bytes] = loop.create_future()

    def on_ready() -> None:
        if not ready.done():
            ready.set_result(os.read(ready_r, 1))

    loop.add_reader(ready_r, on_ready)
    try:
        signal_byte = await asyncio.wait_for(ready, 10.0)
    except TimeoutError:
        signal_byte = b""
    finally:
        loop.remove_reader(ready_r)
    if signal_byte != b"1":
        proc.kill()
        _, err = proc.communicate()
        detail = err.decode(errors="replace")[-500:]
        raise SandboxError(f"slirp4netns did not bring the box's network up: {detail}")
    return proc


_KEYCTL = 250  # x86_64; the box's filter (and this) are written for x86_64
_KEYCTL_JOIN_SESSION_KEYRING = 1


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _spawn_in_fresh_keyring(
    spawn: Callable[[], subprocess.Popen[bytes]],
) -> subprocess.Popen[bytes]:
    """``spawn()`` on corral's spawner thread, which first joins a new, empty,
    anonymous session keyring: the box inherits that one, not the caller's.

    The box would otherwise possess the caller's session keyring, and with it
    every key in it (a login's tokens) for any keyctl the filter let through;
    keyctl is denied in the box and /proc/keys is masked, so this is the third
    lock. Keyrings are per thread (creds), so corral's own stays as it was. The
    thread lives as long as the process: ``--pdeathsig`` fires when the thread
    that spawned setpriv exits, not the process. Where keyctl is unavailable
    to corral itself (no CONFIG_KEYS, a filter around corral) there is no
    keyring to carry over, and the spawn goes on as is."""

    def run() -> subprocess.Popen[bytes]:
        # anonymous (name NULL): a keyring of its own, charged with quota
        # overrun allowed, freed when the box's last process exits
        _libc().syscall(_KEYCTL, _KEYCTL_JOIN_SESSION_KEYRING, None)
        return spawn()

    try:
        return _spawner().submit(run).result()
    except OSError as exc:
        raise SandboxError(f"cannot start bwrap: {exc}") from exc


@functools.cache
def _spawner() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="corral-spawn")


def _open_box(proc: subprocess.Popen[bytes], box_pid: int) -> int | None:
    """A pidfd on the box's init, or None if it is already gone.

    Taken while the box is blocked, and checked to be a child of our bwrap, so
    a recycled pid can never make corral signal or cgroup a host process.
    """
    try:
        pidfd = os.pidfd_open(box_pid)
    except ProcessLookupError:
        return None
    if _parent_of(box_pid) != proc.pid:
        os.close(pidfd)
        return None
    return pidfd


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # pid (comm) state ppid ...: comm may hold spaces and parentheses
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _abort_unopened(proc: subprocess.Popen[bytes]) -> None:
    """Kill a bwrap whose box we never got hold of, and the box with it.

    bwrap is stopped first so it cannot clone a box between our look at its
    children and its death; then its children (the blocked box) and it die.
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children", encoding="ascii") as f:
                children = [int(pid) for pid in f.read().split()]
        except OSError:
            children = []
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        os.kill(proc.pid, signal.SIGKILL)


def _kill_box(box_pidfd: int, cgroup: _cgroups.SandboxCgroup | None) -> None:
    """SIGKILL everything in the box.

    The box's init is killed, not the outer bwrap: the init's death empties its
    whole pid namespace (setsid daemons too), and the outer bwrap then reaps it
    and exits. Killing the outer bwrap first would orphan the init to the host's
    pid 1, which may never reap it.
    """
    if cgroup is not None:
        with contextlib.suppress(SandboxError):
            cgroup.kill_all()
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(box_pidfd, signal.SIGKILL)


async def _supervise(
    loop: asyncio.AbstractEventLoop,
    proc: subprocess.Popen[bytes],
    box_pidfd: int,
    policy: Policy,
    plans: Plans,
    cgroup: _cgroups.SandboxCgroup | None,
    stdin: bytes | None,
    started: float,
) -> RunResult:
    limits = policy.limits
    output = _Output(limits.output_bytes)
    hit: set[LimitKind] = set()
    done = loop.create_future()
    open_streams = {"stdout", "stderr"}
    assert proc.stdout is not None
    assert proc.stderr is not None
    streams = {"stdout": proc.stdout.fileno(), "stderr": proc.stderr.fileno()}

    def kill_box(reason: LimitKind) -> None:
        hit.add(reason)
        _kill_box(box_pidfd, cgroup)
        loop.call_later(_KILL_GRACE_S, kill_outer)

    def kill_outer() -> None:
        # last resort, if bwrap did not exit after its box was killed. os.kill,
        # not proc.kill(): Popen would reap it behind our back; until our
        # waitpid() below the pid cannot be reused
        if not exited.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)

    def on_readable(name: str) -> None:
        try:
            data = os.read(streams[name], 65536)
        except BlockingIOError:
            return
        if not data:
            loop.remove_reader(streams[name])
            open_streams.discard(name)
            if not open_streams and not done.done():
                done.set_result(None)
            return
        if not output.add(name, data):
            kill_box("output")
            for stream_name in list(open_streams):
                loop.remove_reader(streams[stream_name])
            open_streams.clear()
            if not done.done():
                done.set_result(None)

    for name, fd in streams.items():
        os.set_blocking(fd, False)
        loop.add_reader(fd, on_readable, name)

    if stdin is not None:
        assert proc.stdin is not None
        _feed_stdin(loop, proc.stdin, stdin)

    pidfd = os.pidfd_open(proc.pid)
    exited = loop.create_future()

    def on_exit() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, on_exit)

    # RLIMIT_CPU bounds each process; the cgroup's total bounds the box as a
    # whole (many processes each under the rlimit)
    cpu_timer = [loop.call_later(_CPU_POLL_S, lambda: cpu_check())]

    def cpu_check() -> None:
        if cgroup is not None and limits.cpu_time_s is not None:
            used = cgroup.stats().cpu_time_s
            if used is not None and used > limits.cpu_time_s:
                kill_box("cpu_time")
                return
        cpu_timer[0] = loop.call_later(_CPU_POLL_S, cpu_check)

    try:
        try:
            await asyncio.wait_for(asyncio.shield(exited), limits.wall_time_s)
        except TimeoutError:
            kill_box("timeout")
            await exited
        # The box is gone (or going): drain what is left in the pipes, bounded.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(done), _DRAIN_AFTER_EXIT_S)
    finally:
        cpu_timer[0].cancel()
        loop.remove_reader(pidfd)
        os.close(pidfd)
        for name in list(open_streams):
            loop.remove_reader(streams[name])
        if proc.stdin is not None and not proc.stdin.closed:
            loop.remove_writer(proc.stdin.fileno())
    _, status = os.waitpid(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    duration = time.monotonic() - started
    exit_code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    stats = cgroup.stats() if cgroup is not None else None
    # bwrap reports a signalled command as 128+N, like a shell: a command that
    # exits 152 by itself is indistinguishable from one killed by SIGXCPU. So
    # limits are read from host-side evidence where there is any (the box's
    # cgroup, which counts this run alone), and from the status only where there is none.
    sig = exit_code - 128 if exit_code > 128 and exit_code - 128 < signal.NSIG else None
    limits_hit = decide_limits(
        LimitEvidence(
            own=frozenset(hit),
            oom_kills=stats.oom_kills if stats is not None else 0,
            pids_limit_hits=stats.pids_limit_hits if stats is not None else 0,
            cpu_time_s=stats.cpu_time_s if stats is not None else None,
            cpu_time_limit_s=limits.cpu_time_s,
            exit_code=exit_code,
            signal=sig,
        )
    )
    stdout, stderr = output.get("stdout"), output.get("stderr")
    not_run = _SHELL_NOT_RUN.fullmatch(stderr) if exit_code in (126, 127) else None
    if not_run is not None:
        # the command does not exist (or cannot be run) in the box: shell
        # semantics, said in corral's words rather than the launcher's
        name, reason = (g.decode(errors="replace") for g in not_run.groups())
        stderr = not_run_message(name, exit_code, reason)
    # Only the cgroup sees the box's processes: bwrap's own rusage does not
    # cover them (the box's init reaps them), so without a cgroup: unknown.
    cpu_time = stats.cpu_time_s if stats is not None else None
    peak = stats.peak_memory_bytes if stats is not None else None
    return RunResult(
        exit_code=exit_code,
        signal=sig,
        limit_hit=limits_hit[0] if limits_hit else None,
        limits_hit=limits_hit,
        stdout=stdout,
        stderr=stderr,
        truncated=output.truncated,
        duration_s=duration,
        cpu_time_s=cpu_time,
        peak_memory_bytes=peak,
        degraded=plans.degraded,
    )


def _setup_failed(proc: subprocess.Popen[bytes], identity: HostIdentity | None) -> SandboxError:
    """bwrap exited before the command started: broken infrastructure, with bwrap's reason."""
    proc.wait()
    assert proc.stderr is not None
    message = proc.stderr.read().decode(errors="replace").strip() or "no message"
    hint = ""
    if identity is not None and "Can't find source path" in message:
        hint = (
            f" (as root every box runs as its own unprivileged host uid, {identity.uid} this "
            "time: a bound directory and each directory above it must be reachable by others)"
        )
    return SandboxError(f"bwrap could not set up the box: {message}{hint}")


def _feed_stdin(loop: asyncio.AbstractEventLoop, stream: IO[bytes], data: bytes) -> None:
    """Write ``data`` to the box's stdin as it reads it, then close it.

    Non-blocking: a box that never reads its stdin must not block the host.
    """
    fd = stream.fileno()
    os.set_blocking(fd, False)
    view = memoryview(data)

    def writable() -> None:
        nonlocal view
        try:
            view = view[os.write(fd, view[:65536]) :]
        except BlockingIOError:
            return
        except OSError:  # EPIPE: the box closed its stdin or is gone
            view = view[:0]
        if not view:
            loop.remove_writer(fd)
            with contextlib.suppress(OSError):
                stream.close()

    loop.add_writer(fd, writable)
