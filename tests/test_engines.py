"""The docker and podman backends: the seccomp profile from corral's one rule
set (golden), the hardening flags the plans render to, and attacks from inside."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral import Policy
from corral._policy import SyscallPolicy
from corral._run import run_async
from corral.backends import get_backend
from corral.backends.engine._seccomp import render
from corral.plan._seccomp import plan_seccomp
from tests._dockerd import own_dockerd

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("profile", ["default", "strict"])
def test_seccomp_profile_is_the_plans_rules(profile: str) -> None:
    plan = plan_seccomp(SyscallPolicy(profile=profile))  # type: ignore[arg-type]
    text = render(plan)
    assert text == (GOLDEN / f"engine_seccomp_{profile}.json").read_text()
    doc = json.loads(text)
    assert doc["defaultAction"] == "SCMP_ACT_ALLOW"
    assert [e["names"][0] for e in doc["syscalls"]] == [r.syscall for r in plan.rules]
    assert all(e["action"] == "SCMP_ACT_ERRNO" for e in doc["syscalls"])


@pytest.fixture(scope="module", autouse=True)
def _dockerd() -> Iterator[None]:
    with own_dockerd():
        yield


def _usable(name: str) -> None:
    failed = [c.detail for c in get_backend(name).doctor() if c.status == "fail"]
    if failed:
        pytest.skip(f"backend {name}: {'; '.join(failed)}")


ATTACK = r"""
import ctypes, os, socket
libc = ctypes.CDLL(None, use_errno=True)
print("caps", open("/proc/self/status").read().split("CapEff:")[1].split()[0])
print("nnp", open("/proc/self/status").read().split("NoNewPrivs:")[1].split()[0])
print("uid", os.getuid())
r = libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)
print("mount", r, ctypes.get_errno())
r = libc.ptrace(16, 1, None, None)
print("ptrace", r, ctypes.get_errno())
try:
    open("/etc/corral-attack", "w")
    print("rootfs writable")
except OSError as exc:
    print("rootfs", exc.errno)
print("ifaces", sorted(n for _, n in socket.if_nameindex()))
"""


@pytest.mark.parametrize("name", ["podman", "docker"])
async def test_attacks_from_inside_fail(name: str) -> None:
    _usable(name)
    result = await run_async(
        ["/usr/bin/python3", "-c", ATTACK], policy=Policy.preset("default"), backend=name
    )
    lines = dict(line.split(" ", 1) for line in result.stdout.decode().splitlines())
    assert lines["caps"] == "0000000000000000", result  # every capability dropped
    assert lines["nnp"] == "1"  # no-new-privileges
    assert int(lines["uid"]) != 0  # never root
    assert lines["mount"] == "-1 1"  # EPERM: corral's seccomp rule (and no CAP_SYS_ADMIN)
    assert lines["ptrace"].startswith("-1 ")  # seccomp/caps: no attach to pid 1
    assert lines["rootfs"] in ("30", "13")  # EROFS (read-only root) or EACCES
    assert lines["ifaces"] == "['lo']"  # --network none: loopback only


@pytest.mark.parametrize("name", ["podman", "docker"])
def test_allowlist_is_refused_naming_the_field(name: str) -> None:
    from corral import UnsupportedPolicy

    policy = Policy.preset("default").with_network(mode="allowlist", allow=("example.com",))
    with pytest.raises(UnsupportedPolicy) as info:
        get_backend(name).check(policy)
    assert info.value.field == "network.mode"


def test_docker_create_body_is_the_run_flags_with_corrals_masks(tmp_path: Path) -> None:
    from corral.backends.engine._dockerapi import create_body

    profile = tmp_path / "seccomp.json"
    profile.write_text('{"defaultAction": "SCMP_ACT_ALLOW"}')
    run = [
        "--name=corral-1-2-3",
        "--label=io.corral.box=1",
        "--read-only",
        "--cap-drop=ALL",
        f"--security-opt=seccomp={profile}",
        "--security-opt=no-new-privileges",
        "--cpus=1.5",
        "--ulimit=nproc=10:20",
        "--tmpfs=/tmp:rw,noexec,size=1024",
        "--volume=/usr:/usr:ro",
        "--env=PATH=/usr/bin",
        "--env=SECRET",
        "--",
        "localhost/corral-base:x",
        "/usr/bin/tini",
        "--",
        "true",
    ]
    name, body = create_body(run, {"SECRET": "s3"})
    host = body["HostConfig"]
    assert name == "corral-1-2-3"
    assert "/proc/key-users" in host["MaskedPaths"]
    assert "/proc/keys" in host["MaskedPaths"]  # docker's defaults kept
    # the CLI would send the profile's content, not its path
    assert host["SecurityOpt"] == [
        'seccomp={"defaultAction": "SCMP_ACT_ALLOW"}',
        "no-new-privileges",
    ]
    assert host["NanoCpus"] == 1_500_000_000
    assert host["Ulimits"] == [{"Name": "nproc", "Soft": 10, "Hard": 20}]
    assert host["Tmpfs"] == {"/tmp": "rw,noexec,size=1024"}
    assert body["Env"] == ["PATH=/usr/bin", "SECRET=s3"]
    assert body["Cmd"] == ["/usr/bin/tini", "--", "true"]
    with pytest.raises(ValueError, match="--privileged"):
        create_body(["--name=x", "--privileged", "--", "img", "true"], {})


_ON_GVISOR = r"""
import os, time
print(os.uname().release, os.getuid())
n = 0
try:
    while n < 300:
        if os.fork() == 0:
            time.sleep(5)
            os._exit(0)
        n += 1
except OSError as e:
    print(n, e.errno)
"""


@pytest.mark.parametrize("name", ["podman", "docker"])
async def test_runtime_runsc_runs_the_box_on_gvisor(name: str) -> None:
    from corral import AsyncSandbox
    from corral.backends.engine import DockerBackend, PodmanBackend

    backend = PodmanBackend("runsc") if name == "podman" else DockerBackend("runsc")
    failed = [c.detail for c in backend.doctor() if c.status == "fail"]
    if failed:
        pytest.skip(f"{name} with runsc: {'; '.join(failed)}")
    policy = Policy.preset("default").with_limits(pids=32, wall_time_s=60.0)
    result = await run_async(["/usr/bin/python3", "-c", _ON_GVISOR], policy=policy, backend=backend)
    release_uid, capped = result.stdout_text.splitlines()
    release, uid = release_uid.split()
    assert release == "4.4.0", result  # gVisor's sentry answers uname, not the host kernel
    assert int(uid) != 0
    forked, err = (int(x) for x in capped.split())
    assert err == 11, result  # EAGAIN: the cap is the box's, in the sentry
    assert forked < 32
    assert any(note.startswith("pids:") for note in result.degraded)
    # the agent's channel works there too
    async with AsyncSandbox(policy, runtime=None, backend=backend) as sb:
        out = await sb.commands.run("uname -r; echo $((6 * 7))")
    assert out.stdout_text.split() == ["4.4.0", "42"]
