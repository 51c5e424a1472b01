"""Compile a SeccompPlan to a classic-BPF program with libseccomp, through ctypes.

The output is the raw ``struct sock_filter`` array ``seccomp_export_bpf`` writes,
which is what ``bwrap --seccomp FD`` reads and installs just before it executes
the box's command. libseccomp adds the architecture check: only native x86_64
calls reach the rules; i386 (``int 0x80``) and x32 (numbers with bit 30 set)
calls get the plan's "bad arch" errno, because rules written against x86_64
numbers would mean something else there.

A rule whose system call this host's libseccomp cannot name is skipped and
reported by :func:`skipped_rules`, never a crash: such a call either does not
exist on this architecture, or is newer than libseccomp and so not filtered
(the default-allow deny list has that limit anyway; see the planner).
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass

from corral._errors import HostToolMissing, SandboxError
from corral.plan._seccomp import SeccompPlan

_SONAME = "libseccomp.so.2"
_SCMP_ACT_ALLOW = 0x7FFF_0000
_SCMP_FLTATR_ACT_BADARCH = 2
_SCMP_FLTATR_CTL_OPTIMIZE = 8  # libseccomp >= 2.5: 2 = binary tree of syscall numbers
_NR_SCMP_ERROR = -1
_SCMP_CMP = {"ne": 1, "eq": 4, "ge": 5, "masked_eq": 7}


def _act_errno(code: int) -> int:
    return 0x0005_0000 | (code & 0xFFFF)


class _ScmpArgCmp(ctypes.Structure):
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


class _ScmpVersion(ctypes.Structure):
    _fields_ = (("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint))


@functools.cache
def _lib() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(_SONAME)
    except OSError as exc:
        raise HostToolMissing("libseccomp", "install it with: apt-get install libseccomp2") from exc
    ctx, c_int, c_uint32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32
    lib.seccomp_init.restype, lib.seccomp_init.argtypes = ctx, [c_uint32]
    lib.seccomp_release.restype, lib.seccomp_release.argtypes = None, [ctx]
    lib.seccomp_attr_set.restype, lib.seccomp_attr_set.argtypes = c_int, [ctx, c_int, c_uint32]
    resolve = lib.seccomp_syscall_resolve_name
    resolve.restype, resolve.argtypes = c_int, [ctypes.c_char_p]
    add = lib.seccomp_rule_add_array
    add.restype = c_int
    add.argtypes = [ctx, c_uint32, c_int, ctypes.c_uint, ctypes.POINTER(_ScmpArgCmp)]
    lib.seccomp_export_bpf.restype, lib.seccomp_export_bpf.argtypes = c_int, [ctx, c_int]
    lib.seccomp_version.restype = ctypes.POINTER(_ScmpVersion)
    lib.seccomp_version.argtypes = []
    return lib


def libseccomp_version() -> str | None:
    """``"2.5.4"``, or ``None`` when libseccomp is not installed (for ``corral doctor``)."""
    try:
        version = _lib().seccomp_version().contents
    except HostToolMissing:
        return None
    return f"{version.major}.{version.minor}.{version.micro}"


@dataclass(frozen=True, slots=True)
class _Compiled:
    bpf: bytes
    skipped: tuple[tuple[str, str], ...]


def compile_bpf(plan: SeccompPlan) -> bytes:
    """The plan as a ``struct sock_filter`` array for ``bwrap --seccomp FD``. Cached."""
    return _compile(plan).bpf


def skipped_rules(plan: SeccompPlan) -> tuple[tuple[str, str], ...]:
    """``(syscall, reason)`` for each rule this host's libseccomp could not express."""
    return _compile(plan).skipped


def _check(rc: int, call: str, syscall: str = "") -> None:
    if rc < 0:
        about = f" (rule for {syscall})" if syscall else ""
        raise SandboxError(f"libseccomp {call} failed{about}: {os.strerror(-rc)}")


@functools.lru_cache(maxsize=8)
def _compile(plan: SeccompPlan) -> _Compiled:
    lib = _lib()
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if not ctx:
        raise SandboxError("libseccomp seccomp_init failed: out of memory")
    skipped: list[tuple[str, str]] = []
    try:
        # No seccomp_arch_add: native only, so i386 and x32 calls hit this action.
        rc = lib.seccomp_attr_set(ctx, _SCMP_FLTATR_ACT_BADARCH, _act_errno(plan.bad_arch_errno))
        _check(rc, "seccomp_attr_set(SCMP_FLTATR_ACT_BADARCH)")
        # A binary tree instead of a linear list: a syscall the kernel's cache
        # cannot settle (ioctl, socket, clone: rules on arguments) walks
        # log2(rules) tests, not all of them. Older libseccomp: linear, still correct.
        lib.seccomp_attr_set(ctx, _SCMP_FLTATR_CTL_OPTIMIZE, 2)
        for rule in plan.rules:
            nr = lib.seccomp_syscall_resolve_name(rule.syscall.encode())
            if nr == _NR_SCMP_ERROR:
                version = libseccomp_version()
                skipped.append((rule.syscall, f"unknown to libseccomp {version}: NOT filtered"))
                continue
            if nr < 0:
                skipped.append((rule.syscall, "not a system call on this architecture"))
                continue
            args = (_ScmpArgCmp * max(len(rule.args), 1))()
            for slot, arg in zip(args, rule.args, strict=False):
                slot.arg, slot.op = arg.index, _SCMP_CMP[arg.op]
                # masked_eq: datum_a is the mask, datum_b the value.
                slot.datum_a, slot.datum_b = (
                    (arg.mask, arg.value) if arg.op == "masked_eq" else (arg.value, 0)
                )
            rc = lib.seccomp_rule_add_array(ctx, _act_errno(rule.errno), nr, len(rule.args), args)
            _check(rc, "seccomp_rule_add_array", rule.syscall)
        fd = os.memfd_create("corral-seccomp", os.MFD_CLOEXEC)
        try:
            _check(lib.seccomp_export_bpf(ctx, fd), "seccomp_export_bpf")
            size = os.fstat(fd).st_size
            bpf = os.pread(fd, size, 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)
    if len(bpf) != size or size % 8 or not size:
        raise SandboxError(f"libseccomp exported {size} bytes, not a sock_filter array")
    return _Compiled(bpf, tuple(skipped))
