"""Workspaces on the host: the data directory, walks that never follow the box's
symlinks, disk usage, and reading an ended sandbox's files.

The box owns everything below its workspace and may swap any entry for a
symlink at any moment; the server (often root) reads it only through
directory fds opened ``O_NOFOLLOW`` from their parent's fd.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from corral._errors import CorralError, PathOutsideWorkspace
from corral._sandbox import EntryInfo

UPLOAD_PREFIX = ".corral-upload-"  # the agent's temp names: never a finished file
_UPLOAD_PREFIX = UPLOAD_PREFIX
MAX_LISTING = 10_000  # entries in one listing of an ended workspace


def prepare_data_dir(data_dir: Path, workspaces: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
    workspaces.mkdir(exist_ok=True, mode=0o711)
    # traversable, not listable: a box's uid reaches only its own workspace
    os.chmod(workspaces, 0o711)  # noqa: S103
    if os.geteuid() == 0:
        # as root every box runs as its own uid, which must reach its workspace
        for parent in [workspaces, *workspaces.parents]:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                raise CorralError(
                    f"the data directory must be reachable by the boxes' unprivileged uids, "
                    f"but {parent} is not searchable by others (mode "
                    f"{stat.S_IMODE(os.stat(parent).st_mode):o}); use a --data-dir such as "
                    "/var/lib/corral/server"
                )


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_MAX_DEPTH = 256  # one fd per level while walking; deeper trees are refused, not skipped


class Uncountable(CorralError):
    """Part of a workspace the walker cannot count: what cannot be counted is
    refused (the box ends over its disk limit), never taken as empty."""


class TooDeep(Uncountable):
    """A workspace nests directories deeper than the walker goes (``_MAX_DEPTH``)."""


class Unreadable(Uncountable):
    """A directory the server cannot list (as an ordinary user the box runs
    under the server's uid and can ``chmod 0300`` its own directories)."""


def walk_beneath(root: Path) -> Generator[tuple[int, str, os.stat_result], None, None]:
    """Every entry under ``root`` as ``(parent directory fd, name, lstat)``,
    depth first, for the host to act on with ``dir_fd=`` while the box may
    still be changing the tree. The fd is valid until the next step.

    The box owns everything below ``root`` and can swap a directory for a
    symlink at any moment: each directory is entered with
    ``openat(parent_fd, name, O_DIRECTORY|O_NOFOLLOW)``, never by path, and
    must be the inode ``lstat`` saw, so a planted ``d -> /root/secret``
    (before or during the walk) is never entered and a FIFO or device is never
    opened. Raises ``TooDeep`` past ``_MAX_DEPTH`` levels (each open level
    holds an fd), ``Unreadable`` for a directory it cannot list, ``OSError``
    if ``root`` itself is missing or not a directory."""
    top = os.open(root, _DIR_FLAGS)
    stack: list[tuple[int, Iterator[str]]] = [(top, iter(_names(top)))]
    try:
        while stack:
            fd, names = stack[-1]
            name = next(names, None)
            if name is None:
                os.close(stack.pop()[0])
                continue
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:  # removed meanwhile: the rest still counts
                continue
            yield fd, name, st
            if not stat.S_ISDIR(st.st_mode):
                continue
            if len(stack) >= _MAX_DEPTH:
                raise TooDeep(f"directories nested over {_MAX_DEPTH} deep")
            try:
                # by the parent's fd with O_NOFOLLOW: a symlink swapped in since
                # the lstat fails here (ELOOP/ENOTDIR) instead of leading the
                # root server into a host tree of the box's choosing
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EPERM):
                    # the box's own chmod 0300: bytes it could hide from the disk check
                    raise Unreadable("a directory of the workspace cannot be read") from exc
                continue
            opened = os.fstat(child)
            if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
                os.close(child)  # another directory swapped in meanwhile: not this entry
                continue
            stack.append((child, iter(_names(child))))
    finally:
        for fd, _ in stack:
            os.close(fd)


def _names(fd: int) -> list[str]:
    try:
        return os.listdir(fd)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            # the box's own chmod 0300: bytes it could hide from the disk check
            raise Unreadable("a directory of the workspace cannot be read") from exc
        return []  # removed meanwhile: nothing left to count


def remove_tree(root: Path) -> None:
    """Remove ``root`` and everything under it; raises OSError if that fails.

    coreutils' ``rm -rf`` (fts): it never follows a symlink the box left and
    has no depth limit (Python 3.11's ``shutil.rmtree`` recurses, and raises
    RecursionError on a tree a few thousand directories deep)."""
    if not os.path.lexists(root):
        return
    rm = shutil.which("rm", path="/usr/bin:/bin") or "rm"
    proc = subprocess.run(
        [rm, "-rf", "--one-file-system", "--", str(root)], capture_output=True, env={}
    )
    if proc.returncode != 0 or os.path.lexists(root):
        raise OSError(errno.EIO, f"cannot remove {root}: {proc.stderr.decode(errors='replace')}")


@dataclass(frozen=True, slots=True)
class Usage:
    bytes: int  # allocated blocks, links not followed
    files: int  # entries
    too_deep: bool  # the walk stopped (TooDeep, Unreadable): the rest is not counted
    why: str = ""  # why it stopped


def _usage(root: Path, stop_at: int, max_files: int, *, remove_temps: bool = False) -> Usage:
    """Disk used under ``root``, stopping once past ``stop_at`` bytes or
    ``max_files`` entries; ``remove_temps`` also removes the agent's
    half-written uploads (an ended box's workspace). A missing root uses nothing."""
    total = files = 0
    walk = walk_beneath(root)
    try:
        for fd, name, st in walk:
            if remove_temps and name.startswith(_UPLOAD_PREFIX) and stat.S_ISREG(st.st_mode):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=fd)  # by the parent's fd: never a path the box swapped
                continue
            files += 1
            total += st.st_blocks * 512
            if total > stop_at or files > max_files:
                break
    except Uncountable as exc:
        return Usage(total, files, True, str(exc))
    except FileNotFoundError:
        pass
    finally:
        walk.close()
    return Usage(total, files, False)


# -- reading an ended sandbox's workspace from the host ------------------------------


def _walk(root: Path, relative: str) -> tuple[int, str | None]:
    """The directory fd holding ``relative``'s last component, and that name
    (None for the root itself), never leaving ``root``: each directory is opened
    with O_NOFOLLOW|O_DIRECTORY from its parent's fd, so a symlink the box left
    (``secret -> /etc/shadow``) is refused, not followed, and a FIFO or socket
    on the way fails at once (ENOTDIR) instead of blocking the server."""
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise PathOutsideWorkspace(f"{relative!r} is outside the workspace")
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(root, flags)
    try:
        for part in parts[:-1]:
            new = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = new
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise PathOutsideWorkspace(f"{relative!r} goes through a non-directory") from None
        raise
    return fd, parts[-1] if parts else None


def stat_beneath(root: Path, relative: str) -> EntryInfo:
    parent, name = _walk(root, relative)
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False) if name else os.fstat(parent)
    finally:
        os.close(parent)
    return _entry(st, name or ".", relative)


def list_beneath(root: Path, relative: str) -> list[EntryInfo]:
    parent, name = _walk(root, relative)
    try:
        if name is None:
            fd = os.dup(parent)
        else:
            try:
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(name, flags, dir_fd=parent)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise NotADirectoryError(errno.ENOTDIR, "not a directory") from None
                raise
    finally:
        os.close(parent)
    try:
        base = "/".join(p for p in relative.split("/") if p not in ("", "."))
        out = []
        for entry in sorted(os.listdir(fd))[:MAX_LISTING]:
            if entry.startswith(_UPLOAD_PREFIX):
                continue
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
                out.append(_entry(st, entry, f"{base}/{entry}" if base else entry))
        return out
    finally:
        os.close(fd)


def open_file_beneath(root: Path, relative: str) -> tuple[int, int]:
    """A regular file's fd and size. O_NONBLOCK: a FIFO opens at once and is
    then refused, like every other non-regular file (sockets fail with ENXIO)."""
    parent, name = _walk(root, relative)
    try:
        if name is None:
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, dir_fd=parent)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PathOutsideWorkspace(f"{relative!r} is a symbolic link") from None
            if exc.errno == errno.ENXIO:
                raise PermissionError(errno.EACCES, "not a regular file") from None
            raise
    finally:
        os.close(parent)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        raise PermissionError(errno.EACCES, "not a regular file")
    return fd, st.st_size


def _entry(st: os.stat_result, name: str, path: str) -> EntryInfo:
    kind: Literal["file", "dir", "symlink", "other"] = (
        "file"
        if stat.S_ISREG(st.st_mode)
        else "dir"
        if stat.S_ISDIR(st.st_mode)
        else "symlink"
        if stat.S_ISLNK(st.st_mode)
        else "other"
    )
    return EntryInfo(name, path, kind, st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime)
