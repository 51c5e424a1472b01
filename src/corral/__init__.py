"""corral: isolated, stateful, resource-limited sandboxes for untrusted code.

The public names are imported on first use (PEP 562): ``corral run -- true``
needs the one-shot path only, not the client, the sandbox or the interpreter.
"""

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

if _TYPE_CHECKING:
    from ._client import AsyncClient, Client, RemoteSandbox, SandboxInfo
    from ._errors import (
        CorralError,
        HostToolMissing,
        PolicyError,
        RemoteError,
        SandboxBroken,
        SandboxClosed,
        SandboxError,
        UnsupportedPolicy,
    )
    from ._interpreter import CodeContext, Execution, ExecutionError, Logs, Result
    from ._policy import (
        Bind,
        FilesystemPolicy,
        IdentityPolicy,
        Limits,
        NetworkPolicy,
        Policy,
        SyscallPolicy,
    )
    from ._pool import AsyncPool, Pool
    from ._result import LimitKind, RunResult
    from ._run import run, run_async
    from ._sandbox import (
        AsyncSandbox,
        CommandEvent,
        CommandExit,
        CommandHandle,
        CommandOutput,
        CommandResult,
        EntryInfo,
        FileReader,
        PathOutsideWorkspace,
        ProcessInfo,
        PtyHandle,
    )
    from ._snapshot import Snapshot
    from ._sync import Sandbox, SyncCommandHandle, SyncFileReader, SyncPtyHandle
    from .abc import AsyncSandboxAPI, SandboxAPI
    from .net._events import NetworkEvent

__version__ = "0.1.0"

_LAZY = {
    "AsyncClient": "._client",
    "AsyncPool": "._pool",
    "AsyncSandbox": "._sandbox",
    "AsyncSandboxAPI": ".abc",
    "Bind": "._policy",
    "Client": "._client",
    "CodeContext": "._interpreter",
    "CommandEvent": "._sandbox",
    "CommandExit": "._sandbox",
    "CommandHandle": "._sandbox",
    "CommandOutput": "._sandbox",
    "CommandResult": "._sandbox",
    "CorralError": "._errors",
    "EntryInfo": "._sandbox",
    "Execution": "._interpreter",
    "ExecutionError": "._interpreter",
    "FileReader": "._sandbox",
    "FilesystemPolicy": "._policy",
    "HostToolMissing": "._errors",
    "IdentityPolicy": "._policy",
    "LimitKind": "._result",
    "Limits": "._policy",
    "Logs": "._interpreter",
    "NetworkEvent": ".net._events",
    "NetworkPolicy": "._policy",
    "PathOutsideWorkspace": "._sandbox",
    "Policy": "._policy",
    "Pool": "._pool",
    "PolicyError": "._errors",
    "ProcessInfo": "._sandbox",
    "PtyHandle": "._sandbox",
    "RemoteError": "._errors",
    "RemoteSandbox": "._client",
    "Result": "._interpreter",
    "RunResult": "._result",
    "Sandbox": "._sync",
    "Snapshot": "._snapshot",
    "SandboxAPI": ".abc",
    "SandboxBroken": "._errors",
    "SandboxClosed": "._errors",
    "SandboxError": "._errors",
    "SandboxInfo": "._client",
    "SyncCommandHandle": "._sync",
    "SyncFileReader": "._sync",
    "SyncPtyHandle": "._sync",
    "SyscallPolicy": "._policy",
    "UnsupportedPolicy": "._errors",
    "run": "._run",
    "run_async": "._run",
}


def __getattr__(name: str) -> _Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'corral' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value  # once: later reads do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AsyncClient",
    "AsyncPool",
    "AsyncSandbox",
    "AsyncSandboxAPI",
    "Bind",
    "Client",
    "CodeContext",
    "CommandEvent",
    "CommandExit",
    "CommandHandle",
    "CommandOutput",
    "CommandResult",
    "CorralError",
    "EntryInfo",
    "Execution",
    "ExecutionError",
    "FileReader",
    "FilesystemPolicy",
    "HostToolMissing",
    "IdentityPolicy",
    "LimitKind",
    "Limits",
    "Logs",
    "NetworkEvent",
    "NetworkPolicy",
    "PathOutsideWorkspace",
    "Policy",
    "PolicyError",
    "Pool",
    "ProcessInfo",
    "PtyHandle",
    "RemoteError",
    "RemoteSandbox",
    "Result",
    "RunResult",
    "Sandbox",
    "SandboxAPI",
    "SandboxBroken",
    "SandboxClosed",
    "SandboxError",
    "SandboxInfo",
    "Snapshot",
    "SyncCommandHandle",
    "SyncFileReader",
    "SyncPtyHandle",
    "SyscallPolicy",
    "UnsupportedPolicy",
    "__version__",
    "run",
    "run_async",
]
