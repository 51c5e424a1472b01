"""``corral image build``: the default image, from the package registries only.

Debian's ``mmdebstrap`` makes the root filesystem (the lock's suite, variant
and packages, with slim's path excludes: no manuals, docs or locales), and,
in its customize hooks, the code runtime inside it: a venv from the image's
own ``/usr/bin/python3`` at ``/opt/corral/runtime`` with pip installing the
same pinned requirements as the host runtime (``runtimes/default.txt``), then
Deno from npm (the host's npm writes into the tree: no Node in the image).
``_archive`` turns the tree into one OCI/docker archive, cached under
``/var/cache/corral/images`` (root) by the lock's hash; a build whose archive
is cached does nothing.

What makes it reproducible: every Debian package version is pinned by the
lock (apt preferences during the build, checked against dpkg's database
after it: a mirror that moved on is an error naming the packages, never a
silently different image); Python packages are ``==`` pins of immutable
PyPI releases, compiled to hash-checked ``.pyc`` (``SOURCE_DATE_EPOCH``);
Deno is pinned; mmdebstrap with ``SOURCE_DATE_EPOCH`` removes its logs and
caches; ``/etc/resolv.conf`` and ``/etc/hostname`` get fixed contents; and
the layer is written by corral in sorted order with clamped times and
numeric owners. The host's CA bundle, used by pip during the build (this
host reaches PyPI through a TLS-inspecting proxy), is removed before the
tree is archived.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from corral import _runtime
from corral._errors import CorralError, HostToolMissing
from corral.image import _archive
from corral.image._lock import Lock

REPOSITORY = "localhost/corral-default"
RUNTIME_PATH = _runtime.BOX_PATH  # /opt/corral/runtime, where the host runtime is bound too
LABEL_RUNTIME = "io.corral.runtime"  # the runtime's path in the image
LABEL_LOCK = "io.corral.lock"  # the lock's SHA-256
_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8")
# Debian's slim images leave these out; so does corral's (copyright files stay)
_DPKG_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
)
_HOST_CA_ENV = ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")
_PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
_BUILD_DIR = "/var/tmp/corral-build"  # inside the tree, removed before archiving


@dataclass(frozen=True, slots=True)
class ImageArchive:
    """A built image archive. ``ref``: its name (``localhost/corral-default:<key>``);
    ``path``: the archive (OCI layout and docker-archive in one tar); ``digest``:
    the OCI manifest's ``sha256:...``; ``layer_digest``: its one layer's;
    ``lock_key``: SHA-256 of the lock it was built from."""

    ref: str
    path: Path
    digest: str
    layer_digest: str
    lock_key: str


def cache_dir() -> Path:
    """``CORRAL_IMAGE_CACHE``, else /var/cache/corral/images for root and
    ``$XDG_CACHE_HOME/corral/images`` for everyone else."""
    override = os.environ.get("CORRAL_IMAGE_CACHE")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/var/cache/corral/images")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "corral" / "images"


def default_ref(lock: Lock | None = None) -> str:
    """The default image's name for ``lock`` (the shipped one by default)."""
    return f"{REPOSITORY}:{(lock or Lock.load()).key()[:16]}"


def cached(lock: Lock | None = None) -> ImageArchive | None:
    """The archive built from ``lock`` if it is in the cache, else None (builds nothing)."""
    lock = lock or Lock.load()
    key = lock.key()
    meta = cache_dir() / f"default-{key[:16]}.json"
    try:
        data = json.loads(meta.read_text())
        path = Path(data["path"])
        if data["lock_key"] != key or not path.is_file():
            return None
        return ImageArchive(data["ref"], path, data["digest"], data["layer_digest"], key)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _say(message: str, started: float) -> None:
    print(
        f"corral image: [{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True
    )


def _host_ca() -> Path | None:
    for name in _HOST_CA_ENV:
        value = os.environ.get(name)
        if value and os.path.isfile(value):
            return Path(value)
    default = Path("/etc/ssl/certs/ca-certificates.crt")
    return default if default.is_file() else None


def build_default(
    lock: Lock | None = None, *, rebuild: bool = False, progress: bool = True
) -> ImageArchive:
    """The default image's archive, built unless the cache has it.

    Takes several minutes the first time (mmdebstrap, then pip from PyPI);
    progress goes to stderr. Raises ``HostToolMissing`` (mmdebstrap, npm,
    not root) or ``CorralError`` (a step failed; a package version the lock
    names is no longer on the mirror)."""
    lock = lock or Lock.load()
    if not rebuild:
        hit = cached(lock)
        if hit is not None:
            return hit
    archive, _ = _build(lock, progress=progress)
    return archive


def record_lock(lock_path: Path, *, progress: bool = True) -> ImageArchive:
    """``corral image lock``: build with the mirror's current package versions,
    write them into ``lock_path`` and cache the image under the new lock's key."""
    unpinned = dataclasses.replace(Lock.load(lock_path), packages={})

    def adopt(packages: dict[str, str]) -> Lock:
        lock_path.write_text(unpinned.render(packages), encoding="utf-8")
        return Lock.load(lock_path)

    archive, _ = _build(unpinned, progress=progress, adopt=adopt)
    return archive


def _build(
    lock: Lock,
    *,
    progress: bool,
    adopt: Callable[[dict[str, str]], Lock] | None = None,
) -> tuple[ImageArchive, dict[str, str]]:
    if os.geteuid() != 0:
        raise CorralError(
            "corral image build needs root: mmdebstrap runs in its root mode (run it with sudo)"
        )
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise HostToolMissing("mmdebstrap", "install it with: sudo apt-get install mmdebstrap")
    npm = shutil.which("npm")
    if npm is None:
        raise HostToolMissing("npm", "install it with: sudo apt-get install npm  (for Deno)")
    started = time.monotonic()
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    _sweep(cache)
    work = cache / f".build-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o700)
    try:
        root = work / "root"
        _mmdebstrap(mmdebstrap, lock, root, work, started, progress)
        if progress:
            _say(f"installing Deno {_runtime.DENO_VERSION} from npm into the image", started)
        prefix = root / RUNTIME_PATH.lstrip("/")
        _runtime._install_deno(npm, prefix, quiet=True)
        marker = {
            "name": _runtime.DEFAULT,
            "requirements_sha256": hashlib.sha256(
                lock.requirements + f"\n# deno {_runtime.DENO_VERSION}\n".encode()
            ).hexdigest(),
            "python": "/usr/bin/python3",
            "deno": _runtime.DENO_VERSION,
        }
        (prefix / _runtime.MARKER).write_text(json.dumps(marker))
        for path in [prefix, *prefix.rglob("*")]:
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | (0o055 if path.is_dir() else 0o044))
        packages = _installed_packages(root)
        if adopt is not None:
            lock = adopt(packages)
        elif lock.packages and dict(lock.packages) != packages:
            raise CorralError(_lock_mismatch(dict(lock.packages), packages))
        archive = _finish(root, lock, work, progress=progress, started=started)
        if progress:
            _say(f"done: {archive.ref} ({archive.path.stat().st_size >> 20} MiB)", started)
        return archive, packages
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _sweep(cache: Path) -> None:
    """Remove what builds killed half-way left: ``.build-<pid>`` trees and
    ``*.partial-<pid>`` archives whose process is gone."""
    for path in [*cache.glob(".build-*"), *cache.glob("*.partial-*")]:
        pid = path.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue
        if path.is_dir():
            if any(
                str(path) in line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            ):
                continue  # something is still mounted in it: leave it to an operator
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _mmdebstrap(
    mmdebstrap: str, lock: Lock, root: Path, work: Path, started: float, progress: bool
) -> None:
    build = f'"$1"{_BUILD_DIR}'
    shutil.copyfile(_req_file(lock, work), work / "requirements.txt")
    ca = _host_ca()
    if ca is not None:
        shutil.copyfile(ca, work / "ca.crt")
    pins = "".join(
        f"Package: {name}\nPin: version {version}\nPin-Priority: 1001\n\n"
        for name, version in sorted(lock.packages.items())
    )
    (work / "pins").write_text(pins)
    env_in = [
        "env",
        "-i",
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME=/root",
        "LANG=C.UTF-8",
        f"SOURCE_DATE_EPOCH={lock.source_date_epoch}",  # hash-checked .pyc files
        "PYTHONDONTWRITEBYTECODE=1",  # no stray caches from the build's own imports
        *(f"{k}={os.environ[k]}" for k in _PROXY_ENV if k in os.environ),
        *([f"PIP_CERT={_BUILD_DIR}/ca.crt"] if ca is not None else []),
    ]
    env_words = " ".join(env_in)
    pip = f"{RUNTIME_PATH}/bin/python -m pip --disable-pip-version-check --no-cache-dir --no-input"
    argv = [
        mmdebstrap,
        "--mode=root",
        "--format=directory",
        f"--variant={lock.variant}",
        "--include=" + ",".join(lock.include),
        *(f"--dpkgopt={opt}" for opt in _DPKG_EXCLUDES),
        '--aptopt=Acquire::Languages "none"',
        # the lock's versions, preferred over any other the mirror offers
        f'--setup-hook=mkdir -p "$1"/etc/apt/preferences.d && cp {work}/pins '
        '"$1"/etc/apt/preferences.d/corral-lock',
        f"--customize-hook=mkdir -p {build} && cp {work}/requirements.txt {build}/"
        + (f" && cp {work}/ca.crt {build}/" if ca is not None else ""),
        f'--customize-hook=echo "corral image: the code runtime: a venv at {RUNTIME_PATH}" >&2',
        f'--customize-hook=chroot "$1" {env_words} /usr/bin/python3 -m venv {RUNTIME_PATH}',
        '--customize-hook=echo "corral image: pip install -r runtimes/default.txt (PyPI)" >&2',
        f'--customize-hook=chroot "$1" {env_words} {pip} install --progress-bar off '
        f"-r {_BUILD_DIR}/requirements.txt >&2",
        # bash_kernel's kernelspec is not in its wheel (as in the host runtime)
        f'--customize-hook=chroot "$1" {env_words} {RUNTIME_PATH}/bin/python -m '
        "bash_kernel.install --sys-prefix >&2",
        f'--customize-hook=rm -rf {build} "$1"/etc/apt/preferences.d/corral-lock',
        # mmdebstrap copies the host's: fixed contents instead (the engine writes its own)
        '--customize-hook=echo corral > "$1"/etc/hostname',
        '--customize-hook=: > "$1"/etc/resolv.conf',
        *([] if progress else ["--quiet"]),
        lock.suite,
        str(root),
        *lock.mirrors,
    ]
    if progress:
        _say(f"mmdebstrap {lock.suite} ({lock.variant} + {', '.join(lock.include)})", started)
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(lock.source_date_epoch)}
    proc = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=sys.stderr if progress else subprocess.DEVNULL,
        stderr=sys.stderr if progress else subprocess.PIPE,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        detail = (proc.stderr or b"").decode(errors="replace").strip()[-2000:]
        raise CorralError(
            f"mmdebstrap failed (exit status {proc.returncode}) building the image root"
            + (f": {detail}" if detail else "; its output is above")
        )


def _req_file(lock: Lock, work: Path) -> Path:
    path = work / "requirements.in"
    path.write_bytes(lock.requirements)
    return path


def _installed_packages(root: Path) -> dict[str, str]:
    """name -> version of every package dpkg has installed in the tree."""
    packages: dict[str, str] = {}
    text = (root / "var/lib/dpkg/status").read_text(encoding="utf-8")
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            name = fields["Package"]
            arch = fields.get("Architecture", "")
            if arch not in ("all", "amd64", ""):
                name = f"{name}:{arch}"
            packages[name] = fields.get("Version", "")
    return dict(sorted(packages.items()))


def _lock_mismatch(locked: dict[str, str], got: dict[str, str]) -> str:
    diffs = [
        f"{name} {locked.get(name, '(not locked)')} -> {got.get(name, '(not installed)')}"
        for name in sorted(set(locked) | set(got))
        if locked.get(name) != got.get(name)
    ]
    shown = "; ".join(diffs[:12]) + (f"; and {len(diffs) - 12} more" if len(diffs) > 12 else "")
    return (
        "the image's Debian packages differ from the lock (the mirror no longer has "
        f"the locked versions): {shown}. Record the current ones with: corral image lock"
    )


def _finish(root: Path, lock: Lock, work: Path, *, progress: bool, started: float) -> ImageArchive:
    """Archive the tree at ``root`` under ``lock``'s name, into the cache."""
    key = lock.key()
    ref = f"{REPOSITORY}:{key[:16]}"
    cache = cache_dir()
    layer = work / "layer.tar"
    if progress:
        _say("writing the layer (sorted, times clamped, numeric owners)", started)

    def tick(count: int) -> None:
        if progress and count % 20000 == 0:
            _say(f"  {count} entries", started)

    with open(layer, "wb") as f:
        layer_digest, _ = _archive.write_layer(root, f, lock.source_date_epoch, tick)
    out = cache / f"default-{key[:16]}.tar"
    config = _archive.ImageConfig(
        ref=ref,
        env=_ENV,
        cmd=("/usr/bin/python3",),
        labels=((LABEL_LOCK, key), (LABEL_RUNTIME, RUNTIME_PATH)),
        source_date_epoch=lock.source_date_epoch,
    )
    try:
        digest = _archive.write_archive(layer, layer_digest, out, config)
    finally:
        layer.unlink(missing_ok=True)
    archive = ImageArchive(ref, out, digest, layer_digest, key)
    (cache / f"default-{key[:16]}.json").write_text(
        json.dumps(
            {
                "ref": ref,
                "path": str(out),
                "digest": digest,
                "layer_digest": layer_digest,
                "lock_key": key,
            },
            indent=1,
        )
    )
    return archive
