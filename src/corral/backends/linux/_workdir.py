"""A host directory handed to a box as its workspace, prepared on the host (root only).

* **Write access under the box's own uid.** As root every box runs as a fresh
  host uid (``_identity``), so a directory of the caller's is not writable by
  it. corral attaches an *idmapped* clone of the directory (``open_tree`` +
  ``mount_setattr(MOUNT_ATTR_IDMAP)``, Linux 5.12+) at a per-box mount point
  and binds that: the directory's owner on disk appears as the box's uid
  through it, and what the box creates is stored as the owner. Nothing changes
  on disk (no ACL or chown to undo, no walk of the tree), files the box creates
  belong to the caller afterwards, and the next box (another uid) can change
  them. Ids other than the owner's appear as ``nobody`` and stay read-only.
  Chosen over ACLs, which would need an entry on every existing file for the
  run (and removing after), and leave the box's files owned by a recycled uid.
* **A hard bound on a workspace corral creates itself** (``corral serve``'s,
  ``fresh=True``): the box writes into a per-box ext4 image of the workspace's
  share of ``limits.disk_bytes`` (a sparse file, loop-mounted): a write past it
  fails with ENOSPC in the box. The image is also bound over the host
  directory while the box runs (the host reads it at its usual path), and its
  content is copied into that directory when the box ends, so the workspace
  stays a host directory afterwards; the image is then removed. In the box the
  mount's root is the image's ``/``, so ``/proc/self/mountinfo`` shows no host
  path. A directory the caller hands in keeps its content in place, so it is
  bound as it is: bounded per file only (this host's kernel, like many, has no
  quota support, ``CONFIG_QUOTA``), and every result says so in ``degraded``.

Every mount and image is recorded in ``/run/corral/mnt`` under the name of the
owning process; :func:`sweep_orphans` undoes what a killed corral left (and
first copies a fresh workspace's content out, as ``close`` would have).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass

from corral._errors import HostToolMissing, SandboxError

MOUNT_DIR = "/run/corral/mnt"
_log = logging.getLogger("corral")

_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_AT_SYMLINK_NOFOLLOW = 0x100
_OPEN_TREE_CLONE = 1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_MOUNT_ATTR_IDMAP = 0x100000
_MNT_DETACH = 2
IMAGE_DIR = "/var/tmp/corral-images"  # disk-backed: /run may be RAM
_FULL_BYTES = 1 << 20  # an image with less free than this was filled

_libc = ctypes.CDLL(None, use_errno=True)


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


# -- idmapped mounts -----------------------------------------------------------------


def _userns_mapping(disk_uid: int, disk_gid: int, uid: int, gid: int) -> int:
    """An fd of a fresh user namespace mapping ``disk_uid`` -> ``uid`` (and gids)."""
    unshare = shutil.which("unshare", path="/usr/local/bin:/usr/bin:/bin")
    if unshare is None:
        raise HostToolMissing("unshare", "install it with: sudo apt-get install util-linux")
    # a shell that says when it is in its new namespace, then waits to be killed
    child = subprocess.Popen(
        [unshare, "--user", "--", "/bin/sh", "-c", "echo; read x"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={},
    )
    try:
        assert child.stdout is not None
        if child.stdout.readline() != b"\n":
            raise SandboxError("cannot create a user namespace for an idmapped mount")
        with open(f"/proc/{child.pid}/uid_map", "w", encoding="ascii") as f:
            f.write(f"{disk_uid} {uid} 1\n")
        with open(f"/proc/{child.pid}/gid_map", "w", encoding="ascii") as f:
            f.write(f"{disk_gid} {gid} 1\n")
        return os.open(f"/proc/{child.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        child.kill()
        child.communicate()


def _idmapped_mount(source: str, target: str, disk: os.stat_result, uid: int, gid: int) -> None:
    userns = _userns_mapping(disk.st_uid, disk.st_gid, uid, gid)
    try:
        tree = _check(
            _libc.syscall(
                _SYS_OPEN_TREE,
                _AT_FDCWD,
                source.encode(),
                _OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_SYMLINK_NOFOLLOW,
            ),
            "open_tree",
        )
        try:
            # nosuid, nodev: the box's files are data, never a way to gain privilege
            attr = _MountAttr(
                _MOUNT_ATTR_IDMAP | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, 0, 0, userns
            )
            _check(
                _libc.syscall(
                    _SYS_MOUNT_SETATTR,
                    tree,
                    b"",
                    _AT_EMPTY_PATH,
                    ctypes.byref(attr),
                    ctypes.c_size_t(ctypes.sizeof(attr)),
                ),
                "mount_setattr",
            )
            _check(
                _libc.syscall(
                    _SYS_MOVE_MOUNT, tree, b"", _AT_FDCWD, target.encode(), _MOVE_MOUNT_F_EMPTY_PATH
                ),
                "move_mount",
            )
        finally:
            os.close(tree)
    finally:
        os.close(userns)


def _umount(target: str) -> None:
    # lazy: a process of the dead box may still be exiting
    if _libc.umount2(target.encode(), _MNT_DETACH) < 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"umount {target}: {os.strerror(err)}")


# -- one box's workdir -----------------------------------------------------------------


@dataclass
class Workdir:
    """A host directory prepared for one box; ``path`` is what bwrap binds."""

    source: str
    path: str
    name: str
    image: str | None = None

    @property
    def bounded(self) -> bool:
        return self.image is not None

    def disk_limit_hit(self) -> bool:
        """True if the box filled its image (less than 1 MiB left)."""
        if self.image is None:
            return False
        try:
            st = os.statvfs(_image_root(self.name))
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < _FULL_BYTES

    def close(self) -> None:
        """Unmount, copy a fresh workspace's content out, remove the image.
        Idempotent; OSError if a mount could not be undone (its record stays,
        and the next sweep tries again)."""
        _undo(self.name, self.source, copy_out=self.image is not None)
        self.image = None


def _mount_point(name: str) -> str:
    return f"{MOUNT_DIR}/{name}"


def _image_root(name: str) -> str:
    return f"{MOUNT_DIR}/{name}.image"


def _image_file(name: str) -> str:
    return f"{IMAGE_DIR}/{name}.img"


def _state_path(name: str) -> str:
    return f"{MOUNT_DIR}/{name}.json"


def _undo(name: str, source: str, *, copy_out: bool) -> None:
    """Tear down box ``name``'s mounts and image, each step even if one before
    failed. The image and its record go only once every mount is gone: else
    OSError, and the next sweep tries again (a record removed early would
    leave a mount and a loop device no sweep knows of)."""
    failed: list[OSError] = []
    try:
        _umount(_mount_point(name))  # the box's idmapped view first
    except OSError as exc:
        failed.append(exc)
    with contextlib.suppress(OSError):
        os.rmdir(_mount_point(name))
    root = _image_root(name)
    if os.path.ismount(root):
        try:
            if os.path.ismount(source) and os.path.samestat(os.stat(source), os.stat(root)):
                _umount(source)  # the host's view at the workspace path
        except OSError as exc:
            failed.append(exc)
        if copy_out:
            _copy_out(root, source)
        try:
            _umount(root)
        except OSError as exc:
            failed.append(exc)
    with contextlib.suppress(OSError):
        os.rmdir(root)
    if failed:
        raise failed[0]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_image_file(name))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_state_path(name))


def _copy_out(root: str, dest: str) -> None:
    """The image's content into ``dest``, symlinks as symlinks (never followed),
    holes kept (a sparse file of the box's is not written out in full).

    coreutils' ``cp -a`` goes on past what it cannot copy: entries whose path
    passes PATH_MAX (a box's thousands of nested directories) are dropped and
    logged, the rest is kept; it never stops the teardown."""
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rmdir(f"{root}/lost+found")
    if not os.listdir(root):
        return
    cp = shutil.which("cp", path="/usr/bin:/bin") or "cp"
    # -a: ownership, modes, times, hard links, symlinks as links; --no-dereference
    # so a link the box planted is copied as a link, never as the host file it names
    proc = subprocess.run(
        [
            cp,
            "-a",
            "--no-dereference",
            "--sparse=auto",  # a sparse file stays sparse: no terabytes of zeros
            "--reflink=never",
            "--",
            f"{root}/.",
            f"{dest}/",
        ],
        capture_output=True,
        env={},
    )
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").splitlines()
        _log.warning(
            "corral: %d entries of the workspace %s could not be kept: %s",
            len(lines),
            dest,
            lines[0][:300] if lines else "cp failed",
        )


def prepare(
    source: str, *, uid: int, gid: int, fresh: bool, workspace_bytes: int | None
) -> Workdir:
    """Host directory ``source`` made writable for a box running as host ``uid``/``gid``.

    ``fresh``: ``source`` is an empty directory corral made for this box (a
    server's workspace): with ``workspace_bytes`` set, it is backed by a
    bounded image for the run. Root only. Raises SandboxError if a step
    fails (everything done so far undone); :meth:`Workdir.close` undoes it all."""
    name = f"box-{os.getpid()}-{time.monotonic_ns()}"
    work = Workdir(source, source, name)
    os.makedirs(MOUNT_DIR, mode=0o711, exist_ok=True)
    # state before any mount: a crash from here on leaves a record to sweep
    with open(_state_path(name), "w", encoding="utf-8") as f:
        json.dump({"source": source, "copy_out": False}, f)
    try:
        view_of = source
        if fresh and workspace_bytes is not None:
            work.image = _image_file(name)
            root = _image_root(name)
            _make_image(work.image, workspace_bytes)
            os.mkdir(root, 0o700)
            # nosuid, nodev: nothing the box writes there is a device or a setuid binary
            _tool(["mount", "-o", "loop,nosuid,nodev", work.image, root])
            os.chmod(root, 0o700)
            with contextlib.suppress(OSError):
                os.rmdir(f"{root}/lost+found")
            with open(_state_path(name), "w", encoding="utf-8") as f:
                json.dump({"source": source, "copy_out": True}, f)
            # the host keeps reading the live workspace at its usual path
            _tool(["mount", "--bind", root, source])
            view_of = root
        target = _mount_point(name)
        os.mkdir(target, 0o700)
        _idmapped_mount(view_of, target, os.stat(source), uid, gid)
        work.path = target
    except BaseException as exc:
        with contextlib.suppress(OSError):  # else its record stays for the sweep
            _undo(name, source, copy_out=False)
        if isinstance(exc, OSError):
            raise SandboxError(f"cannot prepare the workdir for the box: {exc}") from exc
        raise
    return work


def _make_image(path: str, size_bytes: int) -> None:
    os.makedirs(IMAGE_DIR, mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size_bytes)  # sparse: host disk is used only as the box writes
    finally:
        os.close(fd)
    # no journal: the image is the box's scratch space, thrown away if corral dies
    # mid-write; -m 0: no blocks reserved for root, the box gets its whole share
    _tool(["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", "-E", "root_owner=0:0", path])


def image_support() -> str | None:
    """None if this host can back a workspace with an image; else why not."""
    if os.geteuid() != 0:
        return "loop-mounted images need root"
    for tool in ("mkfs.ext4", "mount"):
        if shutil.which(tool, path=_TOOL_PATH) is None:
            return f"{tool} is not installed"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices (/dev/loop-control)"
    return None


_TOOL_PATH = "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"


def _tool(argv: list[str]) -> None:
    path = shutil.which(argv[0], path=_TOOL_PATH)
    if path is None:
        raise HostToolMissing(argv[0], "install it with: sudo apt-get install e2fsprogs util-linux")
    proc = subprocess.run([path, *argv[1:]], capture_output=True, env={"PATH": _TOOL_PATH})
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip()
        raise SandboxError(f"{argv[0]} failed: {message}")


def sweep_orphans() -> list[str]:
    """Undo the workdir mounts and images of boxes whose corral process died."""
    swept: list[str] = []
    try:
        entries = os.listdir(MOUNT_DIR)
    except FileNotFoundError:
        return swept
    for entry in entries:
        if not (entry.startswith("box-") and entry.endswith(".json")):
            continue
        name = entry[: -len(".json")]
        try:
            owner = int(name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if _alive(owner):
            continue
        try:
            with open(_state_path(name), encoding="utf-8") as f:
                record = json.load(f)
            source, copy_out = str(record["source"]), bool(record["copy_out"])
        except (OSError, ValueError, KeyError, TypeError):
            source, copy_out = "/nonexistent", False
        with contextlib.suppress(OSError, SandboxError):
            _undo(name, source, copy_out=copy_out and os.path.isdir(source))
            swept.append(name)
    for name, source in _recordless_orphans().items():
        with contextlib.suppress(OSError, SandboxError):
            _undo(name, source, copy_out=os.path.isdir(source))
            swept.append(name)
    return swept


def _recordless_orphans() -> dict[str, str]:
    """Image mounts of dead owners that lost their record (a teardown cut
    short by an older corral): box name -> the workspace the image is also
    mounted on ("/nonexistent" if none), from /proc/self/mountinfo."""
    by_dev: dict[str, list[str]] = {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                # mount points are octal-escaped (a space is \040)
                point = fields[4].encode().decode("unicode_escape")
                by_dev.setdefault(fields[2], []).append(point)
    except OSError:
        return {}
    found: dict[str, str] = {}
    for points in by_dev.values():
        for point in points:
            base = os.path.basename(point)
            if not (os.path.dirname(point) == MOUNT_DIR and base.startswith("box-")):
                continue
            name = base.removesuffix(".image")
            try:
                owner = int(name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if _alive(owner) or os.path.exists(_state_path(name)):
                continue
            others = [p for p in points if not p.startswith(MOUNT_DIR + "/")]
            found[name] = others[0] if len(others) == 1 else "/nonexistent"
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
