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
    ├── PathOutsideWorkspace   (also a ValueError) a file path leaves the sandbox's workspace
    └── RemoteError            corral serve refused a request: ``.status``, ``.code`` (auth, quota)
        └── InvalidRequest     (also a ValueError) the server found the request's values wrong

At the HTTP boundary, ``WIRE`` (below) names each exception by a status and a
stable code, once: ``corral serve`` answers with it (``to_wire``) and the
remote client raises the same class back (``from_wire``), as httpx maps
httpcore's exceptions with one table.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass


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


class PathOutsideWorkspace(CorralError, ValueError):
    """A file API path that resolves outside the sandbox's workspace."""


class RemoteError(CorralError):
    """``corral serve`` refused a request; ``status`` is the HTTP status, ``code``
    the stable error code (``unauthorized``, ``quota_exceeded``, ``not_found``…)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        super().__init__(f"{message} ({code}, HTTP {status})")


class InvalidRequest(RemoteError, ValueError):
    """The server found a request's values wrong: a ValueError, as the local library raises."""


# -- the HTTP boundary --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Wire:
    """One row of ``WIRE``: the server answers an exception that is an instance
    of ``raised`` (and, for an ``OSError``, has ``errno``) with ``status`` and
    ``code``; the client raises ``arrives_as`` (default: ``raised``) for the
    first row bearing that code. ``scrub``: the message may name host paths."""

    raised: type[Exception]
    status: int
    code: str
    errno: int | None = None
    arrives_as: type[Exception] | None = None
    scrub: bool = False


WIRE: tuple[Wire, ...] = (
    Wire(PolicyError, 400, "invalid_policy"),
    Wire(UnsupportedPolicy, 400, "unsupported_policy"),
    Wire(PathOutsideWorkspace, 400, "path_outside_workspace"),
    Wire(HostToolMissing, 503, "host_tool_missing", scrub=True),
    # the sandbox ended underneath the remote caller, whoever ended it on the
    # server: a close there (SandboxClosed) arrives as SandboxBroken too
    Wire(SandboxBroken, 409, "sandbox_ended", scrub=True),
    Wire(SandboxClosed, 409, "sandbox_ended", scrub=True),
    Wire(SandboxError, 500, "sandbox_error", scrub=True),
    # OS errors by errno, with strerror only (a host-side filename is a host path)
    Wire(FileNotFoundError, 404, "file_not_found", errno.ENOENT),
    Wire(IsADirectoryError, 400, "is_a_directory", errno.EISDIR),
    Wire(NotADirectoryError, 400, "not_a_directory", errno.ENOTDIR),
    Wire(FileExistsError, 409, "file_exists", errno.EEXIST),
    Wire(PermissionError, 403, "permission_denied", errno.EACCES),
    Wire(PermissionError, 403, "permission_denied", errno.EPERM),
    Wire(OSError, 403, "permission_denied", errno.ENXIO),  # a socket in the workspace
    Wire(OSError, 409, "directory_not_empty", errno.ENOTEMPTY),
    Wire(OSError, 507, "no_space", errno.ENOSPC),
    # bad values, whether the caller's or an errno saying so: ValueError remotely
    Wire(OSError, 413, "too_large", errno.EFBIG, arrives_as=InvalidRequest),
    Wire(OSError, 400, "invalid_path", errno.ENAMETOOLONG, arrives_as=InvalidRequest),
    Wire(OSError, 400, "invalid_path", errno.ELOOP),
    Wire(OSError, 400, "invalid_request", errno.EINVAL, arrives_as=InvalidRequest),
    Wire(ValueError, 400, "invalid_request"),
    Wire(CorralError, 500, "corral_error", scrub=True),
)


def to_wire(exc: BaseException) -> tuple[int, str, str] | None:
    """``(status, code, client-safe message)`` for an exception of the table,
    None for any other (the server's own refusals carry their status and code;
    anything else is an internal error)."""
    for row in WIRE:
        if isinstance(exc, row.raised) and (
            row.errno is None or (isinstance(exc, OSError) and exc.errno == row.errno)
        ):
            if isinstance(exc, OSError):
                message = exc.strerror or row.code.replace("_", " ")
            else:
                message = str(exc)
            return row.status, row.code, public_message(message) if row.scrub else message
    return None


def from_wire(status: int, code: str, message: str, field: object = None) -> CorralError | OSError:
    """The exception the server's ``{"error": {code, message, field}}`` stands
    for: the class of the first ``WIRE`` row with that code, else ``RemoteError``."""
    row = next((r for r in WIRE if r.code == code), None)
    cls = (row.arrives_as or row.raised) if row is not None else RemoteError
    if issubclass(cls, RemoteError):
        return cls(status, code, message)
    if row is not None and row.errno is not None:
        return OSError(row.errno, message)  # OSError picks the subclass of its errno
    if cls is PolicyError:
        name, _, reason = message.partition(": ")
        return PolicyError(str(field or name), reason or message)
    if cls is UnsupportedPolicy:
        name, _, reason = message.partition(": ")
        return UnsupportedPolicy(name, reason)
    if cls is HostToolMissing:
        tool, _, hint = message.partition(" is not available on this host; ")
        return HostToolMissing(tool, hint)
    if issubclass(cls, CorralError):
        return cls(message)
    return RemoteError(status, code, message)  # a ValueError row: its arrives_as says


_HOST_PATH = re.compile(r"(?<![\w.])/(?:[\w.@+-]+/)+[\w.@+-]*")


def public_message(message: str) -> str:
    """An infrastructure error fit for a remote client: host paths of the
    server (bwrap's, the cgroup tree's, the data directory's) become
    ``<host path>``; at most 2,000 characters."""
    return _HOST_PATH.sub("<host path>", message)[:2000]
