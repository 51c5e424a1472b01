"""Workspace snapshots: a sandbox's workspace to a host directory, and back into a new box.

A snapshot is a directory (mode 0700) holding ``workspace.tar`` (the
workspace as the box's own ``tar`` wrote it) and ``snapshot.json`` (format
version, the sandbox's id and policy, the tar's size, whether process state
is included). It is plain files on the host, so it survives a server restart
and ``kill -9``; ``Snapshot.load(path)`` reads it back.

Both directions use only the public sandbox API (commands and files), so a
local and a remote sandbox snapshot alike (a remote one lands on the
client's disk). The archive is made and unpacked *inside* a box, by the box's
``tar`` under the box's identity: a hostile archive (``..``, absolute paths,
symlinks out) can reach only the box it is unpacked in. The host never
unpacks it, it only stores and streams the bytes.

Process and memory state (CRIU) is not captured: ``Snapshot.processes`` is
always False here (see docs/design.md for why this host cannot checkpoint a
bwrap box). A snapshot is taken while the box runs: a file written meanwhile
is copied as it was when tar read it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ._errors import CorralError, SandboxError
from ._policy import Policy

if TYPE_CHECKING:
    from .abc import AsyncSandboxAPI

FORMAT = 1
_TAR = "workspace.tar"
_META = "snapshot.json"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A saved workspace. ``path``: its directory; ``workspace_bytes``: the
    archive's size; ``policy``: the policy of the sandbox it came from;
    ``processes``: whether process and memory state is included (never, yet)."""

    path: str
    sandbox_id: str
    policy: Policy
    workspace_bytes: int
    created_at: float
    processes: bool = False

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Snapshot:
        """The snapshot in directory ``path``; ``SandboxError`` when it is not one
        (missing files, another format version)."""
        directory = Path(path)
        try:
            meta = json.loads((directory / _META).read_text())
            size = (directory / _TAR).stat().st_size
        except (OSError, ValueError) as exc:
            raise SandboxError(f"{directory} is not a corral snapshot: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise SandboxError(f"{directory}: unknown snapshot format {meta.get('format')!r}")
        return cls(
            path=str(directory),
            sandbox_id=str(meta["sandbox_id"]),
            policy=Policy.from_dict(meta["policy"]),
            workspace_bytes=size,
            created_at=float(meta["created_at"]),
            processes=bool(meta.get("processes", False)),
        )


async def take(sb: AsyncSandboxAPI, path: str | os.PathLike[str] | None) -> Snapshot:
    """Archive ``sb``'s workspace into the directory ``path`` (created, mode
    0700; a new temporary directory when None). ``SandboxError`` when tar fails
    in the box (e.g. the workspace has no room for the archive)."""
    workspace = sb.policy.filesystem.workspace
    name = f".corral-snapshot-{secrets.token_hex(6)}.tar"
    directory = Path(tempfile.mkdtemp(prefix="corral-snapshot-") if path is None else path)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise SandboxError(f"{directory}: a snapshot needs an empty directory")
    argv = ["tar", "-C", workspace, f"--exclude=./{name}", "-cf", f"{workspace}/{name}", "."]
    try:
        made = await sb.commands.run(argv)
        # 1: a file changed while tar read it; the archive holds what tar saw
        if made.exit_code not in (0, 1):
            detail = made.stderr.decode(errors="replace").strip()[-500:]
            raise SandboxError(f"the workspace could not be archived in the box: {detail}")
        size = 0
        fd = os.open(directory / _TAR, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            async with await sb.files.open_read(name) as reader:
                async for chunk in reader:
                    out.write(chunk)
                    size += len(chunk)
    finally:
        if await sb.is_running():
            with contextlib.suppress(CorralError, OSError):  # never made: nothing to remove
                await sb.files.remove(name)
    meta = {
        "format": FORMAT,
        "sandbox_id": sb.id,
        "policy": sb.policy.to_dict(),
        "created_at": time.time(),
        "processes": False,
    }
    (directory / _META).write_text(json.dumps(meta, indent=1))
    return Snapshot.load(directory)


async def restore(sb: AsyncSandboxAPI, snapshot: Snapshot | str | os.PathLike[str]) -> None:
    """Unpack ``snapshot``'s workspace into ``sb``'s (files of the same name
    are replaced; others stay). ``SandboxError`` when tar fails in the box."""
    snap = snapshot if isinstance(snapshot, Snapshot) else Snapshot.load(snapshot)
    workspace = sb.policy.filesystem.workspace
    name = f".corral-restore-{secrets.token_hex(6)}.tar"
    try:
        with open(Path(snap.path) / _TAR, "rb") as archive:
            await sb.files.write(name, archive, mode=0o600)
        # unpacked in the box, as the box's user: a hostile archive reaches only this box
        argv = ["tar", "-C", workspace, "--no-same-owner", "-xf", f"{workspace}/{name}"]
        done = await sb.commands.run(argv)
        if done.exit_code != 0:
            detail = done.stderr.decode(errors="replace").strip()[-500:]
            raise SandboxError(f"the snapshot could not be unpacked in the box: {detail}")
    finally:
        if await sb.is_running():
            with contextlib.suppress(CorralError, OSError):  # never made: nothing to remove
                await sb.files.remove(name)
