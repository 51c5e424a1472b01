"""Tools for testing corral and its backends: conformance checks and a fake agent.

``check_backend(backend)`` is the suite every backend must pass (like trio's
``check_one_way_stream``): the semantics of the ``Backend`` and ``Box``
Protocols as ``AsyncSandbox`` and ``run`` rely on them, then the audit's
probes from inside its boxes. A third-party backend runs it in its own tests::

    from corral.testing import check_backend

    async def test_my_backend_conforms() -> None:
        await check_backend(MyBackend())

Each check is also in ``BACKEND_CHECKS`` (name -> coroutine function), so a
test suite can report them one by one. ``FakeAgent`` is the other end of two
real pipes that speaks whatever a test makes it say: for testing the host's
end of the wire (``corral._connection``) against a hostile agent.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping

from corral._box import _wire as w
from corral._errors import UnsupportedPolicy
from corral._policy import Bind, Policy
from corral._run import run_async
from corral._sandbox import AsyncSandbox
from corral.backends import Backend, Box, BoxExit, BoxSpec, Check, Usage

__all__ = ["BACKEND_CHECKS", "FakeAgent", "check_backend"]

_QUICK = Policy.preset("default").with_limits(wall_time_s=20.0)


async def _check_policy_check(backend: Backend) -> None:
    """``check`` starts nothing, returns notes, and refuses naming the field."""
    degraded = backend.check(_QUICK)
    assert isinstance(degraded, tuple), degraded
    assert all(isinstance(note, str) and note for note in degraded), degraded
    missing = _QUICK.with_filesystem(read_only=(Bind("/nonexistent/corral-check", "/mnt/x"),))
    field = None
    try:
        backend.check(missing)
    except UnsupportedPolicy as exc:
        field = exc.field
    assert field == "filesystem.read_only[0].source", f"refusal names {field!r}"


async def _check_one_shot(backend: Backend) -> None:
    """Output, status and stdin through ``run`` (which uses only the Box interface)."""
    result = await run_async(
        ["/bin/sh", "-c", "echo out; echo err >&2; exit 3"], policy=_QUICK, backend=backend
    )
    assert (result.exit_code, result.signal) == (3, None), result
    assert (result.stdout, result.stderr) == (b"out\n", b"err\n"), result
    assert result.degraded == backend.check(_QUICK), (result.degraded, backend.check(_QUICK))
    data = os.urandom(200_000)  # more than a pipe holds: fed as the box reads it
    echoed = await run_async(["cat"], policy=_QUICK, stdin=data, backend=backend)
    assert echoed.stdout == data, len(echoed.stdout)


async def _check_exit_normalised(backend: Backend) -> None:
    """A command killed by signal N exits 128+N with ``signal`` N."""
    result = await run_async(["/bin/sh", "-c", "kill -9 $$"], policy=_QUICK, backend=backend)
    assert (result.exit_code, result.signal) == (137, 9), result
    assert BoxExit.from_code(-15) == BoxExit(143, 15)


async def _check_limits(backend: Backend) -> None:
    """The wall clock and the output cap end the box, and say so."""
    slow = await run_async(
        ["sleep", "30"], policy=_QUICK.with_limits(wall_time_s=0.5), backend=backend
    )
    assert slow.limit_hit == "timeout", slow
    flood = await run_async(
        ["/bin/sh", "-c", "yes"], policy=_QUICK.with_limits(output_bytes=1 << 16), backend=backend
    )
    assert flood.limit_hit == "output", flood.limit_hit
    assert len(flood.stdout) <= 1 << 16, len(flood.stdout)


async def _check_box_lifecycle(backend: Backend) -> None:
    """kill() never blocks and is idempotent; wait() then returns; aclose() is
    idempotent; usage() and info() answer before and after."""
    box: Box = await backend.launch(BoxSpec(("sleep", "30"), _QUICK))
    try:
        assert isinstance(box, Box)
        assert isinstance(box.usage(), Usage)
        info = box.info()
        assert isinstance(info, Mapping)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in info.items()), info
        box.kill()
        box.kill()
        status = await asyncio.wait_for(box.wait(), 10.0)
        assert status.exit_code != 0, status
        again = await backend.reattach(info)
        assert again is None or isinstance(again, Box), again
    finally:
        await box.aclose()
        await box.aclose()
    assert isinstance(box.usage(), Usage)


async def _check_launch_failure_leaves_nothing(backend: Backend) -> None:
    """A launch refused for bad input raises and leaves no task behind."""
    before = len(asyncio.all_tasks())
    for spec in (
        BoxSpec((), _QUICK),
        BoxSpec(("echo", "a\0b"), _QUICK),
    ):
        try:
            await backend.launch(spec)
        except ValueError:
            pass
        else:
            raise AssertionError(f"launch({spec.command!r}) did not refuse")
    assert len(asyncio.all_tasks()) == before


async def _check_sandbox(backend: Backend) -> None:
    """A long-lived sandbox over the backend: commands, files, a background
    command, a terminal; ``degraded`` is the backend's; every task it started
    has ended once ``close()`` returns."""
    before = set(asyncio.all_tasks())
    sb = AsyncSandbox(_QUICK, runtime=None, timeout_s=60, backend=backend)
    await sb.start()
    try:
        assert sb.degraded == backend.check(_QUICK), sb.degraded
        await sb.files.write("f", b"x" * 1000)
        assert (await sb.commands.run("cat f")).stdout == b"x" * 1000
        await sb.commands.run("sleep 30", background=True)
        term = await sb.pty.create()
        await term.send("sleep 30\n")
        slow = asyncio.ensure_future(sb.commands.run("sleep 30"))
        await asyncio.sleep(0.05)
    finally:
        await sb.close()
    left = set(asyncio.all_tasks()) - before - {slow}  # the caller's own task aside
    await asyncio.gather(slow, return_exceptions=True)
    assert not left, f"tasks left running after close(): {left}"


async def _check_doctor_and_sweep(backend: Backend) -> None:
    checks = backend.doctor()
    assert checks, "doctor() reported nothing"
    assert all(isinstance(c, Check) for c in checks), checks
    assert all(c.status in ("ok", "warn", "fail") for c in checks), checks
    await backend.sweep()


BACKEND_CHECKS: Mapping[str, Callable[[Backend], Awaitable[None]]] = {
    "policy_check": _check_policy_check,
    "one_shot": _check_one_shot,
    "exit_normalised": _check_exit_normalised,
    "limits": _check_limits,
    "box_lifecycle": _check_box_lifecycle,
    "launch_failure": _check_launch_failure_leaves_nothing,
    "sandbox": _check_sandbox,
    "doctor_and_sweep": _check_doctor_and_sweep,
}


async def check_backend(
    backend: Backend, *, policy: Policy | None = None, probes: str | None = "*"
) -> None:
    """Run every check of ``BACKEND_CHECKS`` against ``backend``, then the
    audit's probes matching ``probes`` (a glob or substring list, as ``corral
    audit --probe``; None: no probes) under ``policy`` (default: the
    ``default`` preset). Raises ``AssertionError`` naming the first check or
    the probes that failed."""
    from corral.audit import run_probes  # the audit imports this module's users

    for name, check in BACKEND_CHECKS.items():
        try:
            await check(backend)
        except AssertionError as exc:
            raise AssertionError(f"{backend.name}: {name}: {exc}") from exc
    if probes is not None:
        reports = await run_probes(
            policy or Policy.preset("default"), pattern=probes, backend=backend
        )
        bad = [f"{r.id}: {r.result}: {r.detail}" for r in reports if r.result in ("fail", "error")]
        assert not bad, f"{backend.name}: probes failed:\n" + "\n".join(bad)


class FakeAgent:
    """The other end of two real pipes, speaking whatever the test makes it say.

    ``reader`` and ``writer`` are the host's ends (hand them to
    ``Connection``); ``say(frame)`` sends one frame, numbered in turn."""

    def __init__(self) -> None:
        self.to_host_r, self.to_host_w = os.pipe()
        self.from_host_r, self.from_host_w = os.pipe()
        self.reader = self.to_host_r  # the host's ends
        self.writer = self.from_host_w
        self.numberer = w.Numberer()

    async def say(self, frame: bytes, *, numbered: bool = True) -> None:
        """Send one frame, numbered in turn (``numbered=False``: exactly as given)."""
        out = bytearray()
        if numbered:
            self.numberer.queue(out, frame)
        else:
            out += frame
        # from a worker thread: a frame larger than the pipe must not block the
        # event loop that the host end reads it with
        view = memoryview(out)
        while view:
            view = view[await asyncio.to_thread(os.write, self.to_host_w, view) :]

    def close(self) -> None:
        for fd in (self.to_host_w, self.from_host_r, self.to_host_r, self.from_host_w):
            os.close(fd)
