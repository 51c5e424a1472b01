"""The box's mount table names no host path it was not given as data (issue 11, item 7)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import corral
from corral import AsyncSandbox
from corral.backends.linux import _workdir

READ_BOTH = "cat /proc/self/mountinfo /proc/1/mountinfo"


def _host_only(text: str, paths: list[str]) -> list[str]:
    return [line for line in text.splitlines() for p in paths if p in line]


@pytest.fixture
def data_dir() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="corral-test-data-"))
    (top / "workspaces").mkdir()
    try:
        yield top
    finally:
        shutil.rmtree(top)


@pytest.mark.skipif(os.geteuid() != 0, reason="an image-backed workspace needs root")
async def test_a_server_workspace_shows_no_host_path(data_dir: Path) -> None:
    workspace = data_dir / "workspaces" / "abc123"
    workspace.mkdir(mode=0o700)
    sb = AsyncSandbox("default", runtime=None)
    sb._workdir = workspace
    sb._own_workdir = True  # as corral serve does
    await sb.start()
    try:
        result = await sb.commands.run(READ_BOTH)
    finally:
        await sb.close()
    text = result.stdout.decode()
    assert " /workspace " in text
    hidden = [
        str(workspace),
        str(data_dir),
        tempfile.gettempdir() + "/",
        _workdir.MOUNT_DIR,
        _workdir.IMAGE_DIR,
        "/var/lib/corral",
        os.getcwd(),
    ]
    assert _host_only(text, hidden) == []


def test_a_one_shot_box_shows_no_host_path() -> None:
    result = corral.run(["sh", "-c", READ_BOTH])
    assert result.exit_code == 0, result.stderr_text
    hidden = [tempfile.gettempdir() + "/", _workdir.MOUNT_DIR, "/var/lib/corral", os.getcwd()]
    assert _host_only(result.stdout_text, hidden) == []
