"""Warm pools of ``corral serve``: boxes started ahead of the create requests.

The operator names pools with ``corral serve --pool SPEC`` (repeatable), each
for one (policy, runtime) on the server's backend, e.g.
``--pool policy=default,runtime=default,size=8,kernels=python``. A create
request whose policy and runtime equal a pool's (and that asks for no network
approval) gets a ready box from it; with none ready it starts one cold, as
without pools. The rules (those of ``corral.AsyncPool``, plus the server's):

- a pooled box is nobody's until handed out: it has no record, counts against
  no key's quotas (nor the server's ``max_sandboxes``), and its identity
  (sandbox id), record, creation time and lifetime are made at hand-out;
- it is checked before hand-out (running, agent answering, no OOM kill) and
  is never handed out twice; nobody ran anything in it;
- refills start at most ``--pool-max-starting`` boxes at once across all
  pools (default: half the CPUs, at least one), so running work keeps the CPU;
- on shutdown every box not handed out is ended and its workspace removed;
  after a ``kill -9`` the next start removes workspaces no record names.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from corral import _runtime
from corral._errors import CorralError
from corral._policy import Policy
from corral._pool import AsyncPool
from corral._sandbox import AsyncSandbox
from corral.net._events import NetworkEvent

from . import _internals
from ._workspace import remove_tree

log = logging.getLogger("corral.server.pools")

_FIELDS = ("policy", "runtime", "size", "kernels")


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """One pool as the operator names it. ``policy``: a preset name or a
    policy file; ``runtime``: a runtime name, or None for boxes without one;
    ``size``: boxes kept ready (>= 1); ``kernels``: languages whose default
    context is started in each box (needs a runtime)."""

    policy: str = "default"
    runtime: str | None = _runtime.DEFAULT
    size: int = 4
    kernels: tuple[str, ...] = ("python",)

    @property
    def label(self) -> str:
        """How metrics name the pool: ``policy/runtime``."""
        return f"{self.policy}/{self.runtime or 'none'}"

    @classmethod
    def parse(cls, text: str) -> PoolSpec:
        """``policy=NAME,runtime=NAME|none,size=N,kernels=python+...|none``,
        every field optional (defaults: default, default, 4, python; no
        kernels without a runtime). ``CorralError`` naming the bad field."""
        values: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, eq, value = item.partition("=")
            name = name.strip()
            if not eq or name not in _FIELDS:
                raise CorralError(
                    f"--pool {text!r}: expected NAME=VALUE with NAME one of "
                    f"{', '.join(_FIELDS)}, got {item!r}"
                )
            if name in values:
                raise CorralError(f"--pool {text!r}: {name} given twice")
            values[name] = value.strip()
        runtime: str | None = values.get("runtime", _runtime.DEFAULT)
        if runtime in ("", "none"):
            runtime = None
        try:
            size = int(values.get("size", "4"))
        except ValueError:
            size = 0
        if size < 1:
            raise CorralError(f"--pool {text!r}: size: expected a whole number >= 1")
        kernels_text = values.get("kernels", "python" if runtime is not None else "none")
        kernels = tuple(k for k in kernels_text.split("+") if k and k != "none")
        if kernels and runtime is None:
            raise CorralError(f"--pool {text!r}: kernels: starting kernels needs a runtime")
        policy = values.get("policy", "default")
        if not policy:
            raise CorralError(f"--pool {text!r}: policy: a preset name or a policy file")
        return cls(policy=policy, runtime=runtime, size=size, kernels=kernels)


class ServerPool(AsyncPool):
    """An ``AsyncPool`` whose boxes are the server's: each gets its workspace
    directory under the server's ``workspaces`` (removed if the box is never
    handed out) and network callbacks naming its sandbox id; starts pass
    through ``gate``, shared by all the server's pools."""

    def __init__(
        self,
        spec: PoolSpec,
        policy: Policy,
        *,
        backend: str,
        workspaces: Path,
        gate: asyncio.Semaphore,
        max_starting: int,
        on_event: Callable[[str, NetworkEvent], None],
    ) -> None:
        super().__init__(
            policy,
            runtime=spec.runtime,
            size=spec.size,
            kernels=spec.kernels,
            timeout_s=None,  # the service keeps each box's lifetime (its Live)
            max_starting=max_starting,
            backend=backend,
        )
        self.spec = spec
        self._workspaces = workspaces
        self._gate = gate
        self._on_event = on_event
        self.hits = 0
        self.misses = 0

    def _new(self) -> AsyncSandbox:
        sb = AsyncSandbox(self.policy, timeout_s=None, runtime=self.runtime, backend=self.backend)
        workspace = self._workspaces / sb.id
        workspace.mkdir(mode=0o700)
        sandbox_id, on_event = sb.id, self._on_event
        _internals.adopt(sb, workspace, lambda event: on_event(sandbox_id, event), None)
        return sb

    async def _prepare(self) -> AsyncSandbox:
        async with self._gate:
            sb = self._new()
            try:
                await sb.start()
                for language in self.kernels:
                    await sb.prewarm(language)
            except BaseException:
                await asyncio.shield(self._discard(sb))
                raise
            return sb

    async def discard(self, sb: AsyncSandbox) -> None:
        """End a box taken from this pool that was never handed to anyone
        (its record could not be written): the box and its workspace."""
        await self._discard(sb)

    async def _discard(self, sb: AsyncSandbox) -> None:
        try:
            await sb.close()
        finally:
            try:
                await asyncio.to_thread(remove_tree, self._workspaces / sb.id)
            except OSError as exc:  # the next start removes it (no record names it)
                log.warning("corral pool: cannot remove a workspace: %s", exc)
