"""What a probe is, and what it may use: ``Context`` (the policy and backend
under audit, boxes to run), ``probe``/``denied`` (registration into
``PROBES``, in definition order), the in-box ``PRELUDE``, verdicts, and the
applicability rules the probe modules share.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Literal

from corral import _runtime
from corral._policy import Policy
from corral._result import RunResult
from corral._run import run_async
from corral._sandbox import AsyncSandbox
from corral.backends import Backend, resolve_backend

Verdict = Literal["pass", "fail", "skip", "error"]
BOX_PYTHON = "/usr/bin/python3"

# Prepended to every in-box probe: ``attempt(label, fn)`` records "ok" or the
# errno name (or the exception's name) under ``label`` in ``out``.
PRELUDE = r"""
import ctypes, errno, json, mmap, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def attempt(label, fn):
    try:
        fn()
        out[label] = "ok"
    except OSError as exc:
        out[label] = errno.errorcode.get(exc.errno, str(exc.errno))
    except Exception as exc:
        out[label] = type(exc).__name__
def sys_call(*args):
    def go():
        r = libc.syscall(*args)
        if r < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    return go
def in_child(fn):
    # the call's errno name, 'ok', or how the child died: a seccomp filter may
    # kill a foreign-ABI call (runc's bad-arch action: SIGSYS) instead of failing it
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:
        r = fn()
        os.write(wr, (errno.errorcode.get(-r, 'returned %d' % r) if r < 0 else 'ok').encode())
        os._exit(0)
    os.close(wr)
    status = os.waitpid(pid, 0)[1]
    said = os.read(rd, 64).decode()
    if said:
        return said
    if os.WIFSIGNALED(status):
        return 'SIGSYS' if os.WTERMSIG(status) == 31 else 'signal %d' % os.WTERMSIG(status)
    return 'status %d' % status
def machine_code(code):
    buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    return ctypes.CFUNCTYPE(ctypes.c_long)(addr), buf
"""


@dataclass(frozen=True, slots=True)
class Outcome:
    result: Verdict
    detail: str


@dataclass(frozen=True, slots=True)
class ProbeReport:
    id: str
    title: str
    threat: str
    mechanism: str
    result: Verdict
    detail: str
    duration_s: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Context:
    """What a probe may use: the policy under audit, and ways to run boxes under it."""

    policy: Policy
    backend: Backend = field(default_factory=lambda: resolve_backend(None))
    host_service_port: int = 0

    async def box(self, command: list[str], policy: Policy | None = None) -> RunResult:
        return await run_async(command, policy=policy or self.policy, backend=self.backend)

    def sandbox(
        self, policy: Policy | None = None, *, runtime: str | None = _runtime.DEFAULT
    ) -> AsyncSandbox:
        """A long-lived sandbox (60 s) on the backend under audit."""
        return AsyncSandbox(
            policy or self.policy, timeout_s=60, runtime=runtime, backend=self.backend
        )

    async def observe(self, body: str, policy: Policy | None = None) -> dict[str, str]:
        """Run ``PRELUDE + body`` in a box; the JSON it prints in ``out``."""
        code = PRELUDE + body + "\nprint(json.dumps(out))"
        result = await self.box([BOX_PYTHON, "-c", code], policy)
        if result.exit_code != 0 or not result.stdout.strip():
            raise ProbeError(
                f"the probe program failed (exit {result.exit_code}): "
                f"{result.stderr_text.strip()[-300:]}"
            )
        data = json.loads(result.stdout.splitlines()[-1])
        if not isinstance(data, dict):
            raise ProbeError("the probe printed no observations")
        return {str(k): str(v) for k, v in data.items()}


class ProbeError(Exception):
    """The probe itself could not run: reported as ``error``, never as a pass."""


ProbeFn = Callable[[Context], Awaitable[Outcome]]


@dataclass(frozen=True)
class Probe:
    id: str
    title: str
    threat: str
    mechanism: str
    check: ProbeFn
    applies: Callable[[Policy], str | None] = field(default=lambda policy: None)


PROBES: list[Probe] = []


def probe(
    id: str,
    title: str,
    threat: str,
    mechanism: str,
    applies: Callable[[Policy], str | None] | None = None,
) -> Callable[[ProbeFn], ProbeFn]:
    def register(fn: ProbeFn) -> ProbeFn:
        PROBES.append(Probe(id, title, threat, mechanism, fn, applies or (lambda policy: None)))
        return fn

    return register


def denied(
    id: str,
    title: str,
    threat: str,
    mechanism: str,
    body: str,
    expect: Iterable[str] = ("EPERM",),
    applies: Callable[[Policy], str | None] | None = None,
) -> None:
    """A probe that tries each attempt in ``body`` and passes if every one fails as expected."""
    allowed = frozenset(expect)

    async def check(ctx: Context) -> Outcome:
        seen = await ctx.observe(body)
        bad = {label: value for label, value in seen.items() if value not in allowed}
        if bad:
            return Outcome("fail", ", ".join(f"{k}: {v}" for k, v in sorted(bad.items())))
        return Outcome("pass", ", ".join(sorted(set(seen.values()))))

    PROBES.append(Probe(id, title, threat, mechanism, check, applies or (lambda policy: None)))


def network_none(policy: Policy) -> str | None:
    """Direct egress must fail: no route at all. ('allowlist' routes every TCP
    connection to the proxy instead: ``net.transparent`` checks it there.)"""
    if policy.network.mode != "none":
        return f"not applicable: network mode {policy.network.mode}"
    return None


def network_closed(policy: Policy) -> str | None:
    """No ICMP, no DNS lookup, no host loopback: in 'none' and in 'allowlist' alike."""
    if policy.network.mode not in ("none", "allowlist"):
        return f"not applicable: network mode {policy.network.mode}"
    return None


def network_allowlist(policy: Policy) -> str | None:
    if policy.network.mode != "allowlist":
        return f"not applicable: network mode {policy.network.mode}"
    return None


def weakened(result: RunResult) -> str:
    return f" (weakened: {result.degraded[0]})" if result.degraded else ""


def all_in(seen: dict[str, str], allowed: set[str]) -> Outcome:
    bad = {k: v for k, v in seen.items() if v not in allowed}
    if bad:
        return Outcome("fail", ", ".join(f"{k}: {v}" for k, v in sorted(bad.items())))
    return Outcome("pass", ", ".join(sorted(set(seen.values()))))
