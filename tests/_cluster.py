"""The tests' Kubernetes cluster: ``scripts/dev-cluster``, started at most once per session.

``kubeconfig()`` runs ``scripts/dev-cluster up`` (which builds what is missing and is a no-op
when the cluster already runs) and returns the path it prints. If this process is the one that
started the cluster, ``scripts/dev-cluster down`` runs at exit; a cluster someone else started
(``scripts/bootstrap test``, a developer's shell) is left running.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import threading
from pathlib import Path

DEV_CLUSTER = Path(__file__).resolve().parent.parent / "scripts" / "dev-cluster"
NETNS = "corral-k8s"
NODE = "corral-node"
# imported by `up`: Debian's static busybox and its applets, /tmp (see scripts/dev-cluster)
BUSYBOX_IMAGE = "corral.local/busybox:1"

_lock = threading.Lock()
_path: str | None = None


class ClusterUnavailable(RuntimeError):
    """``scripts/dev-cluster up`` failed; the message carries its output."""


def available() -> str | None:
    """Why the cluster cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "the dev cluster needs root (network namespaces, cgroups, mounts)"
    return None


def kubeconfig(timeout_s: float = 1800) -> str:
    """Path of the admin kubeconfig of the running dev cluster, starting it if needed.

    Raises ClusterUnavailable if ``up`` fails or takes longer than ``timeout_s`` seconds
    (a first run builds Kubernetes: several minutes).
    """
    global _path
    with _lock:
        if _path is not None:
            return _path
        try:
            res = subprocess.run(
                [str(DEV_CLUSTER), "up"],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterUnavailable(f"scripts/dev-cluster up took over {timeout_s}s") from exc
        lines = res.stdout.strip().splitlines()
        if res.returncode != 0 or not lines or not lines[-1].startswith("KUBECONFIG="):
            raise ClusterUnavailable(
                f"scripts/dev-cluster up failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
            )
        if "CORRAL_K8S_STARTED=yes" in lines:
            atexit.register(_down)
        _path = lines[-1].removeprefix("KUBECONFIG=")
        return _path


def _down() -> None:
    subprocess.run([str(DEV_CLUSTER), "down"], capture_output=True, timeout=300, check=False)


def import_image(archive: str | Path) -> list[str]:
    """Load an OCI or ``docker save`` archive into the node (containerd's ``k8s.io``
    namespace; pods then use it with ``imagePullPolicy: Never``); returns the image names.

    Raises ClusterUnavailable if the cluster is not running or the import fails.
    """
    res = subprocess.run(
        [str(DEV_CLUSTER), "import-image", str(archive)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if res.returncode != 0:
        raise ClusterUnavailable(f"scripts/dev-cluster import-image {archive}: {res.stderr}")
    return res.stdout.split()
