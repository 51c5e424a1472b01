"""The in-box agent: the box's first program and the host's only way in.

It runs with the box's own Python and the standard library only, next to a
copy of ``_wire.py``, started as ``python3 -E -s -S /run/corral/agent.py
WORKSPACE``. It speaks the wire protocol on the two descriptors named by
``CORRAL_CHANNEL_FDS`` ("READ,WRITE"): fds above 2 that bwrap's init closes
and no command inherits, so the agent is the only process in the box that
holds its channel (bwrap's init keeps fds 0-2, and it is dumpable: a channel
on stdin/stdout could be re-opened through ``/proc/1/fd``). It starts processes
(pipes or a pty, env, cwd, signals), streams their output under the host's
flow-control credit, and serves file operations on paths it resolves itself,
inside the box.

It trusts nothing it did not start, and the host trusts nothing it says: the
agent runs in the same box as the untrusted code, which may kill or replace it.
It makes itself non-dumpable so code running under the same uid cannot
ptrace it or open its channel through ``/proc/<pid>/fd``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import resource
import select
import selectors
import signal
import stat
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable

import _wire as w  # type: ignore[import-not-found,unused-ignore]

OUT_HIGH_WATER = 4 << 20  # stop reading sources while this much waits for the host
MAX_LIST = 5000


class CallError(Exception):
    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err
        self.message = message


class Outgoing:
    """A byte stream the agent sends to the host (process output, file content)."""

    def __init__(self, ident: int, channel: int, fd: int, selectable: bool) -> None:
        self.ident, self.channel, self.fd, self.selectable = ident, channel, fd, selectable
        self.credit = w.WINDOW
        self.registered = False
        self.done = False


class Incoming:
    """A byte stream the host sends to the agent (stdin, file upload)."""

    def __init__(self, ident: int, channel: int, fd: int, pipe: bool) -> None:
        self.ident, self.channel, self.fd, self.pipe = ident, channel, fd, pipe
        self.pending = bytearray()
        self.eof = False
        self.registered = False


class Proc:
    def __init__(
        self, ident: int, popen: subprocess.Popen[bytes], pidfd: int | None, argv: list[str]
    ) -> None:
        self.ident, self.popen, self.pidfd, self.argv = ident, popen, pidfd, argv
        self.master: int | None = None


class Upload:
    def __init__(self, ident: int, tmp: str, final: str, fd: int) -> None:
        self.ident, self.tmp, self.final, self.fd = ident, tmp, final, fd
        self.size = 0


class Agent:
    def __init__(self, workspace: str, cpu_time_s: int, rfd: int, wfd: int) -> None:
        self.workspace = os.path.realpath(workspace)
        # a host hard limit below the policy's (systemd's LimitCPU=) wins: stricter
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        if cpu_time_s and hard != resource.RLIM_INFINITY and cpu_time_s + 1 > hard:
            cpu_time_s = max(1, hard - 1)
        self.cpu_time_s = cpu_time_s
        # util-linux's prlimit, the per-command CPU budget's trampoline (cpu_budgeted)
        self.prlimit = next(
            (p for p in ("/usr/bin/prlimit", "/bin/prlimit") if os.access(p, os.X_OK)), None
        )
        self.sel = selectors.DefaultSelector()
        self.rfd, self.wfd = rfd, wfd
        self.decoder = w.Decoder()
        self.numberer = w.Numberer()
        self.rbuf = bytearray(4 << 20)
        self.rview = memoryview(self.rbuf)
        self.out = bytearray()
        self.out_registered = False
        self.outgoing: dict[tuple[int, int], Outgoing] = {}
        self.incoming: dict[tuple[int, int], Incoming] = {}
        self.procs: dict[int, Proc] = {}
        self.uploads: dict[int, Upload] = {}
        self.reaper = _become_reaper(self.sel)
        self.running = True
        self.me = os.getpid()
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        self.sel.register(rfd, selectors.EVENT_READ, ("host", None))

    # -- sending -------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        self.numberer.queue(self.out, frame)  # written by flush(), after each turn of the loop

    def reply(self, ident: int, body: dict[str, object]) -> None:
        self.send(w.encode_json(w.REPLY, ident, body))

    def event(self, ident: int, body: dict[str, object]) -> None:
        self.send(w.encode_json(w.EVENT, ident, body))

    def flush(self) -> None:
        while self.out:
            try:
                n = os.write(self.wfd, self.out)
            except BlockingIOError:
                break
            except BrokenPipeError:
                self.running = False
                self.out.clear()
                return
            del self.out[:n]
        want = bool(self.out)
        if want != self.out_registered:
            if want:
                self.sel.register(self.wfd, selectors.EVENT_WRITE, ("host-out", None))
            else:
                self.sel.unregister(self.wfd)
            self.out_registered = want

    # -- outgoing streams ----------------------------------------------------------

    def pump_all(self) -> None:
        for stream in list(self.outgoing.values()):
            self.pump(stream)

    def pump(self, s: Outgoing) -> None:
        """Read from the source while the host has credit and the buffer is not full."""
        can = s.credit > 0 and len(self.out) < OUT_HIGH_WATER and not s.done
        if s.selectable:
            if can and not s.registered:
                self.sel.register(s.fd, selectors.EVENT_READ, ("out", s))
                s.registered = True
            elif not can and s.registered:
                self.sel.unregister(s.fd)
                s.registered = False
            return
        while can:  # a regular file: always readable, never selectable
            if not self.read_source(s):
                return
            can = s.credit > 0 and len(self.out) < OUT_HIGH_WATER and not s.done

    def read_source(self, s: Outgoing) -> bool:
        try:
            data = os.read(s.fd, min(s.credit, w.DATA_CHUNK))
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: the pty's other side closed
                raise
            data = b""
        if not data:
            self.end_outgoing(s)
            return False
        s.credit -= len(data)
        self.numberer.queue_data(self.out, s.ident, s.channel, data)
        return True

    def end_outgoing(self, s: Outgoing) -> None:
        s.done = True
        if s.registered:
            self.sel.unregister(s.fd)
            s.registered = False
        os.close(s.fd)
        self.outgoing.pop((s.ident, s.channel), None)
        self.send(w.encode(w.EOF, s.ident, s.channel))

    # -- incoming streams ------------------------------------------------------------

    def on_data(self, ident: int, channel: int, payload: bytes) -> None:
        stream = self.incoming.get((ident, channel))
        if stream is None:
            return  # the target is gone (process exited): drop, as a closed pipe would
        stream.pending += payload
        self.drain(stream)

    def drain(self, s: Incoming) -> None:
        while s.pending:
            try:
                n = os.write(s.fd, s.pending)
            except BlockingIOError:
                break
            except OSError as exc:  # EPIPE: the process closed its stdin
                self.end_incoming(s, error=exc)
                return
            del s.pending[:n]
            self.send(w.encode_credit(s.ident, s.channel, n))
            if s.ident in self.uploads:
                self.uploads[s.ident].size += n
        if s.pipe:
            want = bool(s.pending)
            if want != s.registered:
                if want:
                    self.sel.register(s.fd, selectors.EVENT_WRITE, ("in", s))
                else:
                    self.sel.unregister(s.fd)
                s.registered = want
        if s.eof and not s.pending:
            self.end_incoming(s)

    def end_incoming(self, s: Incoming, error: OSError | None = None) -> None:
        if self.incoming.pop((s.ident, s.channel), None) is None:
            return
        if s.registered:
            self.sel.unregister(s.fd)
        os.close(s.fd)
        if not s.eof:  # ended before the host's EOF: tell it to stop sending
            self.send(w.encode(w.EOF, s.ident, s.channel))
        upload = self.uploads.pop(s.ident, None)
        if upload is not None:
            self.finish_upload(upload, error)

    def finish_upload(self, up: Upload, error: OSError | None) -> None:
        try:
            if error is not None:
                raise error
            os.replace(up.tmp, up.final)
        except OSError as exc:
            with _quiet():
                os.unlink(up.tmp)
            self.event(up.ident, {"error": _err(exc)})
            return
        self.event(up.ident, {"done": up.size})

    # -- calls -----------------------------------------------------------------------

    def on_call(self, ident: int, body: dict[str, object]) -> None:
        op = body.get("op")
        handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        # nothing a call carries may bring the agent (and so the box) down
        try:
            if handler is None:
                raise CallError(errno.ENOSYS, f"unknown operation {op!r}")
            result = handler(ident, body)
            if result is not None:
                self.reply(ident, result)
        except CallError as exc:
            self.reply(ident, {"error": {"errno": exc.errno, "message": exc.message}})
        except OSError as exc:
            self.reply(ident, {"error": _err(exc)})
        except (KeyError, TypeError, ValueError, OverflowError, struct.error) as exc:
            self.reply(ident, {"error": {"errno": errno.EINVAL, "message": f"bad request: {exc}"}})
        except RecursionError:
            self.reply(ident, {"error": {"errno": errno.ELOOP, "message": "too deeply nested"}})

    def path(self, raw: object) -> str:
        if not isinstance(raw, str) or "\0" in raw:
            raise CallError(errno.EINVAL, "a path must be a string without NUL bytes")
        full = os.path.realpath(os.path.join(self.workspace, raw))
        if full != self.workspace and not full.startswith(self.workspace + "/"):
            raise CallError(errno.EACCES, f"{raw!r} is outside the workspace")
        return full

    def cpu_budgeted(self, argv: list[str], env: dict[str, str], cwd: str) -> list[str]:
        """``argv`` run under its own CPU budget, set before the command runs.

        The budget goes on through util-linux's ``prlimit --cpu=S:H --``
        trampoline, which sets it on itself and then execs the command, so the
        command and everything it forks start limited: a limit set by the agent
        after the spawn came too late for a command that forked or finished at
        once. The trampoline costs one small exec; a pre-exec hook instead
        would force a full fork of the agent (subprocess cannot vfork with
        one), which is the fallback where the root has no prlimit. The name is
        looked up first, as exec would, so a missing or unrunnable command is
        still 127/126 with its errno."""
        if self.prlimit is None:
            return argv
        name = argv[0]
        if "/" in name:
            found = os.path.join(cwd, name)
        else:
            # execvp's search: the first runnable file on PATH, else the first file
            files = [
                os.path.join(cwd, d or ".", name)
                for d in os.get_exec_path(env)
                if os.path.isfile(os.path.join(cwd, d or ".", name))
            ]
            runnable = [f for f in files if os.access(f, os.X_OK)]
            found = (runnable or files or [name])[0]
        full = os.path.join(cwd, found)
        if not os.path.exists(full):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
        if os.path.isdir(full) or not os.access(full, os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), name)
        # execvp (the trampoline's) runs a file the kernel cannot exec through
        # /bin/sh; exec itself, as without the trampoline, fails it: ENOEXEC
        head = b"#!"  # unreadable: exec alone may still run it; let it try
        with contextlib.suppress(OSError), open(full, "rb") as f:
            head = f.read(4)
        if not head.startswith((b"\x7fELF", b"#!")):
            raise OSError(errno.ENOEXEC, os.strerror(errno.ENOEXEC), name)
        cpu = f"--cpu={self.cpu_time_s}:{self.cpu_time_s + 1}"
        return [self.prlimit, cpu, "--", *argv]

    def op_exec(self, ident: int, body: dict[str, object]) -> dict[str, object]:
        argv = body["argv"]
        env = body["env"]
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise CallError(errno.EINVAL, "argv must be a non-empty list of strings")
        if not isinstance(env, dict):
            raise CallError(errno.EINVAL, "env must be an object")
        # the command's mark, inherited by everything it starts: a process it
        # double-forked and orphaned is still known as its own (see tree())
        env = {**env, MARK: str(ident)}
        cwd = self.path(body.get("cwd") or ".")
        if not os.path.isdir(cwd):
            raise CallError(errno.ENOENT, f"working directory {body.get('cwd')!r} does not exist")
        pty = body.get("pty")
        master = None
        try:
            if isinstance(pty, dict):
                master, slave = os.openpty()
                try:
                    _winsize(master, int(pty["cols"]), int(pty["rows"]))
                    popen = subprocess.Popen(
                        argv,
                        stdin=slave,
                        stdout=slave,
                        stderr=slave,
                        cwd=cwd,
                        env=env,
                        start_new_session=True,
                        preexec_fn=functools.partial(_terminal_child, self.cpu_time_s),
                    )
                finally:
                    os.close(slave)
            else:
                budgeted = self.cpu_budgeted(argv, env, cwd) if self.cpu_time_s else argv
                popen = subprocess.Popen(
                    budgeted,
                    stdin=subprocess.PIPE if body.get("stdin") else subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=cwd,
                    env=env,
                    start_new_session=True,
                    # no trampoline: the budget set in the child (a full fork)
                    preexec_fn=functools.partial(_limit_cpu, self.cpu_time_s)
                    if self.cpu_time_s and budgeted is argv
                    else None,
                )
        except subprocess.SubprocessError as exc:  # the terminal's pre-exec hook failed
            if master is not None:
                os.close(master)
            message = f"{argv[0]}: {exc}"
            return {"pid": None, "exit_code": 126, "message": message, "reason": str(exc)}
        except OSError as exc:  # shell semantics: 127 not found, 126 cannot run
            if master is not None:
                os.close(master)
            code = 127 if exc.errno == errno.ENOENT else 126
            return {
                "pid": None,
                "exit_code": code,
                "message": f"{argv[0]}: {exc.strerror}",
                "reason": exc.strerror,
            }
        try:
            pidfd: int | None = os.pidfd_open(popen.pid)
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            # no pidfd_open (gVisor before 2023): SIGCHLD tells instead (on_reap)
            pidfd = None
        proc = Proc(ident, popen, pidfd, argv)
        self.procs[ident] = proc
        if pidfd is not None:
            self.sel.register(pidfd, selectors.EVENT_READ, ("exit", proc))
        if master is not None:
            # one descriptor per direction (each stream closes its own), and a
            # third kept for resizing
            proc.master = os.dup(master)
            writer = os.dup(master)
            os.set_blocking(writer, False)
            self.incoming[(ident, w.STDIN)] = Incoming(ident, w.STDIN, writer, pipe=True)
            self.add_outgoing(ident, w.STDOUT, master)
        else:
            assert popen.stdout is not None
            assert popen.stderr is not None
            if popen.stdin is not None:
                fd = _detach(popen.stdin)
                os.set_blocking(fd, False)
                self.incoming[(ident, w.STDIN)] = Incoming(ident, w.STDIN, fd, pipe=True)
            self.add_outgoing(ident, w.STDOUT, _detach(popen.stdout))
            self.add_outgoing(ident, w.STDERR, _detach(popen.stderr))
        return {"pid": popen.pid}

    def add_outgoing(self, ident: int, channel: int, fd: int, selectable: bool = True) -> None:
        if selectable:
            os.set_blocking(fd, False)
        stream = Outgoing(ident, channel, fd, selectable)
        self.outgoing[(ident, channel)] = stream
        self.pump(stream)

    def on_exit(self, proc: Proc) -> None:
        if proc.pidfd is not None:
            self.sel.unregister(proc.pidfd)
            os.close(proc.pidfd)
            proc.pidfd = None
        cpu_s = None
        try:
            # wait4: the rusage covers the command and every descendant it
            # reaped, the host's evidence for a CPU-time kill
            _, status, usage = os.wait4(proc.popen.pid, 0)
            code = proc.popen.returncode = os.waitstatus_to_exitcode(status)
            cpu_s = usage.ru_utime + usage.ru_stime
        except ChildProcessError:
            code = proc.popen.wait()
        body: dict[str, object] = {"exit": code if code >= 0 else 128 - code, "cpu_s": cpu_s}
        if code < 0:
            body["signal"] = -code
        self.event(proc.ident, body)
        stdin = self.incoming.get((proc.ident, w.STDIN))
        if stdin is not None:
            self.end_incoming(stdin)
        if proc.master is not None:
            os.close(proc.master)
        self.procs.pop(proc.ident, None)

    def op_signal(self, ident: int, body: dict[str, object]) -> dict[str, object]:
        """Signal a command and everything it started (``target``: its id), or a
        process no running command accounts for (``pid``: one ``list_processes`` showed)."""
        signum = int(str(body["signal"]))
        table = _process_table()
        if body.get("target") is not None:
            target = self.procs.get(int(str(body["target"])))
            if target is None:
                raise CallError(errno.ESRCH, "no such process")
            _signal_tree(functools.partial(self.roots, target), signum)
        else:
            pid = int(str(body["pid"]))
            if pid not in self.leftovers(table):
                raise CallError(errno.ESRCH, "no such process")
            _signal_tree(lambda _: {pid}, signum)
        return {}

    def op_detach(self, ident: int, body: dict[str, object]) -> dict[str, object]:
        """Stop forwarding a finished command's output (a daemon it left holds the pipe)."""
        target = int(str(body["target"]))
        for channel in (w.STDOUT, w.STDERR):
            stream = self.outgoing.get((target, channel))
            if stream is not None:
                self.end_outgoing(stream)
        return {}

    def op_ping(self, ident: int, body: dict[str, object]) -> dict[str, object]:
        return {}

    def op_detach_read(self, ident: int, body: dict[str, object]) -> dict[str, object]:
        """The host stopped reading a file before its end."""
        stream = self.outgoing.get((int(str(body["target"])), w.CONTENT))
        if stream is not None:
            self.end_outgoing(stream)
        return {}

    def op_abort_write(self, ident: int, body: dict[str, object]) -> dict[str, object]:
        """The host gave up on an upload: drop the temp file."""
        target = int(str(body["target"]))
        stream = self.incoming.get((target, w.CONTENT))
        if stream is not None:
            stream.eof = True
            stream.pending.clear()
            self.end_incoming(stream, error=OSError(errno.ECANCELED, "upload aborted"))
        return {}

    def op_close_stdin(self, ident: int, body: dict[str, object]) -> dict[str, object]:
        stream = self.incoming.get((int(str(body["target"])), w.STDIN))
        if stream is not None:
            stream.eof = True
            self.drain(stream)
        return {}

    def op_resize(self, ident: int, body: dict[str, object]) -> dict[str, object]:
        proc = self.procs.get(int(str(body["target"])))
        if proc is None or proc.master is None:
            raise CallError(errno.ESRCH, "no such terminal")
        _winsize(proc.master, int(str(body["cols"])), int(str(body["rows"])))
        return {}

    def roots(self, proc: Proc, table: dict[int, tuple[int, str]]) -> set[int]:
        """Where ``proc``'s tree starts: its own process, and every orphan that
        came to the agent (a subreaper) carrying its mark."""
        roots = {proc.popen.pid}
        mains = {p.popen.pid for p in self.procs.values()}
        for pid, (ppid, _) in table.items():
            if ppid == self.me and pid not in mains and _mark(pid) == proc.ident:
                roots.add(pid)
        return roots

    def leftovers(self, table: dict[int, tuple[int, str]]) -> set[int]:
        """Live processes in the box that no running command accounts for: what
        a finished command left behind (daemons), or started without its mark."""
        covered: set[int] = set()
        for proc in self.procs.values():
            covered |= _tree(self.roots(proc, table), table)
        everything = _tree({self.me}, table) - {self.me}
        return {p for p in everything - covered if table[p][1] != "Z"}

    def op_list_processes(self, ident: int, body: dict[str, object]) -> dict[str, object]:
        table = _process_table()
        processes: list[dict[str, object]] = [
            {
                "id": p.ident,
                "pid": p.popen.pid,
                "argv": [a[:256] for a in p.argv[:16]],  # bounded: the reply must fit a frame
                "pty": p.master is not None,
            }
            for p in self.procs.values()
        ]
        # commands.list() never hides a live process: whatever no command accounts for
        for pid in sorted(self.leftovers(table))[:256]:
            argv = _cmdline(pid)
            processes.append({"id": None, "pid": pid, "argv": argv, "pty": False})
        return {"processes": processes}

    def on_reap(self) -> None:
        """SIGCHLD: reap the orphans the agent adopted as the box's subreaper
        (its own commands are reaped by on_exit)."""
        with contextlib.suppress(OSError):
            while os.read(self.reaper, 4096):
                pass
        mains = {p.popen.pid for p in self.procs.values()}
        for pid, (ppid, state) in _process_table().items():
            if ppid == self.me and state == "Z" and pid not in mains:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
        # commands without a pidfd (no pidfd_open here): ended ones, left
        # unreaped by WNOWAIT for on_exit's wait4
        for proc in [p for p in self.procs.values() if p.pidfd is None]:
            if proc.popen.returncode is not None:
                continue
            try:
                ended = os.waitid(os.P_PID, proc.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # reaped already: on_exit says so
                self.on_exit(proc)
                continue
            if ended is not None:
                self.on_exit(proc)

    def op_read(self, ident: int, body: dict[str, object]) -> None:
        # O_NONBLOCK: a FIFO planted under the expected name must not block the
        # agent's loop (and every later call) on open
        fd = os.open(self.path(body["path"]), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            if stat.S_ISDIR(st.st_mode):
                raise CallError(errno.EISDIR, f"{body['path']!r} is a directory")
            raise CallError(errno.EINVAL, f"{body['path']!r} is not a regular file")
        os.set_blocking(fd, True)
        self.reply(ident, {"size": st.st_size})
        self.add_outgoing(ident, w.CONTENT, fd, selectable=False)

    def op_write(self, ident: int, body: dict[str, object]) -> dict[str, object]:
        final = self.path(body["path"])
        parent = os.path.dirname(final)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".corral-upload-{ident}-{os.getpid()}")
        mode = int(str(body.get("mode", 0o644))) & 0o777
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        self.uploads[ident] = Upload(ident, tmp, final, fd)
        self.incoming[(ident, w.CONTENT)] = Incoming(ident, w.CONTENT, fd, pipe=False)
        return {"ready": True}

    def op_list(self, ident: int, body: dict[str, object]) -> dict[str, object]:
        path = self.path(body.get("path", "."))
        entries: list[dict[str, object]] = []
        budget = w.MAX_CONTROL // 2  # the reply must fit a control frame
        with os.scandir(path) as it:
            for entry in it:
                budget -= 2 * len(entry.name) + 160
                if len(entries) >= MAX_LIST or budget < 0:
                    return {"entries": entries, "truncated": True}
                entries.append(_describe(entry.path, entry.name, self.workspace))
        return {"entries": sorted(entries, key=lambda e: str(e["name"])), "truncated": False}

    def op_stat(self, ident: int, body: dict[str, object]) -> dict[str, object]:
        path = self.path(body["path"])
        return _describe(path, os.path.basename(path), self.workspace)

    def link_path(self, raw: object) -> str:
        """``path`` without following its last component: a symlink in the
        workspace names the link itself, wherever it points (its parent is
        resolved and must stay in the workspace)."""
        if not isinstance(raw, str) or "\0" in raw:
            raise CallError(errno.EINVAL, "a path must be a string without NUL bytes")
        full = os.path.normpath(os.path.join(self.workspace, raw))
        parent, name = os.path.split(full)
        if full == self.workspace or name in ("", ".", ".."):
            return self.path(raw)
        return os.path.join(self.path(parent), name)

    def op_remove(self, ident: int, body: dict[str, object]) -> dict[str, object]:
        # a symlink is removed itself, never what it points to: unlinking a link
        # to a path outside the workspace touches nothing outside
        path = self.link_path(body["path"])
        if path == self.workspace:
            raise CallError(errno.EBUSY, "the workspace itself cannot be removed")
        if os.path.isdir(path) and not os.path.islink(path):
            _remove_tree(path)
        else:
            os.unlink(path)
        return {}

    def op_mkdir(self, ident: int, body: dict[str, object]) -> dict[str, object]:
        os.makedirs(self.path(body["path"]), exist_ok=True)
        return {}

    def op_rename(self, ident: int, body: dict[str, object]) -> dict[str, object]:
        os.replace(self.path(body["src"]), self.path(body["dst"]))
        return {}

    # -- the loop --------------------------------------------------------------------

    def on_host(self) -> None:
        try:
            n = os.readv(self.rfd, [self.rbuf])
        except BlockingIOError:
            return
        if not n:
            self.running = False
            return
        try:
            self.on_frames(self.decoder.feed(self.rview[:n]))
        except w.ProtocolError as exc:
            # out of step or malformed: a frame went missing or was forged. Tell
            # the host (every call it has pending fails now, instead of waiting
            # for a reply that cannot come) and stop: the box ends with the agent
            self.send(w.encode_json(w.ABORT, 0, {"reason": str(exc)[:500]}))
            self.running = False

    def on_frames(self, frames: list[tuple[int, int, int, bytes]]) -> None:
        for kind, ident, channel, payload in frames:
            if kind == w.CALL:
                self.on_call(ident, w.decode_json(payload))
            elif kind == w.DATA:
                self.on_data(ident, channel, payload)
            elif kind == w.EOF:
                stream = self.incoming.get((ident, channel))
                if stream is not None:
                    stream.eof = True
                    self.drain(stream)
            elif kind == w.CREDIT:
                (amount,) = w.CREDIT_BODY.unpack(payload)
                out = self.outgoing.get((ident, channel))
                if out is not None:
                    out.credit = min(out.credit + amount, 1 << 30)
                    self.pump(out)

    def run(self) -> None:
        self.send(w.encode_json(w.HELLO, 0, {"version": w.VERSION, "pid": os.getpid()}))
        self.flush()
        while self.running:
            for key, _ in self.sel.select():
                kind, obj = key.data
                if kind == "host":
                    self.on_host()
                elif kind == "host-out":
                    self.flush()
                elif kind == "out":
                    try:
                        self.read_source(obj)
                    except OSError:  # the source broke: end that stream, not the agent
                        self.end_outgoing(obj)
                elif kind == "in":
                    self.drain(obj)
                elif kind == "exit":
                    self.on_exit(obj)
                elif kind == "reap":
                    self.on_reap()
            # one turn: write what is queued, read sources the host has credit for
            self.flush()
            if not self.running:
                break
            self.pump_all()
            self.flush()
        self.flush_before_exit()

    def flush_before_exit(self) -> None:
        """Write what is left (an ABORT) for up to a second; the host may be gone."""
        deadline = time.monotonic() + 1.0
        while self.out and time.monotonic() < deadline:
            try:
                del self.out[: os.write(self.wfd, self.out)]
            except BlockingIOError:
                select.select([], [self.wfd], [], 0.05)
            except OSError:
                return


MARK = "CORRAL_COMMAND_ID"
_PR_SET_CHILD_SUBREAPER = 36


def _become_reaper(sel: selectors.BaseSelector) -> int:
    """Make the agent the box's child subreaper: every process orphaned in the
    box (setsid, a double fork, a daemon) becomes the agent's child rather than
    bwrap's init's, so no process leaves the agent's tree. SIGCHLD wakes the
    loop through a pipe to reap them. Returns the pipe's read end."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    r, w_ = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(w_, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel.register(r, selectors.EVENT_READ, ("reap", None))
    return r


def _process_table() -> dict[int, tuple[int, str]]:
    """Every process of the box: pid -> (parent pid, state letter)."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue  # gone meanwhile
            state = fields[0].decode()
            if state == "Z":
                # a leader thread that exited alone (the raw exit syscall) shows Z
                # while its other threads run on: read as a zombie, the process
                # went unlisted by commands.list() (a live process hidden)
                state = _live_thread_state(entry) or state
            table[int(entry)] = (int(fields[1]), state)
    return table


def _live_thread_state(pid: str) -> str | None:
    """The state of a thread of ``pid`` other than its exited leader, if one lives."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0].decode()
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            return state
    return None


def _tree(roots: set[int], table: dict[int, tuple[int, str]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, ())
    return found


def _signal_tree(roots: Callable[[dict[int, tuple[int, str]]], set[int]], signum: int) -> None:
    """Signal every process below ``roots(table)``. SIGKILL stops them all
    first, pass after pass until a pass finds none new, so nothing forks (or
    orphans) its way out between the scan and the kill: a stopped process
    cannot fork, and the roots are found again in every pass."""
    if signum != signal.SIGKILL:
        table = _process_table()
        for pid in _tree(roots(table), table):
            with _quiet():
                os.kill(pid, signum)
        return
    stopped: set[int] = set()
    for _ in range(1000):
        table = _process_table()
        fresh = _tree(roots(table) | stopped, table) - stopped
        if not fresh:
            break
        for pid in fresh:
            with _quiet():
                os.kill(pid, signal.SIGSTOP)
        stopped |= fresh
    for pid in stopped:
        with _quiet():
            os.kill(pid, signal.SIGKILL)


def _mark(pid: int) -> int | None:
    """The command id a process carries in its environment, if readable."""
    # through a live thread if the leader exited alone: else such an orphan
    # escaped its command's kill without clearing anything
    data = _proc_read(pid, "environ", 1 << 20)
    prefix = MARK.encode() + b"="
    for item in data.split(b"\0"):
        if item.startswith(prefix):
            with contextlib.suppress(ValueError):
                return int(item[len(prefix) :])
    return None


def _cmdline(pid: int) -> list[str]:
    raw = _proc_read(pid, "cmdline", 4096)
    return [a.decode(errors="replace")[:256] for a in raw.split(b"\0") if a][:16]


def _proc_read(pid: int, name: str, size: int) -> bytes:
    """/proc/<pid>/<name> (cmdline, environ), or b"". A leader thread that exited
    alone (the raw exit syscall) leaves these empty or unreadable while its
    other threads run on: then they are read through one of those threads."""
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/{name}", "rb") as f:
            data = f.read(size)
        if data:
            return data
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return b""
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/{name}", "rb") as f:
                data = f.read(size)
        except OSError:
            continue
        if data:
            return data
    return b""


def _remove_tree(top: str) -> None:
    """rmtree without recursion (a box can build a tree deeper than Python's stack)."""
    for root, dirs, files, rootfd in os.fwalk(top, topdown=False):
        for name in files:
            os.unlink(name, dir_fd=rootfd)
        for name in dirs:
            if os.path.islink(os.path.join(root, name)):
                os.unlink(name, dir_fd=rootfd)
            else:
                os.rmdir(name, dir_fd=rootfd)
    os.rmdir(top)


def _describe(path: str, name: str, workspace: str) -> dict[str, object]:
    st = os.lstat(path)
    kind = (
        "dir"
        if stat.S_ISDIR(st.st_mode)
        else "symlink"
        if stat.S_ISLNK(st.st_mode)
        else ("file" if stat.S_ISREG(st.st_mode) else "other")
    )
    rel = os.path.relpath(path, workspace)
    return {
        "name": name,
        "path": rel,
        "type": kind,
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "mtime": st.st_mtime,
    }


def _err(exc: OSError) -> dict[str, object]:
    return {"errno": exc.errno or errno.EIO, "message": exc.strerror or str(exc)}


def _detach(stream: object) -> int:
    fd = os.dup(stream.fileno())  # type: ignore[attr-defined]
    stream.close()  # type: ignore[attr-defined]
    return fd


def _winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _limit_cpu(seconds: int) -> None:
    # in the child, before exec: each command its own CPU budget; soft
    # SIGXCPU, hard SIGKILL a second later (a busy loop burns CPU forever)
    if seconds:
        resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds + 1))


def _terminal_child(cpu_seconds: int) -> None:
    _take_tty()
    _limit_cpu(cpu_seconds)


def _take_tty() -> None:
    # the agent is single-threaded, so a pre-exec hook is safe here
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], OSError)  # type: ignore[arg-type]


def _no_dumps() -> None:
    # non-dumpable: code under the same uid can neither ptrace the agent nor
    # open its host channel through /proc/<pid>/fd
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_dumpable = 4
    libc.prctl(pr_set_dumpable, 0, 0, 0, 0)


def _channel() -> tuple[int, int]:
    """The host channel's two descriptors, made close-on-exec at once: no
    command the agent starts inherits them (subprocess closes them too)."""
    rfd, wfd = (int(fd) for fd in os.environ.pop("CORRAL_CHANNEL_FDS").split(","))
    for fd in (rfd, wfd):
        os.set_inheritable(fd, False)
    return rfd, wfd


def main() -> None:
    _no_dumps()
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    rfd, wfd = _channel()
    Agent(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0, rfd, wfd).run()


if __name__ == "__main__":
    main()
