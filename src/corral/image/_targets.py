"""Where a built image goes: docker, podman, containerd; and user Dockerfiles.

``docker load`` and ``podman load`` read the archive through the engines'
CLIs (with the docker and podman backends' own options, so the image lands
where those backends look: ``DOCKER_HOST`` honoured, podman with runc and
cgroupfs); ``ctr images import`` puts it into a containerd namespace
(``k8s.io``: the one the CRI plugin, and so the kubelet, reads) at a given
socket. Each is skipped when the image is already there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

from corral._errors import CorralError, HostToolMissing
from corral.backends.engine._engine import Engine

EngineName = Literal["docker", "podman"]
DEFAULT_CONTAINERD = "/run/containerd/containerd.sock"
_CTR_FIX = "install it with: sudo apt-get install containerd"


def _engine(kind: str) -> Engine:
    if kind not in ("docker", "podman"):
        raise CorralError(f"engine {kind!r}: expected 'docker' or 'podman'")
    engine = Engine(kind)  # type: ignore[arg-type]
    engine.probe()  # HostToolMissing with the fix when it does not answer
    return engine


def engine_has_image(kind: EngineName, ref: str) -> bool:
    """Whether the engine holds an image named ``ref`` (looks nothing up remotely)."""
    engine = _engine(kind)
    out = subprocess.run(
        [*engine.command, "image", "inspect", "--format={{.Id}}", ref],
        capture_output=True,
        env=engine.env(),
        check=False,
    )
    return out.returncode == 0


def load_into_engine(archive: str | Path, ref: str, kind: EngineName) -> bool:
    """``docker load`` / ``podman load`` of ``archive`` unless ``ref`` is there;
    True when it loaded. ``HostToolMissing`` if the engine does not answer,
    ``CorralError`` with the engine's words if the load fails."""
    engine = _engine(kind)
    if engine_has_image(kind, ref):
        return False
    print(f"corral image: {kind} load {ref}", file=sys.stderr, flush=True)
    out = subprocess.run(
        [*engine.command, "load", "--input", str(archive)],
        capture_output=True,
        env=engine.env(),
        check=False,
    )
    if out.returncode != 0:
        raise CorralError(f"{kind} load failed: {out.stderr.decode(errors='replace').strip()}")
    if not engine_has_image(kind, ref):
        raise CorralError(f"{kind} load did not create {ref}: {out.stdout.decode().strip()}")
    return True


def _ctr(address: str, namespace: str) -> list[str]:
    ctr = shutil.which("ctr")
    if ctr is None:
        raise HostToolMissing("ctr", _CTR_FIX)
    return [ctr, "--address", address, "--namespace", namespace]


def containerd_has_image(
    ref: str, address: str = DEFAULT_CONTAINERD, namespace: str = "k8s.io"
) -> bool:
    """Whether containerd at ``address`` holds ``ref`` in ``namespace``."""
    out = subprocess.run(
        [*_ctr(address, namespace), "images", "list", "--quiet"],
        capture_output=True,
        check=False,
        timeout=60,
    )
    if out.returncode != 0:
        why = out.stderr.decode(errors="replace").strip()
        raise CorralError(f"containerd at {address} does not answer: {why}")
    return ref in out.stdout.decode().split()


def import_into_containerd(
    archive: str | Path,
    address: str = DEFAULT_CONTAINERD,
    *,
    ref: str | None = None,
    namespace: str = "k8s.io",
) -> bool:
    """``ctr images import`` of ``archive`` into containerd at ``address`` (a unix
    socket path), namespace ``k8s.io`` by default (the CRI's: pods can use it
    with ``imagePullPolicy: Never``), unpacked for the default snapshotter.
    Skipped when ``ref`` is given and already there; True when it imported.
    ``HostToolMissing`` without ``ctr``; ``CorralError`` when containerd does
    not answer or refuses the archive."""
    if ref is not None and containerd_has_image(ref, address, namespace):
        return False
    print(f"corral image: ctr import into {address} ({namespace})", file=sys.stderr, flush=True)
    out = subprocess.run(
        [*_ctr(address, namespace), "images", "import", "--no-unpack=false", str(archive)],
        capture_output=True,
        check=False,
    )
    if out.returncode != 0:
        raise CorralError(
            f"ctr images import into {address} failed: "
            f"{out.stderr.decode(errors='replace').strip()}"
        )
    if ref is not None and not containerd_has_image(ref, address, namespace):
        raise CorralError(f"ctr images import did not create {ref}: {out.stdout.decode().strip()}")
    return True


def dockerfile_bases(text: str) -> list[str]:
    """The images a Dockerfile's ``FROM`` lines name, without earlier stages,
    ``scratch`` and names built from ``ARG``s (which only the engine can resolve)."""
    bases: list[str] = []
    stages: set[str] = set()
    for line in text.replace("\\\n", " ").splitlines():
        words = line.split()
        if not words or words[0].upper() != "FROM":
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        if not args:
            continue
        name = args[0]
        if len(args) >= 3 and args[1].upper() == "AS":
            stages.add(args[2].lower())
        if name.lower() in stages or name == "scratch" or "$" in name:
            continue
        if name not in bases:
            bases.append(name)
    return bases


def build_dockerfile(
    dockerfile: str | Path,
    tag: str,
    *,
    engine: EngineName = "docker",
    context: str | Path | None = None,
) -> str:
    """``ENGINE build -f DOCKERFILE -t TAG CONTEXT`` (context: the Dockerfile's
    directory), its output streamed to stderr. Every base image (``FROM``)
    must be in the engine already: corral checks them first and never lets
    the engine pull (podman also gets ``--pull=never``). Returns ``tag``;
    ``CorralError`` naming a missing base, or the engine's last words when
    the build fails; ``FileNotFoundError`` for a missing file."""
    path = Path(dockerfile)
    if not path.is_file():
        raise FileNotFoundError(2, "no such Dockerfile", str(path))
    ctx = Path(context) if context is not None else path.resolve().parent
    if not ctx.is_dir():
        raise FileNotFoundError(2, "no such build context directory", str(ctx))
    eng = _engine(engine)
    for base in dockerfile_bases(path.read_text(encoding="utf-8", errors="replace")):
        if not engine_has_image(engine, base):
            # checked here: docker's classic builder would try a registry for it
            raise CorralError(
                f"{path}: FROM {base}: no such image in {engine}, and corral never pulls; "
                f"build or load it first (corral image build --into {engine} for the default)"
            )
    argv = [*eng.command, "build", "--file", str(path), "--tag", tag]
    if engine == "podman":
        argv.append("--pull=never")
    argv.append(str(ctx))
    print(f"corral image: {engine} build {tag} from {path}", file=sys.stderr, flush=True)
    tail: list[str] = []
    with subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=eng.env(),
        stdin=subprocess.DEVNULL,
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            sys.stderr.write(line)
            tail = [*tail[-5:], line.strip()]
    if proc.wait() != 0:
        raise CorralError(f"{engine} build of {tag} failed: {' / '.join(t for t in tail if t)}")
    return tag
