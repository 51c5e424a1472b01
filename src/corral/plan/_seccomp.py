"""Seccomp planner: the system calls the box may not make, each with the attack it stops.

Threat model. Untrusted code runs as an unprivileged user in its own namespaces,
so the kernel itself is the boundary. The filter shrinks the part of the kernel
that code can reach: interfaces that need privilege the box lacks anyway (a
second lock), interfaces that reach outside the box's namespaces (keyrings, the
terminal, the clock), and code with a long exploit history (bpf, io_uring,
user namespaces). It is a deny list on top of an ``allow`` default: a system
call newer than this list is allowed, which is why the namespaces, not the
filter, carry the isolation.

Denials return an errno (EPERM, or ENOSYS where libc should fall back), never a
kill: programs degrade instead of dying, and tests and probes can observe them.
Calls through another ABI (i386 ``int 0x80``, x32 numbers) also get EPERM: a
filter written for x86_64 numbers would not apply to them.

The kernel truncates ``int`` and ``unsigned int`` arguments to 32 bits while the
filter sees all 64, so an equality test on such an argument compares only the low
32 bits (``masked_eq`` with mask ``0xffffffff``); a plain compare is bypassed by
setting a high bit (CVE-2019-10063). Where a rule needs "not equal" the 64-bit
compare errs on the side of denying.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Literal

from corral._policy import SyscallPolicy

CmpOp = Literal["eq", "ne", "masked_eq", "ge"]

_LOW32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF


@dataclass(frozen=True, slots=True)
class ArgCmp:
    """One test on argument ``index`` (0-5). ``masked_eq``: ``arg & mask == value``."""

    index: int
    op: CmpOp
    value: int
    mask: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.index <= 5:
            raise ValueError(f"argument index {self.index} is not 0-5")
        if not (0 <= self.value <= _U64 and 0 <= self.mask <= _U64):
            raise ValueError("value and mask must fit in 64 unsigned bits")
        if self.op == "masked_eq" and self.value & ~self.mask:
            raise ValueError(f"value {self.value:#x} has bits outside mask {self.mask:#x}")

    def render(self) -> str:
        if self.op == "masked_eq":
            return f"arg{self.index}&{self.mask:#x}=={self.value:#x}"
        symbol = {"eq": "==", "ne": "!=", "ge": ">="}[self.op]
        return f"arg{self.index}{symbol}{self.value:#x}"


@dataclass(frozen=True, slots=True)
class SeccompRule:
    """Fail ``syscall`` with ``errno`` when every test in ``args`` holds (always, if none)."""

    syscall: str
    errno: int
    args: tuple[ArgCmp, ...]
    threat: str


@dataclass(frozen=True, slots=True)
class SeccompPlan:
    """A whole filter: allow by default, fail the ``rules``, EPERM for foreign ABIs."""

    default: Literal["allow"]
    bad_arch_errno: int
    rules: tuple[SeccompRule, ...]


def _low32(index: int, value: int) -> ArgCmp:
    return ArgCmp(index, "masked_eq", value, _LOW32)


def _deny(
    names: tuple[str, ...], threat: str, *args: ArgCmp, err: int = errno.EPERM
) -> tuple[SeccompRule, ...]:
    return tuple(SeccompRule(name, err, args, threat) for name in names)


_MOUNT_CALLS = (
    "mount",
    "umount2",
    "pivot_root",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
)
_CLONE_NEW = (
    ("CLONE_NEWNS", 0x0002_0000),
    ("CLONE_NEWUTS", 0x0400_0000),
    ("CLONE_NEWIPC", 0x0800_0000),
    ("CLONE_NEWUSER", 0x1000_0000),
    ("CLONE_NEWPID", 0x2000_0000),
    ("CLONE_NEWNET", 0x4000_0000),
    ("CLONE_NEWCGROUP", 0x0200_0000),
    # clone() reads bit 7 as part of the exit signal, so this cannot match a
    # valid call today; kept so the rule set does not depend on that detail.
    ("CLONE_NEWTIME", 0x0000_0080),
)
_TIOCSTI, _TIOCLINUX, _TIOCSETD = 0x5412, 0x541C, 0x5423
_PER_QUERY = 0xFFFF_FFFF
_AF_NETLINK, _AF_PACKET, _AF_VSOCK = 16, 17, 40
_SOCK_TYPE_MASK, _SOCK_RAW = 0xF, 3
_LEGACY_FAMILIES = (
    ("AF_AX25", 3),
    ("AF_IPX", 4),
    ("AF_APPLETALK", 5),
    ("AF_NETROM", 6),
    ("AF_BRIDGE", 7),
    ("AF_ATMPVC", 8),
    ("AF_X25", 9),
    ("AF_ROSE", 11),
    ("AF_DECnet", 12),
    ("AF_NETBEUI", 13),
    ("AF_SECURITY", 14),
    ("AF_KEY", 15),
)


def _personality_rules() -> tuple[SeccompRule, ...]:
    # Deny every persona but PER_LINUX (0) and the query (0xffffffff). libseccomp
    # refuses two tests on one argument in a rule (EINVAL), so "!= 0 and !=
    # 0xffffffff" cannot be written. Any other 32-bit value has, somewhere around
    # the ring of its bits, a 1 followed by a 0: one masked test per position
    # (32 rules, the fewest that can do it) denies exactly those values.
    threat = "personality flags turn off exploit mitigations (READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE)"
    return tuple(
        SeccompRule(
            "personality",
            errno.EPERM,
            (ArgCmp(0, "masked_eq", 1 << bit, (1 << bit) | (1 << (bit + 1) % 32)),),
            threat,
        )
        for bit in range(32)
    )


_S_ISUID, _S_ISGID = 0o4000, 0o2000
# (syscall, index of its mode argument)
_MODE_ARG = (
    ("chmod", 1),
    ("fchmod", 1),
    ("fchmodat", 2),
    ("fchmodat2", 2),
    ("creat", 1),
    ("open", 2),
    ("openat", 3),
    ("mknod", 1),
    ("mknodat", 2),
)


def _setid_mode_rules() -> tuple[SeccompRule, ...]:
    """No setuid/setgid bits, ever.

    Nothing in the box gains from them (no_new_privs), but a file left in a
    writable host directory (a workdir) would be a setuid binary of the box's
    host uid — the invoking user's, for an unprivileged corral — for anyone on
    the host to run. openat2 carries its mode in a struct no filter can read,
    so it answers ENOSYS and libc falls back to openat.
    """
    threat = "a setuid/setgid file left in a host workdir runs as the box's host uid"
    rules: list[SeccompRule] = []
    for call, index in _MODE_ARG:
        for bit in (_S_ISUID, _S_ISGID):
            rules += _deny((call,), threat, ArgCmp(index, "masked_eq", bit, bit))
    rules += _deny(("openat2",), threat + " (mode hidden in a struct)", err=errno.ENOSYS)
    return tuple(rules)


_DEFAULT_RULES: tuple[SeccompRule, ...] = (
    *_deny(_MOUNT_CALLS, "mounting could uncover or replace host paths hidden from the box"),
    *_deny(("ptrace",), "tracing another process reads and rewrites its memory and registers"),
    *_deny(
        ("process_vm_readv", "process_vm_writev"),
        "reads or writes another process's memory directly",
    ),
    *_deny(
        ("pidfd_getfd",),
        "copies a descriptor out of another process: bwrap's init (dumpable, same uid) "
        "or any process of the box; pidfd_open stays, it only signals and waits",
    ),
    *_deny(("kexec_load", "kexec_file_load"), "replaces the running kernel"),
    *_deny(("init_module", "finit_module", "delete_module"), "loads or unloads kernel code"),
    *_deny(("bpf",), "eBPF verifier bugs are a common kernel exploit (CVE-2021-3490)"),
    *_deny(
        ("perf_event_open",),
        "perf events leak kernel addresses and were exploited (CVE-2013-2094)",
    ),
    *_deny(("userfaultfd",), "stalls kernel page faults to win races in kernel exploits"),
    *_deny(
        ("keyctl", "add_key", "request_key"),
        "kernel keyrings are not namespaced and have been exploited (CVE-2016-0728)",
    ),
    *_deny(
        ("unshare", "setns"),
        "new or joined namespaces open kernel code meant for root (CVE-2022-0185)",
    ),
    *(
        rule
        for flag, bit in _CLONE_NEW
        for rule in _deny(
            ("clone",),
            f"{flag}: a new namespace through clone, the same surface as unshare",
            ArgCmp(0, "masked_eq", bit, bit),
        )
    ),
    *_deny(
        ("clone3",),
        "clone3 passes its flags in memory the filter cannot read; "
        "ENOSYS makes libc fall back to clone, whose flags are checked",
        err=errno.ENOSYS,
    ),
    *_deny(
        ("io_uring_setup", "io_uring_enter", "io_uring_register"),
        "io_uring does I/O past this filter and has been exploited often (CVE-2022-29582)",
    ),
    *_deny(
        ("open_by_handle_at", "name_to_handle_at"),
        "file handles open files outside the box's mounts (the 'shocker' escape)",
    ),
    *_deny(("swapon", "swapoff"), "changes the host's swap"),
    *_deny(("reboot",), "reboots or halts the host"),
    *_deny(("syslog",), "reads the kernel log, which leaks kernel addresses"),
    *_deny(("acct",), "process accounting writes to a host file"),
    *_deny(
        ("settimeofday", "clock_settime", "clock_adjtime", "adjtimex"),
        "sets the host's clock, which is not namespaced",
    ),
    *_deny(("sethostname", "setdomainname"), "renames the host if the UTS namespace is shared"),
    *_deny(
        ("ioctl",),
        "TIOCSTI types into the host terminal (CVE-2017-5226); "
        "low 32 bits only, or high bits bypass it (CVE-2019-10063)",
        _low32(1, _TIOCSTI),
    ),
    *_deny(
        ("ioctl",),
        "TIOCLINUX pastes into and reads the host console, like TIOCSTI (CVE-2023-1523)",
        _low32(1, _TIOCLINUX),
    ),
    *_personality_rules(),
    *_deny(
        ("socket",),
        "AF_PACKET sniffs and forges frames and has been exploited (CVE-2017-7308)",
        _low32(0, _AF_PACKET),
    ),
    *_deny(
        ("socket",),
        "AF_VSOCK talks to the hypervisor or host past the network namespace",
        _low32(0, _AF_VSOCK),
    ),
    *_deny(
        ("socket",),
        "netlink families other than NETLINK_ROUTE (which libc's getaddrinfo needs) "
        "reach audit, netfilter and other privileged kernel interfaces",
        _low32(0, _AF_NETLINK),
        ArgCmp(2, "ne", 0),
    ),
    *_deny(
        ("socket",),
        "SOCK_RAW outside netlink forges IP packets (type masked: SOCK_CLOEXEC is or'ed in)",
        ArgCmp(0, "ne", _AF_NETLINK),
        ArgCmp(1, "masked_eq", _SOCK_RAW, _SOCK_TYPE_MASK),
    ),
    *_setid_mode_rules(),
)

_STRICT_FAMILIES = "rarely used protocol code, a steady source of kernel CVEs"


def _family_rules(call: str) -> tuple[SeccompRule, ...]:
    # Only AF_UNIX (1), AF_INET (2), AF_INET6 (10) and AF_NETLINK (16) remain.
    newer = f"families >= 17 (TIPC, RDS, CAN, ALG...): {_STRICT_FAMILIES} (CVE-2021-43267)"
    rules = _deny((call,), newer, ArgCmp(0, "ge", 17))
    for name, family in _LEGACY_FAMILIES:
        rules += _deny((call,), f"{name}: {_STRICT_FAMILIES}", _low32(0, family))
    return rules


_STRICT_RULES: tuple[SeccompRule, ...] = (
    *_deny(("chroot",), "a process holding a directory outside a chroot escapes it"),
    *_deny(("quotactl", "quotactl_fd"), "administers quotas on filesystems shared with the host"),
    *_deny(("lookup_dcookie",), "oprofile cookies identify kernel dentries"),
    *_deny(("fanotify_init",), "watches file access across whole mounts"),
    *_deny(("kcmp",), "compares kernel objects of two processes, an exploit aid"),
    *_deny(("process_madvise",), "acts on another process's memory"),
    *_deny(
        ("mbind", "migrate_pages", "move_pages"),
        "NUMA page placement, rarely needed, with a history of bugs (CVE-2010-0415)",
    ),
    *_deny(("vhangup",), "hangs up the terminal under other sessions on it"),
    *_deny(("uselib",), "legacy a.out library loader with a history of bugs (CVE-2004-1235)"),
    *_deny(("ustat", "sysfs", "_sysctl", "nfsservctl"), "obsolete interfaces: surface only"),
    *_deny(("vm86", "vm86old"), "virtual-8086 mode, a history of kernel bugs"),
    *_deny(("iopl", "ioperm"), "direct access to hardware I/O ports"),
    *_deny(("modify_ldt",), "LDT changes have given kernel exploits (CVE-2015-5157)"),
    *_deny(("mincore",), "page-cache side channel on other processes' file reads (CVE-2019-5489)"),
    *_deny(
        ("ioctl",),
        "TIOCSETD: terminal line disciplines have exploitable races (CVE-2017-2636)",
        _low32(1, _TIOCSETD),
    ),
    *_family_rules("socket"),
    *_family_rules("socketpair"),
)

_PLANS = {
    "default": SeccompPlan("allow", errno.EPERM, _DEFAULT_RULES),
    "strict": SeccompPlan("allow", errno.EPERM, _DEFAULT_RULES + _STRICT_RULES),
}


def plan_seccomp(section: SyscallPolicy) -> SeccompPlan:
    """The filter for ``section.profile``; ``strict`` is ``default`` plus more."""
    return _PLANS[section.profile]


def render(plan: SeccompPlan) -> str:
    """A stable text form, one rule a line, for golden tests and ``corral doctor``."""
    lines = [
        f"default={plan.default} bad_arch={errno.errorcode[plan.bad_arch_errno]}",
    ]
    for rule in plan.rules:
        tests = "".join(f" {arg.render()}" for arg in rule.args)
        lines.append(f"{rule.syscall} {errno.errorcode[rule.errno]}{tests}  # {rule.threat}")
    return "\n".join(lines) + "\n"
