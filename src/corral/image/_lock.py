"""The image lock: what the default image is built from, exactly.

A lock is a small TOML file (``default.lock`` ships with corral): the Debian
suite and mirrors, the mmdebstrap variant and the packages asked for, the
``SOURCE_DATE_EPOCH`` every timestamp is clamped to, and the exact version of
every Debian package the image holds (recorded by ``corral image lock``). The
code runtime inside the image comes from the same pins as the host's
(``runtimes/default.txt``, Deno's version). The image's cache key and tag are
the SHA-256 of all of it: the same lock gives the same image, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from corral import _runtime
from corral._errors import CorralError

FORMAT = 1  # bumped when the builder changes what a lock produces


def default_lock_path() -> Path:
    return Path(__file__).parent / "default.lock"


@dataclass(frozen=True, slots=True)
class Lock:
    """A parsed lock. ``packages``: Debian package name -> exact version
    (empty: not yet recorded; the build then takes the mirror's current ones)."""

    suite: str
    variant: str
    source_date_epoch: int
    mirrors: tuple[str, ...]
    include: tuple[str, ...]
    packages: Mapping[str, str] = field(default_factory=dict)
    requirements: bytes = b""  # the runtime's pinned requirements file

    @classmethod
    def load(
        cls, path: str | Path | None = None, *, requirements: str | Path | None = None
    ) -> Lock:
        """Read a lock; ``CorralError`` naming the file and field when it is malformed."""
        path = Path(path) if path is not None else default_lock_path()
        req = Path(requirements) if requirements is not None else _runtime.default_requirements()
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise CorralError(f"image lock {path}: {exc}") from exc

        def need(name: str, kind: type) -> object:
            value = data.get(name)
            if not isinstance(value, kind):
                raise CorralError(f"image lock {path}: {name}: expected a {kind.__name__}")
            return value

        mirrors = need("mirrors", list)
        include = need("include", list)
        packages = data.get("packages", {})
        if not isinstance(packages, dict) or not all(isinstance(v, str) for v in packages.values()):
            raise CorralError(f'image lock {path}: packages: expected name = "version" lines')
        return cls(
            suite=str(need("suite", str)),
            variant=str(need("variant", str)),
            source_date_epoch=int(need("source_date_epoch", int)),  # type: ignore[call-overload]
            mirrors=tuple(str(m) for m in mirrors),  # type: ignore[attr-defined]
            include=tuple(str(p) for p in include),  # type: ignore[attr-defined]
            packages=dict(sorted(packages.items())),
            requirements=req.read_bytes(),
        )

    def key(self) -> str:
        """SHA-256 (hex) of everything the image is made from."""
        doc = {
            "format": FORMAT,
            "suite": self.suite,
            "variant": self.variant,
            "source_date_epoch": self.source_date_epoch,
            "mirrors": list(self.mirrors),
            "include": list(self.include),
            "packages": dict(self.packages),
            "requirements_sha256": hashlib.sha256(self.requirements).hexdigest(),
            "deno": _runtime.DENO_VERSION,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def render(self, packages: Mapping[str, str]) -> str:
        """This lock as TOML, with ``packages`` recorded (what ``corral image lock`` writes)."""
        lines = [
            "# corral's default image: Debian + python3 + the code runtime (runtimes/default.txt).",
            "# Every Debian package is pinned below; regenerate with: corral image lock",
            f"suite = {json.dumps(self.suite)}",
            f"variant = {json.dumps(self.variant)}",
            f"source_date_epoch = {self.source_date_epoch}",
            "mirrors = [",
            *(f"    {json.dumps(m)}," for m in self.mirrors),
            "]",
            "include = [",
            *(f"    {json.dumps(p)}," for p in self.include),
            "]",
            "",
            "[packages]",
            *(f"{json.dumps(n)} = {json.dumps(v)}" for n, v in sorted(packages.items())),
        ]
        return "\n".join(lines) + "\n"
