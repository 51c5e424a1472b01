"""What a Linux host can enforce (``corral doctor``, through ``Backend.doctor``),
and how to fix what is missing. Shared by every Linux backend."""

from __future__ import annotations

import ctypes
import os

from corral._policy import SyscallPolicy
from corral.backends._base import Check
from corral.backends.linux import _cgroups, _seccomp, _workdir
from corral.plan._seccomp import plan_seccomp

_SYS_LANDLOCK_CREATE_RULESET = 444  # x86_64 and aarch64 share this number
_LANDLOCK_CREATE_RULESET_VERSION = 1


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def _seccomp_status() -> str:
    status = _read("/proc/self/status") or ""
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return "present" if "Seccomp" in fields else "absent (kernel without CONFIG_SECCOMP?)"


def landlock_abi() -> int | None:
    libc = ctypes.CDLL(None, use_errno=True)
    abi = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0, _LANDLOCK_CREATE_RULESET_VERSION)
    return int(abi) if abi > 0 else None


def linux_checks(*, landlock_note: str) -> list[Check]:
    """User namespaces, cgroups, seccomp, landlock, tty, workspace disk, identity."""
    checks: list[Check] = []
    max_ns = _read("/proc/sys/user/max_user_namespaces")
    clone = _read("/proc/sys/kernel/unprivileged_userns_clone")
    if max_ns == "0" or clone == "0":
        checks.append(
            Check(
                "user namespaces",
                "fail",
                f"disabled (max_user_namespaces={max_ns}, unprivileged_userns_clone={clone})",
                "sysctl -w user.max_user_namespaces=10000 kernel.unprivileged_userns_clone=1",
            )
        )
    else:
        checks.append(Check("user namespaces", "ok", f"max_user_namespaces={max_ns}"))

    support = _cgroups.detect_cgroups()
    if support.version is None or not support.controllers:
        checks.append(
            Check(
                "cgroups",
                "warn",
                f"not usable: {support.reason}; memory and processes fall back to rlimits, "
                "a CPU quota is refused",
                "run as root, or in a cgroup v2 delegated to you (systemd-run --user --scope -p "
                "Delegate=yes)",
            )
        )
    else:
        checks.append(
            Check(
                "cgroups",
                "ok",
                f"v{support.version}, controllers: {', '.join(support.controllers)}",
            )
        )

    version = _seccomp.libseccomp_version()
    if version is None:
        checks.append(
            Check("seccomp", "fail", "libseccomp not found", "sudo apt-get install libseccomp2")
        )
    else:
        plan = plan_seccomp(SyscallPolicy(profile="strict"))
        missing = [n for n, why in _seccomp.skipped_rules(plan) if "NOT filtered" in why]
        detail = f"libseccomp {version}, status field {_seccomp_status()}"
        if missing:
            detail += f"; not known here (not filtered): {', '.join(missing)}"
        checks.append(Check("seccomp", "ok", detail))

    abi = landlock_abi()
    checks.append(
        Check(
            "landlock",
            "ok" if abi else "warn",
            f"ABI {abi}" if abi else f"not available ({landlock_note})",
        )
    )

    tiocsti = _read("/proc/sys/dev/tty/legacy_tiocsti")
    if tiocsti == "1":
        checks.append(
            Check(
                "tty",
                "warn",
                "dev.tty.legacy_tiocsti=1: TIOCSTI works on this host (corral's seccomp "
                "filter and --new-session block it in boxes)",
                "sysctl -w dev.tty.legacy_tiocsti=0",
            )
        )
    image = _workdir.image_support()
    checks.append(
        Check(
            "workspace disk",
            "ok" if image is None else "warn",
            "a server's workspaces are per-box ext4 images: a hard bound on disk_bytes"
            if image is None
            else f"a host workspace directory is bounded per file only ({image})",
        )
    )
    if os.geteuid() == 0:
        checks.append(
            Check(
                "identity",
                "ok",
                "running as root: each box gets its own unprivileged host uid "
                "(CORRAL_UID_RANGE overrides the range)",
            )
        )
    else:
        checks.append(
            Check("identity", "ok", f"running as uid {os.geteuid()}: boxes use user namespaces")
        )
    return checks
