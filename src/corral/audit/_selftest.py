"""The original self-test: compute, workspace, secrets, network, identity, memory."""

from __future__ import annotations

import os

from corral.audit._probe import (
    BOX_PYTHON,
    Context,
    Outcome,
    all_in,
    network_none,
    probe,
    weakened,
)


@probe(
    "selftest.compute",
    "basic compute works",
    "a box too tight to be useful",
    "the box runs ordinary programs",
)
async def _compute(ctx: Context) -> Outcome:
    result = await ctx.box([BOX_PYTHON, "-c", "print(sum(i * i for i in range(1000)))"])
    if result.stdout.strip() == b"332833500":
        return Outcome("pass", "sum of squares computed")
    return Outcome("fail", f"exit {result.exit_code}: {result.stderr_text.strip()[-200:]}")


@probe(
    "selftest.workspace_rw",
    "the workspace is readable and writable",
    "a box that cannot keep its own files",
    "the workspace is a writable mount",
)
async def _workspace(ctx: Context) -> Outcome:
    seen = await ctx.observe(
        "attempt('write', lambda: open('probe.txt', 'w').write('ok'))\n"
        "attempt('read', lambda: open('probe.txt').read() == 'ok' or 1 / 0)"
    )
    if set(seen.values()) == {"ok"}:
        return Outcome("pass", f"read and wrote in {ctx.policy.filesystem.workspace}")
    return Outcome("fail", str(seen))


@probe(
    "selftest.ssh_key",
    "the host user's SSH key is unreachable",
    "stealing ~/.ssh/id_rsa of the user running corral",
    "host home directories are not mounted",
)
async def _ssh(ctx: Context) -> Outcome:
    paths = sorted({os.path.expanduser("~/.ssh/id_rsa"), "/root/.ssh/id_rsa"})
    seen = await ctx.observe(
        "\n".join(f"attempt({p!r}, lambda: open({p!r}).read())" for p in paths)
    )
    return all_in(seen, {"ENOENT", "EACCES"})


@probe(
    "selftest.network",
    "an outbound connection is blocked",
    "exfiltration to an attacker's server",
    "an empty network namespace",
    applies=network_none,
)
async def _net_basic(ctx: Context) -> Outcome:
    seen = await ctx.observe(
        "s = socket.socket(); s.settimeout(3)\n"
        "attempt('connect', lambda: s.connect(('1.1.1.1', 443)))"
    )
    return all_in(seen, {"ENETUNREACH"})


@probe(
    "selftest.identity",
    "processes run unprivileged, as a non-root host identity",
    "root in the box acting as root on host files",
    "user namespace; as root, a per-box unprivileged host uid",
)
async def _identity(ctx: Context) -> Outcome:
    seen = await ctx.observe(
        "out['uid'] = str(os.getuid())\n"
        "out['root_file'] = 'absent'\n"
        "attempt('root_file', lambda: open('/probe-root-only/secret').read())"
    )
    if seen["uid"] == "0":
        return Outcome("fail", "uid 0 inside the box")
    return Outcome("pass", f"uid {seen['uid']} inside")


@probe(
    "selftest.memory",
    "the memory limit is enforced",
    "a memory bomb exhausting host RAM",
    "memory cgroup (RLIMIT_AS without one)",
)
async def _memory(ctx: Context) -> Outcome:
    return await _memory_bomb(ctx, "x = bytearray(ALLOC); x[::4096] = b'a' * len(x[::4096])")


async def _memory_bomb(ctx: Context, code: str, allow_enospc: bool = False) -> Outcome:
    limit = ctx.policy.limits.memory_bytes
    if limit is None:
        return Outcome("fail", "limits.memory_bytes is not set: nothing stops a memory bomb")
    limit = min(limit, 1 << 30)
    policy = ctx.policy.with_limits(memory_bytes=limit, wall_time_s=30.0)
    alloc = limit * 2
    result = await ctx.box(
        [BOX_PYTHON, "-c", f"ALLOC = {alloc}\n{code}\nprint('survived')"], policy
    )
    if result.limit_hit == "memory":
        peak = result.peak_memory_bytes
        return Outcome("pass", f"killed at the memory limit (peak {peak} bytes)")
    if b"survived" not in result.stdout and (
        b"MemoryError" in result.stderr or (allow_enospc and b"No space" in result.stderr)
    ):
        return Outcome("pass", "allocation refused" + weakened(result))
    return Outcome("fail", f"not stopped: exit {result.exit_code}, limit {result.limit_hit}")
