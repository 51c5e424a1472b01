"""bubblewrap's command line, rendered from the plans (pure but for memfds).

bwrap's options, the box's environment and the command itself travel in
memfds registered in ``_Fds``, never on a command line another local user can
read (``/proc/<pid>/cmdline``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from corral._errors import HostToolMissing
from corral._policy import Policy
from corral.backends.linux import _seccomp
from corral.backends.linux._procbox import find_util
from corral.net._proxy import PORT as PROXY_PORT
from corral.plan import Plans, _capabilities, _mounts, _namespaces

BWRAP_INSTALL_HINT = (
    "install it with: sudo apt-get install bubblewrap (Fedora: dnf install bubblewrap)"
)
MIN_BWRAP = (0, 8, 0)  # --disable-userns, --size, --perms, --ro-bind-data
_PROXY_URL = f"http://127.0.0.1:{PROXY_PORT}"
PROXY_ENV = {
    name: value
    for base, value in (
        ("http_proxy", _PROXY_URL),
        ("https_proxy", _PROXY_URL),
        ("all_proxy", _PROXY_URL),
        ("no_proxy", "localhost,127.0.0.1,::1"),
    )
    for name in (base, base.upper())
}


@dataclass(frozen=True, slots=True)
class BwrapInfo:
    path: str
    version: tuple[int, int, int]


@functools.cache
def find_bwrap() -> BwrapInfo:
    """The bwrap binary and its version, or HostToolMissing saying how to install it."""
    path = shutil.which("bwrap", path="/usr/local/bin:/usr/bin:/bin")
    if path is None:
        raise HostToolMissing("bubblewrap", BWRAP_INSTALL_HINT)
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, check=True, timeout=10, env={}
        ).stdout.decode()
    except (OSError, subprocess.SubprocessError) as exc:
        raise HostToolMissing(
            "bubblewrap", f"{path} does not run ({exc}); {BWRAP_INSTALL_HINT}"
        ) from exc
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", out)
    if match is None:
        raise HostToolMissing("bubblewrap", f"cannot read the version of {path}: {out!r}")
    major, minor, patch = (int(g) for g in match.groups())
    version = (major, minor, patch)
    if version < MIN_BWRAP:
        need = ".".join(map(str, MIN_BWRAP))
        raise HostToolMissing(
            "bubblewrap", f"version {need} or newer is needed, found {out.strip()}"
        )
    return BwrapInfo(path, version)


_PRLIMIT_FLAGS = {
    "RLIMIT_AS": "as",
    "RLIMIT_CORE": "core",
    "RLIMIT_CPU": "cpu",
    "RLIMIT_FSIZE": "fsize",
    "RLIMIT_NOFILE": "nofile",
    "RLIMIT_NPROC": "nproc",
    "RLIMIT_STACK": "stack",
}


def _limit(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


class _Fds:
    """File descriptors handed to bwrap; all closed on exit, whatever happens."""

    def __init__(self) -> None:
        self.keep: list[int] = []  # our ends
        self.pass_: list[int] = []  # bwrap's ends, closed right after spawn

    def data(self, content: bytes) -> int:
        fd = os.memfd_create("corral-data", os.MFD_CLOEXEC)
        os.write(fd, content)
        os.lseek(fd, 0, os.SEEK_SET)
        self.pass_.append(fd)
        return fd

    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe2(os.O_CLOEXEC)
        return r, w

    def close_passed(self) -> None:
        for fd in self.pass_:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pass_.clear()

    def close_all(self) -> None:
        self.close_passed()
        for fd in self.keep:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.keep.clear()


_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ARG_VAR = "CORRAL_ARGV_"
_LAUNCH_SHELL = "/bin/sh"
_LAUNCH_PYTHON = "/usr/bin/python3"
# bwrap refuses more than 9000 arguments in all (options and --args): the
# policy's take a few hundred, the rest is the command's share through --setenv
_MAX_ENV_ARGS = 1000
# the fallback launcher, for an environment with names no POSIX shell passes
# on (dash drops them) or a long argv: the argv comes NUL-separated on an
# inherited memfd (above 2: bwrap's init closes it), 13 ms slower here
_PY_LAUNCHER = (
    "import os\n"
    f"fd = int(os.environ.pop('{_ARG_VAR}FD'))\n"
    "with open(fd, 'rb') as f:\n"
    "    argv = f.read().split(b'\\0')[:-1]\n"
    "try:\n"
    "    os.execvp(argv[0], argv)\n"
    "except OSError as e:\n"
    "    said = b': command not found in the box' if e.errno == 2 else (\n"
    "        f': cannot be run in the box ({e.strerror})'.encode())\n"
    "    os.write(2, b'corral: ' + argv[0] + said + b'\\n')\n"
    "    os._exit(127 if e.errno == 2 else 126)\n"
)


def _launcher(
    command: Sequence[str], env: Sequence[tuple[str, str]], fds: _Fds
) -> tuple[list[str], list[str]]:
    """The box's first command line, which carries none of ``command``, and
    the ``--setenv`` options that carry ``command`` in its place.

    ``/proc/<pid>/cmdline`` of bwrap (and of setpriv and prlimit before it) is
    readable by every local user for the box's whole life, so the command's
    arguments (secrets, for some callers) must not be on it: they travel as
    environment variables inside the ``--args`` memfd, and a fixed shell line
    in the box turns them back into an argv, unsets them and execs it (or, see
    ``_PY_LAUNCHER``, in a memfd of their own). Only the command's own process
    then shows its argv, as any process does."""
    args = [os.fsencode(str(a)) for a in command]
    for arg in args:
        # a NUL would end the argument inside the NUL-separated --args memfd
        # and turn the rest into bwrap options (a bind of the host's /)
        if b"\0" in arg:
            raise ValueError("a command argument must not contain NUL bytes")
    shell_env = all(_SHELL_NAME.match(name) for name, _ in env)
    if len(args) <= _MAX_ENV_ARGS and shell_env:
        setenv: list[str] = []
        for i, arg in enumerate(args):
            setenv += ["--setenv", f"{_ARG_VAR}{i}", os.fsdecode(arg)]
        names = " ".join(f"{_ARG_VAR}{i}" for i in range(len(args)))
        quoted = " ".join(f'"${_ARG_VAR}{i}"' for i in range(len(args)))
        # $0 is "corral": a command that is not found reads
        # "corral: 1: exec: NAME: not found" (exit 127; 126 cannot run),
        # put in corral's words by CgroupProcessBox.exec_failure
        line = f'set -- {quoted}; unset {names}; exec "$@"'
        return [_LAUNCH_SHELL, "-c", line, "corral"], setenv
    argv_fd = fds.data(b"".join(arg + b"\0" for arg in args))
    return [_LAUNCH_PYTHON, "-I", "-S", "-c", _PY_LAUNCHER], [
        "--setenv",
        f"{_ARG_VAR}FD",
        str(argv_fd),
    ]


def render_argv(
    plans: Plans,
    policy: Policy,
    command: Sequence[str],
    fds: _Fds,
    extra_options: Sequence[str] = (),
    extra_env: Sequence[tuple[str, str]] = (),
) -> list[str]:
    """The command line that starts the box for ``plans``.

    bwrap's options travel in a memfd (``--args``), not on its command line:
    ``/proc/<pid>/cmdline`` is readable by every local user, and the options
    carry the box's environment (API keys, tokens). So does ``command``: the
    command line names only a fixed launcher (see ``_launcher``). Generated
    files and the seccomp program travel through memfds too; all are
    registered in ``fds``. ``extra_env`` is for the box's first program only.
    """
    # setpriv --pdeathsig: bwrap dies with the corral process that started it
    # (and takes the box with it, --die-with-parent): a box never outlives the
    # host-side supervisor that enforces its wall clock and output cap.
    argv: list[str] = [find_util("setpriv"), "--pdeathsig", "KILL", "--"]
    # rlimits are set by util-linux's prlimit just before bwrap starts, so the
    # box inherits them: root here may lack CAP_SYS_RESOURCE, which setting
    # them on the box's pid from outside would need.
    argv.append(find_util("prlimit"))
    for rl in plans.rlimits:
        argv.append(f"--{_PRLIMIT_FLAGS[rl.resource]}={_limit(rl.soft)}:{_limit(rl.hard)}")
    args: list[str] = [*extra_options]
    for nop in plans.namespaces:
        match nop:
            case _namespaces.Unshare(namespace="mount"):
                pass  # bwrap always unshares the mount namespace
            case _namespaces.Unshare(namespace=ns):
                args.append(f"--unshare-{ns}")
            case _namespaces.MapIdentity(uid=uid, gid=gid):
                args += ["--uid", str(uid), "--gid", str(gid)]
            case _namespaces.Hostname(name=name):
                args += ["--hostname", name]
            case _namespaces.DisableNestedUserns():
                args.append("--disable-userns")
            case _namespaces.DieWithParent():
                args.append("--die-with-parent")
            case _namespaces.NewSession():
                args.append("--new-session")
    for cop in plans.capabilities:
        match cop:
            case _capabilities.DropAllCapabilities():
                args += ["--cap-drop", "ALL"]
            case _capabilities.NoNewPrivs():
                pass  # bwrap sets PR_SET_NO_NEW_PRIVS unconditionally
    for mop in plans.mounts:
        match mop:
            case _mounts.RoBind(source=src, target=dst):
                args += ["--ro-bind", src, dst]
            case _mounts.Bind(source=src, target=dst):
                args += ["--bind", src, dst]
            case _mounts.Tmpfs(target=dst, size_bytes=size, mode=mode):
                args += ["--perms", f"{mode:04o}"]
                if size is not None:
                    args += ["--size", str(size)]
                args += ["--tmpfs", dst]
            case _mounts.Proc(target=dst):
                args += ["--proc", dst]
                # /proc/keys lists every key whose owner uid is mapped in the
                # box with the owner's "view" bit (a key's description names
                # what it is for): as an ordinary user the box's uid is the
                # caller's, so the host user's keys showed. key-users: their
                # uids and counts. Both become empty files (as in Docker).
                for name in ("keys", "key-users"):
                    args += [
                        "--perms",
                        "0444",
                        "--ro-bind-data",
                        str(fds.data(b"")),
                        f"{dst}/{name}",
                    ]
            case _mounts.Dev(target=dst):
                args += ["--dev", dst]
            case _mounts.Symlink(link_to=target, path=path):
                args += ["--symlink", target, path]
            case _mounts.Dir(path=path, mode=mode):
                args += ["--perms", f"{mode:04o}", "--dir", path]
            case _mounts.File(path=path, content=content, mode=mode):
                args += ["--perms", f"{mode:04o}", "--ro-bind-data", str(fds.data(content)), path]
            case _mounts.Hide(path=path, host_path=host_path):
                # the host path is under a read-only bind: the box cannot swap
                # it for a symlink or rename it between runs
                if os.path.isdir(host_path):
                    args += ["--perms", "0000", "--tmpfs", path, "--remount-ro", path]
                elif os.path.lexists(host_path):
                    args += ["--ro-bind", "/dev/null", path]
                # absent on the host: nothing to hide
            case _mounts.RemountRo(path=path):
                args += ["--remount-ro", path]
            case _mounts.Chdir(path=path):
                args += ["--chdir", path]
    args += ["--seccomp", str(fds.data(_seccomp.compile_bpf(plans.seccomp)))]
    args.append("--clearenv")
    for name, value in policy.env:
        args += ["--setenv", name, value]
    for name, value in extra_env:
        args += ["--setenv", name, value]
    launcher, carried = _launcher(command, policy.env, fds)
    args += carried
    options = fds.data(b"".join(os.fsencode(arg) + b"\0" for arg in args))
    return [*argv, "--", find_bwrap().path, "--args", str(options), "--", *launcher]
