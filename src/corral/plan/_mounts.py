"""The box's filesystem, as an ordered tuple of mount operations.

The box starts from an empty root (bubblewrap's tmpfs) and gets only what is
listed here: the system directories read-only, a minimal ``/etc`` corral writes
itself, a fresh ``/proc``, a minimal ``/dev``, a size-limited ``/tmp`` and the
workspace. Everything else of the host — home directories, ``/root``, ``/work``,
``/run`` and the sockets in it — is simply absent.

What the host looks like (merged-/usr or not, which ``/etc`` files exist) is an
input, :class:`HostLayout`, so the planner stays a pure function.
"""

from __future__ import annotations

from dataclasses import dataclass

from corral._policy import FilesystemPolicy, IdentityPolicy

# System directories bound read-only when they are real directories on the host
# (a merged-/usr host has them as symlinks into /usr, recreated as symlinks).
SYSTEM_DIRS: tuple[str, ...] = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")

# The host /etc entries a program may legitimately need. Deliberately absent:
# shadow, gshadow, sudoers, ssh keys, machine-id, the host's passwd/group
# (generated instead), resolv.conf (there is no network), anything credential-like.
ETC_ALLOWLIST: tuple[str, ...] = (
    "/etc/alternatives",  # Debian's /usr/bin/* -> /etc/alternatives/* links
    "/etc/ca-certificates",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/locale.alias",
    "/etc/magic",
    "/etc/mime.types",
    "/etc/os-release",
    "/etc/protocols",
    "/etc/python3",
    "/etc/python3.11",
    "/etc/services",
    "/etc/ssl/certs",
    "/etc/ssl/openssl.cnf",
    "/etc/timezone",
)


@dataclass(frozen=True, slots=True)
class HostLayout:
    """Facts about the host the mount plan depends on (gathered by the backend)."""

    # path -> where the symlink points, for SYSTEM_DIRS that are symlinks
    system_symlinks: tuple[tuple[str, str], ...]
    # SYSTEM_DIRS that are real directories
    system_dirs: tuple[str, ...]
    # ETC_ALLOWLIST entries present on the host
    etc_present: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RoBind:
    source: str
    target: str


@dataclass(frozen=True, slots=True)
class Bind:
    source: str
    target: str


@dataclass(frozen=True, slots=True)
class Tmpfs:
    target: str
    size_bytes: int | None
    mode: int


@dataclass(frozen=True, slots=True)
class Proc:
    target: str


@dataclass(frozen=True, slots=True)
class Dev:
    target: str


@dataclass(frozen=True, slots=True)
class Symlink:
    link_to: str
    path: str


@dataclass(frozen=True, slots=True)
class Dir:
    path: str
    mode: int


@dataclass(frozen=True, slots=True)
class File:
    """A file whose content corral writes (never a host file)."""

    path: str
    content: bytes
    mode: int


@dataclass(frozen=True, slots=True)
class Hide:
    """Make a path inside a read-only bind invisible (an empty read-only mount over it).

    ``host_path`` is where it lives on the host, so the backend can tell a
    directory from a file without trusting anything the box could change.
    """

    path: str
    host_path: str


@dataclass(frozen=True, slots=True)
class RemountRo:
    path: str


@dataclass(frozen=True, slots=True)
class Chdir:
    path: str


MountOp = RoBind | Bind | Tmpfs | Proc | Dev | Symlink | Dir | File | Hide | RemountRo | Chdir


def _etc_files(identity: IdentityPolicy, workspace: str, *, dns: bool) -> tuple[File, ...]:
    uid, gid, user = identity.uid, identity.gid, identity.username
    passwd = (
        f"root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n"
        f"{user}:x:{uid}:{gid}:{user}:{workspace}:/bin/sh\n"
        f"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
    group = f"root:x:0:\n{user}:x:{gid}:\nnogroup:x:65534:\n"
    hosts = f"127.0.0.1\tlocalhost {identity.hostname}\n::1\tlocalhost ip6-localhost\n"
    return (
        File("/etc/passwd", passwd.encode(), 0o644),
        File("/etc/group", group.encode(), 0o644),
        File("/etc/hostname", f"{identity.hostname}\n".encode(), 0o644),
        File("/etc/hosts", hosts.encode(), 0o644),
        File(
            "/etc/nsswitch.conf",
            b"passwd: files\ngroup: files\nhosts: files" + (b" dns" if dns else b"") + b"\n",
            0o644,
        ),
    )


def plan_mounts(
    fs: FilesystemPolicy,
    identity: IdentityPolicy,
    host: HostLayout,
    *,
    workspace_source: str | None,
    workspace_bytes: int | None,
    extra_files: tuple[File, ...] = (),
    resolv_conf: bytes | None = None,
    image_root: bool = False,
) -> tuple[MountOp, ...]:
    """The box's mount table, in the order it must be built.

    ``workspace_source`` is a host directory to bind as the workspace, or None
    for a private tmpfs of ``workspace_bytes``. ``extra_files`` are corral's own
    read-only files (the agent), written from memory, never from a host path.
    ``image_root``: the box's root is a container image's (read-only), so
    nothing of the host's system (``/usr``, the system directories, the
    ``/etc`` allowlist) is bound and ``host`` is not consulted; the identity
    files corral generates still cover the image's own.
    """
    ops: list[MountOp] = []
    if not image_root:
        ops.append(RoBind("/usr", "/usr"))
        for path, target in host.system_symlinks:
            ops.append(Symlink(target, path))
        for path in host.system_dirs:
            ops.append(RoBind(path, path))
        ops.append(Dir("/etc", 0o755))

    # /etc: generated identity files plus a short allowlist of host files.
    ops.extend(_etc_files(identity, fs.workspace, dns=resolv_conf is not None))
    if resolv_conf is not None:  # network mode open or allowlist: their resolver
        ops.append(File("/etc/resolv.conf", resolv_conf, 0o644))
    if not image_root:
        for path in host.etc_present:
            ops.append(RoBind(path, path))

    # fresh procfs of the box's own pid namespace: no host processes visible
    ops.append(Proc("/proc"))
    # minimal /dev (null, zero, full, random, urandom, tty, pts, shm): no disks,
    # no kmsg, no host tty
    ops.append(Dev("/dev"))
    # /tmp and /dev/shm are bounded tmpfs: a daemon filling them stops at ENOSPC
    # and the host's disk and RAM are never at risk
    ops.append(Tmpfs("/tmp", fs.tmp_bytes, 0o1777))
    ops.append(Tmpfs("/dev/shm", fs.tmp_bytes, 0o1777))
    # bwrap's /dev is a writable tmpfs of its own, with no size: read-only, or it
    # would be unbounded writable space (host RAM) outside disk_bytes
    ops.append(RemountRo("/dev"))

    if workspace_source is not None:
        ops.append(Bind(workspace_source, fs.workspace))
    else:
        ops.append(Tmpfs(fs.workspace, workspace_bytes, 0o755))

    for bind in fs.read_only:
        ops.append(RoBind(bind.source, bind.target))
    for bind in fs.writable:
        ops.append(Bind(bind.source, bind.target))
    for path in fs.hidden:
        ops.append(Hide(path, fs.host_path_of(path)))
    ops.extend(extra_files)

    # nothing but the workspace, /tmp and /dev/shm (and listed writable binds)
    # accepts writes: the root tmpfs becomes read-only last
    ops.append(RemountRo("/"))
    ops.append(Chdir(fs.workspace))
    return tuple(ops)


def with_workspace_source(
    ops: tuple[MountOp, ...], target: str, source: str
) -> tuple[MountOp, ...]:
    """``ops`` with the workspace bound from ``source`` (the backend's prepared view of it)."""
    return tuple(
        Bind(source, target) if isinstance(op, Bind) and op.target == target else op for op in ops
    )


def render(ops: tuple[MountOp, ...]) -> str:
    """One line per operation, stable, for golden files."""
    lines = []
    for op in ops:
        match op:
            case File(path=path, content=content, mode=mode):
                body = content.decode().replace("\n", "\\n")
                lines.append(f"File {path} mode={mode:o} {body}")
            case Tmpfs(target=target, size_bytes=size, mode=mode):
                lines.append(f"Tmpfs {target} size={size} mode={mode:o}")
            case Dir(path=path, mode=mode):
                lines.append(f"Dir {path} mode={mode:o}")
            case _:
                fields = " ".join(str(v) for v in _values(op))
                lines.append(f"{type(op).__name__} {fields}")
    return "\n".join(lines) + "\n"


def _values(op: MountOp) -> tuple[object, ...]:
    return tuple(getattr(op, name) for name in op.__slots__)
