from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

import corral
from corral import Policy, RunResult
from corral._result import result_from_dict

GOLDEN = Path(__file__).parent / "golden"
SRC = Path(corral.__file__).parent
UNPRIVILEGED_USER = "corral-test"
SYSTEM_PYTHON = "/usr/bin/python3"


def check_golden(name: str, text: str) -> None:
    """Compare ``text`` with ``tests/golden/<name>``; CORRAL_UPDATE_GOLDEN=1 rewrites it."""
    path = GOLDEN / name
    if os.environ.get("CORRAL_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with CORRAL_UPDATE_GOLDEN=1"
    assert text == path.read_text()


@pytest.fixture
def golden() -> Callable[[str, str], None]:
    return check_golden


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A fresh directory every box identity can reach and write (unlike pytest's tmp_path)."""
    path = Path(tempfile.mkdtemp(prefix="corral-test-ws-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def unprivileged_user() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        return None


@pytest.fixture(scope="session")
def world_readable_src() -> Iterator[Path]:
    """A copy of the package an unprivileged user can import (the checkout may be under /root)."""
    top = Path(tempfile.mkdtemp(prefix="corral-test-src-"))
    try:
        shutil.copytree(SRC, top / "corral", ignore=shutil.ignore_patterns("__pycache__"))
        for path in [top, *top.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield top
    finally:
        shutil.rmtree(top)


@dataclass
class Runner:
    """Runs a command in a box as root (the library in-process) or as an ordinary user
    (the CLI in a subprocess under an unprivileged uid): the same walls must hold."""

    mode: str
    src: Path | None = None

    def __call__(
        self,
        command: Sequence[str],
        policy: Policy | None = None,
        *,
        workdir: str | None = None,
    ) -> RunResult:
        policy = policy or Policy.preset("default")
        if self.mode != "user":
            return corral.run(command, policy=policy, workdir=workdir)
        user = unprivileged_user()
        assert user is not None
        assert self.src is not None
        with tempfile.TemporaryDirectory(prefix="corral-test-pol-") as tmp:
            os.chmod(tmp, 0o755)
            policy_file = Path(tmp) / "policy.json"
            policy_file.write_text(json.dumps(policy.to_dict()))
            policy_file.chmod(0o644)
            argv = [
                "setpriv",
                f"--reuid={user.pw_uid}",
                f"--regid={user.pw_gid}",
                "--clear-groups",
                "--",
                SYSTEM_PYTHON,
                "-m",
                "corral",
                "run",
                "--policy",
                str(policy_file),
                "--json",
            ]
            if workdir is not None:
                argv += ["--workdir", workdir]
            proc = subprocess.run(
                [*argv, "--", *command],
                capture_output=True,
                env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(self.src)},
                cwd="/",
                timeout=120,
                check=False,
            )
        if proc.returncode == 125 or not proc.stdout.startswith(b"{"):
            raise corral.CorralError(proc.stderr.decode(errors="replace"))
        return result_from_dict(json.loads(proc.stdout))


def _modes() -> list[str]:
    return ["root", "user"] if os.geteuid() == 0 else ["self"]


@pytest.fixture(params=_modes())
def box(request: pytest.FixtureRequest) -> Runner:
    mode = str(request.param)
    if mode == "user":
        if unprivileged_user() is None:
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI must create the user {UNPRIVILEGED_USER} (scripts/setup.sh)")
            pytest.skip(f"no user {UNPRIVILEGED_USER}: run scripts/setup.sh")
        return Runner("user", request.getfixturevalue("world_readable_src"))
    return Runner(mode)


def py(code: str) -> list[str]:
    """A command running ``code`` with the box's system Python."""
    return [SYSTEM_PYTHON, "-c", code]
