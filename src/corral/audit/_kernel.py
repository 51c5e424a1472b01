"""Kernel-surface probes (``kernel.*``): capabilities, no_new_privs, seccomp, syscalls."""

from __future__ import annotations

from corral.audit._probe import (
    Context,
    Outcome,
    denied,
    probe,
)


@probe(
    "kernel.capabilities",
    "CapEff, CapBnd and CapAmb are zero",
    "kernel code reachable only with capabilities",
    "bwrap --cap-drop ALL",
)
async def _caps(ctx: Context) -> Outcome:
    status = await _status(ctx)
    bad = [k for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb") if int(status[k], 16)]
    return Outcome(
        "fail" if bad else "pass",
        ", ".join(f"{k}={status[k]}" for k in ("CapEff", "CapBnd", "CapAmb")),
    )


@probe(
    "kernel.no_new_privs",
    "NoNewPrivs is 1",
    "gaining privileges through setuid files",
    "PR_SET_NO_NEW_PRIVS (bwrap)",
)
async def _nnp(ctx: Context) -> Outcome:
    status = await _status(ctx)
    return Outcome(
        "pass" if status.get("NoNewPrivs") == "1" else "fail",
        f"NoNewPrivs: {status.get('NoNewPrivs')}",
    )


@probe(
    "kernel.seccomp",
    "a seccomp filter is installed (Seccomp: 2)",
    "the whole syscall surface of the kernel",
    "the seccomp profile of the policy",
)
async def _seccomp(ctx: Context) -> Outcome:
    status = await _status(ctx)
    return Outcome(
        "pass" if status.get("Seccomp") == "2" else "fail",
        f"Seccomp: {status.get('Seccomp')}, profile {ctx.policy.syscalls.profile}",
    )


async def _status(ctx: Context) -> dict[str, str]:
    seen = await ctx.observe(
        "for line in open('/proc/self/status'):\n"
        "    k, _, v = line.partition(':')\n"
        "    out[k] = v.strip()"
    )
    return seen


# x86_64 system call numbers
denied(
    "kernel.mount",
    "mount fails",
    "mounting filesystems to reach host data or kernel bugs",
    "seccomp; no CAP_SYS_ADMIN",
    "attempt('tmpfs', sys_call(165, b'none', b'/tmp', b'tmpfs', 0, None))\n"
    "attempt('open_tree', sys_call(428, -100, b'/', 0))\n"
    "attempt('fsopen', sys_call(430, b'tmpfs', 0))",
)
denied(
    "kernel.ptrace",
    "ptrace fails",
    "reading or steering other processes",
    "seccomp denies ptrace and process_vm_*",
    "attempt('attach', sys_call(101, 16, 1, 0, 0))\n"
    "attempt('traceme', sys_call(101, 0, 0, 0, 0))\n"
    "attempt('vm_readv', sys_call(310, 1, 0, 0, 0, 0, 0))",
)
denied(
    "kernel.bpf",
    "bpf fails",
    "eBPF verifier and JIT bugs",
    "seccomp",
    "attempt('bpf', sys_call(321, 0, 0, 0))",
)
denied(
    "kernel.perf_event_open",
    "perf_event_open fails",
    "perf side channels and bugs",
    "seccomp",
    "attempt('perf', sys_call(298, 0, 0, -1, -1, 0))",
)
denied(
    "kernel.userfaultfd",
    "userfaultfd fails",
    "stalling the kernel to win races",
    "seccomp",
    "attempt('uffd', sys_call(323, 0))",
)
denied(
    "kernel.keyctl",
    "keyrings are unreachable",
    "reading or planting keys, keyring bugs",
    "seccomp denies keyctl, add_key, request_key",
    "attempt('keyctl', sys_call(250, 0, 0, 0, 0, 0))\n"
    "attempt('add_key', sys_call(248, b'user', b'x', b'y', 1, -2))\n"
    "attempt('request_key', sys_call(249, b'user', b'x', None, 0))",
)
denied(
    "kernel.kexec",
    "kexec fails",
    "replacing the running kernel",
    "seccomp",
    "attempt('kexec_load', sys_call(246, 0, 0, 0, 0))\n"
    "attempt('kexec_file_load', sys_call(320, -1, -1, 0, None, 0))",
)
denied(
    "kernel.modules",
    "module loading fails",
    "loading kernel code",
    "seccomp",
    "attempt('init_module', sys_call(175, 0, 0, 0))\n"
    "attempt('finit_module', sys_call(313, 0, 0, 0))\n"
    "attempt('delete_module', sys_call(176, b'x', 0))",
)
denied(
    "kernel.io_uring",
    "io_uring fails",
    "io_uring's long record of kernel bugs, and its way around seccomp",
    "seccomp",
    "attempt('setup', sys_call(425, 8, 0))\nattempt('enter', sys_call(426, 0, 0, 0, 0, 0, 0))",
)
denied(
    "kernel.open_by_handle_at",
    "open_by_handle_at fails",
    "opening host files by handle (the 'shocker' escape)",
    "seccomp",
    "attempt('open_by_handle_at', sys_call(304, -100, 0, 0))\n"
    "attempt('name_to_handle_at', sys_call(303, -100, b'/', 0, 0, 0))",
)
denied(
    "kernel.namespaces",
    "new namespaces cannot be made",
    "regaining capabilities in a nested namespace",
    "seccomp; --disable-userns",
    "attempt('unshare_user', sys_call(272, 0x10000000))\n"
    "attempt('unshare_net', sys_call(272, 0x40000000))\n"
    "attempt('unshare_mount', sys_call(272, 0x00020000))\n"
    "attempt('clone_newuser', sys_call(56, 0x10000000 | 17, 0, 0, 0, 0))",
    expect=("EPERM", "EINVAL"),
)
denied(
    "kernel.setns",
    "setns fails",
    "joining another namespace",
    "seccomp",
    "fd = os.open('/proc/self/ns/net', os.O_RDONLY)\nattempt('setns', sys_call(308, fd, 0))",
)
denied(
    "kernel.clock_hostname",
    "the clock and the host name cannot be changed",
    "disturbing the host's time; renaming it",
    "seccomp; uts namespace",
    "attempt('settimeofday', sys_call(164, 0, 0))\n"
    "attempt('clock_settime', sys_call(227, 0, b'\\0' * 16))\n"
    "attempt('adjtimex', sys_call(159, b'\\0' * 512))\n"
    "attempt('sethostname', sys_call(170, b'evil', 4))",
)
denied(
    "kernel.tiocsti",
    "TIOCSTI fails on every standard descriptor, high bits or not",
    "typing commands into the caller's terminal (CVE-2017-5226)",
    "seccomp, low-32-bit masked compare (CVE-2019-10063); --new-session",
    "for fd in (0, 1, 2):\n"
    "    attempt(f'fd{fd}', sys_call(16, fd, 0x5412, b'x'))\n"
    "    attempt(f'fd{fd}_high', sys_call(16, fd, 0x100005412, b'x'))",
)
denied(
    "kernel.tioclinux",
    "TIOCLINUX fails",
    "reading and pasting the host console",
    "seccomp, masked compare",
    "attempt('tioclinux', sys_call(16, 0, 0x541C, b'\\x02'))\n"
    "attempt('tioclinux_high', sys_call(16, 0, 0x10000541C, b'\\x02'))",
)
denied(
    "kernel.i386_abi",
    "the i386 system call ABI (int 0x80) is blocked",
    "bypassing a 64-bit-only filter through the 32-bit entry",
    "seccomp bad-arch action (EPERM; under runc, a SIGSYS kill)",
    "fn, keep = machine_code(bytes([0xb8, 20, 0, 0, 0, 0xcd, 0x80, 0xc3]))\n"
    "out['int80_getpid'] = in_child(fn)",
    expect=("EPERM", "SIGSYS"),
)
denied(
    "kernel.x32_abi",
    "the x32 system call ABI is blocked",
    "bypassing the filter with x32 system call numbers",
    "seccomp bad-arch action (EPERM; under runc, a SIGSYS kill)",
    "fn, keep = machine_code(bytes([0xb8, 0x27, 0, 0, 0x40, 0x0f, 0x05, 0xc3]))\n"
    "out['x32_getpid'] = in_child(fn)",
    expect=("EPERM", "SIGSYS"),
)
denied(
    "kernel.host_knobs",
    "core_pattern, sysrq, uevent_helper, binfmt_misc, release_agent cannot be written",
    "classic container escapes through kernel knobs",
    "read-only /proc/sys; no /sys; no cgroupfs",
    "\n".join(
        f"attempt({p!r}, lambda: open({p!r}, 'w').write('x'))"
        for p in (
            "/proc/sys/kernel/core_pattern",
            "/proc/sysrq-trigger",
            "/sys/kernel/uevent_helper",
            "/proc/sys/fs/binfmt_misc/register",
            "/sys/fs/cgroup/release_agent",
        )
    ),
    expect=("EACCES", "EROFS", "ENOENT", "EPERM"),
)
