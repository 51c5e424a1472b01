"""Finding runsc, the flags every call uses, corral's own state directory, the sweep."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from corral._errors import HostToolMissing

RUNSC_INSTALL_HINT = "install it with: sudo apt-get install runsc (Debian/Ubuntu's gVisor)"
PLATFORM = "ptrace"
RUNSC_FLAGS = (
    # ptrace: the platform that works on this kind of host (no nested KVM that
    # does not hang; this runsc predates systrap). Each system call of the box
    # is caught by ptrace and served by the sentry, never by the host kernel.
    f"--platform={PLATFORM}",
    # an empty network stack in the sentry: loopback only, no host interface
    "--network=none",
    # the policy's seccomp rules, enforced by the sentry on the box's calls
    "--oci-seccomp",
    # corral's cgroup holds runsc, the gofer and the sentry (see _box)
    "--ignore-cgroups",
)
_OWNED = re.compile(r"^box-(\d+)-\d+$")
# What a host cgroup's pids.max must allow gVisor itself: the sentry, the gofer
# and runsc (about 110 host tasks idle here), and under the ptrace platform a
# stub process per box address space with a thread for each sentry thread
# that enters it (about 26 per box process, measured: 50 sleeping processes in
# the box were 1736 host tasks). The box's own cap is RLIMIT_NPROC in the
# sentry; a host cgroup at that cap would kill the sentry (Go cannot start a
# thread), and the box with it.
_SENTRY_TASKS = 256
_HOST_TASKS_PER_PROCESS = 40


def host_task_ceiling(pids: int) -> int:
    """The host cgroup's pids.max for a gVisor box allowed ``pids`` tasks."""
    return _SENTRY_TASKS + _HOST_TASKS_PER_PROCESS * pids


def pids_note(pids: int) -> str:
    """The ``degraded`` note of a gVisor box's pids limit."""
    return (
        f"pids: the box's {pids} tasks are capped by RLIMIT_NPROC in gVisor's kernel (a fork "
        "fails with EAGAIN), so no pids event reports the cap; the host cgroup holds gVisor's "
        f"own tasks to {host_task_ceiling(pids)}"
    )


@dataclass(frozen=True, slots=True)
class RunscInfo:
    path: str
    version: str


@functools.cache
def find_runsc() -> RunscInfo:
    """The runsc binary and its version, or ``HostToolMissing`` saying how to install it."""
    path = shutil.which(
        "runsc", path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    )
    if path is None:
        raise HostToolMissing("runsc (gVisor)", RUNSC_INSTALL_HINT)
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, check=True, timeout=10, env={}
        ).stdout.decode(errors="replace")
    except (OSError, subprocess.SubprocessError) as exc:
        raise HostToolMissing(
            "runsc (gVisor)", f"{path} does not run ({exc}); {RUNSC_INSTALL_HINT}"
        ) from exc
    first = out.splitlines()[0] if out else "unknown"
    return RunscInfo(path, first.removeprefix("runsc version ").strip())


def runsc_root() -> str:
    """corral's own runsc state and bundle directory (0700): never another user's runsc's."""
    if os.geteuid() == 0:
        base = "/run/corral-gvisor"
    else:
        base = os.path.join(
            os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/corral-{os.geteuid()}", "corral-gvisor"
        )
    os.makedirs(base, mode=0o700, exist_ok=True)
    return base


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_containers() -> list[str]:
    """Ids of the containers runsc has in corral's state directory."""
    try:
        out = subprocess.run(
            [
                find_runsc().path,
                "--root",
                os.path.join(runsc_root(), "state"),
                "list",
                "--format=json",
            ],
            capture_output=True,
            timeout=30,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        ).stdout
        entries = json.loads(out or b"[]") or []
    except (OSError, subprocess.SubprocessError, ValueError, HostToolMissing):
        return []
    return [str(e.get("id")) for e in entries if isinstance(e, dict) and e.get("id")]


def sweep_orphans() -> list[str]:
    """Delete the containers and bundles of boxes whose owner died (kill -9):
    ``runsc delete --force`` for each, then its bundle; returns their ids."""
    from corral.backends.gvisor._box import delete_container

    root = runsc_root()
    gone: set[str] = set()
    for cid in list_containers():
        m = _OWNED.match(cid)
        if m and not _alive(int(m[1])):
            delete_container(cid)
            gone.add(cid)
    bundles = os.path.join(root, "bundles")
    if os.path.isdir(bundles):
        for name in os.listdir(bundles):
            m = _OWNED.match(name)
            if m and not _alive(int(m[1])):
                shutil.rmtree(os.path.join(bundles, name), ignore_errors=True)
                gone.add(name)
    return sorted(gone)
