"""Filesystem probes (``fs.*``): host secrets, mounts, descriptors, devices, symlinks."""

from __future__ import annotations

import asyncio
import os
import tempfile

from corral.audit._probe import (
    Context,
    Outcome,
    ProbeError,
    denied,
    probe,
)

_SECRETS = {
    "shadow": "/etc/shadow",
    "gshadow": "/etc/gshadow",
    "sudoers": "/etc/sudoers",
    "ssh_host_key": "/etc/ssh/ssh_host_ed25519_key",
}

denied(
    "fs.host_secrets",
    "/etc/shadow, sudoers and host keys are absent",
    "reading password hashes and host keys",
    "a generated /etc, no host files",
    "\n".join(f"attempt({k!r}, lambda: open({v!r}).read())" for k, v in _SECRETS.items()),
    expect=("ENOENT",),
)
denied(
    "fs.root_home",
    "/root is absent",
    "reading root's files and keys",
    "host home directories are not mounted",
    "attempt('root', lambda: os.listdir('/root'))\n"
    "attempt('root_ssh', lambda: open('/root/.ssh/id_rsa').read())",
    expect=("ENOENT",),
)
denied(
    "fs.host_homes",
    "/home is absent",
    "reading users' files and keys",
    "host home directories are not mounted",
    "attempt('home', lambda: os.listdir('/home'))",
    expect=("ENOENT",),
)
denied(
    "fs.proc_root",
    "/proc/1/root leads nowhere",
    "escaping through another process's root",
    "a fresh procfs of the box's own pid namespace",
    "attempt('proc1', lambda: open('/proc/1/root/etc/shadow').read())\n"
    "attempt('proc1_work', lambda: os.listdir('/proc/1/root/root'))",
    expect=("ENOENT", "EACCES"),
)
denied(
    "fs.traversal",
    "'..' from the workspace stays in the box",
    "path traversal to host files",
    "the box's root is its own tmpfs",
    "attempt('dotdot', lambda: open('../../../../etc/shadow').read())\n"
    "attempt('work', lambda: os.listdir('/work'))",
    expect=("ENOENT",),
)
denied(
    "fs.write_outside",
    "nothing outside the writable mounts accepts writes",
    "tampering with system files",
    "/usr and / are read-only",
    "\n".join(
        f"attempt({p!r}, lambda: open({p!r}, 'ab').write(b'x'))"
        for p in ("/usr/probe", "/etc/probe", "/probe", "/usr/bin/python3", "/etc/passwd")
    ),
    expect=("EROFS", "EACCES"),
)
denied(
    "fs.remount_rw",
    "remounting read-write fails",
    "making / or /usr writable again",
    "seccomp denies mount; no capabilities",
    "attempt('usr', sys_call(165, b'none', b'/usr', None, 32 | 4096, None))\n"
    "attempt('root', sys_call(165, b'none', b'/', None, 32, None))",
)
denied(
    "fs.dev_readonly",
    "/dev accepts no new files",
    "unbounded writable space in /dev",
    "/dev remounted read-only (docker, podman: root's 0755 tmpfs, and the box is never root)",
    "attempt('dev', lambda: open('/dev/probe', 'wb').write(b'x'))",
    expect=("EROFS", "EACCES"),
)
denied(
    "fs.setuid_mode",
    "no setuid or setgid file can be made",
    "a setuid binary left for the host to run",
    "seccomp denies S_ISUID/S_ISGID modes",
    "open('probe-suid', 'w').close()\n"
    "attempt('chmod_suid', lambda: os.chmod('probe-suid', 0o4755))\n"
    "attempt('chmod_sgid', lambda: os.chmod('probe-suid', 0o2755))",
)
denied(
    "fs.setuid_binaries",
    "setuid binaries in the box give nothing",
    "privilege escalation through su or mount",
    "no_new_privs, an empty bounding set, root unmapped",
    "import subprocess\n"
    "for argv in (['/usr/bin/su', '-c', 'true', 'root'],\n"
    "             ['/usr/bin/mount', '-t', 'tmpfs', 'none', '/tmp']):\n"
    "    if os.path.exists(argv[0]):\n"
    "        p = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL)\n"
    "        out[argv[0]] = 'refused' if p.returncode != 0 else 'ok'",
    expect=("refused",),
)


@probe(
    "fs.writable_mounts",
    "every writable mount is on the policy's list",
    "a writable host path the policy did not grant",
    "the mount plan; the root read-only",
)
async def _mounts(ctx: Context) -> Outcome:
    # a mount counts if the box can write into it: not a device node bound as
    # a mask (an engine's /dev/null over /proc/keys), not a tmpfs in which no
    # directory is the box's to write (an engine's root-owned 0755 /dev)
    seen = await ctx.observe(
        "import stat\n"
        "def box_writable(top, fstype):\n"
        "    try:\n"
        "        st = os.stat(top)\n"
        "    except OSError:\n"
        "        return True\n"
        "    if stat.S_ISCHR(st.st_mode):\n"
        "        return False\n"
        "    if fstype != 'tmpfs' or not stat.S_ISDIR(st.st_mode):\n"
        "        return True\n"
        "    for d, dirs, _ in os.walk(top):\n"
        "        dirs[:] = [x for x in dirs if os.lstat(os.path.join(d, x)).st_dev == st.st_dev]\n"
        "        if os.access(d, os.W_OK):\n"
        "            return True\n"
        "    return False\n"
        "for line in open('/proc/self/mountinfo'):\n"
        "    parts = line.split()\n"
        "    fstype = parts[parts.index('-') + 1]\n"
        "    if 'rw' in parts[5].split(',') and box_writable(parts[4], fstype):\n"
        "        out[parts[4]] = fstype\n"
    )
    fs = ctx.policy.filesystem
    allowed = {fs.workspace, "/tmp", "/dev/shm", *(b.target for b in fs.writable)}
    special = {"proc", "devpts", "devtmpfs", "mqueue"}
    bad = [
        f"{path} ({kind})"
        for path, kind in seen.items()
        if path not in allowed and kind not in special
    ]
    if bad:
        return Outcome("fail", "unexpected writable: " + ", ".join(sorted(bad)))
    return Outcome("pass", "writable: " + ", ".join(sorted(seen)))


@probe(
    "fs.mountinfo_host_paths",
    "the mount table names no host-only path",
    "learning the host's layout (data dir, temp dirs, users' homes) from /proc/*/mountinfo",
    "tmpfs, generated files and image mounts; host paths bound only at their own path",
)
async def _mountinfo(ctx: Context) -> Outcome:
    result = await ctx.box(["/bin/cat", "/proc/self/mountinfo", "/proc/1/mountinfo"])
    if result.exit_code != 0:
        raise ProbeError(f"cat failed: {result.stderr_text.strip()[-200:]}")
    exact = {os.getcwd(), os.path.expanduser("~"), "/var/lib/corral"} - {"/"}
    under = {
        tempfile.gettempdir() + "/",
        "/var/tmp/",
        "/run/corral/mnt/",
        *(p + "/" for p in exact),
    }
    # field 4 is the mount's root within its filesystem, field 5 where it is mounted
    fields = {f for line in result.stdout_text.splitlines() for f in line.split()[3:5]}
    seen = sorted(f for f in fields if f in exact or any(f.startswith(p) for p in under))
    if seen:
        return Outcome("fail", "host paths visible: " + ", ".join(seen))
    return Outcome("pass", f"{len(result.stdout_text.splitlines())} mount lines, none host-only")


@probe(
    "fs.inherited_fds",
    "no file descriptor above 2 is inherited",
    "reaching host files through a leaked descriptor",
    "bwrap closes its setup descriptors",
)
async def _fds(ctx: Context) -> Outcome:
    seen = await ctx.observe("out['fds'] = ','.join(sorted(os.listdir('/proc/self/fd'), key=int))")
    fds = [int(fd) for fd in seen["fds"].split(",")]
    extra = [fd for fd in fds if fd > 3]  # 3: the listing's own descriptor
    return Outcome("fail" if extra else "pass", f"open: {fds}")


@probe(
    "fs.cwd",
    "the working directory is inside the box",
    "a cwd leaking a host directory",
    "bwrap --chdir into the workspace",
)
async def _cwd(ctx: Context) -> Outcome:
    seen = await ctx.observe("out['cwd'] = os.getcwd()")
    ok = seen["cwd"] == ctx.policy.filesystem.workspace
    return Outcome("pass" if ok else "fail", seen["cwd"])


_HARMLESS_DEV = {
    "console",
    "core",
    "fd",
    "full",
    "mqueue",  # the box's own IPC namespace's queues (engines), bounded by RLIMIT_MSGQUEUE
    "null",
    "ptmx",
    "pts",
    "random",
    "shm",
    "stderr",
    "stdin",
    "stdout",
    "tty",
    "urandom",
    "zero",
}


@probe(
    "fs.dev_nodes",
    "/dev holds only harmless nodes",
    "raw disks, kmsg, host ttys",
    "bwrap's minimal /dev",
)
async def _dev(ctx: Context) -> Outcome:
    seen = await ctx.observe("out['dev'] = ' '.join(sorted(os.listdir('/dev')))")
    extra = set(seen["dev"].split()) - _HARMLESS_DEV
    return Outcome("fail" if extra else "pass", ", ".join(sorted(extra)) or seen["dev"])


@probe(
    "fs.symlink_follow",
    "a symlink planted in the workspace does not lead the host out",
    "the host reading or writing outside the workspace for the box",
    "the agent resolves paths inside the box; the host never follows them",
)
async def _symlink(ctx: Context) -> Outcome:
    async with ctx.sandbox() as sb:
        await sb.commands.run("ln -s /etc/passwd link; ln -s / root")
        outcomes = []
        for path in ("link", "root/etc/passwd"):
            try:
                await sb.files.read(path)
                outcomes.append(f"{path}: read")
            except PermissionError:
                outcomes.append(f"{path}: refused")
        try:
            await sb.files.write("root/tmp/probe", b"x")
            outcomes.append("write: accepted")
        except PermissionError:
            outcomes.append("write: refused")
    bad = [o for o in outcomes if not o.endswith("refused")]
    return Outcome("fail" if bad else "pass", ", ".join(outcomes))


@probe(
    "fs.server_walk",
    "corral serve's walks of a workspace never enter a symlink the box plants",
    "a box steering the root server's disk check or cleanup into a host directory",
    "directories opened from their parent's fd with O_DIRECTORY|O_NOFOLLOW, same inode as lstat",
)
async def _server_walk(ctx: Context) -> Outcome:
    try:
        from corral.server._workspace import walk_beneath
    except ImportError:
        return Outcome("skip", "corral serve is not installed here")

    def check() -> Outcome:
        import shutil
        import tempfile
        from pathlib import Path

        top = tempfile.mkdtemp(prefix="corral-audit-walk-")
        try:
            secret, ws = os.path.join(top, "secret"), os.path.join(top, "ws")
            os.makedirs(os.path.join(ws, "d"))
            os.mkdir(secret)
            open(os.path.join(secret, "host-file"), "w").close()
            os.symlink(secret, os.path.join(ws, "planted"))
            seen = []
            for _fd, name, _st in walk_beneath(Path(ws)):
                seen.append(name)
                if name == "d":  # the box's move: a directory it showed becomes a symlink
                    os.rename(os.path.join(ws, "d"), os.path.join(ws, "moved"))
                    os.symlink(secret, os.path.join(ws, "d"))
        finally:
            shutil.rmtree(top)
        if "host-file" in seen:
            return Outcome("fail", "the walk entered the host directory through a symlink")
        return Outcome("pass", "a planted symlink and one swapped in mid-walk were not entered")

    return await asyncio.to_thread(check)
