"""The ``corral`` command line, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corral._cli import EXIT_BROKEN_PIPE, EXIT_CORRAL, EXIT_LIMIT


def corral(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        capture_output=True,
        timeout=60,
        check=False,
        cwd=cwd,
    )


def test_run_prints_output_and_mirrors_the_exit_status() -> None:
    proc = corral(
        "run",
        "--memory",
        "256M",
        "--timeout",
        "10",
        "--",
        "python3",
        "-c",
        "print(sum(range(100)))",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"4950\n"
    proc = corral("run", "--", "sh", "-c", "echo oops >&2; exit 3")
    assert proc.returncode == 3
    assert proc.stderr == b"oops\n"


def test_run_shadow_is_absent() -> None:
    proc = corral("run", "--", "python3", "-c", "open('/etc/shadow').read()")
    assert proc.returncode == 1
    assert b"FileNotFoundError" in proc.stderr


def test_run_json_reports_the_memory_limit() -> None:
    proc = corral("run", "--json", "--memory", "64M", "--", "python3", "-c", "x = 'a' * 10**10")
    result = json.loads(proc.stdout)
    assert proc.returncode == EXIT_LIMIT
    assert result["limit_hit"] in ("memory",) or result["degraded"]
    for key in (
        "exit_code",
        "signal",
        "stdout",
        "stderr",
        "duration_s",
        "cpu_time_s",
        "peak_memory_bytes",
        "limits_hit",
        "truncated",
    ):
        assert key in result


def test_run_limit_hit_is_explained_on_stderr() -> None:
    proc = corral("run", "--timeout", "0.5", "--", "sleep", "30")
    assert proc.returncode == EXIT_LIMIT
    assert b"corral: limit hit: timeout" in proc.stderr


def test_run_workdir_env_and_policy_file(tmp_path: Path, world_dir: Path) -> None:
    work = world_dir
    (work / "in.txt").write_text("data")
    policy = tmp_path / "p.toml"
    policy.write_text('extends = "strict"\n[env]\nGREETING = "hi"\n')
    proc = corral(
        "run",
        "--policy",
        str(policy),
        "--workdir",
        str(work),
        "--env",
        "X=1",
        "--",
        "sh",
        "-c",
        "cat in.txt; echo $GREETING $X; echo out > out.txt",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"datahi 1\n"
    assert (work / "out.txt").read_text() == "out\n"


def test_a_workdir_in_a_private_directory_is_reached_through_its_idmapped_view(
    tmp_path: Path,
) -> None:
    """As root the box's own host uid could not enter a 0700 tree; the idmapped
    mount of the workdir (see _workdir) gives the box that directory, and only it."""
    if os.geteuid() != 0:
        pytest.skip("as a user the box runs with the caller's uid and reaches the caller's dirs")
    hidden = tmp_path / "private"  # tmp_path sits in a 0700 directory
    hidden.mkdir()
    (hidden / "in.txt").write_text("data")
    proc = corral("run", "--workdir", str(hidden), "--", "sh", "-c", "cat in.txt > out.txt")
    assert proc.returncode == 0, proc.stderr
    out = hidden / "out.txt"
    assert out.read_text() == "data"
    assert (out.stat().st_uid, out.stat().st_gid) == (0, 0)  # the caller's, not the box's uid


def test_command_not_found_is_127() -> None:
    proc = corral("run", "--", "definitely-not-installed")
    assert proc.returncode == 127
    assert b"definitely-not-installed" in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("run", "--policy", "lax", "--", "true"), b"preset: 'lax' is not a preset"),
        (("run", "--pids", "0", "--", "true"), b"limits.pids: must be > 0"),
        (("run", "--policy", "/nonexistent.toml", "--", "true"), b"cannot read policy file"),
        (("run", "--workdir", "/nonexistent-dir", "--", "true"), b"workdir is not a directory"),
    ],
)
def test_bad_input_is_a_clear_error(args: tuple[str, ...], message: bytes) -> None:
    proc = corral(*args)
    assert proc.returncode == EXIT_CORRAL
    assert message in proc.stderr, proc.stderr


def test_run_without_a_command() -> None:
    proc = corral("run")
    assert proc.returncode == 2
    assert b"no command given" in proc.stderr


def test_doctor_reports_what_the_host_enforces() -> None:
    proc = corral("doctor", "--json")
    assert proc.returncode == 0, proc.stdout
    checks = {c["name"]: c for c in json.loads(proc.stdout)}
    assert checks["bwrap"]["status"] == "ok"
    assert checks["seccomp"]["status"] == "ok"
    assert {"user namespaces", "cgroups", "landlock", "identity"} <= set(checks)
    text = corral("doctor")
    assert b"bwrap" in text.stdout


def test_policy_show_and_check(tmp_path: Path) -> None:
    proc = corral("policy", "show", "strict")
    assert json.loads(proc.stdout)["limits"]["memory_bytes"] == 256 << 20
    good = tmp_path / "good.toml"
    good.write_text('name = "g"\n[limits]\nmemory_bytes = "1G"\n')
    assert corral("policy", "check", str(good)).returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nmemory_bytes = -1\n")
    proc = corral("policy", "check", str(bad))
    assert proc.returncode == EXIT_CORRAL
    assert b"limits.memory_bytes: must be >= 0" in proc.stderr


def test_missing_bind_source_is_refused() -> None:
    policy_text = '[filesystem]\nread_only = ["/nonexistent-corral-src:/data"]\n'
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(policy_text)
        f.flush()
        proc = corral("run", "--policy", f.name, "--", "true")
    assert proc.returncode == EXIT_CORRAL
    assert b"filesystem.read_only[0].source: /nonexistent-corral-src does not exist" in proc.stderr


def test_uid_range_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("host uids are only chosen when corral runs as root")
    proc = subprocess.run(
        [sys.executable, "-m", "corral", "run", "--", "true"],
        capture_output=True,
        env={**os.environ, "CORRAL_UID_RANGE": "1000-2000"},
        check=False,
    )
    assert proc.returncode == EXIT_CORRAL
    assert b"must be within 65536" in proc.stderr


@pytest.mark.parametrize(
    "args",
    [("policy", "show", "default"), ("run", "--", "sh", "-c", "seq 100000")],
)
def test_a_closed_pipe_ends_the_cli_quietly(args: tuple[str, ...]) -> None:
    """``corral ... | head -1``, its reader already gone: a real pipe, whose
    every write fails with EPIPE (as the writes after head's first line do)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "corral", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert proc.stderr == b""
    assert proc.returncode == EXIT_BROKEN_PIPE


@pytest.mark.parametrize(
    ("command", "status", "message"),
    [
        ("no-such-cmd", 127, b"corral: no-such-cmd: command not found in the box\n"),
        ("/etc/hostname", 126, b"corral: /etc/hostname: cannot be run in the box"),
    ],
)
def test_a_command_that_cannot_start_is_said_in_corrals_words(
    command: str, status: int, message: bytes
) -> None:
    import corral as lib

    # both launchers: the shell line, and the Python one (an env name no shell passes on)
    for env in ([], ["--env", "odd-name.x=1"]):
        proc = corral("run", *env, "--", command)
        assert proc.returncode == status
        assert proc.stderr.startswith(message)
        assert b"bwrap" not in proc.stderr
        assert b"exec:" not in proc.stderr
    # a long-lived sandbox says the same
    with lib.Sandbox(runtime=None) as sb:
        result = sb.commands.run([command])
    assert result.exit_code == status
    assert result.stderr.startswith(message)


@pytest.mark.parametrize("command", [("mcp",), ("run", "--", "true")])
def test_every_time_limit_option_takes_none_and_refuses_zero(command: tuple[str, ...]) -> None:
    """One parser for time limits at the edge: ``corral mcp --timeout none``
    failed while ``python -m corral._mcp --timeout none`` worked."""
    sub, rest = command[0], command[1:]
    # stdin closed: the MCP server ends at once, cleanly, if its options parsed
    ok = subprocess.run(
        [sys.executable, "-m", "corral", sub, "--timeout", "none", *rest],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr.decode()
    refused = corral(sub, "--timeout", "0", *rest)
    assert refused.returncode == 2
    assert b"a time limit must be more than 0 (or none)" in refused.stderr
