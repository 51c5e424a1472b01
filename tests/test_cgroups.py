"""cgroups: the planner against golden files; the runtime against the real kernel.

The kernel tests start real processes in real sandbox cgroups; they need root
and skip with the reason ``detect_cgroups`` gives when cgroups are unusable.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corral._errors import SandboxError, UnsupportedPolicy
from corral._policy import Limits
from corral.backends.linux._cgroups import (
    CgroupSupport,
    SandboxCgroup,
    detect_cgroups,
    leftover_cgroups,
)
from corral.plan._cgroups import CgroupWrite, plan_cgroups, render

Golden = Callable[[str, str], None]
LIMITS = Limits(memory_bytes=64 << 20, pids=16, cpu_cores=0.5)
NO_LIMITS = Limits(memory_bytes=None, pids=None, cpu_cores=None)


# -- the planner ----------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_plan_golden(version: int, golden: Golden) -> None:
    assert version in (1, 2)
    golden(f"cgroups_v{version}.txt", render(plan_cgroups(LIMITS, 1 if version == 1 else 2)))


@pytest.mark.parametrize("limits", [LIMITS, NO_LIMITS, Limits()])
def test_every_write_names_its_threat(limits: Limits) -> None:
    for writes in (plan_cgroups(limits, 1), plan_cgroups(limits, 2)):
        for w in writes:
            assert w.threat
            assert w.fallback is None or w.fallback.threat


def test_v1_memsw_follows_the_memory_limit() -> None:
    writes = plan_cgroups(LIMITS, 1)
    files = [w.file for w in writes]
    # the kernel refuses memory+swap below the plain limit: the plain limit goes first
    assert files.index("memory.limit_in_bytes") < files.index("memory.memsw.limit_in_bytes")
    memsw = writes[files.index("memory.memsw.limit_in_bytes")]
    assert memsw.value == str(64 << 20)
    assert memsw.fallback is not None
    assert (memsw.fallback.file, memsw.fallback.value) == ("memory.swappiness", "0")


def test_no_limits_still_turn_swap_off() -> None:
    assert {w.file for w in plan_cgroups(NO_LIMITS, 1)} == {
        "memory.oom_control",
        "memory.swappiness",
    }
    assert {w.file for w in plan_cgroups(NO_LIMITS, 2)} == {"memory.swap.max", "memory.oom.group"}


def test_cpu_quota() -> None:
    limits = Limits(cpu_cores=1.5)
    assert [w.value for w in plan_cgroups(limits, 2) if w.file == "cpu.max"] == ["150000 100000"]
    v1 = {w.file: w.value for w in plan_cgroups(limits, 1)}
    assert (v1["cpu.cfs_period_us"], v1["cpu.cfs_quota_us"]) == ("100000", "150000")


def test_cpu_share_below_the_cfs_minimum_is_refused() -> None:
    with pytest.raises(UnsupportedPolicy) as info:
        plan_cgroups(Limits(cpu_cores=0.001), 2)
    assert info.value.field == "limits.cpu_cores"


def test_detection_is_cached_and_explains_itself() -> None:
    support = detect_cgroups()
    assert support is detect_cgroups()
    if not support.available:
        assert support.reason
    assert set(support.parents) == set(support.controllers)


# -- the kernel -------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _remove_parents() -> Iterator[None]:
    """Leave the host as found: corral's parent directories go too when they are empty."""
    yield
    for parent in sorted(set(detect_cgroups().parents.values()), reverse=True):
        with contextlib.suppress(OSError):  # EBUSY: another sandbox still uses it
            os.rmdir(parent)


@pytest.fixture
def support() -> CgroupSupport:
    support = detect_cgroups()
    if not support.available:
        pytest.skip(f"cgroups unavailable: {support.reason}")
    return support


@pytest.fixture
def name() -> Iterator[str]:
    """A unique sandbox name; fails the test if its cgroup outlives it."""
    name = f"test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    left = [path for path in leftover_cgroups() if path.endswith(f"/{name}")]
    for path in left:
        with contextlib.suppress(OSError):
            os.rmdir(path)
    assert not left, f"leaked cgroups: {left}"


def _writes(support: CgroupSupport, limits: Limits, *needed: str) -> tuple[CgroupWrite, ...]:
    missing = [c for c in needed if c not in support.controllers]
    if missing:
        pytest.skip(f"no {', '.join(missing)} controller: {support.reason}")
    assert support.version is not None
    plan = plan_cgroups(limits, support.version)
    return tuple(w for w in plan if w.controller in support.controllers)


def _start(cgroup: SandboxCgroup, *argv: str) -> subprocess.Popen[bytes]:
    """Start ``argv``, blocked on a line of stdin until it is inside ``cgroup``."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        cgroup.add_process(proc.pid)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def _python(cgroup: SandboxCgroup, code: str) -> subprocess.Popen[bytes]:
    return _start(cgroup, sys.executable, "-c", f"import sys\nsys.stdin.readline()\n{code}")


def _wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.root
def test_memory_bomb_is_oom_killed(support: CgroupSupport, name: str) -> None:
    limits = Limits(memory_bytes=64 << 20, pids=16, cpu_cores=None)
    with SandboxCgroup.create(support, name, _writes(support, limits, "memory")) as cgroup:
        proc = _python(cgroup, "b = b'x' * (200 << 20)")
        proc.communicate(b"go\n", timeout=60)
        assert proc.returncode == -signal.SIGKILL
        stats = cgroup.stats()
        assert stats.oom_kills >= 1
        if stats.peak_memory_bytes is not None:
            assert 32 << 20 < stats.peak_memory_bytes <= (64 << 20) + (1 << 20)


@pytest.mark.root
def test_stats_count_memory_and_tasks_now(support: CgroupSupport, name: str) -> None:
    # memory_bytes and pids are readings of now (the charts of corral serve),
    # not peaks: they rise with a process holding 48 MiB and fall when it ends
    limits = Limits(memory_bytes=256 << 20, pids=16, cpu_cores=None)
    writes = _writes(support, limits, "memory", "pids")
    with SandboxCgroup.create(support, name, writes) as cgroup:
        before = cgroup.stats()
        assert before.pids == 0
        hold = "b = bytearray(48 << 20); b[::4096] = b'1' * len(b[::4096]); sys.stdin.readline()"
        proc = _python(cgroup, hold)
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        assert _wait_for(lambda: (cgroup.stats().memory_bytes or 0) >= 48 << 20)
        assert cgroup.stats().pids == 1
        proc.communicate(b"done\n", timeout=30)
        after = cgroup.stats()
        assert after.pids == 0
        assert after.memory_bytes is not None
        assert after.memory_bytes < 48 << 20


@pytest.mark.root
def test_fork_bomb_is_capped_and_killed(support: CgroupSupport, name: str) -> None:
    limits = Limits(memory_bytes=None, pids=16, cpu_cores=None)
    with SandboxCgroup.create(support, name, _writes(support, limits, "pids")) as cgroup:
        sleeps = "read x; i=0; while [ $i -lt 100 ]; do sleep 60 & i=$((i+1)); done; wait"
        proc = _start(cgroup, "sh", "-c", sleeps)
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        assert _wait_for(lambda: cgroup.stats().pids_limit_hits >= 1)
        assert 1 <= len(cgroup.pids()) <= 16
        cgroup.kill_all()
        assert cgroup.pids() == []
        proc.wait(timeout=10)


@pytest.mark.root
def test_kill_all_outruns_a_real_fork_bomb(support: CgroupSupport, name: str) -> None:
    limits = Limits(memory_bytes=None, pids=16, cpu_cores=None)
    with SandboxCgroup.create(support, name, _writes(support, limits, "pids")) as cgroup:
        bomb = (
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
        )
        proc = _python(cgroup, bomb)
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        assert _wait_for(lambda: len(cgroup.pids()) >= 16)
        cgroup.kill_all()
        assert cgroup.pids() == []
        assert proc.wait(timeout=10) == -signal.SIGKILL


@pytest.mark.root
def test_cpu_quota_throttles_a_busy_loop(support: CgroupSupport, name: str) -> None:
    limits = Limits(memory_bytes=None, pids=None, cpu_cores=0.2)
    with SandboxCgroup.create(support, name, _writes(support, limits, "cpu")) as cgroup:
        proc = _python(
            cgroup, "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 1: pass"
        )
        proc.communicate(b"go\n", timeout=30)
        assert proc.returncode == 0
        stats = cgroup.stats()
        if stats.cpu_time_s is None:
            pytest.skip("this host does not count CPU time per cgroup (no cpuacct)")
        assert 0.05 < stats.cpu_time_s <= 0.35
        assert stats.cpu_throttled_s is None or stats.cpu_throttled_s > 0


@pytest.mark.root
def test_remove_kills_cleans_up_and_is_idempotent(support: CgroupSupport, name: str) -> None:
    cgroup = SandboxCgroup.create(support, name, ())
    proc = _start(cgroup, "sleep", "60")
    assert proc.stdin is not None
    proc.stdin.close()
    assert cgroup.pids() == [proc.pid]
    assert all(os.path.isdir(path) for path in cgroup.paths)
    cgroup.remove()
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert not any(os.path.exists(path) for path in cgroup.paths)
    assert not [path for path in leftover_cgroups() if path.endswith(f"/{name}")]
    cgroup.remove()
    with pytest.raises(SandboxError):
        cgroup.add_process(os.getpid())


@pytest.mark.root
@pytest.mark.parametrize(
    ("write", "expected"),
    [
        (CgroupWrite("pids", "pids.no_such_file", "1", "test"), "pids.no_such_file"),
        (CgroupWrite("pids", "pids.max", "banana", "test"), "pids.max"),
        (CgroupWrite("no-such-controller", "x.max", "1", "test"), "x.max"),
    ],
)
def test_a_bad_write_refuses_and_leaves_nothing(
    support: CgroupSupport, name: str, write: CgroupWrite, expected: str
) -> None:
    _writes(support, NO_LIMITS, "pids")
    with pytest.raises(SandboxError, match=expected):
        SandboxCgroup.create(support, name, (CgroupWrite("pids", "pids.max", "8", "test"), write))
    parents = set(support.parents.values())
    assert not any(os.path.exists(f"{parent}/{name}") for parent in parents)


@pytest.mark.root
def test_a_taken_name_is_refused_without_touching_the_owner(
    support: CgroupSupport, name: str
) -> None:
    with SandboxCgroup.create(support, name, ()) as first:
        with pytest.raises(SandboxError, match="cannot create cgroup"):
            SandboxCgroup.create(support, name, ())
        assert all(os.path.isdir(path) for path in first.paths)


@pytest.mark.root
def test_an_unprivileged_user_is_told_why(world_readable_src: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    code = (
        "from corral.backends.linux._cgroups import detect_cgroups as d; "
        "s = d(); print(s.available, s.reason)"
    )
    proc = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "/usr/bin/python3",
            "-c",
            code,
        ],
        capture_output=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(world_readable_src)},
        cwd="/",
        timeout=60,
        check=True,
    )
    available, _, reason = proc.stdout.decode().strip().partition(" ")
    assert available == "False"
    assert "root" in reason


@pytest.mark.root
def test_a_missing_file_falls_back(support: CgroupSupport, name: str) -> None:
    _writes(support, NO_LIMITS, "pids")
    fallback = CgroupWrite("pids", "pids.max", "8", "test")
    absent = CgroupWrite("pids", "pids.not_on_this_kernel", "1", "test", fallback)
    with SandboxCgroup.create(support, name, (absent,)) as cgroup:
        assert Path(cgroup.dirs["pids"], "pids.max").read_text().strip() == "8"


def _cgroup2_mounts() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, fs = line.partition(" - ")
        if fs.startswith("cgroup2 ") and fields.split()[3] == "/":
            points.append(fields.split()[4])
    return points


@pytest.mark.root
def test_v2_mechanics_on_a_hybrid_hosts_cgroup2(name: str) -> None:
    """A hybrid host's controller-less cgroup2 still has cgroup.procs, cgroup.kill and
    cpu.stat: the v2 paths that do not need a controller run against the real kernel."""
    mounts = _cgroup2_mounts()
    if detect_cgroups().version == 2 or not mounts or os.geteuid() != 0:
        pytest.skip("not a hybrid host run as root (pure v2 hosts run the tests above on v2)")
    path = f"{mounts[0]}/{name}"
    os.mkdir(path)
    cgroup = SandboxCgroup(2, name, {"unified": path})
    proc = None
    try:
        proc = _start(cgroup, "sh", "-c", "read x; while :; do sleep 1 & wait; done")
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        assert _wait_for(lambda: len(cgroup.pids()) == 2)
        assert cgroup.stats().cpu_time_s is not None
        cgroup.remove()
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert not os.path.exists(path)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            os.rmdir(path)
