"""The bubblewrap backend (``"bwrap"``): Linux namespaces, cgroups, seccomp and
rlimits around an unprivileged bwrap; no daemon, no root needed.

``_argv`` renders the plans into bwrap's command line; ``_box`` runs one
box's lifecycle. Host pieces are in ``corral.backends.linux``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from corral._errors import CorralError
from corral._policy import Policy
from corral.backends._base import BoxSpec, Check, refuse_image
from corral.backends.bwrap._argv import BWRAP_INSTALL_HINT, PROXY_ENV, find_bwrap
from corral.backends.bwrap._box import BwrapBox, sweep_orphans
from corral.backends.linux._checks import linux_checks
from corral.backends.linux._facts import check_bind_sources, gather_host_facts
from corral.plan import HostFacts, make_plans

__all__ = ["BwrapBackend", "BwrapBox"]


class BwrapBackend:
    """Boxes made by bubblewrap. Implements ``corral.backends.Backend``.

    Boxes die with the process that started them (``--die-with-parent``,
    ``setpriv --pdeathsig``), so ``reattach`` never finds one."""

    name = "bwrap"

    def __init__(self) -> None:
        self._facts: HostFacts | None = None

    async def _host_facts(self) -> HostFacts:
        if self._facts is None:  # probed once, off the event loop
            self._facts = await asyncio.to_thread(gather_host_facts)
        return self._facts

    def check(self, policy: Policy) -> tuple[str, ...]:
        """Degraded controls for ``policy`` with a private workspace; raises
        ``UnsupportedPolicy`` (naming the field) or ``HostToolMissing``."""
        find_bwrap()
        check_bind_sources(policy)
        if policy.network.mode == "allowlist":
            policy = policy.with_env({**PROXY_ENV, **dict(policy.env)}, replace=True)
        facts = self._facts or gather_host_facts()
        return make_plans(policy, facts).degraded

    async def launch(self, spec: BoxSpec) -> BwrapBox:
        refuse_image(spec, "bwrap")
        return await BwrapBox.start(spec, await self._host_facts())

    async def sweep(self) -> None:
        await asyncio.to_thread(sweep_orphans)

    def doctor(self) -> list[Check]:
        checks: list[Check] = []
        try:
            info = find_bwrap()
            checks.append(Check("bwrap", "ok", f"{info.path} {'.'.join(map(str, info.version))}"))
        except CorralError as exc:
            checks.append(Check("bwrap", "fail", str(exc), BWRAP_INSTALL_HINT))
        return checks + linux_checks(landlock_note="not used by the bwrap backend yet")

    async def reattach(self, info: Mapping[str, str]) -> BwrapBox | None:
        return None  # a bwrap box never outlives its owner
