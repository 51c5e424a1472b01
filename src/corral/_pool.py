"""Warm pools: sandboxes started ahead of need, each handed out once.

``AsyncPool`` keeps ``size`` boxes started in the background, their agent
connected and the chosen kernels (``kernels``) running, so ``sandbox()``
returns a ready box in about a millisecond and its first cell does not pay
the kernel's cold start. The rules:

- **never reused**: a box leaves the pool once and never comes back; what the
  caller did to it (files, processes, kernel variables, environment) ends
  with it. A pooled box was started with the pool's policy and runtime and
  nobody has run anything in it, so it is what a new ``AsyncSandbox`` is.
- **checked before hand-out**: a box that died or whose agent does not answer
  a ping (or that was OOM-killed while idle) is closed and the next one tried;
  with none ready, ``sandbox()`` starts one cold (the caller never waits for
  the refill).
- **fresh limits at hand-out**: an idle box has no lifetime (the pool owns
  it); its lifetime (``timeout_s``) starts when it is handed out.
- **bounded refill**: at most ``max_starting`` boxes start at once (default:
  half the CPUs, at least one), so refilling does not starve running work;
  a failed start is retried after a back-off, never in a tight loop.

``Pool`` is the sync facade: the same pool on the facade's event loop (a
daemon thread), whose ``sandbox()`` yields the sync ``Sandbox``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

from . import _portal, _runtime
from ._errors import CorralError, SandboxError
from ._policy import Policy
from ._sandbox import AsyncSandbox
from ._sync import Sandbox
from .backends import Backend

log = logging.getLogger("corral.pool")

_PING_TIMEOUT_S = 1.0
_RETRY_S = (0.5, 1.0, 2.0, 5.0, 10.0)  # back-off after failed starts, then 10 s


def _default_starting() -> int:
    return max(1, (os.cpu_count() or 2) // 2)


class AsyncPool:
    """Pre-started sandboxes for one (policy, runtime, backend, image).

    ``size``: boxes kept ready (>= 0). ``kernels``: languages whose default
    context is started in each box before it is ready (``()``: none; each needs
    the runtime). ``timeout_s``: each handed-out box's lifetime, from hand-out.
    ``max_starting``: boxes started at once while refilling (>= 1).
    ``image``: the boxes' container image (``AsyncSandbox``'s ``image``).
    ``ValueError`` for a bad size or bound. Use ``async with``, or ``start()``
    then ``close()`` (which ends every box not handed out).
    """

    def __init__(
        self,
        policy: Policy | str | None = None,
        *,
        runtime: str | None = _runtime.DEFAULT,
        size: int = 4,
        kernels: Sequence[str] = ("python",),
        timeout_s: float | None = 300.0,
        max_starting: int | None = None,
        backend: str | Backend | None = None,
        image: str | None = None,
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size: expected a whole number >= 0, got {size!r}")
        if max_starting is None:
            max_starting = _default_starting()
        if isinstance(max_starting, bool) or not isinstance(max_starting, int) or max_starting < 1:
            raise ValueError(f"max_starting: expected a whole number >= 1, got {max_starting!r}")
        if kernels and runtime is None:
            raise ValueError("kernels: starting kernels needs a runtime (runtime=None given)")
        self.policy = Policy.preset(policy) if isinstance(policy, str) else policy
        self.runtime = runtime
        self.size = size
        self.kernels = tuple(kernels)
        self.timeout_s = timeout_s
        self.max_starting = max_starting
        self.backend = backend
        self.image = image
        self._ready: deque[AsyncSandbox] = deque()
        self._starting = 0
        self._wake = asyncio.Event()
        self._filler: asyncio.Task[None] | None = None
        self._starts: set[asyncio.Task[None]] = set()
        self._failures = 0
        self._closed = False
        self.last_error: BaseException | None = None  # the last failed start, for operators

    async def __aenter__(self) -> AsyncPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def ready(self) -> int:
        """Boxes ready to hand out now."""
        return len(self._ready)

    async def start(self) -> None:
        """Begin filling the pool in the background (returns at once)."""
        if self._closed:
            raise SandboxError("the pool was closed")
        if self._filler is None:
            self._filler = asyncio.ensure_future(self._fill())

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        """Until ``size`` boxes are ready (``TimeoutError`` after ``timeout_s``)."""
        async with asyncio.timeout(timeout_s):
            while len(self._ready) < self.size:
                if self._closed:
                    raise SandboxError("the pool was closed")
                await asyncio.sleep(0.01)

    def _new(self) -> AsyncSandbox:
        # no lifetime while idle: the pool owns the box until it is handed out
        return AsyncSandbox(
            self.policy,
            timeout_s=None,
            runtime=self.runtime,
            backend=self.backend,
            image=self.image,
        )

    async def _prepare(self) -> AsyncSandbox:
        sb = self._new()
        try:
            await sb.start()
            for language in self.kernels:
                await sb.prewarm(language)
        except BaseException:
            await sb.close()
            raise
        return sb

    async def _fill(self) -> None:
        while not self._closed:
            while len(self._ready) + self._starting < self.size and (
                self._starting < self.max_starting
            ):
                self._starting += 1
                task = asyncio.ensure_future(self._start_one())
                self._starts.add(task)
                task.add_done_callback(self._starts.discard)
            self._wake.clear()
            await self._wake.wait()

    async def _start_one(self) -> None:
        try:
            sb = await self._prepare()
        except asyncio.CancelledError:
            self._starting -= 1
            raise
        except Exception as exc:
            self.last_error = exc
            delay = _RETRY_S[min(self._failures, len(_RETRY_S) - 1)]
            self._failures += 1
            log.warning("corral pool: a box failed to start (retry in %s s): %s", delay, exc)
            try:
                await asyncio.sleep(delay)
            finally:
                self._starting -= 1
                self._wake.set()
            return
        self._failures = 0
        self._starting -= 1  # counted as ready in the same step: no overshoot
        self._wake.set()
        if self._closed:
            await sb.close()
        else:
            self._ready.append(sb)

    async def _healthy(self, sb: AsyncSandbox) -> bool:
        """The box is up, its agent answers, nothing in it was OOM-killed while idle."""
        if not await sb.is_running() or sb._oom_kills() > 0:
            return False
        try:
            await asyncio.wait_for(sb._conn().call({"op": "ping"}), _PING_TIMEOUT_S)
        except (CorralError, TimeoutError):
            return False
        return True

    async def take(self) -> AsyncSandbox:
        """A ready sandbox, now the caller's (close it when done). Starts one
        cold when none is ready; ``SandboxError`` once the pool is closed, or
        what the cold start raised."""
        if self._closed:
            raise SandboxError("the pool was closed")
        while self._ready:
            sb = self._ready.popleft()
            self._wake.set()  # refill in the background
            if await self._healthy(sb):
                await sb.set_timeout(self.timeout_s)  # its lifetime starts now
                return sb
            log.warning("corral pool: dropped a box that failed its check before hand-out")
            await sb.close()
        sb = await self._prepare()
        await sb.set_timeout(self.timeout_s)
        return sb

    @contextlib.asynccontextmanager
    async def sandbox(self) -> AsyncIterator[AsyncSandbox]:
        """``async with pool.sandbox() as sb``: a ready sandbox, closed at the end."""
        sb = await self.take()
        try:
            yield sb
        finally:
            await sb.close()

    async def close(self) -> None:
        """Stop refilling and end every box not handed out (idempotent)."""
        self._closed = True
        self._wake.set()
        tasks = [t for t in (self._filler, *self._starts) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        ready, self._ready = list(self._ready), deque()
        await asyncio.gather(*(sb.close() for sb in ready), return_exceptions=True)


class Pool:
    """The sync facade of ``AsyncPool`` (same parameters): its boxes are
    started on the facade's event loop, in the background, between calls."""

    def __init__(
        self,
        policy: Policy | str | None = None,
        *,
        runtime: str | None = _runtime.DEFAULT,
        size: int = 4,
        kernels: Sequence[str] = ("python",),
        timeout_s: float | None = 300.0,
        max_starting: int | None = None,
        backend: str | Backend | None = None,
        image: str | None = None,
    ) -> None:
        make: Callable[[], AsyncPool] = lambda: AsyncPool(  # noqa: E731
            policy,
            runtime=runtime,
            size=size,
            kernels=kernels,
            timeout_s=timeout_s,
            max_starting=max_starting,
            backend=backend,
            image=image,
        )
        self._async = _portal.call(_construct(make))
        _portal.call(self._async.start())

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ready(self) -> int:
        """Boxes ready to hand out now."""
        return self._async.ready

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Until ``size`` boxes are ready (``TimeoutError`` after ``timeout_s``)."""
        _portal.call(self._async.wait_ready(timeout_s))

    def take(self) -> Sandbox:
        """A ready sandbox, now the caller's (close it when done)."""
        return Sandbox._around(_portal.call(self._async.take()))

    @contextlib.contextmanager
    def sandbox(self) -> Iterator[Sandbox]:
        """``with pool.sandbox() as sb``: a ready sandbox, closed at the end."""
        sb = self.take()
        try:
            yield sb
        finally:
            sb.close()

    def close(self) -> None:
        """Stop refilling and end every box not handed out (idempotent)."""
        _portal.call(self._async.close())


async def _construct(make: Callable[[], AsyncPool]) -> AsyncPool:
    # on the facade's loop: the pool's Event and tasks belong to it
    return make()
