"""The gVisor backend (``"gvisor"``): ``runsc`` as an OCI runtime, no daemon.

The box's system calls are served by gVisor's sentry, a kernel in user space,
not by the host kernel: a kernel bug reachable from inside the box is a bug in
the sentry, which runs confined (its own seccomp filter, namespaces, no host
filesystem but through the gofer). corral writes the OCI bundle from the same
plans as the bwrap backend (``_bundle``); ``_box`` runs one box; ``_runsc``
finds runsc and sweeps what a killed owner left.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping

from corral._errors import CorralError, UnsupportedPolicy
from corral._policy import Policy
from corral.backends._base import BoxSpec, Check, refuse_image
from corral.backends.gvisor._box import GvisorBox, _sentry_pids
from corral.backends.gvisor._runsc import PLATFORM, RUNSC_INSTALL_HINT, find_runsc, sweep_orphans
from corral.backends.linux import _cgroups
from corral.backends.linux._facts import check_bind_sources, gather_host_facts
from corral.plan import HostFacts, make_plans

__all__ = ["GvisorBackend", "GvisorBox"]

# gVisor 2022's OCI seccomp ignores errnoRet: a denied call fails with EPERM
# where the plan says ENOSYS (libc's fallback then does not run)
_DEGRADED = (
    "syscalls: every denied call fails with EPERM (this runsc ignores the rules' errno, "
    "so no ENOSYS); gVisor's own system call table is the first boundary",
)


def refuse_network(policy: Policy) -> None:
    """Only network mode ``none``: the box's network is gVisor's own stack, in the sentry.

    corral's allowlist proxy listens inside the box's network namespace
    (bwrap: setns through the box's pidfd); a gVisor box's loopback is the
    sentry's netstack, not a host namespace a thread can enter, so nothing
    corral can open reaches it. ``open`` would need runsc's host network."""
    if policy.network.mode != "none":
        raise UnsupportedPolicy(
            "network.mode",
            f"{policy.network.mode!r} is not available with the gvisor backend: the box's "
            "network is gVisor's user-space stack (--network=none), which corral's proxy "
            "cannot listen in; use network mode 'none' or the bwrap backend",
        )


class GvisorBackend:
    """Boxes run by gVisor's runsc. Implements ``corral.backends.Backend``.

    Boxes die with their owner (runsc under ``setpriv --pdeathsig``), so
    ``reattach`` never finds one; ``sweep`` deletes what a killed owner left."""

    name = "gvisor"

    def __init__(self) -> None:
        self._facts: HostFacts | None = None

    async def _host_facts(self) -> HostFacts:
        if self._facts is None:
            self._facts = await asyncio.to_thread(gather_host_facts)
        return self._facts

    def check(self, policy: Policy) -> tuple[str, ...]:
        """Degraded controls for ``policy``; raises ``UnsupportedPolicy`` (naming
        the field) or ``HostToolMissing`` (runsc not installed)."""
        find_runsc()
        refuse_network(policy)
        check_bind_sources(policy)
        facts = self._facts or gather_host_facts()
        return _sentry_pids(make_plans(policy, facts), policy).degraded + _DEGRADED

    async def launch(self, spec: BoxSpec) -> GvisorBox:
        refuse_image(spec, "gvisor")
        facts = await self._host_facts()
        return await GvisorBox.start(spec, facts, _DEGRADED)

    async def sweep(self) -> None:
        def both() -> None:
            sweep_orphans()
            _cgroups.sweep_orphans()

        await asyncio.to_thread(both)

    def doctor(self) -> list[Check]:
        checks: list[Check] = []
        try:
            info = find_runsc()
            checks.append(Check("runsc", "ok", f"{info.path} {info.version}"))
        except CorralError as exc:
            checks.append(Check("runsc", "fail", str(exc), RUNSC_INSTALL_HINT))
        checks.append(
            Check(
                "gvisor platform",
                "ok",
                f"{PLATFORM} (every system call of the box trapped by ptrace and served by "
                "the sentry; KVM hangs on this kind of host, systrap is newer than Debian's runsc)",
            )
        )
        if os.geteuid() != 0:
            checks.append(
                Check(
                    "gvisor as root",
                    "fail",
                    "corral runs runsc as root (the gofer and sentry drop to their own "
                    "namespaces); rootless runsc is not used",
                    "run corral as root for the gvisor backend",
                )
            )
        support = _cgroups.detect_cgroups()
        checks.append(
            Check(
                "gvisor cgroups",
                "ok" if support.available else "warn",
                f"v{support.version}: {', '.join(support.controllers)}"
                if support.available
                else support.reason,
            )
        )
        return checks

    async def reattach(self, info: Mapping[str, str]) -> GvisorBox | None:
        return None
