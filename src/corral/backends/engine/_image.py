"""The base image: an empty root with the host's system layout, built offline.

No registry is reachable from many hosts corral runs on (this one included),
and a box needs nothing from an image: like the bwrap backend, the engine
backends bind the host's ``/usr`` (and the code runtime) read-only and write
``/etc`` from the plans. The image is a tar corral makes in memory (the
merged-/usr symlinks, empty mount points) imported with ``ENGINE import``;
its tag is the hash of its content, so it is built once per host layout and
never changes under a running box.
"""

from __future__ import annotations

import hashlib
import io
import tarfile

from corral.plan._mounts import Symlink

_MOUNT_POINTS = ("usr", "etc", "tmp", "proc", "dev", "sys", "run", "run/corral", "workspace")
REPOSITORY = "localhost/corral-base"


def base_tar(symlinks: tuple[Symlink, ...], workspace: str) -> bytes:
    """A reproducible tar: the system symlinks and empty mount points (root-owned,
    0755; /tmp 1777)."""
    buf = io.BytesIO()
    dirs = dict.fromkeys((*_MOUNT_POINTS, workspace.strip("/")))
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path in sorted(d for d in dirs if d):
            info = tarfile.TarInfo(path)
            # runc gives a tmpfs the mode of the directory it covers: /tmp must be 1777
            # (or the box's uid cannot write its own /tmp)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if path == "tmp" else 0o755
            tar.addfile(info)
        for link in sorted(symlinks, key=lambda s: s.path):
            info = tarfile.TarInfo(link.path.strip("/"))
            info.type, info.linkname = tarfile.SYMTYPE, link.link_to
            tar.addfile(info)
    return buf.getvalue()


def image_tag(tar: bytes) -> str:
    """``localhost/corral-base:<first 16 hex of the tar's SHA-256>``."""
    return f"{REPOSITORY}:{hashlib.sha256(tar).hexdigest()[:16]}"
