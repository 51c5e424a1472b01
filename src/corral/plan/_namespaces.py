"""Which kernel namespaces the box gets: all of them, always.

Deny by default: there is no policy field that shares a namespace with the
host. The network namespace in particular leaves the box with nothing but its
own loopback interface.
"""

from __future__ import annotations

from dataclasses import dataclass

from corral._policy import IdentityPolicy, NetworkPolicy


@dataclass(frozen=True, slots=True)
class Unshare:
    namespace: str
    threat: str


@dataclass(frozen=True, slots=True)
class Hostname:
    name: str


@dataclass(frozen=True, slots=True)
class MapIdentity:
    """The uid/gid the box's processes have inside their user namespace."""

    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class DieWithParent:
    threat: str


@dataclass(frozen=True, slots=True)
class NewSession:
    threat: str


@dataclass(frozen=True, slots=True)
class DisableNestedUserns:
    threat: str


NamespaceOp = Unshare | Hostname | MapIdentity | DieWithParent | NewSession | DisableNestedUserns


def plan_namespaces(network: NetworkPolicy, identity: IdentityPolicy) -> tuple[NamespaceOp, ...]:
    if network.mode not in ("none", "allowlist", "open"):  # pragma: no cover
        raise ValueError(f"network mode {network.mode!r} has no namespace plan")
    # allowlist too: the box's only way out is the proxy's listener, which
    # corral creates inside this empty namespace (see corral.net)
    return (
        Unshare("user", "root or capabilities in the box mean anything on the host"),
        Unshare("mount", "the box's mounts change the host's view of the filesystem"),
        Unshare("pid", "the box sees, signals or ptraces host processes"),
        Unshare("net", "the box reaches the network or the host's 127.0.0.1 services"),
        Unshare("ipc", "the box reaches host SysV IPC and POSIX message queues"),
        Unshare("uts", "the box renames the host"),
        Unshare("cgroup", "the box learns the host's cgroup layout"),
        MapIdentity(identity.uid, identity.gid),
        Hostname(identity.hostname),
        DisableNestedUserns(
            "a nested user namespace regains capabilities to attack kernel code "
            "reachable only with them"
        ),
        DieWithParent("the box outlives the corral process that owns it"),
        NewSession("TIOCSTI on an inherited tty types into the host shell (CVE-2017-5226)"),
    )


def render(ops: tuple[NamespaceOp, ...]) -> str:
    lines = []
    for op in ops:
        values = " ".join(f"{name}={getattr(op, name)!s}" for name in op.__slots__)
        lines.append(f"{type(op).__name__} {values}")
    return "\n".join(lines) + "\n"
