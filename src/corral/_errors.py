"""The one exception tree of corral.

Failure of the code inside a sandbox (a crash, a timeout, a limit hit) is a
result, never an exception. Exceptions are for the caller's mistakes and for
broken infrastructure::

    CorralError
    ├── PolicyError            a policy is invalid; ``.field`` names the exact field
    ├── UnsupportedPolicy      this backend or host cannot enforce a field: refuse, never drop it
    ├── HostToolMissing        a system tool (bwrap, libseccomp) is absent; says how to install it
    ├── SandboxError           the sandbox could not be set up or broke underneath the caller
    │   └── SandboxBroken      it died or its machinery failed while in use
    ├── SandboxClosed          the caller closed it and then used it again
    └── RemoteError            corral serve refused a request: ``.status``, ``.code`` (auth, quota)
"""

from __future__ import annotations


class CorralError(Exception):
    """Root of every exception corral raises on purpose."""


class PolicyError(CorralError, ValueError):
    """A policy value is invalid. ``field`` is its dotted path, e.g. ``limits.memory_bytes``."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.reason = message
        super().__init__(f"{field}: {message}" if field else message)


class UnsupportedPolicy(CorralError):
    """The chosen backend or this host cannot enforce a policy field, so nothing was started."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.reason = message
        super().__init__(f"{field}: {message}")


class HostToolMissing(CorralError):
    """A system tool corral needs is not installed; the message says how to install it."""

    def __init__(self, tool: str, install_hint: str) -> None:
        self.tool = tool
        self.install_hint = install_hint
        super().__init__(f"{tool} is not available on this host; {install_hint}")


class SandboxError(CorralError):
    """The sandbox machinery failed (setup, cgroups, the backend tool itself)."""


class SandboxBroken(SandboxError):
    """The sandbox died or its machinery broke while in use."""


class SandboxClosed(CorralError):
    """The sandbox was closed by its owner and cannot be used any more."""


class RemoteError(CorralError):
    """``corral serve`` refused a request; ``status`` is the HTTP status, ``code``
    the stable error code (``unauthorized``, ``quota_exceeded``, ``not_found``…)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        super().__init__(f"{message} ({code}, HTTP {status})")
