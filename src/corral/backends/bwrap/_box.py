"""The bubblewrap box: one box's lifecycle, from launch to the last trace removed.

Launch sequence (one linear containment sequence, like nsjail's):

1. Plan everything from the Policy and the host's facts (pure,
   ``corral.plan.make_plans``); refuse to start if a field cannot be enforced here.
2. As root, take a fresh unprivileged host uid for the box (bwrap started by
   root keeps host uid 0 for file permissions).
3. Create the box's cgroup and apply its limits.
4. Start bwrap with ``--block-fd``: it builds the namespaces and mounts, then
   waits before running anything. Its ``--info-fd`` tells us the box's init pid.
5. Put that pid into the cgroup (rlimits came with bwrap, set by prlimit
   before it), start the box's network side (proxy or slirp4netns), then
   release the block.

``aclose`` kills the whole tree and removes every trace; nothing of it blocks
the event loop: processes are awaited through pidfds, and what must wait on
the kernel (emptying and removing the cgroup, copying a workspace image out,
unmounting) runs in a thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import errno
import functools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from corral._errors import HostToolMissing, SandboxError
from corral._policy import Policy
from corral.backends._base import BoxSpec, Usage
from corral.backends._process import (
    close_streams,
    exit_future,
    feed_stdin,
    read_available,
    reaped,
)
from corral.backends.bwrap._argv import _Fds, proxy_env, render_argv
from corral.backends.linux import _cgroups, _workdir
from corral.backends.linux._facts import check_bind_sources
from corral.backends.linux._identity import (
    HostIdentity,
    acquire_host_identity,
    release_host_identity,
)
from corral.backends.linux._procbox import CgroupProcessBox, find_util
from corral.plan import HostFacts, Plans, make_plans

if TYPE_CHECKING:  # imported when a box has a network (mode allowlist)
    from corral.net._proxy import Proxy

_KILL_GRACE_S = 2.0  # after the box's init was killed, before bwrap itself is


class BwrapBox(CgroupProcessBox):
    """One running bwrap box: bwrap, the box's init (a pidfd), its cgroup, its
    host uid, its network side. Implements ``corral.backends.Box``.

    ``plans``, ``pidfd``, ``cgroup`` and ``proc`` are this backend's own;
    nothing above the backend reads them."""

    def __init__(self, spec: BoxSpec, policy: Policy, plans: Plans) -> None:
        self.spec = spec
        self.policy = policy
        self.plans = plans
        self.fds = _Fds()
        self.identity: HostIdentity | None = None
        self.cgroup: _cgroups.SandboxCgroup | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.pidfd: int | None = None
        self.proxy: Proxy | None = None
        self.slirp: subprocess.Popen[bytes] | None = None
        self.workdir: _workdir.Workdir | None = None  # the host workdir, prepared as root
        self.workspace_source = spec.workdir
        # the host's ends of the agent's channel (from the box, to the box)
        self._channel: tuple[int, int] | None = None
        self._exited: asyncio.Future[int] | None = None
        self._usage = Usage()
        self._closing: asyncio.Future[None] | None = None
        self._outer_kill: asyncio.TimerHandle | None = None

    # -- the Box interface ---------------------------------------------------------------

    @property
    def degraded(self) -> tuple[str, ...]:
        return self.plans.degraded

    @property
    def network(self) -> Proxy | None:
        return self.proxy

    def info(self) -> Mapping[str, str]:
        return {
            "backend": "bwrap",
            "bwrap_pid": str(self.proc.pid) if self.proc is not None else "",
            "owner_pid": str(os.getpid()),
        }

    def kill(self) -> None:
        """SIGKILL everything in the box (idempotent, never waits; the box then ends)."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        if self.pidfd is not None:
            _kill_box(self.pidfd, self.cgroup)
        else:
            _abort_unopened(proc)
        if self._outer_kill is None and self._exited is not None and not self._exited.done():
            # last resort, if bwrap does not exit after its box was killed.
            # os.kill, not proc.kill(): until our waitpid the pid cannot be reused
            self._outer_kill = asyncio.get_running_loop().call_later(
                _KILL_GRACE_S, self._kill_outer
            )

    async def aclose(self) -> None:
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        # shielded: a caller cancelled while closing does not leave half a box behind
        await asyncio.shield(self._closing)

    # -- launch ------------------------------------------------------------------------

    @classmethod
    async def start(cls, spec: BoxSpec, facts: HostFacts) -> BwrapBox:
        """Run the launch sequence of the module docstring for ``spec``."""
        command = spec.command
        if not command:
            raise ValueError("command must not be empty")
        if any("\0" in str(arg) for arg in command):
            raise ValueError("a command argument must not contain NUL bytes")
        policy = spec.policy
        if policy.network.mode == "allowlist":
            # every common tool finds the proxy from these (curl, pip, npm, git,
            # Python, Node): upper and lower case both; the policy's own win
            policy = policy.with_env({**proxy_env(), **dict(policy.env)}, replace=True)
        workspace_source = None
        if spec.workdir is not None:
            path = Path(spec.workdir).resolve()
            if not path.is_dir():
                raise FileNotFoundError(
                    errno.ENOENT, "workdir is not a directory", str(spec.workdir)
                )
            workspace_source = str(path)
        check_bind_sources(policy)
        plans = make_plans(
            policy,
            facts,
            workspace_source=workspace_source,
            extra_files=spec.extra_files,
            per_command_cpu=spec.per_command_cpu,
            fresh_workdir=spec.own_workdir,
        )
        box = cls(dataclasses.replace(spec, workdir=workspace_source), policy, plans)
        try:
            await box._launch(facts)
        except BaseException:
            box.kill()  # at once, before any await: nothing runs on unsupervised
            await box.aclose()
            raise
        return box

    async def _launch(self, facts: HostFacts) -> None:
        plans, fds, spec = self.plans, self.fds, self.spec
        if os.geteuid() == 0:
            self.identity = acquire_host_identity()
            if self.workspace_source is not None:
                # the box's uid may write the workdir through an idmapped view
                # of it (and a fresh one is bounded by an image): see _workdir
                await _sweep_once()
                plans = await self.prepare_workdir(
                    self.workspace_source,
                    uid=self.identity.uid,
                    gid=self.identity.gid,
                    fresh=spec.own_workdir,
                )
        if plans.cgroups:
            await _sweep_once()
            self.cgroup = _cgroups.SandboxCgroup.create(
                _cgroups.detect_cgroups(), f"box-{os.getpid()}-{time.monotonic_ns()}", plans.cgroups
            )
        info_r, info_w = fds.pipe()
        block_r, block_w = fds.pipe()
        fds.keep += [info_r, block_w]
        fds.pass_ += [info_w, block_r]
        extra_env: list[tuple[str, str]] = []
        channel = spec.stdio == "channel"
        if channel:
            from_box_r, from_box_w = fds.pipe()
            to_box_r, to_box_w = fds.pipe()
            fds.keep += [from_box_r, to_box_w]
            fds.pass_ += [to_box_r, from_box_w]
            self._channel = (from_box_r, to_box_w)
            extra_env.append(("CORRAL_CHANNEL_FDS", f"{to_box_r},{from_box_w}"))
        argv = render_argv(
            plans,
            self.policy,
            spec.command,
            fds,
            ["--info-fd", str(info_w), "--block-fd", str(block_r)],
            extra_env,
        )
        identity = self.identity

        def spawn() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                argv,
                stdin=subprocess.PIPE
                if spec.stdin is not None and not channel
                else subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if channel else subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=tuple(fds.pass_),
                env={},
                # root never runs a box as itself: see _identity
                user=identity.uid if identity else None,
                group=identity.gid if identity else None,
                extra_groups=[] if identity else None,
            )

        self.proc = proc = await _spawn_in_fresh_keyring(spawn, self._adopt)
        self._exited = exit_future(proc)
        fds.close_passed()
        info = await _read_until_json(asyncio.get_running_loop(), info_r)
        if info is None or not isinstance(info.get("child-pid"), int):
            raise await self._setup_failed()
        box_pid = int(str(info["child-pid"]))
        self.pidfd = _open_box(proc, box_pid)
        if self.pidfd is None:
            raise await self._setup_failed()
        fds.keep.append(self.pidfd)
        if self.cgroup is not None:
            try:
                # in a thread: a cgroup migration waits on the kernel (RCU) for
                # 10-30 ms here, which would hold up every other box's I/O
                await asyncio.to_thread(self.cgroup.add_process, box_pid)
            except SandboxError:
                if self._exited.done():  # bwrap gave up while we were placing it
                    raise await self._setup_failed() from None
                raise
        if self.policy.network.mode == "open":
            self.slirp = await _start_slirp(box_pid, fds)
        if self.policy.network.mode == "allowlist":
            net = self.policy.network
            # imported here: a box without a network never loads the proxy
            from corral.backends.linux._netns import NetnsError, prepare_allowlist
            from corral.net._proxy import Proxy
            from corral.net._rules import Rules

            self.proxy = Proxy(
                Rules(net.allow, net.deny),
                hosts=dict(net.hosts),
                approve=spec.on_network_request,
                on_event=spec.on_network_event,
            )
            # before the box's first process: its only ways out lead to the proxy
            # and the DNS responder (programs that ignore proxy variables too)
            try:
                socks = await asyncio.to_thread(prepare_allowlist, self.pidfd)
            except NetnsError as exc:
                raise SandboxError(f"network mode allowlist: {exc}") from exc
            await self.proxy.serve(socks.proxy)
            await self.proxy.serve_transparent(socks.transparent, socks.dns)
        try:
            os.write(block_w, b"\0")
        except BrokenPipeError:
            raise await self._setup_failed() from None
        if spec.stdin is not None and proc.stdin is not None:
            feed_stdin(asyncio.get_running_loop(), proc.stdin, spec.stdin)

    def _adopt(self, proc: subprocess.Popen[bytes]) -> None:
        """A process spawned for this box whose launch was cancelled: ``aclose`` ends it."""
        self.proc = proc
        self._exited = exit_future(proc)

    async def _setup_failed(self) -> SandboxError:
        """bwrap exited before the command started: broken infrastructure, with bwrap's reason."""
        proc, identity = self.proc, self.identity
        assert proc is not None
        assert self._exited is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), _KILL_GRACE_S)
        except TimeoutError:
            _abort_unopened(proc)
            await asyncio.shield(self._exited)
        message = read_available(proc.stderr).decode(errors="replace").strip() or "no message"
        hint = ""
        if identity is not None and "Can't find source path" in message:
            hint = (
                f" (as root every box runs as its own unprivileged host uid, {identity.uid} this "
                "time: a bound directory and each directory above it must be reachable by others)"
            )
        return SandboxError(f"bwrap could not set up the box: {message}{hint}")

    # -- teardown ------------------------------------------------------------------------

    def _kill_outer(self) -> None:
        proc = self.proc
        if proc is not None and self._exited is not None and not self._exited.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)

    async def _close(self) -> None:
        """Kill what still runs and remove every trace. Safe at any point of a launch."""
        proc = self.proc
        try:
            if self.proxy is not None:
                await self.proxy.close()  # every connection cut and on record
            if self.slirp is not None:
                with contextlib.suppress(ProcessLookupError):
                    self.slirp.kill()
                await reaped(self.slirp)
                close_streams(self.slirp)
            if proc is not None and self._exited is not None:
                if not self._exited.done():
                    # The box may still be blocked: kill it BEFORE the block pipe
                    # closes, because bwrap takes EOF on --block-fd as "go" and
                    # would run the command unsupervised.
                    self.kill()
                    try:
                        await asyncio.wait_for(asyncio.shield(self._exited), _KILL_GRACE_S)
                    except TimeoutError:
                        self._kill_outer()
                        await asyncio.shield(self._exited)
            elif proc is not None:  # spawned, but never watched: never happens unless cancelled
                _abort_unopened(proc)
                await reaped(proc)
            if proc is not None:
                if proc.stdin is not None and not proc.stdin.closed:
                    asyncio.get_running_loop().remove_writer(proc.stdin.fileno())
                close_streams(proc)
        finally:
            if self._outer_kill is not None:
                self._outer_kill.cancel()
            self.usage()  # the last counters, kept for callers reading them after close
            # emptying and removing the cgroup, copying a workspace image out and
            # unmounting wait on the kernel: off the event loop
            await asyncio.to_thread(self._remove_traces)

    def _remove_traces(self) -> None:
        try:
            if self.cgroup is not None:
                self.cgroup.remove()
        finally:
            try:
                if self.workdir is not None:
                    self.workdir.close()
                    self.workdir = None
            finally:
                if self.identity is not None:
                    release_host_identity(self.identity)
                    self.identity = None
                self.fds.close_all()


_swept = False


async def _sweep_once() -> None:
    """Once per process, before its first box: what killed owners left (in a thread)."""
    global _swept
    if not _swept:
        _swept = True
        await asyncio.to_thread(sweep_orphans)


def sweep_orphans() -> None:
    """Clear the cgroups, workdir mounts and images of boxes whose owner was
    killed (a fresh workspace's content is copied out of its image first)."""
    _cgroups.sweep_orphans()
    if os.geteuid() == 0:
        _workdir.sweep_orphans()


async def _read_until_json(loop: asyncio.AbstractEventLoop, fd: int) -> dict[str, object] | None:
    """Read bwrap's --info-fd document; None if bwrap closed it without one (setup failed)."""
    buf = b""
    while True:
        fut: asyncio.Future[bytes] = loop.create_future()

        def ready(fut: asyncio.Future[bytes] = fut) -> None:
            if not fut.done():
                try:
                    fut.set_result(os.read(fd, 4096))
                except OSError as exc:
                    fut.set_exception(exc)

        loop.add_reader(fd, ready)
        try:
            chunk = await fut
        finally:
            loop.remove_reader(fd)
        if not chunk:
            return None
        buf += chunk
        with contextlib.suppress(ValueError):
            data = json.loads(buf)
            if isinstance(data, dict):
                return data


_LOOPBACK_WAIT_S = 5.0


def _loopback_configured(box_pid: int) -> bool:
    """bwrap has set the box's lo up with its address: ::1 is listed for lo
    once the link is up (with IPv6), else 127.0.0.1 is in its local table."""
    try:
        with open(f"/proc/{box_pid}/net/if_inet6", encoding="ascii") as f:
            return any(line.split()[-1] == "lo" for line in f if line.strip())
    except FileNotFoundError:  # no IPv6 in this kernel
        pass
    except OSError:
        return True  # the box is gone: nothing to wait for
    try:
        with open(f"/proc/{box_pid}/net/fib_trie", encoding="ascii") as f:
            return "127.0.0.1" in f.read()
    except OSError:
        return True


async def _start_slirp(box_pid: int, fds: _Fds) -> subprocess.Popen[bytes]:
    """Network mode open: slirp4netns gives the box's own namespace a tap device
    with outbound NAT in user space. --disable-host-loopback keeps the host's
    127.0.0.1 services out of reach; --enable-sandbox and --enable-seccomp
    confine slirp4netns itself, which parses the box's packets. It is handed
    the namespace as a descriptor corral opened (the box is still blocked), not
    a pid to look up."""
    path = shutil.which("slirp4netns", path="/usr/local/bin:/usr/bin:/bin")
    if path is None:
        raise HostToolMissing("slirp4netns", "install it with: sudo apt-get install slirp4netns")
    # slirp4netns sets the box's lo up, which gives it 127.0.0.1 at once: were
    # that before bwrap's own RTM_NEWADDR, bwrap would fail ("loopback: Failed
    # RTM_NEWADDR"). Wait until bwrap has configured it.
    deadline = time.monotonic() + _LOOPBACK_WAIT_S
    while not _loopback_configured(box_pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    netns = os.open(f"/proc/{box_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    fds.pass_.append(netns)
    passed = [netns]
    argv = [
        find_util("setpriv"),
        "--pdeathsig",
        "KILL",
        "--",  # dies with corral
    ]
    if os.geteuid() == 0:
        # slirp4netns's --enable-sandbox unshares a mount namespace, makes only
        # "/" private (not recursively) and detaches the old root after its
        # pivot_root: as root, every mount below a shared one (ip netns' names
        # under /run/netns, systemd's shared tree) was unmounted on the HOST
        # too. Its own namespace, private all the way down, first. (In a user
        # namespace of its own, as without root, shared mounts become slaves.)
        argv += [find_util("unshare"), "--mount", "--propagation", "private", "--"]
    argv += [
        path,
        "--configure",
        "--mtu=65520",
        "--disable-host-loopback",
        "--enable-sandbox",
        "--enable-seccomp",
    ]
    if os.geteuid() != 0:
        userns = os.open(f"/proc/{box_pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        fds.pass_.append(userns)
        passed.append(userns)
        argv.append(f"--userns-path=/proc/self/fd/{userns}")
    ready_r, ready_w = fds.pipe()
    fds.keep.append(ready_r)
    fds.pass_.append(ready_w)
    passed.append(ready_w)
    argv += [f"--ready-fd={ready_w}", "--netns-type=path", f"/proc/self/fd/{netns}", "tap0"]
    try:
        proc = subprocess.Popen(
            argv,
            pass_fds=tuple(passed),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={},
        )
    except OSError as exc:
        raise SandboxError(f"cannot start slirp4netns: {exc}") from exc
    fds.close_passed()
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[bytes] = loop.create_future()

    def on_ready() -> None:
        if not ready.done():
            ready.set_result(os.read(ready_r, 1))

    loop.add_reader(ready_r, on_ready)
    try:
        signal_byte = await asyncio.wait_for(ready, 10.0)
    except TimeoutError:
        signal_byte = b""
    finally:
        loop.remove_reader(ready_r)
    if signal_byte != b"1":
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await reaped(proc)
        detail = read_available(proc.stderr).decode(errors="replace")[-500:]
        close_streams(proc)
        raise SandboxError(f"slirp4netns did not bring the box's network up: {detail}")
    return proc


_KEYCTL = 250  # x86_64; the box's filter (and this) are written for x86_64
_KEYCTL_JOIN_SESSION_KEYRING = 1


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


async def _spawn_in_fresh_keyring(
    spawn: Callable[[], subprocess.Popen[bytes]],
    adopt: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> subprocess.Popen[bytes]:
    """``spawn()`` on corral's spawner thread, which first joins a new, empty,
    anonymous session keyring: the box inherits that one, not the caller's.

    The box would otherwise possess the caller's session keyring, and with it
    every key in it (a login's tokens) for any keyctl the filter let through;
    keyctl is denied in the box and /proc/keys is masked, so this is the third
    lock. Keyrings are per thread (creds), so corral's own stays as it was. The
    thread lives as long as the process: ``--pdeathsig`` fires when the thread
    that spawned setpriv exits, not the process. Where keyctl is unavailable
    to corral itself (no CONFIG_KEYS, a filter around corral) there is no
    keyring to carry over, and the spawn goes on as is.

    Cancelled while the spawn is under way, the process it made is handed to
    ``adopt`` (which must end and reap it), so nothing runs unsupervised."""

    def run() -> subprocess.Popen[bytes]:
        # anonymous (name NULL): a keyring of its own, charged with quota
        # overrun allowed, freed when the box's last process exits
        _libc().syscall(_KEYCTL, _KEYCTL_JOIN_SESSION_KEYRING, None)
        return spawn()

    started = _spawner().submit(run)
    try:
        # off the event loop: a fork and exec of setpriv cost it milliseconds
        return await asyncio.wrap_future(started)
    except asyncio.CancelledError:
        # a spawn under way goes on in its thread: wait for its process (a
        # few ms) and hand it over, or it would run unsupervised
        with contextlib.suppress(Exception):
            proc = started.result()
            if adopt is not None:
                adopt(proc)
            else:
                _abort_unopened(proc)
                proc.wait()
        raise
    except OSError as exc:
        raise SandboxError(f"cannot start bwrap: {exc}") from exc


@functools.cache
def _spawner() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="corral-spawn")


def _open_box(proc: subprocess.Popen[bytes], box_pid: int) -> int | None:
    """A pidfd on the box's init, or None if it is already gone.

    Taken while the box is blocked, and checked to be a child of our bwrap, so
    a recycled pid can never make corral signal or cgroup a host process.
    """
    try:
        pidfd = os.pidfd_open(box_pid)
    except ProcessLookupError:
        return None
    if _parent_of(box_pid) != proc.pid:
        os.close(pidfd)
        return None
    return pidfd


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # pid (comm) state ppid ...: comm may hold spaces and parentheses
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _abort_unopened(proc: subprocess.Popen[bytes]) -> None:
    """Kill a bwrap whose box we never got hold of, and the box with it.

    bwrap is stopped first so it cannot clone a box between our look at its
    children and its death; then its children (the blocked box) and it die.
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children", encoding="ascii") as f:
                children = [int(pid) for pid in f.read().split()]
        except OSError:
            children = []
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        os.kill(proc.pid, signal.SIGKILL)


def _kill_box(box_pidfd: int, cgroup: _cgroups.SandboxCgroup | None) -> None:
    """SIGKILL everything in the box, without waiting (``aclose`` waits, off the loop).

    The box's init is killed, not the outer bwrap: the init's death empties its
    whole pid namespace (setsid daemons too), and the outer bwrap then reaps it
    and exits. Killing the outer bwrap first would orphan the init to the host's
    pid 1, which may never reap it.
    """
    if cgroup is not None:
        with contextlib.suppress(SandboxError, OSError):
            cgroup.signal_all()
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(box_pidfd, signal.SIGKILL)
