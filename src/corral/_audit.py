"""``corral audit``: prove, on this host and for this policy, that the walls hold.

Every probe is a small program run inside a real box under the policy being
audited; it reports what it observed and the host decides. For abuse probes
the host does not take the box's word at all: it judges from what it measured
itself (cgroup counters, its own clock, the output it received), so a
compromised probe cannot lie its way to a pass.

A probe that does not apply to the policy is reported ``skip`` with the
reason, never dropped. The probes are the conformance suite every backend
must pass.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import fnmatch
import json
import os
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Literal
from xml.etree import ElementTree

from . import _runtime
from ._errors import CorralError
from ._policy import Policy
from ._result import RunResult
from ._run import run_async
from ._sandbox import AsyncSandbox
from .backends import Backend, resolve_backend

Verdict = Literal["pass", "fail", "skip", "error"]
BOX_PYTHON = "/usr/bin/python3"

# Prepended to every in-box probe: ``attempt(label, fn)`` records "ok" or the
# errno name (or the exception's name) under ``label`` in ``out``.
PRELUDE = r"""
import ctypes, errno, json, mmap, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def attempt(label, fn):
    try:
        fn()
        out[label] = "ok"
    except OSError as exc:
        out[label] = errno.errorcode.get(exc.errno, str(exc.errno))
    except Exception as exc:
        out[label] = type(exc).__name__
def sys_call(*args):
    def go():
        r = libc.syscall(*args)
        if r < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    return go
def in_child(fn):
    # the call's errno name, 'ok', or how the child died: a seccomp filter may
    # kill a foreign-ABI call (runc's bad-arch action: SIGSYS) instead of failing it
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:
        r = fn()
        os.write(wr, (errno.errorcode.get(-r, 'returned %d' % r) if r < 0 else 'ok').encode())
        os._exit(0)
    os.close(wr)
    status = os.waitpid(pid, 0)[1]
    said = os.read(rd, 64).decode()
    if said:
        return said
    if os.WIFSIGNALED(status):
        return 'SIGSYS' if os.WTERMSIG(status) == 31 else 'signal %d' % os.WTERMSIG(status)
    return 'status %d' % status
def machine_code(code):
    buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    return ctypes.CFUNCTYPE(ctypes.c_long)(addr), buf
"""


@dataclass(frozen=True, slots=True)
class Outcome:
    result: Verdict
    detail: str


@dataclass(frozen=True, slots=True)
class ProbeReport:
    id: str
    title: str
    threat: str
    mechanism: str
    result: Verdict
    detail: str
    duration_s: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Context:
    """What a probe may use: the policy under audit, and ways to run boxes under it."""

    policy: Policy
    backend: Backend = field(default_factory=lambda: resolve_backend(None))
    host_service_port: int = 0

    async def box(self, command: list[str], policy: Policy | None = None) -> RunResult:
        return await run_async(command, policy=policy or self.policy, backend=self.backend)

    def sandbox(
        self, policy: Policy | None = None, *, runtime: str | None = _runtime.DEFAULT
    ) -> AsyncSandbox:
        """A long-lived sandbox (60 s) on the backend under audit."""
        return AsyncSandbox(
            policy or self.policy, timeout_s=60, runtime=runtime, backend=self.backend
        )

    async def observe(self, body: str, policy: Policy | None = None) -> dict[str, str]:
        """Run ``PRELUDE + body`` in a box; the JSON it prints in ``out``."""
        code = PRELUDE + body + "\nprint(json.dumps(out))"
        result = await self.box([BOX_PYTHON, "-c", code], policy)
        if result.exit_code != 0 or not result.stdout.strip():
            raise ProbeError(
                f"the probe program failed (exit {result.exit_code}): "
                f"{result.stderr_text.strip()[-300:]}"
            )
        data = json.loads(result.stdout.splitlines()[-1])
        if not isinstance(data, dict):
            raise ProbeError("the probe printed no observations")
        return {str(k): str(v) for k, v in data.items()}


class ProbeError(Exception):
    """The probe itself could not run: reported as ``error``, never as a pass."""


ProbeFn = Callable[[Context], Awaitable[Outcome]]


@dataclass(frozen=True)
class Probe:
    id: str
    title: str
    threat: str
    mechanism: str
    check: ProbeFn
    applies: Callable[[Policy], str | None] = field(default=lambda policy: None)


PROBES: list[Probe] = []


def probe(
    id: str,
    title: str,
    threat: str,
    mechanism: str,
    applies: Callable[[Policy], str | None] | None = None,
) -> Callable[[ProbeFn], ProbeFn]:
    def register(fn: ProbeFn) -> ProbeFn:
        PROBES.append(Probe(id, title, threat, mechanism, fn, applies or (lambda policy: None)))
        return fn

    return register


def denied(
    id: str,
    title: str,
    threat: str,
    mechanism: str,
    body: str,
    expect: Iterable[str] = ("EPERM",),
    applies: Callable[[Policy], str | None] | None = None,
) -> None:
    """A probe that tries each attempt in ``body`` and passes if every one fails as expected."""
    allowed = frozenset(expect)

    async def check(ctx: Context) -> Outcome:
        seen = await ctx.observe(body)
        bad = {label: value for label, value in seen.items() if value not in allowed}
        if bad:
            return Outcome("fail", ", ".join(f"{k}: {v}" for k, v in sorted(bad.items())))
        return Outcome("pass", ", ".join(sorted(set(seen.values()))))

    PROBES.append(Probe(id, title, threat, mechanism, check, applies or (lambda policy: None)))


def _network_none(policy: Policy) -> str | None:
    """Direct egress must fail: no route at all. ('allowlist' routes every TCP
    connection to the proxy instead: ``net.transparent`` checks it there.)"""
    if policy.network.mode != "none":
        return f"not applicable: network mode {policy.network.mode}"
    return None


def _network_closed(policy: Policy) -> str | None:
    """No ICMP, no DNS lookup, no host loopback: in 'none' and in 'allowlist' alike."""
    if policy.network.mode not in ("none", "allowlist"):
        return f"not applicable: network mode {policy.network.mode}"
    return None


def _allowlist(policy: Policy) -> str | None:
    if policy.network.mode != "allowlist":
        return f"not applicable: network mode {policy.network.mode}"
    return None


# -- the original self-test -----------------------------------------------------------


@probe(
    "selftest.compute",
    "basic compute works",
    "a box too tight to be useful",
    "the box runs ordinary programs",
)
async def _compute(ctx: Context) -> Outcome:
    result = await ctx.box([BOX_PYTHON, "-c", "print(sum(i * i for i in range(1000)))"])
    if result.stdout.strip() == b"332833500":
        return Outcome("pass", "sum of squares computed")
    return Outcome("fail", f"exit {result.exit_code}: {result.stderr_text.strip()[-200:]}")


@probe(
    "selftest.workspace_rw",
    "the workspace is readable and writable",
    "a box that cannot keep its own files",
    "the workspace is a writable mount",
)
async def _workspace(ctx: Context) -> Outcome:
    seen = await ctx.observe(
        "attempt('write', lambda: open('probe.txt', 'w').write('ok'))\n"
        "attempt('read', lambda: open('probe.txt').read() == 'ok' or 1 / 0)"
    )
    if set(seen.values()) == {"ok"}:
        return Outcome("pass", f"read and wrote in {ctx.policy.filesystem.workspace}")
    return Outcome("fail", str(seen))


@probe(
    "selftest.ssh_key",
    "the host user's SSH key is unreachable",
    "stealing ~/.ssh/id_rsa of the user running corral",
    "host home directories are not mounted",
)
async def _ssh(ctx: Context) -> Outcome:
    paths = sorted({os.path.expanduser("~/.ssh/id_rsa"), "/root/.ssh/id_rsa"})
    seen = await ctx.observe(
        "\n".join(f"attempt({p!r}, lambda: open({p!r}).read())" for p in paths)
    )
    return _all_in(seen, {"ENOENT", "EACCES"})


@probe(
    "selftest.network",
    "an outbound connection is blocked",
    "exfiltration to an attacker's server",
    "an empty network namespace",
    applies=_network_none,
)
async def _net_basic(ctx: Context) -> Outcome:
    seen = await ctx.observe(
        "s = socket.socket(); s.settimeout(3)\n"
        "attempt('connect', lambda: s.connect(('1.1.1.1', 443)))"
    )
    return _all_in(seen, {"ENETUNREACH"})


@probe(
    "selftest.identity",
    "processes run unprivileged, as a non-root host identity",
    "root in the box acting as root on host files",
    "user namespace; as root, a per-box unprivileged host uid",
)
async def _identity(ctx: Context) -> Outcome:
    seen = await ctx.observe(
        "out['uid'] = str(os.getuid())\n"
        "out['root_file'] = 'absent'\n"
        "attempt('root_file', lambda: open('/probe-root-only/secret').read())"
    )
    if seen["uid"] == "0":
        return Outcome("fail", "uid 0 inside the box")
    return Outcome("pass", f"uid {seen['uid']} inside")


@probe(
    "selftest.memory",
    "the memory limit is enforced",
    "a memory bomb exhausting host RAM",
    "memory cgroup (RLIMIT_AS without one)",
)
async def _memory(ctx: Context) -> Outcome:
    return await _memory_bomb(ctx, "x = bytearray(ALLOC); x[::4096] = b'a' * len(x[::4096])")


async def _memory_bomb(ctx: Context, code: str, allow_enospc: bool = False) -> Outcome:
    limit = ctx.policy.limits.memory_bytes
    if limit is None:
        return Outcome("fail", "limits.memory_bytes is not set: nothing stops a memory bomb")
    limit = min(limit, 1 << 30)
    policy = ctx.policy.with_limits(memory_bytes=limit, wall_time_s=30.0)
    alloc = limit * 2
    result = await ctx.box(
        [BOX_PYTHON, "-c", f"ALLOC = {alloc}\n{code}\nprint('survived')"], policy
    )
    if result.limit_hit == "memory":
        peak = result.peak_memory_bytes
        return Outcome("pass", f"killed at the memory limit (peak {peak} bytes)")
    if b"survived" not in result.stdout and (
        b"MemoryError" in result.stderr or (allow_enospc and b"No space" in result.stderr)
    ):
        return Outcome("pass", "allocation refused" + _weakened(result))
    return Outcome("fail", f"not stopped: exit {result.exit_code}, limit {result.limit_hit}")


def _weakened(result: RunResult) -> str:
    return f" (weakened: {result.degraded[0]})" if result.degraded else ""


def _all_in(seen: dict[str, str], allowed: set[str]) -> Outcome:
    bad = {k: v for k, v in seen.items() if v not in allowed}
    if bad:
        return Outcome("fail", ", ".join(f"{k}: {v}" for k, v in sorted(bad.items())))
    return Outcome("pass", ", ".join(sorted(set(seen.values()))))


# -- filesystem -------------------------------------------------------------------------

_SECRETS = {
    "shadow": "/etc/shadow",
    "gshadow": "/etc/gshadow",
    "sudoers": "/etc/sudoers",
    "ssh_host_key": "/etc/ssh/ssh_host_ed25519_key",
}

denied(
    "fs.host_secrets",
    "/etc/shadow, sudoers and host keys are absent",
    "reading password hashes and host keys",
    "a generated /etc, no host files",
    "\n".join(f"attempt({k!r}, lambda: open({v!r}).read())" for k, v in _SECRETS.items()),
    expect=("ENOENT",),
)
denied(
    "fs.root_home",
    "/root is absent",
    "reading root's files and keys",
    "host home directories are not mounted",
    "attempt('root', lambda: os.listdir('/root'))\n"
    "attempt('root_ssh', lambda: open('/root/.ssh/id_rsa').read())",
    expect=("ENOENT",),
)
denied(
    "fs.host_homes",
    "/home is absent",
    "reading users' files and keys",
    "host home directories are not mounted",
    "attempt('home', lambda: os.listdir('/home'))",
    expect=("ENOENT",),
)
denied(
    "fs.proc_root",
    "/proc/1/root leads nowhere",
    "escaping through another process's root",
    "a fresh procfs of the box's own pid namespace",
    "attempt('proc1', lambda: open('/proc/1/root/etc/shadow').read())\n"
    "attempt('proc1_work', lambda: os.listdir('/proc/1/root/root'))",
    expect=("ENOENT", "EACCES"),
)
denied(
    "fs.traversal",
    "'..' from the workspace stays in the box",
    "path traversal to host files",
    "the box's root is its own tmpfs",
    "attempt('dotdot', lambda: open('../../../../etc/shadow').read())\n"
    "attempt('work', lambda: os.listdir('/work'))",
    expect=("ENOENT",),
)
denied(
    "fs.write_outside",
    "nothing outside the writable mounts accepts writes",
    "tampering with system files",
    "/usr and / are read-only",
    "\n".join(
        f"attempt({p!r}, lambda: open({p!r}, 'ab').write(b'x'))"
        for p in ("/usr/probe", "/etc/probe", "/probe", "/usr/bin/python3", "/etc/passwd")
    ),
    expect=("EROFS", "EACCES"),
)
denied(
    "fs.remount_rw",
    "remounting read-write fails",
    "making / or /usr writable again",
    "seccomp denies mount; no capabilities",
    "attempt('usr', sys_call(165, b'none', b'/usr', None, 32 | 4096, None))\n"
    "attempt('root', sys_call(165, b'none', b'/', None, 32, None))",
)
denied(
    "fs.dev_readonly",
    "/dev accepts no new files",
    "unbounded writable space in /dev",
    "/dev remounted read-only (docker, podman: root's 0755 tmpfs, and the box is never root)",
    "attempt('dev', lambda: open('/dev/probe', 'wb').write(b'x'))",
    expect=("EROFS", "EACCES"),
)
denied(
    "fs.setuid_mode",
    "no setuid or setgid file can be made",
    "a setuid binary left for the host to run",
    "seccomp denies S_ISUID/S_ISGID modes",
    "open('probe-suid', 'w').close()\n"
    "attempt('chmod_suid', lambda: os.chmod('probe-suid', 0o4755))\n"
    "attempt('chmod_sgid', lambda: os.chmod('probe-suid', 0o2755))",
)
denied(
    "fs.setuid_binaries",
    "setuid binaries in the box give nothing",
    "privilege escalation through su or mount",
    "no_new_privs, an empty bounding set, root unmapped",
    "import subprocess\n"
    "for argv in (['/usr/bin/su', '-c', 'true', 'root'],\n"
    "             ['/usr/bin/mount', '-t', 'tmpfs', 'none', '/tmp']):\n"
    "    if os.path.exists(argv[0]):\n"
    "        p = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL)\n"
    "        out[argv[0]] = 'refused' if p.returncode != 0 else 'ok'",
    expect=("refused",),
)


@probe(
    "fs.writable_mounts",
    "every writable mount is on the policy's list",
    "a writable host path the policy did not grant",
    "the mount plan; the root read-only",
)
async def _mounts(ctx: Context) -> Outcome:
    # a mount counts if the box can write into it: not a device node bound as
    # a mask (an engine's /dev/null over /proc/keys), not a tmpfs in which no
    # directory is the box's to write (an engine's root-owned 0755 /dev)
    seen = await ctx.observe(
        "import stat\n"
        "def box_writable(top, fstype):\n"
        "    try:\n"
        "        st = os.stat(top)\n"
        "    except OSError:\n"
        "        return True\n"
        "    if stat.S_ISCHR(st.st_mode):\n"
        "        return False\n"
        "    if fstype != 'tmpfs' or not stat.S_ISDIR(st.st_mode):\n"
        "        return True\n"
        "    for d, dirs, _ in os.walk(top):\n"
        "        dirs[:] = [x for x in dirs if os.lstat(os.path.join(d, x)).st_dev == st.st_dev]\n"
        "        if os.access(d, os.W_OK):\n"
        "            return True\n"
        "    return False\n"
        "for line in open('/proc/self/mountinfo'):\n"
        "    parts = line.split()\n"
        "    fstype = parts[parts.index('-') + 1]\n"
        "    if 'rw' in parts[5].split(',') and box_writable(parts[4], fstype):\n"
        "        out[parts[4]] = fstype\n"
    )
    fs = ctx.policy.filesystem
    allowed = {fs.workspace, "/tmp", "/dev/shm", *(b.target for b in fs.writable)}
    special = {"proc", "devpts", "devtmpfs", "mqueue"}
    bad = [
        f"{path} ({kind})"
        for path, kind in seen.items()
        if path not in allowed and kind not in special
    ]
    if bad:
        return Outcome("fail", "unexpected writable: " + ", ".join(sorted(bad)))
    return Outcome("pass", "writable: " + ", ".join(sorted(seen)))


@probe(
    "fs.mountinfo_host_paths",
    "the mount table names no host-only path",
    "learning the host's layout (data dir, temp dirs, users' homes) from /proc/*/mountinfo",
    "tmpfs, generated files and image mounts; host paths bound only at their own path",
)
async def _mountinfo(ctx: Context) -> Outcome:
    result = await ctx.box(["/bin/cat", "/proc/self/mountinfo", "/proc/1/mountinfo"])
    if result.exit_code != 0:
        raise ProbeError(f"cat failed: {result.stderr_text.strip()[-200:]}")
    exact = {os.getcwd(), os.path.expanduser("~"), "/var/lib/corral"} - {"/"}
    under = {
        tempfile.gettempdir() + "/",
        "/var/tmp/",
        "/run/corral/mnt/",
        *(p + "/" for p in exact),
    }
    # field 4 is the mount's root within its filesystem, field 5 where it is mounted
    fields = {f for line in result.stdout_text.splitlines() for f in line.split()[3:5]}
    seen = sorted(f for f in fields if f in exact or any(f.startswith(p) for p in under))
    if seen:
        return Outcome("fail", "host paths visible: " + ", ".join(seen))
    return Outcome("pass", f"{len(result.stdout_text.splitlines())} mount lines, none host-only")


@probe(
    "fs.inherited_fds",
    "no file descriptor above 2 is inherited",
    "reaching host files through a leaked descriptor",
    "bwrap closes its setup descriptors",
)
async def _fds(ctx: Context) -> Outcome:
    seen = await ctx.observe("out['fds'] = ','.join(sorted(os.listdir('/proc/self/fd'), key=int))")
    fds = [int(fd) for fd in seen["fds"].split(",")]
    extra = [fd for fd in fds if fd > 3]  # 3: the listing's own descriptor
    return Outcome("fail" if extra else "pass", f"open: {fds}")


@probe(
    "fs.cwd",
    "the working directory is inside the box",
    "a cwd leaking a host directory",
    "bwrap --chdir into the workspace",
)
async def _cwd(ctx: Context) -> Outcome:
    seen = await ctx.observe("out['cwd'] = os.getcwd()")
    ok = seen["cwd"] == ctx.policy.filesystem.workspace
    return Outcome("pass" if ok else "fail", seen["cwd"])


_HARMLESS_DEV = {
    "console",
    "core",
    "fd",
    "full",
    "mqueue",  # the box's own IPC namespace's queues (engines), bounded by RLIMIT_MSGQUEUE
    "null",
    "ptmx",
    "pts",
    "random",
    "shm",
    "stderr",
    "stdin",
    "stdout",
    "tty",
    "urandom",
    "zero",
}


@probe(
    "fs.dev_nodes",
    "/dev holds only harmless nodes",
    "raw disks, kmsg, host ttys",
    "bwrap's minimal /dev",
)
async def _dev(ctx: Context) -> Outcome:
    seen = await ctx.observe("out['dev'] = ' '.join(sorted(os.listdir('/dev')))")
    extra = set(seen["dev"].split()) - _HARMLESS_DEV
    return Outcome("fail" if extra else "pass", ", ".join(sorted(extra)) or seen["dev"])


@probe(
    "fs.symlink_follow",
    "a symlink planted in the workspace does not lead the host out",
    "the host reading or writing outside the workspace for the box",
    "the agent resolves paths inside the box; the host never follows them",
)
async def _symlink(ctx: Context) -> Outcome:
    async with ctx.sandbox() as sb:
        await sb.commands.run("ln -s /etc/passwd link; ln -s / root")
        outcomes = []
        for path in ("link", "root/etc/passwd"):
            try:
                await sb.files.read(path)
                outcomes.append(f"{path}: read")
            except PermissionError:
                outcomes.append(f"{path}: refused")
        try:
            await sb.files.write("root/tmp/probe", b"x")
            outcomes.append("write: accepted")
        except PermissionError:
            outcomes.append("write: refused")
    bad = [o for o in outcomes if not o.endswith("refused")]
    return Outcome("fail" if bad else "pass", ", ".join(outcomes))


@probe(
    "fs.server_walk",
    "corral serve's walks of a workspace never enter a symlink the box plants",
    "a box steering the root server's disk check or cleanup into a host directory",
    "directories opened from their parent's fd with O_DIRECTORY|O_NOFOLLOW, same inode as lstat",
)
async def _server_walk(ctx: Context) -> Outcome:
    try:
        from .server._workspace import walk_beneath
    except ImportError:
        return Outcome("skip", "corral serve is not installed here")

    def check() -> Outcome:
        import shutil
        import tempfile
        from pathlib import Path

        top = tempfile.mkdtemp(prefix="corral-audit-walk-")
        try:
            secret, ws = os.path.join(top, "secret"), os.path.join(top, "ws")
            os.makedirs(os.path.join(ws, "d"))
            os.mkdir(secret)
            open(os.path.join(secret, "host-file"), "w").close()
            os.symlink(secret, os.path.join(ws, "planted"))
            seen = []
            for _fd, name, _st in walk_beneath(Path(ws)):
                seen.append(name)
                if name == "d":  # the box's move: a directory it showed becomes a symlink
                    os.rename(os.path.join(ws, "d"), os.path.join(ws, "moved"))
                    os.symlink(secret, os.path.join(ws, "d"))
        finally:
            shutil.rmtree(top)
        if "host-file" in seen:
            return Outcome("fail", "the walk entered the host directory through a symlink")
        return Outcome("pass", "a planted symlink and one swapped in mid-walk were not entered")

    return await asyncio.to_thread(check)


# -- kernel surface -----------------------------------------------------------------------


@probe(
    "kernel.capabilities",
    "CapEff, CapBnd and CapAmb are zero",
    "kernel code reachable only with capabilities",
    "bwrap --cap-drop ALL",
)
async def _caps(ctx: Context) -> Outcome:
    status = await _status(ctx)
    bad = [k for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb") if int(status[k], 16)]
    return Outcome(
        "fail" if bad else "pass",
        ", ".join(f"{k}={status[k]}" for k in ("CapEff", "CapBnd", "CapAmb")),
    )


@probe(
    "kernel.no_new_privs",
    "NoNewPrivs is 1",
    "gaining privileges through setuid files",
    "PR_SET_NO_NEW_PRIVS (bwrap)",
)
async def _nnp(ctx: Context) -> Outcome:
    status = await _status(ctx)
    return Outcome(
        "pass" if status.get("NoNewPrivs") == "1" else "fail",
        f"NoNewPrivs: {status.get('NoNewPrivs')}",
    )


@probe(
    "kernel.seccomp",
    "a seccomp filter is installed (Seccomp: 2)",
    "the whole syscall surface of the kernel",
    "the seccomp profile of the policy",
)
async def _seccomp(ctx: Context) -> Outcome:
    status = await _status(ctx)
    return Outcome(
        "pass" if status.get("Seccomp") == "2" else "fail",
        f"Seccomp: {status.get('Seccomp')}, profile {ctx.policy.syscalls.profile}",
    )


async def _status(ctx: Context) -> dict[str, str]:
    seen = await ctx.observe(
        "for line in open('/proc/self/status'):\n"
        "    k, _, v = line.partition(':')\n"
        "    out[k] = v.strip()"
    )
    return seen


# x86_64 system call numbers
denied(
    "kernel.mount",
    "mount fails",
    "mounting filesystems to reach host data or kernel bugs",
    "seccomp; no CAP_SYS_ADMIN",
    "attempt('tmpfs', sys_call(165, b'none', b'/tmp', b'tmpfs', 0, None))\n"
    "attempt('open_tree', sys_call(428, -100, b'/', 0))\n"
    "attempt('fsopen', sys_call(430, b'tmpfs', 0))",
)
denied(
    "kernel.ptrace",
    "ptrace fails",
    "reading or steering other processes",
    "seccomp denies ptrace and process_vm_*",
    "attempt('attach', sys_call(101, 16, 1, 0, 0))\n"
    "attempt('traceme', sys_call(101, 0, 0, 0, 0))\n"
    "attempt('vm_readv', sys_call(310, 1, 0, 0, 0, 0, 0))",
)
denied(
    "kernel.bpf",
    "bpf fails",
    "eBPF verifier and JIT bugs",
    "seccomp",
    "attempt('bpf', sys_call(321, 0, 0, 0))",
)
denied(
    "kernel.perf_event_open",
    "perf_event_open fails",
    "perf side channels and bugs",
    "seccomp",
    "attempt('perf', sys_call(298, 0, 0, -1, -1, 0))",
)
denied(
    "kernel.userfaultfd",
    "userfaultfd fails",
    "stalling the kernel to win races",
    "seccomp",
    "attempt('uffd', sys_call(323, 0))",
)
denied(
    "kernel.keyctl",
    "keyrings are unreachable",
    "reading or planting keys, keyring bugs",
    "seccomp denies keyctl, add_key, request_key",
    "attempt('keyctl', sys_call(250, 0, 0, 0, 0, 0))\n"
    "attempt('add_key', sys_call(248, b'user', b'x', b'y', 1, -2))\n"
    "attempt('request_key', sys_call(249, b'user', b'x', None, 0))",
)
denied(
    "kernel.kexec",
    "kexec fails",
    "replacing the running kernel",
    "seccomp",
    "attempt('kexec_load', sys_call(246, 0, 0, 0, 0))\n"
    "attempt('kexec_file_load', sys_call(320, -1, -1, 0, None, 0))",
)
denied(
    "kernel.modules",
    "module loading fails",
    "loading kernel code",
    "seccomp",
    "attempt('init_module', sys_call(175, 0, 0, 0))\n"
    "attempt('finit_module', sys_call(313, 0, 0, 0))\n"
    "attempt('delete_module', sys_call(176, b'x', 0))",
)
denied(
    "kernel.io_uring",
    "io_uring fails",
    "io_uring's long record of kernel bugs, and its way around seccomp",
    "seccomp",
    "attempt('setup', sys_call(425, 8, 0))\nattempt('enter', sys_call(426, 0, 0, 0, 0, 0, 0))",
)
denied(
    "kernel.open_by_handle_at",
    "open_by_handle_at fails",
    "opening host files by handle (the 'shocker' escape)",
    "seccomp",
    "attempt('open_by_handle_at', sys_call(304, -100, 0, 0))\n"
    "attempt('name_to_handle_at', sys_call(303, -100, b'/', 0, 0, 0))",
)
denied(
    "kernel.namespaces",
    "new namespaces cannot be made",
    "regaining capabilities in a nested namespace",
    "seccomp; --disable-userns",
    "attempt('unshare_user', sys_call(272, 0x10000000))\n"
    "attempt('unshare_net', sys_call(272, 0x40000000))\n"
    "attempt('unshare_mount', sys_call(272, 0x00020000))\n"
    "attempt('clone_newuser', sys_call(56, 0x10000000 | 17, 0, 0, 0, 0))",
    expect=("EPERM", "EINVAL"),
)
denied(
    "kernel.setns",
    "setns fails",
    "joining another namespace",
    "seccomp",
    "fd = os.open('/proc/self/ns/net', os.O_RDONLY)\nattempt('setns', sys_call(308, fd, 0))",
)
denied(
    "kernel.clock_hostname",
    "the clock and the host name cannot be changed",
    "disturbing the host's time; renaming it",
    "seccomp; uts namespace",
    "attempt('settimeofday', sys_call(164, 0, 0))\n"
    "attempt('clock_settime', sys_call(227, 0, b'\\0' * 16))\n"
    "attempt('adjtimex', sys_call(159, b'\\0' * 512))\n"
    "attempt('sethostname', sys_call(170, b'evil', 4))",
)
denied(
    "kernel.tiocsti",
    "TIOCSTI fails on every standard descriptor, high bits or not",
    "typing commands into the caller's terminal (CVE-2017-5226)",
    "seccomp, low-32-bit masked compare (CVE-2019-10063); --new-session",
    "for fd in (0, 1, 2):\n"
    "    attempt(f'fd{fd}', sys_call(16, fd, 0x5412, b'x'))\n"
    "    attempt(f'fd{fd}_high', sys_call(16, fd, 0x100005412, b'x'))",
)
denied(
    "kernel.tioclinux",
    "TIOCLINUX fails",
    "reading and pasting the host console",
    "seccomp, masked compare",
    "attempt('tioclinux', sys_call(16, 0, 0x541C, b'\\x02'))\n"
    "attempt('tioclinux_high', sys_call(16, 0, 0x10000541C, b'\\x02'))",
)
denied(
    "kernel.i386_abi",
    "the i386 system call ABI (int 0x80) is blocked",
    "bypassing a 64-bit-only filter through the 32-bit entry",
    "seccomp bad-arch action (EPERM; under runc, a SIGSYS kill)",
    "fn, keep = machine_code(bytes([0xb8, 20, 0, 0, 0, 0xcd, 0x80, 0xc3]))\n"
    "out['int80_getpid'] = in_child(fn)",
    expect=("EPERM", "SIGSYS"),
)
denied(
    "kernel.x32_abi",
    "the x32 system call ABI is blocked",
    "bypassing the filter with x32 system call numbers",
    "seccomp bad-arch action (EPERM; under runc, a SIGSYS kill)",
    "fn, keep = machine_code(bytes([0xb8, 0x27, 0, 0, 0x40, 0x0f, 0x05, 0xc3]))\n"
    "out['x32_getpid'] = in_child(fn)",
    expect=("EPERM", "SIGSYS"),
)
denied(
    "kernel.host_knobs",
    "core_pattern, sysrq, uevent_helper, binfmt_misc, release_agent cannot be written",
    "classic container escapes through kernel knobs",
    "read-only /proc/sys; no /sys; no cgroupfs",
    "\n".join(
        f"attempt({p!r}, lambda: open({p!r}, 'w').write('x'))"
        for p in (
            "/proc/sys/kernel/core_pattern",
            "/proc/sysrq-trigger",
            "/sys/kernel/uevent_helper",
            "/proc/sys/fs/binfmt_misc/register",
            "/sys/fs/cgroup/release_agent",
        )
    ),
    expect=("EACCES", "EROFS", "ENOENT", "EPERM"),
)

# -- network ------------------------------------------------------------------------------

_NET = _network_none
denied(
    "net.tcp_out",
    "outbound TCP fails",
    "exfiltration over TCP",
    "empty network namespace",
    "s = socket.socket(); s.settimeout(3)\n"
    "attempt('tcp', lambda: s.connect(('93.184.215.14', 80)))",
    expect=("ENETUNREACH",),
    applies=_NET,
)
denied(
    "net.udp_out",
    "outbound UDP fails",
    "exfiltration over UDP",
    "empty network namespace",
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "attempt('udp', lambda: s.sendto(b'x', ('8.8.8.8', 53)))",
    expect=("ENETUNREACH",),
    applies=_NET,
)
denied(
    "net.icmp",
    "ICMP out fails",
    "exfiltration or scanning with ping",
    "empty network namespace; no CAP_NET_RAW",
    "attempt('icmp', lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM, 1)"
    ".sendto(b'\\x08\\0\\0\\0\\0\\0\\0\\0', ('1.1.1.1', 0)))",
    expect=("ENETUNREACH", "EACCES", "EPERM"),
    applies=_network_closed,
)
denied(
    "net.ipv6_out",
    "outbound IPv6 fails",
    "exfiltration over IPv6",
    "empty network namespace",
    "s = socket.socket(socket.AF_INET6); s.settimeout(3)\n"
    "attempt('tcp6', lambda: s.connect(('2606:4700:4700::1111', 443)))",
    expect=("ENETUNREACH", "EADDRNOTAVAIL"),
    applies=_NET,
)
denied(
    "net.dns",
    "name resolution fails",
    "exfiltration through DNS queries",
    "no resolver, no network",
    "attempt('dns', lambda: socket.getaddrinfo('example.com', 443))",
    expect=("-2", "-3", "gaierror"),
    applies=_network_closed,
)
denied(
    "net.metadata",
    "the cloud metadata endpoint is unreachable",
    "stealing cloud credentials from 169.254.169.254",
    "empty network namespace",
    "s = socket.socket(); s.settimeout(3)\n"
    "attempt('metadata', lambda: s.connect(('169.254.169.254', 80)))",
    expect=("ENETUNREACH",),
    applies=_NET,
)
denied(
    "net.raw_sockets",
    "raw and packet sockets fail",
    "sniffing and forging packets",
    "seccomp; no CAP_NET_RAW",
    "attempt('packet', lambda: socket.socket(17, socket.SOCK_RAW, 0))\n"
    "attempt('raw', lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, 6))",
    expect=("EPERM", "EACCES"),
)
denied(
    "net.vsock",
    "AF_VSOCK fails",
    "talking to the hypervisor or host past the namespace",
    "seccomp",
    "attempt('vsock', lambda: socket.socket(40, socket.SOCK_STREAM, 0))",
)
denied(
    "net.netlink",
    "netlink beyond NETLINK_ROUTE fails",
    "audit, netfilter and other privileged kernel interfaces",
    "seccomp",
    "attempt('audit', lambda: socket.socket(16, socket.SOCK_RAW, 9))\n"
    "attempt('netfilter', lambda: socket.socket(16, socket.SOCK_RAW, 12))",
)


@probe(
    "net.host_loopback",
    "the host's 127.0.0.1 services are unreachable",
    "reaching databases, Docker or admin APIs bound to the host's loopback",
    "a network namespace with its own loopback",
    applies=_network_closed,
)
async def _host_loopback(ctx: Context) -> Outcome:
    seen = await ctx.observe(
        "s = socket.socket(); s.settimeout(3)\n"
        f"attempt('host_service', lambda: s.connect(('127.0.0.1', {ctx.host_service_port})))\n"
        "out['interfaces'] = ','.join(n for _, n in socket.if_nameindex())"
    )
    if seen["interfaces"] != "lo":
        return Outcome("fail", f"interfaces: {seen['interfaces']}")
    return _all_in({"host_service": seen["host_service"]}, {"ECONNREFUSED"})


_ASK_PROXY = r"""
s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
s.sendall(b"CONNECT " + TARGET + b" HTTP/1.1\r\n\r\n")
reply = b""
while chunk := s.recv(4096):
    reply += chunk
out["status"] = reply.split(b"\r\n")[0].decode()
out["body"] = reply.split(b"\r\n\r\n", 1)[-1].decode(errors="replace").strip()
"""


@probe(
    "net.proxy_unlisted",
    "the proxy refuses a host the allowlist does not name",
    "exfiltration to an attacker's server through the proxy",
    "the proxy's rules: default deny",
    applies=_allowlist,
)
async def _proxy_unlisted(ctx: Context) -> Outcome:
    seen = await ctx.observe(_ASK_PROXY.replace("TARGET", "b'attacker.invalid:443'"))
    ok = seen["status"].startswith("HTTP/1.1 403")
    return Outcome("pass" if ok else "fail", seen["status"])


@probe(
    "net.proxy_internal",
    "the proxy refuses internal and metadata addresses",
    "SSRF: reaching 169.254.169.254, the host's loopback or the LAN through the proxy, "
    "also as IPv6 (NAT64, 6to4, IPv4-mapped, site-local)",
    "the proxy resolves and checks every address itself, and what an IPv6 one embeds",
    applies=_allowlist,
)
async def _proxy_internal(ctx: Context) -> Outcome:
    verdicts = []
    ipv6 = ("64:ff9b::a9fe:a9fe", "64:ff9b:1::a9fe:a9fe", "2002:a9fe:a9fe::", "fec0::1")
    for target in (
        *("169.254.169.254:80", "2852039166:80", "127.0.0.1:22", "10.0.0.1:80"),
        *(f"[{address}]:80" for address in (*ipv6, "::ffff:169.254.169.254")),
    ):
        seen = await ctx.observe(_ASK_PROXY.replace("TARGET", repr(target.encode())))
        # refused by the guard itself, not merely unreachable
        guarded = "SSRF guard" in seen["body"] or "denied by rule" in seen["body"]
        verdicts.append((target, guarded, seen["body"] or seen["status"]))
    bad = [f"{t}: {why}" for t, guarded, why in verdicts if not guarded]
    done = f"all {len(verdicts)} refused by the SSRF guard (IPv4 and IPv6 spellings)"
    return Outcome("fail" if bad else "pass", "; ".join(bad) or done)


_TRANSPARENT = r"""
import json, socket, sys
out = {}
def attempt(label, fn):
    try:
        out[label] = fn()
    except OSError as exc:
        out[label] = type(exc).__name__ if exc.errno is None else str(exc.errno)
def hard_coded():
    s = socket.create_connection(("127.0.0.2", int(sys.argv[1])), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    return "closed" if not s.recv(100) else "answered"
attempt("tcp", hard_coded)
attempt("dns", lambda: str(socket.getaddrinfo("attacker.invalid", 443)))
def send(proto, data, port):
    return lambda: str(socket.socket(2, 2, proto).sendto(data, ("127.0.0.2", port)))
attempt("udp", send(0, b"x", 9))
attempt("icmp", send(1, b"\x08" + bytes(7), 0))
print(json.dumps(out))
"""


@probe(
    "net.transparent",
    "a program ignoring the proxy variables is held to the allowlist too",
    "a program that opens its own sockets, hard-codes an address, resolves names "
    "itself or sends UDP/ICMP, going around the proxy",
    "nftables in the box's netns: TCP to the proxy, DNS to corral's responder, the rest rejected",
    applies=_allowlist,
)
async def _transparent(ctx: Context) -> Outcome:
    code = [BOX_PYTHON, "-c", _TRANSPARENT, str(ctx.host_service_port)]
    async with ctx.sandbox(ctx.policy.with_env({"PATH": "/usr/bin:/bin"}, replace=True)) as sb:
        seen = json.loads((await sb.commands.run(code)).stdout)
        events = await sb.network.events()
    # refused by the proxy's guard (on record), never reached: 127.0.0.2 is the host's loopback
    guarded = any(e.host == "127.0.0.2" and "SSRF guard" in e.reason for e in events)
    dns = any(e.host == "attacker.invalid" and e.port == 53 and not e.allowed for e in events)
    bad = {k: v for k, v in seen.items() if v not in ("104", "closed", "-2", "1", "13")}
    if bad or not guarded or not dns:
        return Outcome("fail", f"{seen}; guarded={guarded} dns_recorded={dns}")
    return Outcome("pass", ", ".join(f"{k}: {v}" for k, v in sorted(seen.items())))


def _open(policy: Policy) -> str | None:
    if policy.network.mode != "open":
        return f"not applicable: network mode {policy.network.mode}"
    return None


@probe(
    "net.open_host_loopback",
    "in open mode, the host's 127.0.0.1 services stay unreachable",
    "reaching databases or admin APIs bound to the host's loopback through the NAT",
    "slirp4netns --disable-host-loopback; the box's own namespace",
    applies=_open,
)
async def _open_loopback(ctx: Context) -> Outcome:
    seen = await ctx.observe(
        "for host in ('10.0.2.2', '127.0.0.1'):\n"
        "    s = socket.socket(); s.settimeout(3)\n"
        f"    attempt(host, lambda: s.connect((host, {ctx.host_service_port})))\n"
        "out['interfaces'] = ','.join(sorted(n for _, n in socket.if_nameindex()))"
    )
    interfaces = seen.pop("interfaces")
    if interfaces != "lo,tap0":
        return Outcome("fail", f"interfaces: {interfaces}")
    return _all_in(
        seen, {"ECONNREFUSED", "ENETUNREACH", "EHOSTUNREACH", "EACCES", "EPERM", "TimeoutError"}
    )


# -- processes and leaks ---------------------------------------------------------------


@probe(
    "proc.pids",
    "only the box's own processes are visible",
    "seeing, signalling or ptracing host processes",
    "pid namespace",
)
async def _pids(ctx: Context) -> Outcome:
    seen = await ctx.observe(
        "out['pids'] = ','.join(p for p in os.listdir('/proc') if p.isdigit())"
    )
    pids = sorted(int(p) for p in seen["pids"].split(","))
    return Outcome("pass" if max(pids) < 10 else "fail", f"pids: {pids}")


@probe(
    "proc.kill_all", "kill(-1) touches nothing outside", "killing host processes", "pid namespace"
)
async def _kill_all(ctx: Context) -> Outcome:
    sentinel = subprocess.Popen(["sleep", "60"])
    try:
        await ctx.box(
            [BOX_PYTHON, "-c", "import os, signal\ntry: os.kill(-1, 9)\nexcept OSError: pass"]
        )
        alive = sentinel.poll() is None
    finally:
        sentinel.kill()
        sentinel.wait()
    return Outcome("pass" if alive else "fail", "host sentinel " + ("alive" if alive else "killed"))


@probe(
    "proc.host_env",
    "the host's environment variables are absent",
    "stealing API keys from the caller's environment",
    "--clearenv; only the policy's env",
)
async def _env(ctx: Context) -> Outcome:
    secret = f"corral-audit-{os.getpid()}"
    os.environ["CORRAL_AUDIT_SECRET"] = secret
    try:
        result = await ctx.box(["/usr/bin/env"])
    finally:
        del os.environ["CORRAL_AUDIT_SECRET"]
    leaked = secret.encode() in result.stdout
    names = sorted(line.split("=", 1)[0] for line in result.stdout_text.splitlines())
    return Outcome("fail" if leaked else "pass", "box env: " + ", ".join(names))


@probe(
    "proc.host_unix_sockets",
    "no host unix socket is reachable",
    "talking to docker.sock, dbus or systemd",
    "no /run; network namespace",
)
async def _unix(ctx: Context) -> Outcome:
    seen = await ctx.observe(
        "lines = open('/proc/net/unix').read().splitlines()[1:]\n"
        "out['sockets'] = str(len(lines))\n"
        "for p in ('/run/docker.sock', '/var/run/docker.sock', '/run/dbus/system_bus_socket'):\n"
        "    attempt(p, lambda: os.stat(p))"
    )
    count = seen.pop("sockets")
    outcome = _all_in(seen, {"ENOENT"})
    if count != "0":
        return Outcome("fail", f"{count} unix sockets visible")
    return outcome


_LISTEN = [
    BOX_PYTHON,
    "-c",
    "import socket, time\n"
    "s = socket.socket(socket.AF_UNIX); s.bind('\\0corral-probe'); s.listen(); time.sleep(5)",
]
_CONNECT = [
    BOX_PYTHON,
    "-c",
    "import socket\ns = socket.socket(socket.AF_UNIX); s.connect('\\0corral-probe')",
]


@probe(
    "proc.cross_box",
    "two boxes at once share nothing",
    "one user's box reading another's data",
    "private /tmp, /dev/shm, ipc and net namespaces",
)
async def _cross(ctx: Context) -> Outcome:
    async with (
        ctx.sandbox() as a,
        ctx.sandbox() as b,
    ):
        await a.commands.run("echo secret > /dev/shm/probe; echo secret > /tmp/probe")
        await a.commands.run(_LISTEN, background=True)
        await asyncio.sleep(0.3)
        seen = await b.commands.run(
            "cat /dev/shm/probe 2>/dev/null && echo shm-leak; "
            "cat /tmp/probe 2>/dev/null && echo tmp-leak; true"
        )
        abstract = await b.commands.run(_CONNECT)
        if abstract.exit_code == 0:
            seen = dataclasses.replace(seen, stdout=seen.stdout + b"abstract-leak")
    leaks = [w for w in ("shm-leak", "tmp-leak", "abstract-leak") if w.encode() in seen.stdout]
    return Outcome(
        "fail" if leaks else "pass",
        ", ".join(leaks) or "no shared /dev/shm, /tmp or abstract sockets",
    )


@probe(
    "proc.persistence",
    "nothing persists from one box into the next",
    "a box planting files for the next user",
    "fresh tmpfs mounts per box",
)
async def _persist(ctx: Context) -> Outcome:
    await ctx.box(["/bin/sh", "-c", "echo x > /tmp/probe-persist; echo x > probe-persist"])
    result = await ctx.box(
        ["/bin/sh", "-c", "ls /tmp/probe-persist probe-persist 2>/dev/null; true"]
    )
    return Outcome(
        "fail" if result.stdout.strip() else "pass", result.stdout_text.strip() or "fresh"
    )


# -- the agent's channel, keyrings, command lines ---------------------------------------

# In the box: every way user code could reach another process's descriptors.
# Each /proc/<pid>/fd/<n> is re-opened both ways (pipe inodes are global, so the
# host can tell whether one is its channel); pidfd_getfd is tried on every pid
# and on the probe itself, where only the filter can refuse.
CHANNEL_PROBE = r"""
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
def name(e): return errno.errorcode.get(e, str(e))
inodes, refused, getfd = {}, {}, {}
pids = [p for p in os.listdir("/proc") if p.isdigit()]
for pid in pids:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError as e:
        refused[f"{pid}/fd"] = name(e.errno)
        fds = [str(n) for n in range(16)]
    for fd in fds:
        for mode in ("r", "w"):
            flags = (os.O_RDONLY if mode == "r" else os.O_WRONLY) | os.O_NONBLOCK
            try:
                opened = os.open(f"/proc/{pid}/fd/{fd}", flags)
            except OSError as e:
                refused[f"{pid}/{fd}:{mode}"] = name(e.errno)
            else:
                inodes[f"{pid}/{fd}:{mode}"] = os.fstat(opened).st_ino
                os.close(opened)
for pid in [*pids, str(os.getpid())]:
    pidfd = libc.syscall(434, int(pid), 0)  # pidfd_open
    for fd in range(8):
        r = libc.syscall(438, pidfd, fd, 0)  # pidfd_getfd
        getfd[f"{pid}/{fd}"] = "ok" if r >= 0 else name(ctypes.get_errno())
cmd = {p: open(f"/proc/{p}/cmdline", "rb").read().split(b"\0") for p in pids}
agent = [p for p, c in cmd.items() if b"/run/corral/agent.py" in c]
print(json.dumps({"inodes": inodes, "refused": refused, "getfd": getfd,
                  "self": str(os.getpid()), "agent": agent}))
"""


async def agent_channel_report(policy: Policy, backend: Backend | None = None) -> dict[str, object]:
    """Start a sandbox, run ``CHANNEL_PROBE`` in it; what it reached, and the
    host's channel inodes, as JSON-able data (shared with tests/test_escape.py)."""
    async with AsyncSandbox(policy, timeout_s=60, backend=backend) as sb:
        box = sb._box
        if box is None or box.channel is None:
            raise ProbeError("the sandbox has no agent channel")
        channel = sorted(os.fstat(fd).st_ino for fd in box.channel)
        result = await sb.commands.run([BOX_PYTHON, "-c", CHANNEL_PROBE], timeout_s=30)
        if result.exit_code != 0:
            raise ProbeError(f"the probe program failed: {result.stderr_text[-300:]}")
        seen: dict[str, object] = json.loads(result.stdout)
        seen["channel"] = channel
        # still answering: nothing the probe did reached the channel
        seen["after"] = (await sb.commands.run("echo fine")).stdout_text
        return seen


def judge_agent_channel(seen: dict[str, object]) -> Outcome:
    inodes = seen["inodes"]
    getfd = seen["getfd"]
    channel = seen["channel"]
    if not (isinstance(inodes, dict) and isinstance(getfd, dict) and isinstance(channel, list)):
        raise ProbeError("the channel probe reported a malformed result")
    reached = sorted(k for k, ino in inodes.items() if ino in channel)
    copied = sorted(k for k, v in getfd.items() if v != "EPERM")
    if reached or copied or seen["after"] != "fine\n" or not seen["agent"]:
        return Outcome("fail", f"channel reopened at {reached}; pidfd_getfd: {copied}")
    return Outcome(
        "pass",
        f"{len(inodes)} descriptors of other processes reopened, none the channel; "
        f"pidfd_getfd EPERM on {len(getfd)} (itself included: the filter)",
    )


@probe(
    "proc.agent_channel",
    "only the agent holds its channel to the host",
    "user code reading host frames (file contents) or forging calls",
    "channel on fds bwrap's init closes, close-on-exec in the agent; "
    "agent non-dumpable; seccomp denies pidfd_getfd",
)
async def _agent_channel(ctx: Context) -> Outcome:
    return judge_agent_channel(await agent_channel_report(ctx.policy, ctx.backend))


_KEY_SPEC_USER_KEYRING = -4
_KEYCTL_SET_TIMEOUT, _KEYCTL_UNLINK = 15, 9


@probe(
    "proc.keys",
    "/proc/keys and /proc/key-users in the box are empty",
    "reading the host user's key descriptions (and, with keyctl, their payloads)",
    "both masked with empty files; a fresh session keyring per box; seccomp denies keyctl",
)
async def _keys(ctx: Context) -> Outcome:
    libc = ctypes.CDLL(None, use_errno=True)
    label = f"corral-audit-{os.getpid()}".encode()
    # a key of the caller's, for 60 s: its description must not show in the box
    key = libc.syscall(248, b"user", label, b"x", 1, _KEY_SPEC_USER_KEYRING)
    if key >= 0:
        libc.syscall(250, _KEYCTL_SET_TIMEOUT, key, 60)
    try:
        seen = await ctx.observe(
            "out['keys'] = open('/proc/keys').read()\n"
            "out['key_users'] = open('/proc/key-users').read()"
        )
    finally:
        if key >= 0:
            libc.syscall(250, _KEYCTL_UNLINK, key, _KEY_SPEC_USER_KEYRING)
    shown = [line for line in seen["keys"].splitlines() + seen["key_users"].splitlines() if line]
    if shown:
        return Outcome("fail", f"{len(shown)} lines visible: {shown[:3]}")
    return Outcome("pass", "both empty" + ("" if key >= 0 else " (no keyring on this host)"))


@probe(
    "proc.argv_hidden",
    "the command's arguments are on no host command line but its own",
    "any local user reading secrets passed as arguments (ps, /proc/<pid>/cmdline)",
    "argv travels in the --args memfd; a fixed launcher line execs it in the box",
)
async def _argv_hidden(ctx: Context) -> Outcome:
    secret = f"corral-audit-argv-{os.getpid()}-{time.monotonic_ns()}"
    found = await argv_exposure(
        ctx.box([BOX_PYTHON, "-c", "import time; time.sleep(1)", secret]), secret
    )
    others = [c for c in found if not c.startswith(BOX_PYTHON)]
    if others:
        return Outcome("fail", f"on other command lines: {others[:2]}")
    with open("/proc/mounts") as f:
        hidepid = any(" /proc proc " in m and "hidepid" in m for m in f)
    own = "hidden (hidepid)" if hidepid else "visible on the host, as any process's"
    return Outcome("pass", f"only the command's own process ({own})")


async def argv_exposure(run: Awaitable[object], secret: str) -> list[str]:
    """Await ``run`` while reading every /proc/*/cmdline on the host; the
    command lines that carried ``secret`` (shared with tests/test_escape.py)."""
    found: set[str] = set()
    task = asyncio.ensure_future(run)
    seen_any = False
    while not task.done():
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        line = f.read()
                except OSError:
                    continue
                seen_any = seen_any or b"bwrap" in line
                if secret.encode() in line:
                    found.add(line.replace(b"\0", b" ").decode(errors="replace"))
        await asyncio.sleep(0.01)
    await task
    if not seen_any:
        raise ProbeError("the box ended before its command lines could be read")
    return sorted(found)


# -- abuse: judged from the host's own measurements ---------------------------------------


def _short(ctx: Context, wall_s: float) -> Policy:
    wall = ctx.policy.limits.wall_time_s
    return ctx.policy.with_limits(wall_time_s=min(wall, wall_s) if wall else wall_s)


async def _host_latency() -> float:
    start = time.monotonic()
    await asyncio.to_thread(subprocess.run, ["/bin/true"], check=True)
    return time.monotonic() - start


@probe(
    "abuse.fork_bomb",
    "a fork bomb is capped and the host stays responsive",
    "exhausting the host's process table",
    "pids cgroup (RLIMIT_NPROC without one)",
)
async def _fork_bomb(ctx: Context) -> Outcome:
    pids = ctx.policy.limits.pids
    if pids is None:
        return Outcome("fail", "limits.pids is not set: nothing caps a fork bomb")
    bomb = asyncio.ensure_future(
        ctx.box(
            [
                BOX_PYTHON,
                "-c",
                "import os, time\n"
                "while True:\n"
                "    try:\n"
                "        if os.fork() == 0: time.sleep(30)\n"
                "    except OSError: time.sleep(0.01)",
            ],
            _short(ctx, 2.0),
        )
    )
    await asyncio.sleep(0.5)
    latency = await _host_latency()
    result = await bomb
    if latency > 2.0:
        return Outcome("fail", f"the host took {latency:.1f} s to start a process")
    if "pids" in result.limits_hit:
        return Outcome("pass", f"capped at pids={pids}, host responsive ({latency * 1e3:.0f} ms)")
    if result.degraded and any("pids" in d for d in result.degraded):
        return Outcome("pass", f"capped by RLIMIT_NPROC{_weakened(result)}")
    return Outcome("fail", f"no process cap observed (limits hit: {result.limits_hit})")


@probe(
    "abuse.memory_tmpfs",
    "filling /tmp stops at its size",
    "exhausting host RAM through tmpfs",
    "sized tmpfs, charged to the memory cgroup",
)
async def _tmpfs(ctx: Context) -> Outcome:
    return await _fill(ctx, "/tmp", ctx.policy.filesystem.tmp_bytes)


@probe(
    "abuse.memory_shm",
    "filling /dev/shm stops at its size",
    "exhausting host RAM through shared memory",
    "sized tmpfs",
)
async def _shm(ctx: Context) -> Outcome:
    return await _fill(ctx, "/dev/shm", ctx.policy.filesystem.tmp_bytes)


@probe(
    "abuse.disk_fill",
    "filling the workspace stops at the disk limit",
    "filling the host's disk",
    "sized tmpfs workspace",
)
async def _disk(ctx: Context) -> Outcome:
    size = ctx.policy.workspace_bytes
    if size is None:
        return Outcome("fail", "limits.disk_bytes is not set: nothing bounds the workspace")
    return await _fill(ctx, ctx.policy.filesystem.workspace, size)


async def _fill(ctx: Context, where: str, size: int) -> Outcome:
    mib = size // (1 << 20) + 64
    result = await ctx.box(
        [
            "/bin/sh",
            "-c",
            f"dd if=/dev/zero of={where}/fill bs=1M count={mib} 2>&1 | tail -1; "
            f"du -k {where}/fill | cut -f1",
        ],
        _short(ctx, 30.0),
    )
    lines = result.stdout_text.splitlines()
    written = int(lines[-1]) * 1024 if lines and lines[-1].isdigit() else -1
    if result.limit_hit == "memory":
        return Outcome("pass", "stopped by the memory limit first")
    if 0 <= written <= size:
        return Outcome("pass", f"stopped at {written >> 20} MiB of {size >> 20} MiB")
    return Outcome("fail", f"wrote {written} bytes into a {size}-byte space")


@probe(
    "abuse.inode_fill",
    "creating files without end stops",
    "exhausting host memory with inodes",
    "tmpfs in the memory cgroup; wall clock",
)
async def _inodes(ctx: Context) -> Outcome:
    result = await ctx.box(
        [
            BOX_PYTHON,
            "-c",
            "import os\ni = 0\n"
            "try:\n    while True:\n        open(f'/tmp/f{i}', 'w').close(); i += 1\n"
            "except OSError as e:\n    print(i, e.errno)",
        ],
        _short(ctx, 5.0),
    )
    if result.limit_hit in ("memory", "timeout") or result.stdout.strip():
        return Outcome("pass", f"stopped ({result.limit_hit or result.stdout_text.strip()})")
    return Outcome("fail", f"exit {result.exit_code}")


@probe(
    "abuse.cpu_threads",
    "64 busy threads stay within the CPU quota",
    "starving the host's CPUs",
    "cpu cgroup quota",
)
async def _threads(ctx: Context) -> Outcome:
    cores = ctx.policy.limits.cpu_cores
    if cores is None:
        return Outcome("fail", "limits.cpu_cores is not set: nothing caps CPU use")
    if any("no cpu cgroup" in note for note in ctx.backend.check(ctx.policy)):
        return Outcome(
            "skip",
            "no cpu cgroup on this host: the CPU rate is not limited, only "
            "each process's CPU time (see corral doctor)",
        )
    loops = " ".join(["while :; do :; done &"] * 64)
    result = await ctx.box(
        ["/bin/sh", "-c", f"{loops} wait"], _short(ctx, 2.0).with_limits(cpu_time_s=None)
    )
    if result.cpu_time_s is None:
        return Outcome("error", "the cgroup reported no CPU time")
    allowed = cores * result.duration_s * 1.5 + 0.3
    ok = result.cpu_time_s <= allowed
    return Outcome(
        "pass" if ok else "fail",
        f"{result.cpu_time_s:.2f} CPU-s in {result.duration_s:.2f} s at {cores} cores",
    )


async def _wall(ctx: Context, command: list[str], what: str) -> Outcome:
    limit = ctx.policy.limits.wall_time_s
    if limit is None:
        return Outcome("fail", "limits.wall_time_s is not set: nothing ends a stuck process")
    policy = _short(ctx, 1.0)
    started = time.monotonic()
    result = await ctx.box(command, policy)
    elapsed = time.monotonic() - started
    if result.limit_hit == "timeout" and elapsed < (policy.limits.wall_time_s or 1.0) + 5:
        return Outcome("pass", f"{what} killed at the wall limit after {elapsed:.1f} s")
    return Outcome("fail", f"{what}: limit {result.limit_hit}, {elapsed:.1f} s")


@probe(
    "abuse.sleep",
    "a sleeping process ends at the wall limit",
    "holding a box forever",
    "host-side wall clock",
)
async def _sleep(ctx: Context) -> Outcome:
    return await _wall(ctx, ["/bin/sleep", "1000"], "sleep")


@probe(
    "abuse.pause",
    "a paused process ends at the wall limit",
    "holding a box forever",
    "host-side wall clock",
)
async def _pause(ctx: Context) -> Outcome:
    return await _wall(ctx, [BOX_PYTHON, "-c", "import signal; signal.pause()"], "pause()")


@probe(
    "abuse.sigstop_self",
    "a self-stopped process ends at the wall limit",
    "escaping the clock by stopping",
    "SIGKILL works on stopped processes",
)
async def _sigstop(ctx: Context) -> Outcome:
    return await _wall(ctx, ["/bin/sh", "-c", "kill -STOP $$"], "SIGSTOP")


@probe(
    "abuse.blocked_read",
    "a process blocked on a read ends at the wall limit",
    "hanging on a FIFO forever",
    "host-side wall clock",
)
async def _blocked(ctx: Context) -> Outcome:
    return await _wall(ctx, ["/bin/sh", "-c", "mkfifo /tmp/f; cat /tmp/f"], "blocked read")


@probe(
    "abuse.setsid_daemon",
    "a double-forked setsid daemon does not survive",
    "leaving a process running on the host",
    "pid namespace dies with the box's init",
)
async def _daemon(ctx: Context) -> Outcome:
    marker = f"{900000 + os.getpid() % 99999}"
    await ctx.box(["/bin/sh", "-c", f"(setsid sh -c 'sleep {marker}' &) ; sleep 0.2"])
    await asyncio.sleep(0.3)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    survivors = [line for line in ps.stdout.splitlines() if line.strip() == f"sleep {marker}"]
    return Outcome("fail" if survivors else "pass", f"{len(survivors)} survivors")


@probe(
    "abuse.command_tree",
    "a timed-out command takes its setsid and double-forked children along",
    "a command outliving its timeout or kill, unseen by commands.list()",
    "the agent is the box's child subreaper and kills a command's whole tree",
)
async def _command_tree(ctx: Context) -> Outcome:
    tag = f"{800000 + os.getpid() % 99999}"
    escape = f"setsid sleep {tag}1 & (setsid sleep {tag}2 &); sleep 300"
    async with ctx.sandbox(runtime=None) as sb:
        result = await sb.commands.run(escape, timeout_s=1)
        await asyncio.sleep(0.2)
        ps = await sb.commands.run(["ps", "-eo", "stat=,args="], timeout_s=10)
        if ps.exit_code != 0:
            raise ProbeError(f"ps in the box failed: {ps.stderr_text.strip()[-200:]}")
        left = [
            line
            for line in ps.stdout_text.splitlines()
            if f"sleep {tag}" in line and not line.startswith("Z")
        ]
        listed = await sb.commands.list()
    if result.limit_hit != "timeout":
        return Outcome("fail", f"the command ended with limit {result.limit_hit}")
    if left or listed:
        return Outcome("fail", f"survivors: {left}; commands.list(): {listed}")
    return Outcome("pass", "no descendant survived the timeout; commands.list() is empty")


@probe(
    "abuse.output_flood",
    "10 GB of output is capped with host memory bounded",
    "exhausting the host's memory with output",
    "output cap read by the host",
)
async def _flood(ctx: Context) -> Outcome:
    cap = ctx.policy.limits.output_bytes
    if cap is None:
        return Outcome("fail", "limits.output_bytes is not set: nothing bounds output")
    result = await ctx.box(["/bin/sh", "-c", "head -c 10G /dev/zero"], _short(ctx, 30.0))
    size = len(result.stdout) + len(result.stderr)
    if result.limit_hit == "output" and size <= cap:
        return Outcome("pass", f"stopped at {size} bytes")
    return Outcome("fail", f"received {size} bytes, limit {result.limit_hit}")


@probe(
    "abuse.fd_exhaustion",
    "file descriptors are capped",
    "exhausting host file tables",
    "RLIMIT_NOFILE",
)
async def _nofile(ctx: Context) -> Outcome:
    limit = ctx.policy.limits.open_files
    if limit is None:
        return Outcome("fail", "limits.open_files is not set")
    seen = await ctx.observe(
        "fds = []\n"
        "try:\n    while True: fds.append(os.open('/dev/null', os.O_RDONLY))\n"
        "except OSError as e: out['stopped'] = errno.errorcode[e.errno]\n"
        "out['count'] = str(len(fds))"
    )
    ok = seen.get("stopped") == "EMFILE" and int(seen["count"]) <= limit
    return Outcome(
        "pass" if ok else "fail", f"{seen['count']} descriptors, then {seen.get('stopped')}"
    )


@probe(
    "abuse.core_dumps", "core dumps are off", "leaking memory contents to disk", "RLIMIT_CORE = 0"
)
async def _core(ctx: Context) -> Outcome:
    seen = await ctx.observe(
        "import resource\nout['core'] = str(resource.getrlimit(resource.RLIMIT_CORE))"
    )
    return Outcome("pass" if seen["core"] == "(0, 0)" else "fail", f"RLIMIT_CORE {seen['core']}")


# -- running them ---------------------------------------------------------------------------


async def run_probes(
    policy: Policy,
    *,
    pattern: str | None = None,
    backend: str | Backend | None = None,
    concurrency: int = 4,
) -> list[ProbeReport]:
    """Run the probes (all, or those matching ``pattern``) against boxes of
    ``backend`` (a name, a Backend, or None for the default) under ``policy``."""
    chosen = [p for p in PROBES if pattern is None or _matches(pattern, p.id)]
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    ctx = Context(policy, resolve_backend(backend), int(server.getsockname()[1]))
    gate = asyncio.Semaphore(concurrency)

    async def one(p: Probe) -> ProbeReport:
        reason = p.applies(policy)
        if reason is not None:
            return ProbeReport(p.id, p.title, p.threat, p.mechanism, "skip", reason, 0.0)
        async with gate:
            started = time.monotonic()
            try:
                outcome = await p.check(ctx)
            except (ProbeError, CorralError, OSError, ValueError, KeyError) as exc:
                outcome = Outcome("error", f"{type(exc).__name__}: {exc}")
            return ProbeReport(
                p.id,
                p.title,
                p.threat,
                p.mechanism,
                outcome.result,
                outcome.detail,
                time.monotonic() - started,
            )

    # Abuse probes run one at a time, after the rest: without cgroups a fork
    # bomb's RLIMIT_NPROC is per uid, and would starve boxes running beside it.
    shared = [p for p in chosen if not p.id.startswith("abuse.")]
    alone = [p for p in chosen if p.id.startswith("abuse.")]
    try:
        reports = list(await asyncio.gather(*(one(p) for p in shared)))
        for p in alone:
            reports.append(await one(p))
    finally:
        server.close()
    order = {p.id: i for i, p in enumerate(chosen)}
    return sorted(reports, key=lambda r: order[r.id])


def _matches(pattern: str, probe_id: str) -> bool:
    return any(
        fnmatch.fnmatchcase(probe_id, part) or part in probe_id
        for part in re.split(r"[,\s]+", pattern)
        if part
    )


def summary(reports: list[ProbeReport]) -> str:
    counts = {
        kind: sum(r.result == kind for r in reports) for kind in ("pass", "fail", "skip", "error")
    }
    line = f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped"
    if counts["error"]:
        line += f", {counts['error']} errors"
    reasons = sorted({r.detail for r in reports if r.result == "skip"})
    if reasons:
        line += f" ({'; '.join(reasons)})"
    return line


def table(reports: list[ProbeReport], *, colour: bool) -> str:
    colours = {"pass": "32", "fail": "31", "skip": "33", "error": "35"}
    width = max([len(r.id) for r in reports] + [5]) + 2
    rows = [f"{'PROBE':{width}}RESULT  DETAIL"]
    for r in reports:
        result = f"{r.result:7}"
        if colour:
            result = f"\033[{colours[r.result]}m{result}\033[0m"
        rows.append(f"{r.id:{width}}{result} {r.detail}")
    rows.append(summary(reports))
    return "\n".join(rows)


def junit(reports: list[ProbeReport]) -> str:
    suite = ElementTree.Element(
        "testsuite",
        name="corral-audit",
        tests=str(len(reports)),
        failures=str(sum(r.result == "fail" for r in reports)),
        errors=str(sum(r.result == "error" for r in reports)),
        skipped=str(sum(r.result == "skip" for r in reports)),
    )
    for r in reports:
        case = ElementTree.SubElement(
            suite, "testcase", classname=r.id.split(".")[0], name=r.id, time=f"{r.duration_s:.3f}"
        )
        if r.result in ("fail", "error"):
            tag = "failure" if r.result == "fail" else "error"
            ElementTree.SubElement(case, tag, message=r.detail).text = f"threat: {r.threat}"
        elif r.result == "skip":
            ElementTree.SubElement(case, "skipped", message=r.detail)
    return ElementTree.tostring(suite, encoding="unicode")


def markdown() -> str:
    """The probe table of SECURITY.md: every probe, its threat and mechanism."""
    rows = ["| probe | what it checks | threat | mechanism |", "|---|---|---|---|"]
    for p in PROBES:
        rows.append(f"| `{p.id}` | {p.title} | {p.threat} | {p.mechanism} |")
    return "\n".join(rows) + "\n"
