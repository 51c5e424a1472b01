"""One-shot execution: ``run`` and ``run_async``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence

from ._bwrap import run_bwrap
from ._policy import Policy
from ._proxy import Approval
from ._result import RunResult


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
) -> RunResult:
    """Run ``command`` once in a fresh sandbox; the sandbox is gone when this returns.

    ``policy`` is a Policy or a preset name (default: ``"default"``). ``env``
    adds variables to the policy's environment; ``timeout_s`` tightens the
    policy's wall-clock limit. ``workdir`` is a host directory bound as the
    workspace (otherwise the workspace is a private, size-limited tmpfs).
    ``on_network_request(host, port)`` decides hosts the allowlist does not
    name (network mode ``allowlist``); its answer is remembered for the box.
    Failures of the command are in the result; exceptions mean misuse or a
    broken host.
    """
    resolved = _resolve(policy)
    if env:
        resolved = resolved.with_env(env)
    if timeout_s is not None:
        wall = resolved.limits.wall_time_s
        resolved = resolved.with_limits(
            wall_time_s=timeout_s if wall is None else min(wall, timeout_s)
        )
    return await run_bwrap(
        list(command), resolved, workdir=workdir, stdin=stdin, approve=on_network_request
    )


def run(
    command: Sequence[str],
    *,
    policy: Policy | str | None = None,
    workdir: str | os.PathLike[str] | None = None,
    stdin: bytes | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    on_network_request: Approval | None = None,
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
        )
    )
