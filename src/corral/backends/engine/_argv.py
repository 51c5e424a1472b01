"""Plans -> a container engine's ``run`` command line (docker and podman alike). Pure.

The same ``corral.plan`` output the bwrap backend renders into bwrap's options
is rendered here into the flags both engines share; the few differences
(podman takes ``nosuid,nodev`` on a bind, and ``U`` to give a tmpfs to the box's uid) come from
the ``EngineKind``. Golden-tested in tests/test_engines.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from corral._errors import UnsupportedPolicy
from corral._policy import Policy
from corral.backends.gvisor._runsc import host_task_ceiling
from corral.plan import Plans
from corral.plan._mounts import (
    Bind,
    Chdir,
    Dev,
    Dir,
    File,
    Hide,
    Proc,
    RemountRo,
    RoBind,
    Symlink,
    Tmpfs,
)

EngineKind = Literal["docker", "podman"]
Runtime = Literal["runc", "runsc"]
LABEL = "io.corral.box"  # every container corral starts carries it: what the sweep looks for
OWNER_LABEL = "io.corral.owner"  # "<pid>:<start time in clock ticks>" of the corral process
CGROUP_PARENT = "/corral-engine"

# The channel launcher: the agent's channel arrives on stdin/stdout (``run -i``)
# and is moved to fds 3 and 4 at once; 0 and 1 become /dev/null. The agent is
# the container's pid 1 and makes itself non-dumpable first thing, so no other
# process in the box (same uid) can open its channel through /proc/1/fd.
CHANNEL_LAUNCHER = (
    "/bin/sh",
    "-c",
    'exec 3<&0 4>&1 </dev/null >/dev/null; CORRAL_CHANNEL_FDS=3,4 exec "$@"',
    "corral-launcher",
)

_ULIMIT = {
    "RLIMIT_CORE": "core",
    "RLIMIT_STACK": "stack",
    "RLIMIT_NOFILE": "nofile",
    "RLIMIT_FSIZE": "fsize",
    "RLIMIT_CPU": "cpu",
    "RLIMIT_AS": "as",
    "RLIMIT_NPROC": "nproc",
}
_STOP_TIMEOUT_S = 1
# the command's arguments travel as environment variables (named on the CLI's
# command line, valued in its environment) and a fixed shell line turns them
# back into an argv in the box, as the bwrap backend's launcher does: the
# engine CLI's and the init's /proc/<pid>/cmdline are readable by every local
# user, and the arguments may be secrets
ARG_VAR = "CORRAL_ARGV_"
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# a box's environment with names no POSIX shell passes on (dash drops them):
# python execs the argv instead (slower to start, so only then)
_PY_LAUNCHER = (
    "import os\n"
    f"n = int(os.environ.pop('{ARG_VAR}N'))\n"
    f"argv = [os.environb.pop(b'{ARG_VAR}%d' % i) for i in range(n)]\n"
    "try:\n"
    "    os.execvp(argv[0], argv)\n"
    "except OSError as e:\n"
    "    said = b': command not found in the box' if e.errno == 2 else (\n"
    "        f': cannot be run in the box ({e.strerror})'.encode())\n"
    "    os.write(2, b'corral: ' + argv[0] + said + b'\\n')\n"
    "    os._exit(127 if e.errno == 2 else 126)\n"
)
# what the engine's CLI itself reads from its environment
CLI_ENV = frozenset(
    ("PATH", "HOME", "TMPDIR", "XDG_RUNTIME_DIR", "DOCKER_HOST", "DOCKER_CONFIG", "CONTAINER_HOST")
)
_NO_OPTION_CHARS = frozenset(":,\n\0")


@dataclass(frozen=True, slots=True)
class RunInputs:
    """What the ``run`` command line is made of besides the plans.

    ``files``: box path -> host path of each file corral wrote for this box
    (a ``File`` op's content, or an empty file for a hidden file path).
    ``nproc``: RLIMIT_NPROC for the box's uid, above any pids limit (the
    cgroup caps; root here lacks CAP_SYS_RESOURCE: an engine default would
    raise the limit and fail). ``init_source``: for a box on an image (which
    need not have an init), the host's static init bound at ``init_path``."""

    kind: EngineKind
    name: str
    owner: str
    image: str
    uid: int
    gid: int
    cidfile: str
    seccomp_file: str
    files: Mapping[str, str]
    channel: bool
    stdin: bool
    init_path: str
    nproc: int
    init_source: str | None = None  # a host file bound read-only at init_path (image roots)
    python: str = "/usr/bin/python3"  # the fallback launcher's (see _launcher)
    runtime: Runtime = "runc"


def _checked(path: str, field: str) -> str:
    # the engines split -v and --tmpfs on ':' and ','
    if _NO_OPTION_CHARS & set(path):
        raise UnsupportedPolicy(
            field, f"path {path!r} holds ':' or ',', which the engine splits on"
        )
    return path


def _size(size_bytes: int | None) -> str:
    return f",size={size_bytes}" if size_bytes is not None else ""


def command_env(command: Sequence[str]) -> dict[str, str]:
    """The CLI environment entries that carry ``command`` into the box
    (``ARG_VAR<i>``, and ``ARG_VAR`` ``N`` for the count); see ``_launch_line``."""
    env = {f"{ARG_VAR}{i}": str(arg) for i, arg in enumerate(command)}
    env[f"{ARG_VAR}N"] = str(len(command))
    return env


def _launcher(command: Sequence[str], policy: Policy, python: str) -> list[str]:
    """The fixed command line that execs ``command`` from ``command_env``'s
    variables; none of ``command`` is on it."""
    if all(_SHELL_NAME.match(name) for name, _ in policy.env):
        n = len(command)
        names = " ".join(f"{ARG_VAR}{i}" for i in range(n))
        quoted = " ".join(f'"${ARG_VAR}{i}"' for i in range(n))
        # $0 is "corral": a command that is not found reads "corral: 1: exec:
        # NAME: not found" (127), put in corral's words by _result.said_by_launcher
        line = f'set -- {quoted}; unset {names} {ARG_VAR}N; exec "$@"'
        return ["/bin/sh", "-c", line, "corral"]
    return [python, "-I", "-S", "-c", _PY_LAUNCHER]


def render_run(
    plans: Plans, policy: Policy, command: Sequence[str], inputs: RunInputs
) -> list[str]:
    """The arguments after the engine's binary: ``run ... IMAGE COMMAND``.

    Raises ``UnsupportedPolicy`` for a bind path the engine cannot take."""
    limits, fs = policy.limits, policy.filesystem
    argv = [
        "run",
        f"--name={inputs.name}",
        f"--label={LABEL}=1",
        f"--label={OWNER_LABEL}={inputs.owner}",
        f"--cidfile={inputs.cidfile}",
        f"--cgroup-parent={CGROUP_PARENT}",
        # no network at all: only loopback in a fresh namespace (never the host's)
        "--network=none",
        # a fresh IPC namespace: no host shm segments or message queues
        "--ipc=private",
        f"--hostname={policy.identity.hostname}",
        # the image is read-only: only the workspace and the tmpfs accept writes
        "--read-only",
        # the cgroup tree read-only and empty: the box's own cgroup paths (and
        # docker's layout) stay unseen, and no writable tmpfs sits under /sys
        "--tmpfs=/sys/fs/cgroup:ro,nosuid,nodev,noexec,size=4k",
        # every capability dropped: root-equivalent powers stay outside
        "--cap-drop=ALL",
        # setuid binaries and file capabilities cannot raise privilege
        "--security-opt=no-new-privileges",
        # corral's own filter (the bwrap backend's rules): the kernel surface the box reaches
        f"--security-opt=seccomp={inputs.seccomp_file}",
        # never root, and a uid of this box alone: boxes cannot signal or ptrace each other
        f"--user={inputs.uid}:{inputs.gid}",
        f"--stop-timeout={_STOP_TIMEOUT_S}",
        # logs bounded at nothing: output goes only to corral's pipes
        "--log-driver=none",
        # only images already here: never a registry (corral's hosts reach none)
        "--pull=never",
    ]
    if inputs.kind == "podman":
        argv += [
            # podman's --read-only adds writable tmpfs on /run, /tmp and
            # /var/tmp: only the policy's writable places may exist
            "--read-only-tmpfs=false",
            # /proc/key-users (which host uids hold keys, and how many) masked
            # like /proc/keys; docker's CLI cannot add a mask (see SECURITY.md)
            "--security-opt=mask=/proc/key-users",
        ]
    if limits.memory_bytes is not None:
        # swap equal to memory: no swap, the limit is the box's RAM
        argv += [f"--memory={limits.memory_bytes}", f"--memory-swap={limits.memory_bytes}"]
    if limits.cpu_cores is not None:
        argv.append(f"--cpus={limits.cpu_cores:g}")  # a CFS quota: cores, not shares
    if limits.pids is not None and inputs.runtime == "runsc":
        # gVisor: the box's cap is RLIMIT_NPROC in the sentry (below); the
        # cgroup holds the sentry's own tasks, far more (see gvisor._runsc)
        argv.append(f"--pids-limit={host_task_ceiling(limits.pids)}")
    elif limits.pids is not None:
        argv.append(f"--pids-limit={limits.pids}")  # fork bombs stop at the cgroup
    if inputs.runtime == "runsc" and inputs.kind == "docker":
        argv.append("--runtime=runsc")  # podman: its global --runtime (Engine.command)
    # rlimits, all explicit: root here lacks CAP_SYS_RESOURCE, so an engine's
    # default (raising nofile) would fail; lowered limits always apply.
    # RLIMIT_NPROC stays above the pids limit: the uid is this box's alone, and
    # the cgroup must be the one that refuses a fork bomb, or its pids.events
    # (the evidence behind limit_hit "pids") never counts one
    nproc = inputs.nproc
    if limits.pids is not None and inputs.runtime == "runsc":
        nproc = limits.pids  # gVisor counts the box's tasks against it
    seen = set()
    for rl in plans.rlimits:
        name = _ULIMIT[rl.resource]
        seen.add(name)
        soft = -1 if rl.soft is None else rl.soft
        hard = -1 if rl.hard is None else rl.hard
        argv.append(f"--ulimit={name}={soft}:{hard}")
    if "nproc" not in seen:
        argv.append(f"--ulimit=nproc={nproc}:{nproc}")  # per uid: this box's alone
    if inputs.channel or inputs.stdin:
        argv.append("--interactive")
    bind_opts = ",nosuid,nodev" if inputs.kind == "podman" else ""
    for op in plans.mounts:
        match op:
            case RoBind(source=source, target=target):
                src = _checked(source, "filesystem.read_only")
                argv.append(f"--volume={src}:{_checked(target, 'filesystem.read_only')}:ro")
            case Bind(source=source, target=target):
                # the workspace: the only writable bind (nosuid,nodev: on the host
                # mount corral prepared as root, and on podman's bind too)
                src = _checked(source, "filesystem.writable")
                argv.append(
                    f"--volume={src}:{_checked(target, 'filesystem.writable')}:rw{bind_opts}"
                )
            case Tmpfs(target="/dev/shm", size_bytes=size):
                if size is not None:
                    argv.append(f"--shm-size={size}")
            case Tmpfs(target=target, size_bytes=size, mode=mode):
                if target == fs.workspace:
                    # a private workspace: the box's uid owns it; programs may run from it
                    owner = "U" if inputs.kind == "podman" else f"uid={inputs.uid},gid={inputs.gid}"
                    opts = f"rw,exec,nosuid,nodev,mode={mode:o},{owner}"
                else:
                    # /tmp: size-limited, nothing executed from it, no devices or setuid
                    opts = f"rw,noexec,nosuid,nodev,mode={mode:o}"
                argv.append(f"--tmpfs={_checked(target, 'filesystem')}:{opts}{_size(size)}")
            case File(path=path):
                argv.append(f"--volume={inputs.files[path]}:{_checked(path, 'filesystem')}:ro")
            case Hide(path=path):
                if path in inputs.files:  # a file: an empty one over it
                    argv.append(
                        f"--volume={inputs.files[path]}:{_checked(path, 'filesystem.hidden')}:ro"
                    )
                else:  # a directory: an empty read-only tmpfs over it
                    argv.append(f"--tmpfs={_checked(path, 'filesystem.hidden')}:ro,size=4k")
            case Chdir(path=path):
                argv.append(f"--workdir={path}")
            case RemountRo() | Proc() | Dev() | Dir() | Symlink():
                # the root is --read-only; /proc and /dev are the engine's own
                # (fresh, masked); directories and symlinks are in the base image
                pass
    if inputs.init_source is not None and not inputs.channel:
        argv.append(f"--volume={_checked(inputs.init_source, 'init')}:{inputs.init_path}:ro")
    for name, value in policy.env:
        if name in CLI_ENV:  # the CLI needs its own: the box's value goes inline
            argv.append(f"--env={name}={value}")
        else:
            # the name only: the CLI takes the value from its own environment,
            # so no value shows in the CLI's world-readable /proc/<pid>/cmdline
            argv.append(f"--env={name}")
    if not inputs.channel:
        # the names only (values in the CLI's environment, see command_env)
        argv += [f"--env={name}" for name in command_env(command)]
    argv += ["--", inputs.image]
    if inputs.channel:
        # the agent's command line: corral's own, no caller's arguments
        argv += CHANNEL_LAUNCHER
        argv += list(command)
    else:
        # an init (the host's tini, under the bound /usr or bound alone) as pid 1: the command
        # is not pid 1, so a signal kills it as on a host (a shell's `kill -9 $$`),
        # and orphans are reaped. The command itself comes from the environment
        # (threat: its arguments on the CLI's and tini's world-readable cmdline)
        argv += [inputs.init_path, "--", *_launcher(command, policy, inputs.python)]
    return argv
