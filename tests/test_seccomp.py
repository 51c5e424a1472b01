"""The seccomp planner against golden files, and the compiled filter in a real kernel.

Kernel tests install the real BPF in a child process (tests/_seccomp_child.py)
and make the denied calls; a control child without the filter makes the same
calls and must get a different answer, so each test can fail.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from corral._errors import SandboxError
from corral._policy import SyscallPolicy
from corral.backends.linux._seccomp import compile_bpf, libseccomp_version, skipped_rules
from corral.plan._seccomp import ArgCmp, SeccompPlan, SeccompRule, plan_seccomp, render

Golden = Callable[[str, str], None]
CHILD = Path(__file__).with_name("_seccomp_child.py")
DEFAULT = plan_seccomp(SyscallPolicy("default"))
STRICT = plan_seccomp(SyscallPolicy("strict"))

# probe -> errno the filter answers; the probes are in _seccomp_child.py
DENIED_BY_DEFAULT = {
    "mount": errno.EPERM,
    "ptrace": errno.EPERM,
    "unshare_user": errno.EPERM,
    "clone_newns": errno.EPERM,
    "clone_newuser_high": errno.EPERM,
    "keyctl": errno.EPERM,
    "bpf": errno.EPERM,
    "io_uring_setup": errno.EPERM,
    "perf_event_open": errno.EPERM,
    "userfaultfd": errno.EPERM,
    "tiocsti": errno.EPERM,
    "tiocsti_high": errno.EPERM,
    "tioclinux": errno.EPERM,
    "af_packet": errno.EPERM,
    "af_packet_high": errno.EPERM,
    "af_vsock": errno.EPERM,
    "netlink_audit": errno.EPERM,
    "raw_inet": errno.EPERM,
    "personality_rie": errno.EPERM,
    "personality_rie_high": errno.EPERM,
    "clone3": errno.ENOSYS,
    "i386_getpid": errno.EPERM,
    "x32_getpid": errno.EPERM,
}
DENIED_BY_STRICT_ONLY = {
    "chroot": errno.EPERM,
    "modify_ldt": errno.EPERM,
    "mincore": errno.EPERM,
    "af_alg": errno.EPERM,
}
STILL_WORKING = [
    "netlink_route",
    "af_unix",
    "udp6",
    "personality_query",
    "personality_linux",
    "getpid",
    "files",
    "fork_exec",
    "threads",
    "getaddrinfo",
]
# Without the filter, only root gets past the kernel's own EPERM on these.
KERNEL_EPERM_UNLESS_ROOT = {"af_packet", "af_packet_high", "raw_inet", "netlink_audit"}

on_x86_64 = pytest.mark.skipif(
    platform.machine() != "x86_64", reason="the probes are x86_64 machine code and numbers"
)


def run_child(bpf: bytes) -> dict[str, int]:
    """Probe results in a child that installed ``bpf`` (none if empty)."""
    proc = subprocess.run(
        [sys.executable, str(CHILD)], input=bpf, capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode()
    results: dict[str, int] = json.loads(proc.stdout)
    return results


@pytest.fixture(scope="module")
def control() -> dict[str, int]:
    return run_child(b"")


@pytest.fixture(scope="module")
def default() -> dict[str, int]:
    return run_child(compile_bpf(DEFAULT))


@pytest.fixture(scope="module")
def strict() -> dict[str, int]:
    return run_child(compile_bpf(STRICT))


def matches(rule: SeccompRule, args: tuple[int, ...]) -> bool:
    """What the kernel does with a rule, in Python (for the planner's own tests)."""
    for cmp in rule.args:
        arg = args[cmp.index]
        if cmp.op == "masked_eq":
            ok = arg & cmp.mask == cmp.value
        else:
            ok = {"eq": arg == cmp.value, "ne": arg != cmp.value, "ge": arg >= cmp.value}[cmp.op]
        if not ok:
            return False
    return True


# -- the planner ------------------------------------------------------------------


@pytest.mark.parametrize(("profile", "plan"), [("default", DEFAULT), ("strict", STRICT)])
def test_golden(profile: str, plan: SeccompPlan, golden: Golden) -> None:
    golden(f"seccomp_{profile}.txt", render(plan))


def test_every_rule_names_its_threat_and_strict_extends_default() -> None:
    assert all(rule.threat and rule.errno in errno.errorcode for rule in STRICT.rules)
    assert STRICT.rules[: len(DEFAULT.rules)] == DEFAULT.rules
    assert (DEFAULT.default, DEFAULT.bad_arch_errno) == ("allow", errno.EPERM)


@pytest.mark.parametrize(
    "persona",
    [1, 8, 0x0400000, 0x0040000, 0x8000_0000, 0x7FFF_FFFF, 0xFFFF_FFFE, 0x1_0040_0000]
    + [(1 << bit) ^ 0xFFFF_FFFF for bit in range(32)],
)
def test_personality_rules_deny_every_persona_but_linux_and_query(persona: int) -> None:
    rules = [r for r in DEFAULT.rules if r.syscall == "personality"]
    assert any(matches(rule, (persona,)) for rule in rules)
    for allowed in (0, 0xFFFF_FFFF, 1 << 32, 0xFFFF_FFFF | 1 << 40):  # kernel reads 32 bits
        assert not any(matches(rule, (allowed,)) for rule in rules)


def test_arg_cmp_rejects_a_value_outside_its_mask() -> None:
    with pytest.raises(ValueError, match="outside mask"):
        ArgCmp(1, "masked_eq", 0x1_0000_5412, 0xFFFF_FFFF)


# -- the compiler -------------------------------------------------------------------


def test_compile_bpf_is_a_cached_sock_filter_array() -> None:
    bpf = compile_bpf(DEFAULT)
    assert len(bpf) % 8 == 0
    assert bpf
    assert compile_bpf(plan_seccomp(SyscallPolicy("default"))) is bpf
    version = libseccomp_version()
    assert version is not None
    assert version.count(".") == 2


def test_unknown_syscalls_are_skipped_with_a_reason() -> None:
    assert skipped_rules(DEFAULT) == ()
    plan = SeccompPlan(
        "allow",
        errno.EPERM,
        (
            SeccompRule("no_such_syscall", errno.EPERM, (), "test"),
            SeccompRule("vm86", errno.EPERM, (), "i386 only"),
        ),
    )
    reasons = dict(skipped_rules(plan))
    assert "unknown to libseccomp" in reasons["no_such_syscall"]
    if platform.machine() == "x86_64":
        assert reasons["vm86"] == "not a system call on this architecture"


def test_libseccomp_failure_names_the_syscall() -> None:
    # libseccomp refuses two tests on one argument in a rule (why personality is 32 rules).
    same_arg = (ArgCmp(0, "ne", 0), ArgCmp(0, "ne", 0xFFFF_FFFF))
    plan = SeccompPlan("allow", errno.EPERM, (SeccompRule("personality", 1, same_arg, "t"),))
    with pytest.raises(SandboxError, match="personality"):
        compile_bpf(plan)


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bwrap to hide the library")
def test_a_missing_libseccomp_is_reported_not_crashed() -> None:
    # A child whose libseccomp.so.2 is /dev/null, as on a host without the package.
    assert libseccomp_version() is not None  # loaded here: find the file in our own maps
    maps = Path("/proc/self/maps").read_text().split()
    library = next(word for word in maps if "/libseccomp.so" in word)
    code = (
        "from corral import _errors\n"
        "from corral.backends.linux import _seccomp\n"
        "from corral.plan._seccomp import SeccompPlan\n"
        "assert _seccomp.libseccomp_version() is None\n"
        "try:\n"
        "    _seccomp.compile_bpf(SeccompPlan('allow', 1, ()))\n"
        "except _errors.HostToolMissing as exc:\n"
        "    print(exc)\n"
    )
    hide = ["--ro-bind", "/", "/", "--ro-bind", "/dev/null", library, "--dev", "/dev"]
    proc = subprocess.run(
        ["bwrap", *hide, "--", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "apt-get install libseccomp2" in proc.stdout


# -- the kernel ---------------------------------------------------------------------


@on_x86_64
@pytest.mark.parametrize(("probe", "err"), DENIED_BY_DEFAULT.items())
def test_default_denies(
    probe: str, err: int, default: dict[str, int], strict: dict[str, int], control: dict[str, int]
) -> None:
    assert default[probe] == err, errno.errorcode.get(default[probe])
    assert strict[probe] == err
    if os.geteuid() == 0 or probe not in KERNEL_EPERM_UNLESS_ROOT:
        assert control[probe] != err


@on_x86_64
@pytest.mark.parametrize(("probe", "err"), DENIED_BY_STRICT_ONLY.items())
def test_strict_denies_more(
    probe: str, err: int, default: dict[str, int], strict: dict[str, int]
) -> None:
    assert strict[probe] == err
    assert default[probe] != err


@on_x86_64
@pytest.mark.parametrize("probe", STILL_WORKING)
def test_ordinary_work_still_succeeds(
    probe: str, default: dict[str, int], strict: dict[str, int], control: dict[str, int]
) -> None:
    assert (control[probe], default[probe], strict[probe]) == (0, 0, 0)


@on_x86_64
def test_foreign_abis_hit_the_bad_arch_errno(
    default: dict[str, int], control: dict[str, int]
) -> None:
    # Unfiltered, int 0x80 getpid returns a pid and x32 getpid is answered by the
    # kernel (ENOSYS where x32 is compiled out); filtered, both are refused.
    assert control["i386_getpid"] == 0
    assert control["x32_getpid"] in (0, errno.ENOSYS)
    assert (default["i386_getpid"], default["x32_getpid"]) == (errno.EPERM, errno.EPERM)


@on_x86_64
def test_a_plain_64_bit_compare_would_be_bypassed() -> None:
    # Why the ioctl rules mask the low 32 bits: CVE-2019-10063.
    tiocsti = ArgCmp(1, "eq", 0x5412)
    plan = SeccompPlan("allow", errno.EPERM, (SeccompRule("ioctl", 1, (tiocsti,), "t"),))
    results = run_child(compile_bpf(plan))
    assert results["tiocsti"] == errno.EPERM
    assert results["tiocsti_high"] == errno.ENOTTY  # reached the kernel: stdin is a pipe
