"""The OCI bundle runsc runs: ``config.json`` and a root directory, from the plans.

Pure but for the files it writes: ``render_config`` maps the plans to the OCI
runtime spec, ``write_rootfs`` builds the bundle's read-only root (symlinks,
mount points, corral's generated ``/etc`` files and the agent). No image is
needed: the host's ``/usr`` (and the code runtime) are bound read-only, as
the bwrap backend does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from corral._policy import Policy
from corral.plan import Plans, _mounts
from corral.plan._seccomp import SeccompPlan

# the container's first program when it is an agent: runsc hands the sandbox
# only the stdio of `runsc run` (this runsc has no --preserve-fds), so the
# channel arrives as fds 0 and 1 and is moved above 2 at once; 0 and 1 become
# /dev/null, so no command the agent starts can inherit the channel
CHANNEL_LAUNCHER = (
    "exec 3<&0 4>&1 </dev/null >/dev/null; "
    'CORRAL_CHANNEL_FDS=3,4; export CORRAL_CHANNEL_FDS; exec "$@"'
)
# a one-shot command goes through the same shell, so a missing program reads
# "corral: 1: exec: NAME: not found" (127) as on bwrap
# (put in corral's words by CgroupProcessBox.exec_failure)
PIPES_LAUNCHER = 'exec "$@"'

_RLIMIT_TYPES = {
    "RLIMIT_AS",
    "RLIMIT_CORE",
    "RLIMIT_CPU",
    "RLIMIT_FSIZE",
    "RLIMIT_NOFILE",
    "RLIMIT_NPROC",
    "RLIMIT_STACK",
}
_UNLIMITED = 0xFFFF_FFFF_FFFF_FFFF
_OPS = {
    "eq": "SCMP_CMP_EQ",
    "ne": "SCMP_CMP_NE",
    "masked_eq": "SCMP_CMP_MASKED_EQ",
    "ge": "SCMP_CMP_GE",
}


def render_seccomp(plan: SeccompPlan) -> dict[str, Any]:
    """The plan's rules in the OCI ``linux.seccomp`` shape (allow by default).

    One OCI rule per plan rule: its argument tests are ANDed, and rules for
    the same call are ORed, as the plan means them. ``errnoRet`` is written,
    but this runsc (2022) answers every denial with EPERM (see ``degraded``)."""
    rules: list[dict[str, Any]] = []
    for rule in plan.rules:
        entry: dict[str, Any] = {
            "names": [rule.syscall],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": rule.errno,
        }
        if rule.args:
            entry["args"] = [
                {
                    "index": a.index,
                    # masked_eq: OCI's value is the mask, valueTwo the datum (libseccomp's order)
                    "value": a.mask if a.op == "masked_eq" else a.value,
                    "valueTwo": a.value if a.op == "masked_eq" else 0,
                    "op": _OPS[a.op],
                }
                for a in rule.args
            ]
        rules.append(entry)
    # only x86_64: gVisor implements no i386 or x32 system calls at all, so a
    # foreign-ABI call cannot reach a kernel path the filter does not see
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": rules,
    }


def _mount(op: _mounts.MountOp, policy: Policy) -> dict[str, Any] | None:
    match op:
        case _mounts.RoBind(source=src, target=dst):
            return {"destination": dst, "type": "bind", "source": src,
                    "options": ["rbind", "ro", "nosuid", "nodev"]}  # fmt: skip
        case _mounts.Bind(source=src, target=dst):
            # writable, but no setuid binary or device node the box plants works
            return {"destination": dst, "type": "bind", "source": src,
                    "options": ["rbind", "rw", "nosuid", "nodev"]}  # fmt: skip
        case _mounts.Tmpfs(target=dst, size_bytes=size, mode=mode):
            # sized: a box filling /tmp stops at ENOSPC (the sentry's memory, in its cgroup)
            options = ["nosuid", "nodev", f"mode={mode:o}"]
            if size is not None:
                options.append(f"size={size}")
            if dst == policy.filesystem.workspace:  # a private workspace is the box user's
                options += [f"uid={policy.identity.uid}", f"gid={policy.identity.gid}"]
            return {"destination": dst, "type": "tmpfs", "source": "tmpfs", "options": options}
        case _mounts.Proc(target=dst):
            # the sentry's own procfs: only the box's processes, no host /proc
            return {"destination": dst, "type": "proc", "source": "proc"}
        case _mounts.Hide(path=path, host_path=host_path):
            if os.path.isdir(host_path):
                return {"destination": path, "type": "tmpfs", "source": "tmpfs",
                        "options": ["ro", "mode=0", "size=4096"]}  # fmt: skip
            if os.path.lexists(host_path):
                return {"destination": path, "type": "bind", "source": "/dev/null",
                        "options": ["rbind", "ro"]}  # fmt: skip
    return None


def render_config(
    plans: Plans,
    policy: Policy,
    command: Sequence[str],
    *,
    channel: bool,
    extra_env: Mapping[str, str] = {},
) -> dict[str, Any]:
    """The OCI runtime spec (``config.json``) for ``plans``; the root is ``rootfs``."""
    mounts: list[dict[str, Any]] = []
    cwd = policy.filesystem.workspace
    readonly_root = False
    for op in plans.mounts:
        if isinstance(op, _mounts.RemountRo) and op.path == "/":
            # nothing but the workspace, /tmp, /dev/shm and listed binds is writable
            readonly_root = True
        elif isinstance(op, _mounts.Chdir):
            cwd = op.path
        elif (entry := _mount(op, policy)) is not None:
            mounts.append(entry)
        # Dev: the sentry's own /dev (null, zero, full, random, urandom, tty,
        # pts, shm), no host device; Dir, File, Symlink: in the bundle's root
    # the sentry's sysfs, read-only (runsc mounts it writable unless the spec
    # has one): no writable place the policy did not list (fs.writable_mounts)
    mounts.append(
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["ro", "nosuid", "nodev", "noexec"],
        }
    )
    env = [f"{k}={v}" for k, v in policy.env] + [f"{k}={v}" for k, v in extra_env.items()]
    launcher = CHANNEL_LAUNCHER if channel else PIPES_LAUNCHER
    caps: dict[str, list[str]] = {
        s: [] for s in ("bounding", "effective", "inheritable", "permitted", "ambient")
    }
    limits = policy.limits
    resources: dict[str, Any] = {}
    if limits.memory_bytes is not None:  # the sentry's view; the host cgroup is corral's own
        resources["memory"] = {"limit": limits.memory_bytes, "swap": limits.memory_bytes}
    if limits.pids is not None:
        resources["pids"] = {"limit": limits.pids}
    if limits.cpu_cores is not None:
        resources["cpu"] = {"quota": round(limits.cpu_cores * 100_000), "period": 100_000}
    return {
        "ociVersion": "1.0.2",
        "hostname": policy.identity.hostname,
        "root": {"path": "rootfs", "readonly": readonly_root},
        "mounts": mounts,
        "process": {
            "terminal": False,
            # never root: the box's processes run as the policy's uid in the sentry
            "user": {"uid": policy.identity.uid, "gid": policy.identity.gid, "additionalGids": []},
            "args": ["/bin/sh", "-c", launcher, "corral", *command],
            "env": env,
            "cwd": cwd,
            # no capability in any set: CAP_SYS_ADMIN and friends reach sentry code
            # (mount, raw sockets) an unprivileged user cannot
            "capabilities": caps,
            # a setuid binary or file capability in the box raises privileges
            "noNewPrivileges": True,
            "rlimits": [
                {
                    "type": r.resource,
                    "soft": _UNLIMITED if r.soft is None else r.soft,
                    "hard": _UNLIMITED if r.hard is None else r.hard,
                }
                for r in plans.rlimits
                if r.resource in _RLIMIT_TYPES
            ],
        },
        "linux": {
            # the box's own pid, network (empty: --network=none), ipc, uts and
            # mount namespaces, all in the sentry; none shared with the host
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "resources": resources,
            "seccomp": render_seccomp(plans.seccomp),
            # the sentry's /proc shows none of the host's kernel state
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"],
        },
    }


def write_rootfs(plans: Plans, rootfs: str) -> None:
    """Build the bundle's root in ``rootfs`` (an empty directory): the plan's
    symlinks, directories and files (written from memory, never a host path),
    and an empty mount point for every mount. Root-owned, read-only to the box."""
    for op in plans.mounts:
        match op:
            case _mounts.Symlink(link_to=target, path=path):
                os.symlink(target, _inside(rootfs, path))
            case _mounts.Dir(path=path, mode=mode):
                os.makedirs(_inside(rootfs, path), exist_ok=True)
                os.chmod(_inside(rootfs, path), mode)
            case _mounts.File(path=path, content=content, mode=mode):
                dest = _inside(rootfs, path)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
                try:
                    os.write(fd, content)
                    os.fchmod(fd, mode)
                finally:
                    os.close(fd)
            case _mounts.RoBind(source=src, target=dst) | _mounts.Bind(source=src, target=dst):
                _mount_point(rootfs, dst, directory=os.path.isdir(src))
            case _mounts.Tmpfs(target=dst) | _mounts.Proc(target=dst):
                _mount_point(rootfs, dst, directory=True)
            case _:
                pass


def _inside(rootfs: str, path: str) -> str:
    rel = os.path.normpath(path).lstrip("/")
    if rel.startswith(".."):
        raise ValueError(f"{path!r} leaves the box's root")
    return os.path.join(rootfs, rel)


def _mount_point(rootfs: str, target: str, *, directory: bool) -> None:
    dest = _inside(rootfs, target)
    parent = os.path.dirname(dest)
    # under a symlink of the root (merged /usr) or another mount: that mount has it
    if os.path.islink(dest) or any(os.path.islink(p) for p in _parents(rootfs, parent)):
        return
    os.makedirs(parent, exist_ok=True)
    if os.path.lexists(dest):
        return
    if directory:
        os.mkdir(dest, 0o755)
    else:
        os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444))


def _parents(rootfs: str, path: str) -> list[str]:
    out = []
    while len(path) > len(rootfs):
        out.append(path)
        path = os.path.dirname(path)
    return out
