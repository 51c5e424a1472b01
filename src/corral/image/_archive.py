"""A root filesystem directory -> one image archive, deterministically.

The layer is a tar of the tree made here, not by ``tar``: entries in sorted
order, numeric owners only (no user or group names), every mtime clamped to
the lock's ``SOURCE_DATE_EPOCH``, PAX headers without atime/ctime, no
extended attributes, device nodes left out (an engine gives every container
its own ``/dev``). The archive around it is both an OCI image layout
(``oci-layout``, ``index.json``, ``blobs/sha256/...``; OCI Image Layout
Specification 1.0) and a ``docker save`` archive (``manifest.json`` naming the
same blobs), so ``docker load`` (20.10 reads only the latter), ``podman load``
and ``ctr images import`` all take it. The same tree and epoch give the same
bytes, so the same digests.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

_CHUNK = 1 << 20
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
_SKIP_CONTENT = ("dev", "proc", "sys")  # kept as empty directories


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """What goes into the OCI image config besides the layer."""

    ref: str  # e.g. localhost/corral-default:0123456789abcdef
    env: tuple[str, ...]
    cmd: tuple[str, ...]
    labels: tuple[tuple[str, str], ...]
    source_date_epoch: int


def sorted_walk(root: Path) -> Iterator[Path]:
    """Every path under ``root`` in sorted, depth-first order (a directory before its
    contents); the contents of ``/dev``, ``/proc`` and ``/sys`` are left out."""

    def visit(directory: Path) -> Iterator[Path]:
        for name in sorted(os.listdir(directory)):
            child = directory / name
            yield child
            rel = child.relative_to(root).as_posix()
            if child.is_dir() and not child.is_symlink() and rel not in _SKIP_CONTENT:
                yield from visit(child)

    return visit(root)


class _HashingWriter(io.RawIOBase):
    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.out.write(view)
        self.sha.update(view)
        self.size += len(view)
        return len(view)


def write_layer(
    root: Path,
    out: IO[bytes],
    source_date_epoch: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[str, int]:
    """Write the layer tar of ``root`` to ``out``; its ``sha256:<hex>`` digest and size."""
    writer = _HashingWriter(out)
    count = 0
    inodes: dict[tuple[int, int], str] = {}
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted_walk(root):
            st = path.lstat()
            name = path.relative_to(root).as_posix()
            info = tarfile.TarInfo(name)
            info.mode = stat.S_IMODE(st.st_mode)
            info.uid, info.gid = st.st_uid, st.st_gid
            info.uname = info.gname = ""
            info.mtime = min(int(st.st_mtime), source_date_epoch)
            body: IO[bytes] | None = None
            if stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
            elif stat.S_ISLNK(st.st_mode):
                info.type = tarfile.SYMTYPE
                info.linkname = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in inodes:
                    info.type = tarfile.LNKTYPE
                    info.linkname = inodes[key]
                else:
                    inodes[key] = name
                    info.size = st.st_size
                    body = open(path, "rb")  # noqa: SIM115 - closed below
            elif stat.S_ISFIFO(st.st_mode):
                info.type = tarfile.FIFOTYPE
            else:
                continue  # device nodes, sockets: an engine makes its own
            try:
                tar.addfile(info, body)
            finally:
                if body is not None:
                    body.close()
            count += 1
            if progress is not None and count % 5000 == 0:
                progress(count)
    return f"sha256:{writer.sha.hexdigest()}", writer.size


def _blob(data: bytes) -> tuple[str, bytes]:
    return f"sha256:{hashlib.sha256(data).hexdigest()}", data


def _json(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def write_archive(layer: Path, layer_digest: str, out: Path, config: ImageConfig) -> str:
    """The image archive at ``out`` around the layer file; the manifest's digest."""
    created = datetime.fromtimestamp(config.source_date_epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    layer_size = layer.stat().st_size
    config_digest, config_bytes = _blob(
        _json(
            {
                "architecture": "amd64",
                "os": "linux",
                "created": created,
                "config": {
                    "Env": list(config.env),
                    "Cmd": list(config.cmd),
                    "Labels": dict(config.labels),
                },
                "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
                "history": [{"created": created, "created_by": "corral image build"}],
            }
        )
    )
    manifest_digest, manifest_bytes = _blob(
        _json(
            {
                "schemaVersion": 2,
                "mediaType": MEDIA_MANIFEST,
                "config": {
                    "mediaType": MEDIA_CONFIG,
                    "digest": config_digest,
                    "size": len(config_bytes),
                },
                "layers": [{"mediaType": MEDIA_LAYER, "digest": layer_digest, "size": layer_size}],
            }
        )
    )
    tag = config.ref.rsplit(":", 1)[1]
    index = _json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [
                {
                    "mediaType": MEDIA_MANIFEST,
                    "digest": manifest_digest,
                    "size": len(manifest_bytes),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": config.ref,
                        "org.opencontainers.image.ref.name": tag,
                    },
                }
            ],
        }
    )

    def path_of(digest: str) -> str:
        return "blobs/sha256/" + digest.split(":", 1)[1]

    docker_manifest = _json(
        [
            {
                "Config": path_of(config_digest),
                "RepoTags": [config.ref],
                "Layers": [path_of(layer_digest)],
            }
        ]
    )
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")  # concurrent builds: their own
    try:
        with (
            open(tmp, "wb") as f,
            tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):

            def add(name: str, data: bytes | None = None, *, directory: bool = False) -> None:
                info = tarfile.TarInfo(name)
                info.mtime = config.source_date_epoch
                info.mode = 0o755 if directory else 0o644
                if directory:
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                else:
                    assert data is not None
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))

            add("blobs", directory=True)
            add("blobs/sha256", directory=True)
            add(path_of(config_digest), config_bytes)
            info = tarfile.TarInfo(path_of(layer_digest))
            info.mtime, info.mode, info.size = config.source_date_epoch, 0o644, layer_size
            with open(layer, "rb") as body:
                tar.addfile(info, body)
            add(path_of(manifest_digest), manifest_bytes)
            add("index.json", index)
            add("manifest.json", docker_manifest)
            add("oci-layout", _json({"imageLayoutVersion": "1.0.0"}))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return manifest_digest
