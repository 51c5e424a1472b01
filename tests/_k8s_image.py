"""The box image for the kubernetes tests, imported into the dev cluster's node.

Corral's default image (``corral.image.build_default``: Debian bookworm with
python3 and the code runtime) when its archive is built here (``corral image
build``); otherwise (TEMPORARY, for the tests only) a minimal Debian bookworm
root with python3 made by mmdebstrap from the Debian mirror and wrapped as a
``docker save`` archive here. Either is loaded with ``scripts/dev-cluster
import-image``. Cached under /var/tmp/corral-k8s-test (made once per host).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

CACHE = Path(os.environ.get("CORRAL_K8S_TEST_CACHE", "/var/tmp/corral-k8s-test"))
MINIMAL_REF = "corral.local/k8s-test-python:1"


def _minimal_archive() -> Path:
    archive = CACHE / "minimal-docker.tar"
    if archive.exists():
        return archive
    CACHE.mkdir(parents=True, exist_ok=True)
    rootfs = CACHE / "rootfs.tar"
    if not rootfs.exists():
        mmdebstrap = shutil.which("mmdebstrap")
        if mmdebstrap is None:
            raise RuntimeError("the test image needs mmdebstrap: apt-get install mmdebstrap")
        part = rootfs.with_suffix(".part")
        subprocess.run(
            [
                mmdebstrap,
                "--mode=root",
                "--format=tar",
                "--variant=essential",
                "--include=python3",
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/locale/*",
                "bookworm",
                str(part),
            ],
            check=True,
            capture_output=True,
            timeout=1800,
        )
        part.rename(rootfs)
    digest = hashlib.sha256()
    with rootfs.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{digest.hexdigest()}"]},
        }
    ).encode()
    manifest = json.dumps(
        [{"Config": "config.json", "RepoTags": [MINIMAL_REF], "Layers": ["layer.tar"]}]
    ).encode()
    part = archive.with_suffix(".part")
    with tarfile.open(part, "w") as tar:
        for name, data in (("config.json", config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.add(rootfs, arcname="layer.tar")
    part.rename(archive)
    return archive


def box_image(dev_cluster: Path) -> str:
    """The image reference for the tests' Pods, imported into the node (each
    session again: a new cluster's containerd is empty)."""
    ref, archive = MINIMAL_REF, None
    from corral.image import cached

    built = cached()  # corral's default image, if this host has built it
    if built is not None:
        ref, archive = built.ref, built.path
    if archive is None:
        archive = _minimal_archive()
    subprocess.run(
        [str(dev_cluster), "import-image", str(archive)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return ref
