"""corral: isolated, stateful, resource-limited sandboxes for untrusted code."""

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
from ._proxy import NetworkEvent
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
from ._sync import Sandbox, SyncCommandHandle, SyncFileReader, SyncPtyHandle
from .abc import AsyncSandboxAPI, SandboxAPI

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
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
    "SyncCommandHandle",
    "SyncFileReader",
    "SyncPtyHandle",
    "SyscallPolicy",
    "UnsupportedPolicy",
    "__version__",
    "run",
    "run_async",
]
