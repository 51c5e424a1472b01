"""Every read of ``AsyncSandbox``'s private parts by ``corral serve``.

One small module, so that what the sandbox does not yet offer publicly is
reached in one place. No other module of ``corral.server`` touches a private
field of the sandbox.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

from corral._sandbox import AsyncSandbox, CommandHandle, PtyHandle
from corral.backends import Usage
from corral.net._events import NetworkEvent


def adopt(
    sandbox: AsyncSandbox,
    workspace: Path,
    on_event: Callable[[NetworkEvent], None],
    approve: Callable[[str, int], Awaitable[bool]] | None,
) -> None:
    """Give a not yet started sandbox the server's workspace directory (the
    box's own for its life, taken back at its end) and the network callbacks,
    which must name the sandbox's id, known only once it is constructed."""
    sandbox._workdir = workspace
    sandbox._own_workdir = True
    sandbox._on_network_event = on_event
    if approve is not None:
        sandbox._approve = approve


def died_of_oom(sandbox: AsyncSandbox) -> bool:
    """The box's cgroup saw an OOM kill (the box's ``usage()``)."""
    return sandbox._oom_kills() > 0


def usage(sandbox: AsyncSandbox) -> Usage | None:
    """The box's counters now (``Box.usage()``: cgroup files, cheap); None
    before it started."""
    box = sandbox._box
    return box.usage() if box is not None else None


def failure(sandbox: AsyncSandbox) -> str:
    """Why the sandbox's channel failed ("" if it did not)."""
    connection = sandbox._connection
    failure = connection.failure if connection is not None else None
    return str(failure or "")


def spawn(sandbox: AsyncSandbox, coro: Coroutine[Any, Any, None]) -> None:
    """A housekeeping task that ends when the sandbox closes."""
    sandbox._spawn(coro)


def buffers(handle: CommandHandle) -> Mapping[Any, bytearray]:
    """A background command's output buffers (bounded by the policy's output_bytes)."""
    return handle._buffers()


def terminal_ended(handle: PtyHandle) -> bool:
    """The terminal's process ended (its result not yet waited for)."""
    return handle._process.exit.done()


def paused(sandbox: AsyncSandbox) -> bool:
    """The box is frozen (``pause``) and not yet resumed."""
    return sandbox._paused
