"""Escape attempts from inside a real box, as root and as an ordinary user.

Each test tries to climb one wall and asserts that it fails *for the right
reason* (the errno the wall produces, not just "something failed").
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from subprocess import PIPE, Popen
from typing import Any

import pytest

from corral import Policy
from corral import run as corral_run
from corral.audit import PRELUDE
from corral.audit._filesystem import _HARMLESS_DEV

from .conftest import SYSTEM_PYTHON, UNPRIVILEGED_USER, Runner, py, unprivileged_user

# The audit's own prelude: ``attempt(label, fn)`` records "ok" or the errno name.
PROBE_PRELUDE = PRELUDE


def probe(box: Runner, body: str, policy: Policy | None = None) -> dict[str, str]:
    result = box(py(PROBE_PRELUDE + body + "\nprint(json.dumps(out))"), policy)
    assert result.exit_code == 0, result.stderr_text
    data: dict[str, str] = json.loads(result.stdout)
    return data


def test_host_secrets_are_absent(box: Runner, tmp_path: Path) -> None:
    repo_file = Path(__file__).resolve()
    found = probe(
        box,
        f"""
for label, path in [("shadow", "/etc/shadow"), ("gshadow", "/etc/gshadow"),
                    ("sudoers", "/etc/sudoers"), ("root", "/root/.bashrc"),
                    ("home", "/home"), ("work", "/work"), ("repo", {str(repo_file)!r}),
                    ("proc1root", "/proc/1/root/etc/shadow"), ("run", "/run"),
                    ("sys", "/sys/kernel"), ("docker_sock", "/var/run/docker.sock"),
                    ("ssh_host_key", "/etc/ssh/ssh_host_rsa_key"),
                    ("traversal", "/workspace/../../etc/shadow")]:
    attempt(label, lambda p=path: open(p, "rb").read() if not os.path.isdir(p) else os.listdir(p))
""",
    )
    assert all(v == "ENOENT" for v in found.values()), found


def test_host_home_file_is_unreachable(box: Runner) -> None:
    home = Path("/home/corral-escape-test")
    home.mkdir(exist_ok=True)
    secret = home / ".ssh" / "id_rsa"
    secret.parent.mkdir(exist_ok=True)
    secret.write_text("PRIVATE KEY")
    try:
        found = probe(box, f"attempt('key', lambda: open({str(secret)!r}).read())")
        assert found == {"key": "ENOENT"}
    finally:
        secret.unlink()
        secret.parent.rmdir()
        home.rmdir()


def test_generated_etc_and_identity(box: Runner) -> None:
    result = box(["/bin/sh", "-c", "id -u; id -un; hostname; cat /etc/passwd"])
    assert result.exit_code == 0, result.stderr_text
    lines = result.stdout_text.splitlines()
    assert lines[:3] == ["1000", "sandbox", "sandbox"]
    assert all(not line.startswith(("daemon:", "postgres:", "corral-test:")) for line in lines)


def test_writes_outside_the_workspace_fail(box: Runner) -> None:
    found = probe(
        box,
        """
for label, path in [("usr", "/usr/evil"), ("etc", "/etc/evil"), ("root", "/evil"),
                    ("bin", "/usr/bin/python3"), ("passwd", "/etc/passwd")]:
    attempt(label, lambda p=path: open(p, "ab").write(b"x"))
attempt("workspace", lambda: open("/workspace/fine", "wb").write(b"x"))
attempt("tmp", lambda: open("/tmp/fine", "wb").write(b"x"))
""",
    )
    assert found.pop("workspace") == "ok"
    assert found.pop("tmp") == "ok"
    assert set(found.values()) <= {"EROFS", "EACCES"}, found


def test_kernel_surface_is_filtered(box: Runner) -> None:
    # x86_64 syscall numbers
    found = probe(
        box,
        """
MS_REMOUNT, MS_BIND, MS_RDONLY = 32, 4096, 1
attempt("remount_rw", lambda: sys_call(165, b"none", b"/usr", None, MS_REMOUNT | MS_BIND, None)())
attempt("mount_tmpfs", lambda: sys_call(165, b"none", b"/tmp", b"tmpfs", 0, None)())
attempt("ptrace_attach", sys_call(101, 16, 1, 0, 0))             # PTRACE_ATTACH pid 1
attempt("unshare_user", sys_call(272, 0x10000000))               # CLONE_NEWUSER
attempt("unshare_net", sys_call(272, 0x40000000))                # CLONE_NEWNET
attempt("keyctl", sys_call(250, 0, 0, 0, 0, 0))                  # KEYCTL_GET_KEYRING_ID
attempt("bpf", sys_call(321, 0, 0, 0))
attempt("io_uring_setup", sys_call(425, 8, 0))
attempt("perf_event_open", sys_call(298, 0, 0, -1, -1, 0))
attempt("userfaultfd", sys_call(323, 0))
attempt("kexec_load", sys_call(246, 0, 0, 0, 0))
attempt("init_module", sys_call(175, 0, 0, 0))
attempt("sethostname", sys_call(170, b"evil", 4))
attempt("settimeofday", sys_call(164, 0, 0))
for fd in (0, 1, 2):
    attempt(f"tiocsti_{fd}", lambda fd=fd: sys_call(16, fd, 0x5412, b"x")())
    attempt(f"tiocsti_hi_{fd}", lambda fd=fd: sys_call(16, fd, 0x100005412, b"x")())
attempt("af_packet", lambda: socket.socket(17, socket.SOCK_RAW, 0))
attempt("af_vsock", lambda: socket.socket(40, socket.SOCK_STREAM, 0))
""",
    )
    assert all(v == "EPERM" for v in found.values()), found


def test_no_capabilities_and_seccomp_on(box: Runner) -> None:
    result = box(["/bin/sh", "-c", "grep -E '^(Cap|NoNewPrivs|Seccomp:)' /proc/self/status"])
    status = dict(line.split(":\t") for line in result.stdout_text.splitlines())
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, (cap, status[cap])
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"


@pytest.fixture
def host_service() -> Iterator[int]:
    """A real TCP service on the host's 127.0.0.1 that a box must not reach."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                conn.sendall(b"host secret")
                conn.close()
            except TimeoutError:
                continue

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join()
        server.close()


def test_network_is_unreachable(box: Runner, host_service: int) -> None:
    # the service really is there: the host can talk to it
    with socket.create_connection(("127.0.0.1", host_service), timeout=2) as conn:
        assert conn.recv(100) == b"host secret"
    found = probe(
        box,
        f"""
def connect(addr, family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(2)
    s.connect(addr)
attempt("host_loopback", lambda: connect(("127.0.0.1", {host_service})))
attempt("external", lambda: connect(("1.1.1.1", 443)))
attempt("metadata", lambda: connect(("169.254.169.254", 80)))
attempt("external_v6", lambda: connect(("2606:4700::1111", 443), socket.AF_INET6))
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
attempt("udp", lambda: udp.sendto(b"x", ("8.8.8.8", 53)))
attempt("dns", lambda: socket.getaddrinfo("pypi.org", 443))
out["interfaces"] = sorted(n for _, n in socket.if_nameindex())
""",
    )
    assert found.pop("interfaces") == ["lo"]  # type: ignore[comparison-overlap]
    # the box's own loopback has nothing listening: the host's service is not there
    assert found.pop("host_loopback") == "ECONNREFUSED"
    assert found.pop("dns") in {"-2", "-3"}  # EAI_NONAME / EAI_AGAIN: no resolver at all
    assert set(found.values()) == {"ENETUNREACH"}, found


def test_host_processes_are_invisible(box: Runner) -> None:
    result = box(py("import os; print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))"))
    pids = json.loads(result.stdout)
    assert os.getpid() not in pids or os.getpid() < 10
    assert max(pids) < 10, pids  # the box's init, the command, nothing else
    assert 1 in pids


def test_kill_minus_one_touches_nothing_outside(box: Runner) -> None:
    victim = __import__("subprocess").Popen(["sleep", "30"])
    try:
        result = box(
            py(
                "import os, signal\n"
                "try:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError as e:\n    print(e)\n"
                "print('alive')"
            )
        )
        assert victim.poll() is None, "kill(-1) in the box killed a host process"
        del result
    finally:
        victim.kill()
        victim.wait()


def test_host_environment_does_not_leak(box: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_TEST_SECRET", "hunter2")
    result = box(["/usr/bin/env"])
    assert result.exit_code == 0
    assert "hunter2" not in result.stdout_text
    env = dict(line.split("=", 1) for line in result.stdout_text.splitlines())
    assert set(env) == {"HOME", "LANG", "PATH", "PWD", "PYTHONUNBUFFERED"}  # PWD: --chdir
    assert env["PWD"] == env["HOME"] == "/workspace"


def test_only_harmless_devices(box: Runner) -> None:
    result = box(["/bin/ls", "/dev"])
    assert set(result.stdout_text.split()) <= _HARMLESS_DEV


def test_no_inherited_fds_above_2(box: Runner) -> None:
    result = box(py("import os; print(sorted(int(f) for f in os.listdir('/proc/self/fd')))"))
    # 0-2 and the fd listdir itself has open
    assert json.loads(result.stdout) == [0, 1, 2, 3]


def test_command_not_found_is_exit_127(box: Runner) -> None:
    result = box(["no-such-command-here"])
    assert result.exit_code == 127
    assert b"no-such-command-here" in result.stderr


def test_dev_is_read_only_but_usable(box: Runner) -> None:
    found = probe(
        box,
        """
attempt("dev_file", lambda: open("/dev/fill", "wb").write(b"x" * 4096))
attempt("dev_null", lambda: open("/dev/null", "wb").write(b"x"))
attempt("dev_shm", lambda: open("/dev/shm/ok", "wb").write(b"x"))
""",
    )
    # bwrap's /dev is a tmpfs of its own with no size: writable, it would be
    # unbounded host RAM outside disk_bytes
    assert found == {"dev_file": "EROFS", "dev_null": "ok", "dev_shm": "ok"}


def test_no_setuid_files_in_a_host_workdir(box: Runner, world_dir: Path) -> None:
    result = box(
        py(
            PROBE_PRELUDE
            + """
import shutil
shutil.copy("/bin/sh", "sh")
attempt("chmod_suid", lambda: os.chmod("sh", 0o4755))
attempt("chmod_sgid", lambda: os.chmod("sh", 0o2755))
attempt("open_suid", lambda: os.close(os.open("new", os.O_CREAT | os.O_WRONLY, 0o4755)))
attempt("mknod_sgid", lambda: os.mknod("fifo", 0o2644 | 0o010000))
attempt("chmod_plain", lambda: os.chmod("sh", 0o755))
print(json.dumps(out))
"""
        ),
        workdir=str(world_dir),
    )
    found = json.loads(result.stdout)
    assert found.pop("chmod_plain") == "ok"
    assert set(found.values()) == {"EPERM"}, found
    for path in world_dir.iterdir():
        assert not path.stat().st_mode & 0o6000, path


def test_hidden_path_inside_a_read_only_bind(box: Runner, world_dir: Path) -> None:
    (world_dir / "public.txt").write_text("fine")
    (world_dir / "secret").mkdir()
    (world_dir / "secret" / "key").write_text("TOPSECRET")
    (world_dir / "token").write_text("TOPSECRET")
    policy = Policy.preset("default").with_filesystem(
        read_only=[f"{world_dir}:/data"], hidden=["/data/secret", "/data/token", "/data/absent"]
    )
    result = box(
        ["/bin/sh", "-c", "cat /data/public.txt; ls -A /data/secret; cat /data/token; echo ."],
        policy,
    )
    assert result.exit_code == 0, result.stderr_text
    assert result.stdout == b"fine.\n"
    assert b"TOPSECRET" not in result.stdout + result.stderr


def test_environment_is_not_on_any_command_line() -> None:
    """Every local user can read /proc/<pid>/cmdline: the box's env must not be there."""
    import corral

    secret = "sk-corral-test-not-on-cmdline"
    policy = Policy.preset("default").with_env({"API_KEY": secret})
    cmd = ["/bin/sh", "-c", "echo $API_KEY; cat /proc/1/cmdline; sleep 0.2"]
    seen: list[bytes] = []

    def snoop() -> None:
        for _ in range(50):
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    with contextlib.suppress(OSError):
                        seen.append((entry / "cmdline").read_bytes())

    thread = threading.Thread(target=snoop)
    thread.start()
    result = corral.run(cmd, policy=policy)
    thread.join()
    assert result.stdout.startswith(secret.encode())
    assert any(b"bwrap" in c for c in seen), "the snoop never saw the box's bwrap"
    assert not any(secret.encode() in c for c in seen)


# -- the agent's channel, keyrings and command lines, as root and as an ordinary user ----


def _modes_with_user() -> list[str]:
    return ["root", "user"] if os.geteuid() == 0 else ["self"]


def start_as(mode: str, script: str, src: Path, env: dict[str, str] | None = None) -> Popen[bytes]:
    """``script`` under the system Python with this checkout's corral: as root
    (or the current user) in the library, or under ``setpriv`` as corral-test."""
    prefix: list[str] = []
    if mode == "user":
        user = unprivileged_user()
        if user is None:
            pytest.skip(f"no user {UNPRIVILEGED_USER}")
        prefix = [
            "setpriv",
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--clear-groups",
            "--",
        ]
    return Popen(
        [*prefix, SYSTEM_PYTHON, "-c", script],
        stdout=PIPE,
        stderr=PIPE,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(src), "HOME": "/", **(env or {})},
        cwd="/",
    )


def run_as(mode: str, script: str, src: Path, env: dict[str, str] | None = None) -> Any:
    proc = start_as(mode, script, src, env)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err.decode(errors="replace")
    return json.loads(out.splitlines()[-1])


@pytest.mark.parametrize("mode", _modes_with_user())
def test_the_agent_channel_is_out_of_reach(mode: str, world_readable_src: Path) -> None:
    """Issue 11, item 1. bwrap's init (pid 1, dumpable, the box's uid) used to
    hold the channel as its stdin/stdout: /proc/1/fd/0 re-opened, or
    pidfd_getfd(pidfd_open(1), 0), read host frames and wrote forged ones.
    Every /proc/<pid>/fd/<n> in the box is re-opened both ways, and
    pidfd_getfd tried on every pid, from a command of a live sandbox."""
    seen = run_as(
        mode,
        "import asyncio, json\n"
        "from corral import Policy\n"
        "from corral.audit import agent_channel_report\n"
        "print(json.dumps(asyncio.run(agent_channel_report(Policy.preset('default')))))",
        world_readable_src,
    )
    channel = set(seen["channel"])
    inodes: dict[str, int] = seen["inodes"]
    # the route was walked: pid 1's stdin and stdout re-open (/dev/null now) ...
    assert {k for k in inodes if k.startswith("1/")} >= {"1/0:r", "1/0:w", "1/1:r", "1/1:w"}
    # ... and none of the descriptors re-opened anywhere is the channel
    assert not [k for k, ino in inodes.items() if ino in channel]
    # the agent itself: non-dumpable, its fd directory is refused
    (agent,) = seen["agent"]
    assert seen["refused"][f"{agent}/fd"] == "EACCES"
    # pidfd_getfd fails for the filter's reason: even on the probe's own pid,
    # which ptrace rules would always allow
    assert set(seen["getfd"].values()) == {"EPERM"}
    assert seen["getfd"][f"{seen['self']}/0"] == "EPERM"
    assert seen["after"] == "fine\n"


_KEYS_SCRIPT = r"""
import ctypes, json, os, corral
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall(250, 1, None)  # a session keyring of this test's own (KEYCTL_JOIN_SESSION_KEYRING)
key = libc.syscall(248, b"user", b"corral-test-host-key", b"hunter2", 7, -3)  # add_key, session
assert key > 0, ctypes.get_errno()
host = open("/proc/keys").read()
box = corral.run(["/bin/sh", "-c", "cat /proc/keys; echo ---; cat /proc/key-users"])
print(json.dumps({"host": host, "box": box.stdout_text, "exit": box.exit_code}))
"""


@pytest.mark.parametrize("mode", _modes_with_user())
def test_the_hosts_keys_are_not_listed_in_the_box(mode: str, world_readable_src: Path) -> None:
    """Issue 11, item 6: as an ordinary user the box's uid is the caller's, and
    /proc/keys lists every key that uid owns (the owner's view bit), whatever
    the session keyring."""
    seen = run_as(mode, _KEYS_SCRIPT, world_readable_src)
    assert "corral-test-host-key" in seen["host"]  # the key is there to be seen
    assert seen["exit"] == 0
    assert seen["box"] == "---\n"  # both lists empty in the box


def test_each_box_starts_in_a_fresh_session_keyring() -> None:
    """The third lock on keys: the box does not possess the caller's session
    keyring (nor share one with another box)."""
    import asyncio

    from corral.backends.bwrap._box import _spawn_in_fresh_keyring

    show = [
        SYSTEM_PYTHON,
        "-c",
        "import ctypes; print(ctypes.CDLL(None).syscall(250, 0, -3, 0))",  # GET_KEYRING_ID
    ]
    ids = []
    for _ in range(2):
        proc = asyncio.run(_spawn_in_fresh_keyring(lambda: Popen(show, stdout=PIPE)))
        out, _ = proc.communicate()
        ids.append(int(out))
    mine = int(subprocess.run(show, stdout=PIPE, check=True).stdout)
    assert len({*ids, mine}) == 3, (ids, mine)


_ARGV_SCRIPT = r"""
import asyncio, json, os, corral
secret = os.environ.pop("SECRET")
sleeper = ["/usr/bin/python3", "-c", "import time; time.sleep(1.5)", secret]
one_shot = corral.run(sleeper)
async def long_lived():
    async with corral.AsyncSandbox() as sb:
        return (await sb.commands.run(sleeper)).exit_code
print(json.dumps([one_shot.exit_code, asyncio.run(long_lived())]))
"""


@pytest.mark.parametrize("mode", _modes_with_user())
def test_the_commands_argv_is_on_no_other_command_line(mode: str, world_readable_src: Path) -> None:
    """Issue 11, item 7: /proc/<pid>/cmdline is readable by every local user,
    and bwrap's (with setpriv's and prlimit's) used to end with the command.
    While a one-shot box and a sandbox's command run, the secret argument may
    show only in the command's own process."""
    secret = f"sk-argv-{os.getpid()}-{mode}"
    proc = start_as(mode, _ARGV_SCRIPT, world_readable_src, {"SECRET": secret})
    carriers: set[bytes] = set()
    bwraps = 0
    while proc.poll() is None:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    line = (entry / "cmdline").read_bytes()
                    bwraps += b"/bwrap\0" in line
                    if secret.encode() in line:
                        carriers.add(line)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert json.loads(out) == [0, 0]
    assert bwraps, "the snoop never saw a box's bwrap"
    command = b"\0".join([SYSTEM_PYTHON.encode(), b"-c", b"import time; time.sleep(1.5)"])
    assert carriers, "the snoop never saw the command itself"
    # a sandbox's command with a CPU budget starts as util-linux's prlimit,
    # which sets the budget and execs it: the same process, before its exec
    trampoline = re.compile(rb"\A/(usr/)?bin/prlimit\0--cpu=\d+:\d+\0--\0")
    own = [trampoline.sub(b"", line, count=1) for line in carriers]
    assert all(line.startswith(command) for line in own), carriers


ODD_ARGS = [
    "",
    " ",
    "-n",
    "--",
    "a'b",
    'a"b',
    "$HOME",
    "`id`",
    "$(id)",
    "a\nb",
    "\\",
    "*",
    "é",
    "\udcff",
]


def test_the_argv_reaches_the_command_exactly(box: Runner) -> None:
    """The launcher line in the box rebuilds the argv from the environment; no
    argument is expanded, split or globbed on the way (a NUL is refused)."""
    result = box(
        py("import json, os, sys; print(json.dumps([os.fsencode(a).hex() for a in sys.argv[1:]]))")
        + ODD_ARGS
    )
    assert result.exit_code == 0, result.stderr_text
    assert json.loads(result.stdout) == [os.fsencode(a).hex() for a in ODD_ARGS]
    with pytest.raises(ValueError, match="NUL"):
        corral_run(["/bin/echo", "a\0--bind"])


def test_an_environment_name_no_shell_keeps_still_arrives(box: Runner) -> None:
    """dash drops variables whose names are not shell names: for such a policy
    the launcher is Python, and the environment arrives as given."""
    policy = Policy.preset("default").with_env({"odd-name.x": "1", "FINE": "2"})
    result = box(["/usr/bin/env"], policy)
    assert result.exit_code == 0, result.stderr_text
    env = dict(line.split("=", 1) for line in result.stdout_text.splitlines())
    assert env["odd-name.x"] == "1"
    assert env["FINE"] == "2"
    assert not [name for name in env if name.startswith("CORRAL_")]
    missing = box(["no-such-command-here"], policy)
    assert missing.exit_code == 127
    assert b"no-such-command-here" in missing.stderr


def test_a_long_argv_still_arrives(box: Runner) -> None:
    """Past about 5,000 arguments the launcher's shell line would outgrow the
    kernel's 128 KiB for one argument: the Python launcher takes over."""
    args = [f"a{i}" for i in range(20_000)]
    result = box(py("import sys; print(len(sys.argv) - 1, sys.argv[-1])") + args)
    assert result.exit_code == 0, result.stderr_text
    assert result.stdout_text == "20000 a19999\n"
