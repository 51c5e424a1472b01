"""Runtimes: the environments code contexts run in (corral's E2B templates).

A runtime is a virtualenv built from the system Python (``/usr/bin/python3``:
never one under a home directory a box cannot see) with the packages of a
pinned requirements file, plus Deno (pinned, from the npm registry's ``deno``
package, which ships the linux-x64 binary) for JavaScript and TypeScript
contexts, registered as the Jupyter kernel ``corral-deno``. It is built once,
reused while its requirements and the Deno pin are unchanged, and bound
read-only into every box at ``/opt/corral/runtime``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ._errors import CorralError, HostToolMissing

SYSTEM_PYTHON = "/usr/bin/python3"
BOX_PATH = "/opt/corral/runtime"
MARKER = "corral-runtime.json"
DEFAULT = "default"
DENO_VERSION = "2.9.6"  # the npm package `deno`, whose @deno/linux-x64-glibc holds the binary
DENO_KERNEL = "corral-deno"
_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


@dataclass(frozen=True, slots=True)
class RuntimeInfo:
    name: str
    path: Path
    requirements_sha256: str
    size_bytes: int | None = None


def runtimes_dir() -> Path:
    """Where runtimes live: ``CORRAL_RUNTIMES_DIR``, else /var/lib/corral/runtimes
    for root and ``$XDG_DATA_HOME/corral/runtimes`` for everyone else."""
    override = os.environ.get("CORRAL_RUNTIMES_DIR")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/var/lib/corral/runtimes")
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "corral" / "runtimes"


def default_requirements() -> Path:
    return Path(__file__).parent / "runtimes" / "default.txt"


def _check_name(name: str) -> None:
    if not name or not set(name) <= _NAME_OK or name.startswith("."):
        raise CorralError(f"runtime name {name!r}: use lowercase letters, digits, '-', '_', '.'")


def find(name: str = DEFAULT) -> RuntimeInfo | None:
    _check_name(name)
    path = runtimes_dir() / name
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return RuntimeInfo(name, path, str(marker.get("requirements_sha256", "")))


def require(name: str = DEFAULT) -> RuntimeInfo:
    info = find(name)
    if info is None:
        raise HostToolMissing(
            f"the code runtime {name!r}",
            f"build it with: corral runtime build {name}  (about a minute, from PyPI)",
        )
    return info


def build(
    name: str = DEFAULT, *, requirements: str | os.PathLike[str] | None = None, quiet: bool = True
) -> RuntimeInfo:
    """Build runtime ``name`` (or reuse it if its requirements did not change)."""
    _check_name(name)
    req = Path(requirements) if requirements is not None else default_requirements()
    text = req.read_bytes() + f"\n# deno {DENO_VERSION}\n".encode()
    digest = hashlib.sha256(text).hexdigest()
    existing = find(name)
    if existing is not None and existing.requirements_sha256 == digest:
        return existing
    npm = shutil.which("npm")
    if npm is None:
        raise HostToolMissing("npm", "install it with: sudo apt-get install npm  (for Deno)")
    if not os.path.exists(SYSTEM_PYTHON):
        raise HostToolMissing(
            "python3", "install it with: sudo apt-get install python3 python3-venv"
        )
    root = runtimes_dir()
    root.mkdir(parents=True, exist_ok=True)
    for directory in (root, *root.parents):
        if directory == Path("/"):
            break
        if os.geteuid() == 0 and directory.stat().st_uid == 0:
            directory.chmod(directory.stat().st_mode | 0o055)  # boxes run as other uids
    staging = root / f".{name}.building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _run([SYSTEM_PYTHON, "-m", "venv", str(staging)], quiet)
        python = str(staging / "bin" / "python")
        pip = [python, "-m", "pip", "--disable-pip-version-check"]
        _run([*pip, "install", *(["-q"] if quiet else []), "-r", str(req)], quiet)
        probe = subprocess.run([python, "-c", "import bash_kernel"], capture_output=True)
        if probe.returncode == 0:  # its kernelspec is not part of the wheel
            _run([python, "-m", "bash_kernel.install", "--sys-prefix"], quiet)
            _portable_kernelspecs(staging)
        _install_deno(npm, staging, quiet)
        (staging / MARKER).write_text(
            json.dumps(
                {
                    "name": name,
                    "requirements_sha256": digest,
                    "python": SYSTEM_PYTHON,
                    "deno": DENO_VERSION,
                }
            )
        )
        for path in [staging, *staging.rglob("*")]:
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | (0o055 if path.is_dir() else 0o044))
        final = root / name
        if final.exists():
            old = root / f".{name}.old-{os.getpid()}"
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    info = find(name)
    assert info is not None
    return info


def _install_deno(npm: str, prefix: Path, quiet: bool) -> None:
    """Deno from the npm registry (no install script runs: the binary is a plain
    file of the platform package), and its Jupyter kernelspec, which names the
    path the runtime has inside the box."""
    _run(
        [
            npm,
            "install",
            "--prefix",
            str(prefix / "deno"),
            "--ignore-scripts",
            "--no-audit",
            "--no-fund",
            "--no-save",
            *(["--silent"] if quiet else []),
            f"deno@{DENO_VERSION}",
        ],
        quiet,
    )
    binary = prefix / "deno" / "node_modules" / "@deno" / "linux-x64-glibc" / "deno"
    if not binary.is_file():
        raise CorralError(f"the deno package installed no linux-x64 binary at {binary}")
    (prefix / "bin" / "deno").symlink_to(os.path.relpath(binary, prefix / "bin"))
    spec = prefix / "share" / "jupyter" / "kernels" / DENO_KERNEL
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [
                    f"{BOX_PATH}/bin/deno",
                    "jupyter",
                    "--kernel",
                    "--conn",
                    "{connection_file}",
                ],
                "display_name": "Deno",
                "language": "typescript",
            },
            indent=1,
        )
    )


def _portable_kernelspecs(prefix: Path) -> None:
    """Kernelspecs that name this build's own path would break once the runtime is
    moved into place and bound elsewhere in the box: "python" is resolved by
    jupyter_client to the interpreter that runs it."""
    for spec in (prefix / "share" / "jupyter" / "kernels").glob("*/kernel.json"):
        data = json.loads(spec.read_text())
        argv = data.get("argv")
        if isinstance(argv, list) and argv and str(argv[0]).startswith(str(prefix)):
            argv[0] = "python"
            spec.write_text(json.dumps(data, indent=1))


def _run(argv: list[str], quiet: bool) -> None:
    proc = subprocess.run(argv, capture_output=quiet, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or b"").decode(errors="replace").strip()[-2000:] if quiet else ""
        raise CorralError(f"building the runtime failed at {' '.join(argv[:4])}...: {detail}")


def list_runtimes() -> list[RuntimeInfo]:
    root = runtimes_dir()
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        info = find(entry.name)
        if info is not None:
            size = sum(
                p.stat().st_size for p in entry.rglob("*") if p.is_file() and not p.is_symlink()
            )
            found.append(RuntimeInfo(info.name, info.path, info.requirements_sha256, size))
    return found


def remove(name: str) -> bool:
    info = find(name)
    if info is None:
        return False
    shutil.rmtree(info.path)
    return True
