"""HostFacts: what one host can enforce, as frozen data.

A backend gathers them once (``corral.backends.linux.gather_host_facts``);
the planners read them and never probe the host themselves, so every
degrade-or-refuse decision is a pure function, golden-tested with made-up
hosts (no cgroups, no /dev/net/tun, an old libseccomp) and without root.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from corral.plan._mounts import HostLayout


@dataclass(frozen=True, slots=True)
class HostFacts:
    """Facts about the host the plans depend on.

    ``cgroup_controllers``: the limiting controllers (of memory, pids, cpu)
    corral can use here; ``cgroup_reason`` says why the others are not usable
    (empty when all are). ``net_tun``: /dev/net/tun is usable by this user
    (network mode ``open`` needs it). ``seccomp_unfiltered``: ``(syscall,
    why)`` for each rule of any profile this host's libseccomp cannot filter.
    ``image_support``: None when a fresh workspace can be backed by a bounded
    disk image; otherwise why not. ``root``: corral runs as euid 0.
    """

    layout: HostLayout
    cgroup_version: Literal[1, 2] | None = None
    cgroup_controllers: frozenset[str] = frozenset()
    cgroup_reason: str = ""
    net_tun: bool = False
    seccomp_unfiltered: tuple[tuple[str, str], ...] = ()
    image_support: str | None = "not gathered"
    root: bool = False
    libseccomp_version: str | None = None
