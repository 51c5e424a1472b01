#!/usr/bin/env python3
"""Vendor xterm.js into the dashboard's static files, pinned by version and hash.

The /ui terminal loads nothing from a CDN: src/corral/server/ui/static/
holds xterm.js's ES module, its stylesheet and its licence, byte for byte as
published on npm. This script fetches the pinned release with npm pack,
checks the tarball against the registry's integrity (sha512) pinned here,
copies the three files and checks their sha256 (also pinned here; the tests
check the shipped files against them).

    python scripts/vendor_xterm.py          # (re)write the files
    python scripts/vendor_xterm.py --check  # only compare the shipped files

To upgrade: change VERSION and INTEGRITY (npm view @xterm/xterm@X dist.integrity),
run with --update-hashes, read the release notes for CSP or API changes,
and run tests/test_ui.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "@xterm/xterm"
VERSION = "6.0.0"
INTEGRITY = (  # npm view @xterm/xterm@6.0.0 dist.integrity
    "sha512-TQwDdQGtwwDt+2cgKDLn0IRaSxYu1tSUjgKarSDkUM0"
    "ZNiSRXFpjxEsvc/Zgc5kq5omJ+V0a8/kIM2WD3sMOYg=="
)
STATIC = Path(__file__).resolve().parent.parent / "src/corral/server/ui/static"
# tarball member -> shipped name, sha256
FILES = {
    "package/lib/xterm.mjs": (
        "xterm.mjs",
        "b336ec65a086c056d4804b3d4c2347da5663d3f23c3f25be866467bd8857ad59",
    ),
    "package/css/xterm.css": (
        "xterm.css",
        "854a7c0fb70e8b1a083c16797ab827299fb18744f5ad34f227b48337e33293c6",
    ),
    "package/LICENSE": (
        "xterm.LICENSE",
        "b569f629d00f2626a8100df2a1798210535621e42164dfd426a6fe5aac7b0ccd",
    ),
}


def shipped_mismatches() -> list[str]:
    """The shipped files whose sha256 is not the pinned one (empty: all good)."""
    bad = []
    for name, digest in FILES.values():
        path = STATIC / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            bad.append(name)
    return bad


def vendor(update_hashes: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        packed = subprocess.run(
            ["npm", "pack", f"{PACKAGE}@{VERSION}", "--json", "--pack-destination", tmp],
            check=True,
            capture_output=True,
            text=True,
        )
        tarball = Path(tmp) / json.loads(packed.stdout)[0]["filename"]
        data = tarball.read_bytes()
        integrity = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
        if integrity != INTEGRITY:
            sys.exit(f"{PACKAGE}@{VERSION}: tarball integrity {integrity}, pinned {INTEGRITY}")
        with tarfile.open(tarball) as archive:
            for member, (name, digest) in FILES.items():
                extracted = archive.extractfile(member)
                assert extracted is not None, member
                content = extracted.read()
                got = hashlib.sha256(content).hexdigest()
                if got != digest and not update_hashes:
                    sys.exit(f"{member}: sha256 {got}, pinned {digest}")
                (STATIC / name).write_bytes(content)
                print(f"{name}  {got}")


def main() -> None:
    if "--check" in sys.argv:
        bad = shipped_mismatches()
        if bad:
            sys.exit(f"not {PACKAGE}@{VERSION} as pinned: {', '.join(bad)}")
        return
    vendor("--update-hashes" in sys.argv)


if __name__ == "__main__":
    main()
