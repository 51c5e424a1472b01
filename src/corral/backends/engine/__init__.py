"""The container engine backends: ``"docker"`` and ``"podman"``.

One package for both: the two CLIs take the same ``run`` flags, so the plans
are rendered once (``_argv``), the seccomp plan once (``_seccomp``), and the
lifecycle is one class (``_box``); ``Engine`` holds the differences (podman's
global options, its bind options, the init). Boxes run with ``--network none``,
a read-only root, every capability dropped, no-new-privileges, corral's own
seccomp profile, a per-box uid, memory (swap off), CPU and pids limits,
explicit rlimits; see SECURITY.md.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from corral._errors import CorralError
from corral._policy import Policy
from corral.backends._base import BoxSpec, Check
from corral.backends.engine._argv import EngineKind, Runtime
from corral.backends.engine._box import EngineBox, runtime_notes, sweep_orphans
from corral.backends.engine._engine import _FIX, Engine
from corral.backends.linux._checks import linux_checks
from corral.backends.linux._facts import check_bind_sources, gather_host_facts
from corral.plan import HostFacts, make_plans

__all__ = ["DockerBackend", "EngineBackend", "EngineBox", "PodmanBackend"]


class EngineBackend:
    """Boxes as containers of a local engine. Implements ``corral.backends.Backend``.

    A box is removed when it closes; one whose owner was killed is removed by
    the next ``sweep`` (its container's name names the owner). ``reattach``
    never adopts one: a box's channel is its owner's attached CLI."""

    def __init__(self, kind: EngineKind, runtime: Runtime = "runc") -> None:
        self.engine = Engine(kind, runtime)
        self._facts: HostFacts | None = None
        self._swept = False

    @property
    def name(self) -> str:
        return self.engine.kind

    async def _host_facts(self) -> HostFacts:
        if self._facts is None:
            self._facts = await asyncio.to_thread(gather_host_facts)
        return self._facts

    def check(self, policy: Policy) -> tuple[str, ...]:
        """Degraded controls for ``policy``; raises ``UnsupportedPolicy`` (naming
        the field) or ``HostToolMissing`` (the engine's CLI is not installed)."""
        self.engine.binary  # noqa: B018 - raises HostToolMissing when absent
        check_bind_sources(policy)
        self.engine.refuse_unsupported(policy)
        plans = make_plans(policy, self._facts or gather_host_facts())
        return plans.degraded + runtime_notes(self.engine.runtime, policy)

    async def launch(self, spec: BoxSpec) -> EngineBox:
        if not self._swept:
            self._swept = True
            await self.sweep()
        return await EngineBox.start(self.engine, spec, await self._host_facts())

    async def sweep(self) -> None:
        try:
            await asyncio.to_thread(self.engine.probe)
        except CorralError:
            return  # no engine answering: nothing of it to sweep
        await asyncio.to_thread(sweep_orphans, self.engine)

    def doctor(self) -> list[Check]:
        name = self.engine.kind
        try:
            version = self.engine.probe()
        except CorralError as exc:
            return [Check(name, "fail", str(exc), _FIX[name])]
        checks = [
            Check(name, "ok", f"{self.engine.binary} (server {version})"),
            self._image_check(),
        ]
        return checks + linux_checks(landlock_note=f"not used by the {name} backend")

    def _image_check(self) -> Check:
        """Whether corral's default image (of this corral's lock) is in the engine:
        optional (boxes without ``image`` need none), so a warning at most."""
        from corral import image

        try:
            ref = image.default_ref()
            present = image.engine_has_image(self.engine.kind, ref)
        except CorralError as exc:
            return Check("default image", "warn", str(exc))
        if present:
            return Check("default image", "ok", f"{ref} (Sandbox(image=...) / --image)")
        return Check(
            "default image",
            "warn",
            f"{ref} is not in {self.engine.kind}; boxes without an image do not need it",
            f"corral image build --into {self.engine.kind}  (as root; several minutes once)",
        )

    async def reattach(self, info: Mapping[str, str]) -> EngineBox | None:
        return None


class DockerBackend(EngineBackend):
    """``--backend docker``: dockerd through the docker CLI (``DOCKER_HOST`` honoured).

    ``runtime="runsc"``: boxes on gVisor, through a runtime named ``runsc``
    registered in dockerd (``HostToolMissing`` says how, if it is not)."""

    def __init__(self, runtime: Runtime = "runc") -> None:
        super().__init__("docker", runtime)


class PodmanBackend(EngineBackend):
    """``--backend podman``: daemonless podman with runc.

    ``runtime="runsc"``: boxes on gVisor, runsc as podman's OCI runtime
    (platform ptrace, the sentry's own empty network)."""

    def __init__(self, runtime: Runtime = "runc") -> None:
        super().__init__("podman", runtime)
