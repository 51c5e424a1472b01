"""Process probes (``proc.*``): pid namespace, signals, sockets between boxes,
what outlives a box, the agent's channel, keyrings, command lines.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import json
import os
import subprocess
import time
from collections.abc import Awaitable

from corral._policy import Policy
from corral._sandbox import AsyncSandbox
from corral.audit._probe import (
    BOX_PYTHON,
    Context,
    Outcome,
    ProbeError,
    all_in,
    probe,
)
from corral.backends import Backend


@probe(
    "proc.pids",
    "only the box's own processes are visible",
    "seeing, signalling or ptracing host processes",
    "pid namespace",
)
async def _pids(ctx: Context) -> Outcome:
    seen = await ctx.observe(
        "out['pids'] = ','.join(p for p in os.listdir('/proc') if p.isdigit())"
    )
    pids = sorted(int(p) for p in seen["pids"].split(","))
    return Outcome("pass" if max(pids) < 10 else "fail", f"pids: {pids}")


@probe(
    "proc.kill_all", "kill(-1) touches nothing outside", "killing host processes", "pid namespace"
)
async def _kill_all(ctx: Context) -> Outcome:
    sentinel = subprocess.Popen(["sleep", "60"])
    try:
        await ctx.box(
            [BOX_PYTHON, "-c", "import os, signal\ntry: os.kill(-1, 9)\nexcept OSError: pass"]
        )
        alive = sentinel.poll() is None
    finally:
        sentinel.kill()
        sentinel.wait()
    return Outcome("pass" if alive else "fail", "host sentinel " + ("alive" if alive else "killed"))


@probe(
    "proc.host_env",
    "the host's environment variables are absent",
    "stealing API keys from the caller's environment",
    "--clearenv; only the policy's env",
)
async def _env(ctx: Context) -> Outcome:
    secret = f"corral-audit-{os.getpid()}"
    os.environ["CORRAL_AUDIT_SECRET"] = secret
    try:
        result = await ctx.box(["/usr/bin/env"])
    finally:
        del os.environ["CORRAL_AUDIT_SECRET"]
    leaked = secret.encode() in result.stdout
    names = sorted(line.split("=", 1)[0] for line in result.stdout_text.splitlines())
    return Outcome("fail" if leaked else "pass", "box env: " + ", ".join(names))


@probe(
    "proc.host_unix_sockets",
    "no host unix socket is reachable",
    "talking to docker.sock, dbus or systemd",
    "no /run; network namespace",
)
async def _unix(ctx: Context) -> Outcome:
    seen = await ctx.observe(
        "lines = open('/proc/net/unix').read().splitlines()[1:]\n"
        "out['sockets'] = str(len(lines))\n"
        "for p in ('/run/docker.sock', '/var/run/docker.sock', '/run/dbus/system_bus_socket'):\n"
        "    attempt(p, lambda: os.stat(p))"
    )
    count = seen.pop("sockets")
    outcome = all_in(seen, {"ENOENT"})
    if count != "0":
        return Outcome("fail", f"{count} unix sockets visible")
    return outcome


_LISTEN = [
    BOX_PYTHON,
    "-c",
    "import socket, time\n"
    "s = socket.socket(socket.AF_UNIX); s.bind('\\0corral-probe'); s.listen(); time.sleep(5)",
]
_CONNECT = [
    BOX_PYTHON,
    "-c",
    "import socket\ns = socket.socket(socket.AF_UNIX); s.connect('\\0corral-probe')",
]


@probe(
    "proc.cross_box",
    "two boxes at once share nothing",
    "one user's box reading another's data",
    "private /tmp, /dev/shm, ipc and net namespaces",
)
async def _cross(ctx: Context) -> Outcome:
    async with (
        ctx.sandbox() as a,
        ctx.sandbox() as b,
    ):
        await a.commands.run("echo secret > /dev/shm/probe; echo secret > /tmp/probe")
        await a.commands.run(_LISTEN, background=True)
        await asyncio.sleep(0.3)
        seen = await b.commands.run(
            "cat /dev/shm/probe 2>/dev/null && echo shm-leak; "
            "cat /tmp/probe 2>/dev/null && echo tmp-leak; true"
        )
        abstract = await b.commands.run(_CONNECT)
        if abstract.exit_code == 0:
            seen = dataclasses.replace(seen, stdout=seen.stdout + b"abstract-leak")
    leaks = [w for w in ("shm-leak", "tmp-leak", "abstract-leak") if w.encode() in seen.stdout]
    return Outcome(
        "fail" if leaks else "pass",
        ", ".join(leaks) or "no shared /dev/shm, /tmp or abstract sockets",
    )


@probe(
    "proc.persistence",
    "nothing persists from one box into the next",
    "a box planting files for the next user",
    "fresh tmpfs mounts per box",
)
async def _persist(ctx: Context) -> Outcome:
    await ctx.box(["/bin/sh", "-c", "echo x > /tmp/probe-persist; echo x > probe-persist"])
    result = await ctx.box(
        ["/bin/sh", "-c", "ls /tmp/probe-persist probe-persist 2>/dev/null; true"]
    )
    return Outcome(
        "fail" if result.stdout.strip() else "pass", result.stdout_text.strip() or "fresh"
    )


# -- the agent's channel, keyrings, command lines ---------------------------------------

# In the box: every way user code could reach another process's descriptors.
# Each /proc/<pid>/fd/<n> is re-opened both ways (pipe inodes are global, so the
# host can tell whether one is its channel); pidfd_getfd is tried on every pid
# and on the probe itself, where only the filter can refuse.
CHANNEL_PROBE = r"""
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
def name(e): return errno.errorcode.get(e, str(e))
inodes, refused, getfd = {}, {}, {}
pids = [p for p in os.listdir("/proc") if p.isdigit()]
for pid in pids:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError as e:
        refused[f"{pid}/fd"] = name(e.errno)
        fds = [str(n) for n in range(16)]
    for fd in fds:
        for mode in ("r", "w"):
            flags = (os.O_RDONLY if mode == "r" else os.O_WRONLY) | os.O_NONBLOCK
            try:
                opened = os.open(f"/proc/{pid}/fd/{fd}", flags)
            except OSError as e:
                refused[f"{pid}/{fd}:{mode}"] = name(e.errno)
            else:
                inodes[f"{pid}/{fd}:{mode}"] = os.fstat(opened).st_ino
                os.close(opened)
for pid in [*pids, str(os.getpid())]:
    pidfd = libc.syscall(434, int(pid), 0)  # pidfd_open
    for fd in range(8):
        r = libc.syscall(438, pidfd, fd, 0)  # pidfd_getfd
        getfd[f"{pid}/{fd}"] = "ok" if r >= 0 else name(ctypes.get_errno())
cmd = {p: open(f"/proc/{p}/cmdline", "rb").read().split(b"\0") for p in pids}
agent = [p for p, c in cmd.items() if b"/run/corral/agent.py" in c]
print(json.dumps({"inodes": inodes, "refused": refused, "getfd": getfd,
                  "self": str(os.getpid()), "agent": agent}))
"""


async def agent_channel_report(policy: Policy, backend: Backend | None = None) -> dict[str, object]:
    """Start a sandbox, run ``CHANNEL_PROBE`` in it; what it reached, and the
    host's channel inodes, as JSON-able data (shared with tests/test_escape.py)."""
    async with AsyncSandbox(policy, timeout_s=60, backend=backend) as sb:
        box = sb._box
        if box is None or box.channel is None:
            raise ProbeError("the sandbox has no agent channel")
        channel = sorted(os.fstat(fd).st_ino for fd in box.channel)
        result = await sb.commands.run([BOX_PYTHON, "-c", CHANNEL_PROBE], timeout_s=30)
        if result.exit_code != 0:
            raise ProbeError(f"the probe program failed: {result.stderr_text[-300:]}")
        seen: dict[str, object] = json.loads(result.stdout)
        seen["channel"] = channel
        # still answering: nothing the probe did reached the channel
        seen["after"] = (await sb.commands.run("echo fine")).stdout_text
        return seen


def judge_agent_channel(seen: dict[str, object]) -> Outcome:
    inodes = seen["inodes"]
    getfd = seen["getfd"]
    channel = seen["channel"]
    if not (isinstance(inodes, dict) and isinstance(getfd, dict) and isinstance(channel, list)):
        raise ProbeError("the channel probe reported a malformed result")
    reached = sorted(k for k, ino in inodes.items() if ino in channel)
    copied = sorted(k for k, v in getfd.items() if v != "EPERM")
    if reached or copied or seen["after"] != "fine\n" or not seen["agent"]:
        return Outcome("fail", f"channel reopened at {reached}; pidfd_getfd: {copied}")
    return Outcome(
        "pass",
        f"{len(inodes)} descriptors of other processes reopened, none the channel; "
        f"pidfd_getfd EPERM on {len(getfd)} (itself included: the filter)",
    )


@probe(
    "proc.agent_channel",
    "only the agent holds its channel to the host",
    "user code reading host frames (file contents) or forging calls",
    "channel on fds bwrap's init closes, close-on-exec in the agent; "
    "agent non-dumpable; seccomp denies pidfd_getfd",
)
async def _agent_channel(ctx: Context) -> Outcome:
    return judge_agent_channel(await agent_channel_report(ctx.policy, ctx.backend))


_KEY_SPEC_USER_KEYRING = -4
_KEYCTL_SET_TIMEOUT, _KEYCTL_UNLINK = 15, 9


@probe(
    "proc.keys",
    "/proc/keys and /proc/key-users in the box are empty",
    "reading the host user's key descriptions (and, with keyctl, their payloads)",
    "both masked with empty files; a fresh session keyring per box; seccomp denies keyctl",
)
async def _keys(ctx: Context) -> Outcome:
    libc = ctypes.CDLL(None, use_errno=True)
    label = f"corral-audit-{os.getpid()}".encode()
    # a key of the caller's, for 60 s: its description must not show in the box
    key = libc.syscall(248, b"user", label, b"x", 1, _KEY_SPEC_USER_KEYRING)
    if key >= 0:
        libc.syscall(250, _KEYCTL_SET_TIMEOUT, key, 60)
    try:
        seen = await ctx.observe(
            "out['keys'] = open('/proc/keys').read()\n"
            "out['key_users'] = open('/proc/key-users').read()"
        )
    finally:
        if key >= 0:
            libc.syscall(250, _KEYCTL_UNLINK, key, _KEY_SPEC_USER_KEYRING)
    shown = [line for line in seen["keys"].splitlines() + seen["key_users"].splitlines() if line]
    if shown:
        return Outcome("fail", f"{len(shown)} lines visible: {shown[:3]}")
    return Outcome("pass", "both empty" + ("" if key >= 0 else " (no keyring on this host)"))


@probe(
    "proc.argv_hidden",
    "the command's arguments are on no host command line but its own",
    "any local user reading secrets passed as arguments (ps, /proc/<pid>/cmdline)",
    "argv travels in the --args memfd; a fixed launcher line execs it in the box",
)
async def _argv_hidden(ctx: Context) -> Outcome:
    secret = f"corral-audit-argv-{os.getpid()}-{time.monotonic_ns()}"
    found = await argv_exposure(
        ctx.box([BOX_PYTHON, "-c", "import time; time.sleep(1)", secret]), secret
    )
    others = [c for c in found if not c.startswith(BOX_PYTHON)]
    if others:
        return Outcome("fail", f"on other command lines: {others[:2]}")
    with open("/proc/mounts") as f:
        hidepid = any(" /proc proc " in m and "hidepid" in m for m in f)
    own = "hidden (hidepid)" if hidepid else "visible on the host, as any process's"
    return Outcome("pass", f"only the command's own process ({own})")


async def argv_exposure(run: Awaitable[object], secret: str) -> list[str]:
    """Await ``run`` while reading every /proc/*/cmdline on the host; the
    command lines that carried ``secret`` (shared with tests/test_escape.py)."""
    found: set[str] = set()
    task = asyncio.ensure_future(run)
    seen_any = False
    while not task.done():
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        line = f.read()
                except OSError:
                    continue
                seen_any = seen_any or b"bwrap" in line
                if secret.encode() in line:
                    found.add(line.replace(b"\0", b" ").decode(errors="replace"))
        await asyncio.sleep(0.01)
    await task
    if not seen_any:
        raise ProbeError("the box ended before its command lines could be read")
    return sorted(found)
