"""Running the probes: every probe (or those matching a pattern) against boxes of
one backend, four at a time, the abuse probes alone after the rest.
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
import socket
import time

from corral._errors import CorralError
from corral._policy import Policy
from corral.audit._probe import (
    PROBES,
    Context,
    Outcome,
    Probe,
    ProbeError,
    ProbeReport,
)
from corral.backends import Backend, resolve_backend


async def run_probes(
    policy: Policy,
    *,
    pattern: str | None = None,
    backend: str | Backend | None = None,
    concurrency: int = 4,
) -> list[ProbeReport]:
    """Run the probes (all, or those matching ``pattern``) against boxes of
    ``backend`` (a name, a Backend, or None for the default) under ``policy``."""
    chosen = [p for p in PROBES if pattern is None or _matches(pattern, p.id)]
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    ctx = Context(policy, resolve_backend(backend), int(server.getsockname()[1]))
    gate = asyncio.Semaphore(concurrency)

    async def one(p: Probe) -> ProbeReport:
        reason = p.applies(policy)
        if reason is not None:
            return ProbeReport(p.id, p.title, p.threat, p.mechanism, "skip", reason, 0.0)
        async with gate:
            started = time.monotonic()
            try:
                outcome = await p.check(ctx)
            except (ProbeError, CorralError, OSError, ValueError, KeyError) as exc:
                outcome = Outcome("error", f"{type(exc).__name__}: {exc}")
            return ProbeReport(
                p.id,
                p.title,
                p.threat,
                p.mechanism,
                outcome.result,
                outcome.detail,
                time.monotonic() - started,
            )

    # Abuse probes run one at a time, after the rest: without cgroups a fork
    # bomb's RLIMIT_NPROC is per uid, and would starve boxes running beside it.
    shared = [p for p in chosen if not p.id.startswith("abuse.")]
    alone = [p for p in chosen if p.id.startswith("abuse.")]
    try:
        reports = list(await asyncio.gather(*(one(p) for p in shared)))
        for p in alone:
            reports.append(await one(p))
    finally:
        server.close()
    order = {p.id: i for i, p in enumerate(chosen)}
    return sorted(reports, key=lambda r: order[r.id])


def _matches(pattern: str, probe_id: str) -> bool:
    return any(
        fnmatch.fnmatchcase(probe_id, part) or part in probe_id
        for part in re.split(r"[,\s]+", pattern)
        if part
    )
