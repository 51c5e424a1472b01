"""Gather ``HostFacts`` once per process: the only place the planning inputs
probe the host (cgroups, /dev/net/tun, libseccomp, the host's layout, root,
loop devices). The planners (``corral.plan``) stay pure."""

from __future__ import annotations

import functools
import os
from typing import get_args

from corral._errors import HostToolMissing, UnsupportedPolicy
from corral._policy import Policy, SeccompProfile, SyscallPolicy
from corral.backends.linux import _cgroups, _seccomp, _workdir
from corral.plan import HostFacts, _mounts
from corral.plan._seccomp import plan_seccomp


@functools.cache
def host_layout() -> _mounts.HostLayout:
    """Which system directories are symlinks (merged /usr) and which /etc files exist."""
    symlinks: list[tuple[str, str]] = []
    dirs: list[str] = []
    for path in _mounts.SYSTEM_DIRS:
        if os.path.islink(path):
            symlinks.append((path, os.readlink(path)))
        elif os.path.isdir(path):
            dirs.append(path)
    etc = tuple(p for p in _mounts.ETC_ALLOWLIST if os.path.exists(p))
    return _mounts.HostLayout(tuple(symlinks), tuple(dirs), etc)


def _seccomp_unfiltered() -> tuple[tuple[str, str], ...]:
    unfiltered: dict[str, str] = {}
    for profile in get_args(SeccompProfile):
        try:
            skipped = _seccomp.skipped_rules(plan_seccomp(SyscallPolicy(profile=profile)))
        except HostToolMissing:
            return ()  # no libseccomp at all: the launch fails with its own message
        for name, why in skipped:
            if "NOT filtered" in why:
                unfiltered[name] = why
    return tuple(sorted(unfiltered.items()))


@functools.cache
def gather_host_facts() -> HostFacts:
    """This host's facts (cached for the process: gathered before the first box)."""
    support = _cgroups.detect_cgroups()
    return HostFacts(
        layout=host_layout(),
        cgroup_version=support.version,
        cgroup_controllers=frozenset(support.controllers),
        cgroup_reason=support.reason,
        net_tun=os.access("/dev/net/tun", os.R_OK | os.W_OK),
        seccomp_unfiltered=_seccomp_unfiltered(),
        image_support=_workdir.image_support(),
        root=os.geteuid() == 0,
        libseccomp_version=_seccomp.libseccomp_version(),
    )


def check_bind_sources(policy: Policy) -> None:
    """Refuse a policy that binds a host path this host does not have (names the field)."""
    for section in ("read_only", "writable"):
        for i, bind in enumerate(getattr(policy.filesystem, section)):
            if not os.path.exists(bind.source):
                raise UnsupportedPolicy(
                    f"filesystem.{section}[{i}].source",
                    f"{bind.source} does not exist on this host",
                )
