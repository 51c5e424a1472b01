"""Images for the container backends, built from the package registries only.

``build_default()`` makes corral's default image (Debian bookworm, minimal,
with python3 and corral's pinned code runtime at ``/opt/corral/runtime``)
with mmdebstrap, reproducibly from a lock (``default.lock``), into an OCI /
docker archive cached by the lock's hash. ``load_into_engine`` and
``import_into_containerd`` put it where docker, podman or a Kubernetes node's
containerd finds it; ``build_dockerfile`` builds a user's own image on top.
The in-box agent and kernel driver are never part of an image: corral places
them in every box at start, so any image with ``python3`` runs a sandbox.
"""

from corral.image._build import (
    LABEL_LOCK,
    LABEL_RUNTIME,
    REPOSITORY,
    ImageArchive,
    build_default,
    cache_dir,
    cached,
    default_ref,
    record_lock,
)
from corral.image._lock import Lock, default_lock_path
from corral.image._targets import (
    DEFAULT_CONTAINERD,
    build_dockerfile,
    containerd_has_image,
    dockerfile_bases,
    engine_has_image,
    import_into_containerd,
    load_into_engine,
)

__all__ = [
    "DEFAULT_CONTAINERD",
    "LABEL_LOCK",
    "LABEL_RUNTIME",
    "REPOSITORY",
    "ImageArchive",
    "Lock",
    "build_default",
    "build_dockerfile",
    "cache_dir",
    "cached",
    "containerd_has_image",
    "default_lock_path",
    "default_ref",
    "dockerfile_bases",
    "engine_has_image",
    "import_into_containerd",
    "load_into_engine",
    "record_lock",
]
