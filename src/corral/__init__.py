"""corral: isolated, stateful, resource-limited sandboxes for untrusted code."""

from ._errors import (
    CorralError,
    HostToolMissing,
    PolicyError,
    SandboxBroken,
    SandboxClosed,
    SandboxError,
    UnsupportedPolicy,
)
from ._policy import (
    Bind,
    FilesystemPolicy,
    IdentityPolicy,
    Limits,
    NetworkPolicy,
    Policy,
    SyscallPolicy,
)
from ._result import LimitKind, RunResult
from ._run import run, run_async

__version__ = "0.1.0"

__all__ = [
    "Bind",
    "CorralError",
    "FilesystemPolicy",
    "HostToolMissing",
    "IdentityPolicy",
    "LimitKind",
    "Limits",
    "NetworkPolicy",
    "Policy",
    "PolicyError",
    "RunResult",
    "SandboxBroken",
    "SandboxClosed",
    "SandboxError",
    "SyscallPolicy",
    "UnsupportedPolicy",
    "__version__",
    "run",
    "run_async",
]
