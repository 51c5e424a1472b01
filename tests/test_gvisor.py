"""The gvisor backend, attacked from inside the box (one-shot runs through ``run``).

Skipped only when the backend's own doctor says it cannot run here.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from corral import Policy, UnsupportedPolicy
from corral._run import run_async
from corral.backends import Backend, get_backend
from corral.backends.gvisor._runsc import list_containers, runsc_root
from corral.backends.linux import _cgroups

_POLICY = Policy.preset("default").with_limits(wall_time_s=30.0)


@pytest.fixture
def gvisor() -> Backend:
    backend = get_backend("gvisor")
    failed = [f"{c.name}: {c.detail}" for c in backend.doctor() if c.status == "fail"]
    if failed:
        pytest.skip("; ".join(failed))
    return backend


async def _py(backend: Backend, code: str, policy: Policy = _POLICY) -> str:
    result = await run_async(
        ["/usr/bin/python3", "-I", "-c", textwrap.dedent(code)], policy=policy, backend=backend
    )
    assert result.exit_code == 0, result
    return result.stdout.decode()


async def test_the_box_runs_on_gvisors_kernel_not_the_hosts(gvisor: Backend) -> None:
    out = await _py(gvisor, "import os; print(os.uname().release)")
    # the sentry answers uname: a host kernel bug is not reachable by name or version
    assert out.strip() == "4.4.0", out
    assert out.strip() != os.uname().release


async def test_no_capabilities_no_root(gvisor: Backend) -> None:
    out = await _py(
        gvisor,
        """
        import os
        caps = [l for l in open('/proc/self/status') if l.startswith('Cap')]
        print(os.getuid(), os.geteuid(), os.getgid())
        print(''.join(caps))
        """,
    )
    ids, *caps = out.strip().splitlines()
    assert ids == "1000 1000 1000", ids
    assert caps
    assert all(line.split()[1] == "0" * 16 for line in caps), caps


async def test_seccomp_rules_deny_in_the_sentry(gvisor: Backend) -> None:
    # without the policy's filter (runsc --oci-seccomp) gVisor lets
    # unshare(CLONE_NEWUSER) succeed: a nested namespace regains capabilities
    out = await _py(
        gvisor,
        """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        print(libc.unshare(0x10000000), ctypes.get_errno())      # CLONE_NEWUSER
        print(libc.syscall(250, 1, None), ctypes.get_errno())    # keyctl: join keyring
        print(libc.syscall(321, 0, None, 0), ctypes.get_errno()) # bpf
        """,
    )
    assert out.split("\n")[:3] == ["-1 1", "-1 1", "-1 1"], out  # EPERM each


async def test_no_network_but_the_boxs_own_loopback(gvisor: Backend) -> None:
    # a listener on the HOST's 127.0.0.1: the box must not reach it
    with socket.socket() as host:
        host.bind(("127.0.0.1", 0))
        host.listen()
        port = host.getsockname()[1]
        out = await _py(
            gvisor,
            f"""
            import socket, errno
            print(sorted(n for _, n in socket.if_nameindex()))
            s = socket.socket()
            print(errno.errorcode[s.connect_ex(('127.0.0.1', {port}))])
            """,
        )
    names, refused = out.strip().splitlines()
    assert names == "['lo']", names
    assert refused == "ECONNREFUSED", refused  # the box's own loopback, nobody listening


async def test_no_host_path_is_visible(gvisor: Backend) -> None:
    out = await _py(
        gvisor,
        f"""
        import os
        for p in ({os.getcwd()!r}, '/root', '/work', {runsc_root()!r}, '/run', '/home'):
            print(p, os.path.exists(p))
        print(open('/proc/self/mountinfo').read())
        print(sorted(os.listdir('/proc'))[:3], os.getpid())
        """,
    )
    lines = out.splitlines()
    for line in lines[:6]:
        assert line.endswith("False"), line
    mountinfo = "\n".join(lines[6:])
    assert runsc_root() not in mountinfo, mountinfo
    assert "bundles" not in mountinfo, mountinfo
    # the box's own pid namespace: its first process is pid 1
    assert out.strip().splitlines()[-1].endswith(("1", "2", "3")), out


async def test_network_modes_other_than_none_are_refused(gvisor: Backend) -> None:
    for policy in (
        Policy.preset("default").with_network(mode="allowlist", allow=("example.org",)),
    ):
        with pytest.raises(UnsupportedPolicy) as err:
            gvisor.check(policy)
        assert err.value.field == "network.mode"
        with pytest.raises(UnsupportedPolicy):
            await run_async(["true"], policy=policy, backend=gvisor)


def _mine() -> tuple[list[str], list[str], list[str]]:
    bundles = os.path.join(runsc_root(), "bundles")
    own = f"box-{os.getpid()}-"
    return (
        [c for c in list_containers() if c.startswith(own)],
        [b for b in (os.listdir(bundles) if os.path.isdir(bundles) else []) if b.startswith(own)],
        [c for c in _cgroups.leftover_cgroups() if os.path.basename(c).startswith(own)],
    )


async def test_nothing_is_left_after_a_run_a_kill_and_a_failed_start(gvisor: Backend) -> None:
    await run_async(["true"], policy=_POLICY, backend=gvisor)
    slow = asyncio.ensure_future(run_async(["sleep", "30"], policy=_POLICY, backend=gvisor))
    await asyncio.sleep(1.0)
    slow.cancel()
    await asyncio.gather(slow, return_exceptions=True)
    with pytest.raises(ValueError, match="NUL"):
        await run_async(["echo", "a\0b"], policy=_POLICY, backend=gvisor)
    assert _mine() == ([], [], [])


_OWNER = """
import asyncio, sys
from corral import Policy
from corral.backends import BoxSpec, get_backend
async def main():
    box = await get_backend("gvisor").launch(BoxSpec(("sleep", "60"), Policy.preset("default")))
    print(box.info()["container"], flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


@pytest.mark.slow
async def test_sweep_clears_what_a_killed_owner_left(gvisor: Backend) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert owner.stdout is not None
    cid = (await asyncio.to_thread(owner.stdout.readline)).decode().strip()
    assert cid.startswith(f"box-{owner.pid}-"), cid
    owner.kill()
    owner.wait()
    owner.stdout.close()
    await gvisor.sweep()
    assert cid not in list_containers()
    assert not os.path.exists(os.path.join(runsc_root(), "bundles", cid))
    assert not [c for c in _cgroups.leftover_cgroups() if c.endswith(cid)]


async def test_memory_limit_hit_is_reported(gvisor: Backend) -> None:
    policy = _POLICY.with_limits(memory_bytes=128 << 20)
    result = await run_async(
        ["/usr/bin/python3", "-c", "b = bytearray(1 << 30); b[::4096] = b'x' * (1 << 18)"],
        policy=policy,
        backend=gvisor,
    )
    assert result.limit_hit == "memory", result


async def test_a_long_lived_sandbox_runs_commands_without_pidfd_open(gvisor: Backend) -> None:
    """This gVisor has no pidfd_open: the agent learns of its commands' ends
    from SIGCHLD instead (foreground, background, an exit status, a kill)."""
    from corral import AsyncSandbox

    async with AsyncSandbox(_POLICY, runtime=None, backend=gvisor) as sb:
        assert (await sb.commands.run("echo hi; exit 3")).exit_code == 3
        assert (await sb.commands.run(["cat", "/proc/self/status"])).exit_code == 0


async def test_commands_beside_a_background_command(gvisor: Backend) -> None:
    """The sentry's own host tasks (over a hundred, and a ptrace stub per box
    process) once counted against the box's pids limit: a command ending beside
    a background one took the sentry past it and Go's runtime killed it."""
    from corral import AsyncSandbox

    async with AsyncSandbox(_POLICY, runtime=None, backend=gvisor) as sb:
        handle = await sb.commands.run("sleep 30", background=True)
        assert [p.pid for p in await sb.commands.list()] == [handle.pid]
        assert (await sb.commands.run("true")).exit_code == 0
        await handle.kill()
        assert (await handle.wait()).signal == 9
        await sb.files.write("f", b"x")
        assert (await sb.commands.run(["cat", "f"])).stdout == b"x"


async def test_a_fork_bomb_stops_at_the_pids_limit_inside_the_sentry(gvisor: Backend) -> None:
    # the cap is gVisor's own (RLIMIT_NPROC on the box's tasks): the fork fails
    # in the box, and the sentry, whose host tasks are many more, lives on
    policy = _POLICY.with_limits(pids=24)
    out = await _py(
        gvisor,
        """
        import os, time
        n = 0
        try:
            while n < 200:
                if os.fork() == 0:
                    time.sleep(5)
                    os._exit(0)
                n += 1
        except OSError as exc:
            print(n, exc.errno)
        """,
        policy,
    )
    forked, err = (int(x) for x in out.split())
    assert err == 11, out  # EAGAIN
    assert forked < 24, out  # at the box's limit
    assert "pids" in " ".join(gvisor.check(policy))  # said, with the reason
