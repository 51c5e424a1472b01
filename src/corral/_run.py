"""One-shot execution: ``run`` and ``run_async``, over any backend's ``Box``.

The supervision is the backend's client, not part of it: output with one
shared cap, the wall clock, the box's total CPU time (``Box.usage``), and the
limit decided from host-side evidence (``decide_limits``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Mapping, Sequence

from ._policy import Policy
from ._result import LimitEvidence, LimitKind, RunResult, decide_limits
from .backends import Backend, Box, BoxSpec, resolve_backend
from .net._events import Approval

_CPU_POLL_S = 0.1
_DRAIN_AFTER_EXIT_S = 2.0


def _resolve(policy: Policy | str | None) -> Policy:
    if policy is None:
        return Policy.preset("default")
    if isinstance(policy, str):
        return Policy.preset(policy)
    return policy


async def run_async(
    command: Sequence[str],
    *,
    policy: Policy | str | None = None,
    workdir: str | os.PathLike[str] | None = None,
    stdin: bytes | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    on_network_request: Approval | None = None,
    backend: str | Backend | None = None,
    image: str | None = None,
) -> RunResult:
    """Run ``command`` once in a fresh sandbox; the sandbox is gone when this returns.

    ``policy`` is a Policy or a preset name (default: ``"default"``). ``env``
    adds variables to the policy's environment; ``timeout_s`` tightens the
    policy's wall-clock limit. ``workdir`` is a host directory bound as the
    workspace (otherwise the workspace is a private, size-limited tmpfs).
    ``on_network_request(host, port)`` decides hosts the allowlist does not
    name (network mode ``allowlist``); its answer is remembered for the box.
    ``backend``: a name (``corral.backends.available_backends()``) or a
    Backend; default ``"bwrap"``. ``image``: a container image whose root the
    box runs (docker and podman backends; see ``BoxSpec.image``). Failures of
    the command are in the result; exceptions mean misuse or a broken host.
    """
    resolved = _resolve(policy)
    if env:
        resolved = resolved.with_env(env)
    if timeout_s is not None:
        wall = resolved.limits.wall_time_s
        resolved = resolved.with_limits(
            wall_time_s=timeout_s if wall is None else min(wall, timeout_s)
        )
    box = await resolve_backend(backend).launch(
        BoxSpec(
            command=tuple(command),
            policy=resolved,
            workdir=os.fspath(workdir) if workdir is not None else None,
            stdin=stdin,
            on_network_request=on_network_request,
            image=image,
        )
    )
    try:
        result = await _supervise(box, resolved)
    finally:
        await box.aclose()
    if box.network is not None:  # read after close: every connection cut and on record
        result = dataclasses.replace(result, network=tuple(box.network.events))
    return result


def run(
    command: Sequence[str],
    *,
    policy: Policy | str | None = None,
    workdir: str | os.PathLike[str] | None = None,
    stdin: bytes | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    on_network_request: Approval | None = None,
    backend: str | Backend | None = None,
    image: str | None = None,
) -> RunResult:
    """The synchronous facade of :func:`run_async` (same arguments, same result)."""
    return asyncio.run(
        run_async(
            command,
            policy=policy,
            workdir=workdir,
            stdin=stdin,
            env=env,
            timeout_s=timeout_s,
            on_network_request=on_network_request,
            backend=backend,
            image=image,
        )
    )


class _Output:
    """stdout and stderr with one shared cap: a flood costs the host bounded memory."""

    def __init__(self, cap: int | None) -> None:
        self.cap = cap
        self.chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self.total = 0
        self.truncated = False

    def add(self, stream: str, data: bytes) -> bool:
        """Keep ``data``; False once the cap is reached."""
        if self.cap is not None and self.total + len(data) > self.cap:
            data = data[: max(0, self.cap - self.total)]
            self.truncated = True
        self.chunks[stream].append(data)
        self.total += len(data)
        return not self.truncated

    def get(self, stream: str) -> bytes:
        return b"".join(self.chunks[stream])


async def _supervise(box: Box, policy: Policy) -> RunResult:
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    limits = policy.limits
    output = _Output(limits.output_bytes)
    hit: set[LimitKind] = set()
    done = loop.create_future()
    assert box.stdout is not None
    assert box.stderr is not None
    streams = {"stdout": box.stdout, "stderr": box.stderr}
    open_streams = set(streams)

    def kill_box(reason: LimitKind) -> None:
        hit.add(reason)
        box.kill()

    def on_readable(name: str) -> None:
        try:
            data = os.read(streams[name], 65536)
        except BlockingIOError:
            return
        if not data:
            loop.remove_reader(streams[name])
            open_streams.discard(name)
            if not open_streams and not done.done():
                done.set_result(None)
            return
        if not output.add(name, data):
            kill_box("output")
            for stream_name in list(open_streams):
                loop.remove_reader(streams[stream_name])
            open_streams.clear()
            if not done.done():
                done.set_result(None)

    for name, fd in streams.items():
        os.set_blocking(fd, False)
        loop.add_reader(fd, on_readable, name)

    # RLIMIT_CPU bounds each process; the box's total (its cgroup's) bounds
    # the box as a whole (many processes each under the rlimit)
    cpu_timer = [loop.call_later(_CPU_POLL_S, lambda: cpu_check())]

    def cpu_check() -> None:
        if limits.cpu_time_s is not None:
            used = box.usage().cpu_time_s
            if used is not None and used > limits.cpu_time_s:
                kill_box("cpu_time")
                return
            cpu_timer[0] = loop.call_later(_CPU_POLL_S, cpu_check)

    waiting = asyncio.ensure_future(box.wait())
    try:
        try:
            status = await asyncio.wait_for(asyncio.shield(waiting), limits.wall_time_s)
        except TimeoutError:
            kill_box("timeout")
            status = await waiting
        # The box is gone (or going): drain what is left in the pipes, bounded.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(done), _DRAIN_AFTER_EXIT_S)
    finally:
        cpu_timer[0].cancel()
        waiting.cancel()
        for name in list(open_streams):
            loop.remove_reader(streams[name])
    duration = time.monotonic() - started
    usage = box.usage()
    exit_code, sig = status.exit_code, status.signal
    # a signalled command is reported as 128+N, like a shell: a command that
    # exits 152 by itself is indistinguishable from one killed by SIGXCPU. So
    # limits are read from host-side evidence where there is any (the box's
    # counters, which count this run alone), and from the status only where there is none.
    limits_hit = decide_limits(
        LimitEvidence(
            own=frozenset(hit),
            oom_kills=usage.oom_kills,
            pids_limit_hits=usage.pids_limit_hits,
            cpu_time_s=usage.cpu_time_s,
            cpu_time_limit_s=limits.cpu_time_s,
            exit_code=exit_code,
            signal=sig,
        )
    )
    stdout, stderr = output.get("stdout"), output.get("stderr")
    # the command does not exist (or cannot be run) in the box: shell
    # semantics, said in corral's words rather than the launcher's (the box
    # knows what its launcher says)
    stderr = box.exec_failure(exit_code, stderr) or stderr
    return RunResult(
        exit_code=exit_code,
        signal=sig,
        limit_hit=limits_hit[0] if limits_hit else None,
        limits_hit=limits_hit,
        stdout=stdout,
        stderr=stderr,
        truncated=output.truncated,
        duration_s=duration,
        cpu_time_s=usage.cpu_time_s,
        peak_memory_bytes=usage.peak_memory_bytes,
        degraded=box.degraded,
    )
