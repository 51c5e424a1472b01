"""Probe a seccomp filter from inside a real process (x86_64 only); run by test_seccomp.py.

Reads a BPF program (``struct sock_filter`` array) on stdin, installs it with
``prctl(PR_SET_SECCOMP)`` unless stdin is empty (the control run), then runs
every probe in its own forked process and prints ``{probe: code}`` as JSON:
0 success, > 0 the errno, < 0 killed by that signal.

Each denied call is made with arguments the kernel would reject in some other
way (EFAULT, EINVAL, ESRCH...), so a probe is harmless and tells the filter's
answer apart from the kernel's even when the filter is missing.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

HIGH = 1 << 32  # set above the 32 bits the kernel reads: must not slip past the filter
CLONE_FS, CLONE_NEWNS, CLONE_NEWUSER = 0x200, 0x20000, 0x10000000  # NEW* | FS: EINVAL
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK, AF_PACKET, AF_ALG, AF_VSOCK = 1, 2, 10, 16, 17, 38, 40
SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, SOCK_SEQPACKET = 1, 2, 3, 5
SOCK_NONBLOCK, SOCK_CLOEXEC = 0o4000, 0o2000000
NETLINK_ROUTE, NETLINK_AUDIT = 0, 9
READ_IMPLIES_EXEC = 0x0400000


def sys_(nr: int, *args: int) -> int:
    """A raw system call: 0 on success, else the errno."""
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    return ctypes.get_errno() if result == -1 else 0


def machine_code(code: bytes, restype: type[ctypes.c_int] | type[ctypes.c_long]) -> int:
    """Run x86-64 code from an RWX page: 0 if it returned >= 0, else the negated result."""
    prot = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=prot)
    page.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    result: int = ctypes.CFUNCTYPE(restype)(address)()
    return -result if result < 0 else 0


def tiocsti(cmd: int) -> int:
    char = ctypes.c_char(b"x")
    return sys_(16, 0, cmd, ctypes.addressof(char))


def files() -> int:
    with open(__file__, "rb") as f:
        return 0 if f.read(3) == b'"""' else 1


def fork_exec() -> int:
    return subprocess.run(["/bin/true"], check=False).returncode


def threads() -> int:
    ran: list[bool] = []
    worker = threading.Thread(target=lambda: ran.append(True))
    worker.start()
    worker.join()
    return 0 if ran else 1


def getaddrinfo() -> int:
    # AI_ADDRCONFIG makes glibc ask the kernel for addresses over NETLINK_ROUTE.
    return 0 if socket.getaddrinfo("127.0.0.1", 80, flags=socket.AI_ADDRCONFIG) else 1


PROBES: dict[str, Callable[[], int]] = {
    # x86_64 numbers: mount 165, ptrace 101, unshare 272, clone 56, keyctl 250,
    # bpf 321, io_uring_setup 425, perf_event_open 298, userfaultfd 323,
    # socket 41, personality 135, clone3 435, chroot 161, modify_ldt 154, mincore 27.
    "mount": lambda: sys_(165, 0, 0, 0, 0, 0),
    "ptrace": lambda: sys_(101, 16, 1 << 30, 0, 0),  # PTRACE_ATTACH to no such pid
    "unshare_user": lambda: sys_(272, CLONE_NEWUSER),
    "clone_newns": lambda: sys_(56, CLONE_NEWNS | CLONE_FS, 0, 0, 0, 0),
    "clone_newuser_high": lambda: sys_(56, HIGH | CLONE_NEWUSER | CLONE_FS, 0, 0, 0, 0),
    "keyctl": lambda: sys_(250, 0xDEAD),
    "bpf": lambda: sys_(321, 0xDEAD, 0, 0),
    "io_uring_setup": lambda: sys_(425, 0, 0),
    "perf_event_open": lambda: sys_(298, 0, 0, -1, -1, 0),
    "userfaultfd": lambda: sys_(323, 0xDEAD),
    "tiocsti": lambda: tiocsti(TIOCSTI),
    "tiocsti_high": lambda: tiocsti(HIGH | TIOCSTI),
    "tioclinux": lambda: tiocsti(TIOCLINUX),
    "af_packet": lambda: sys_(41, AF_PACKET, SOCK_RAW, 0),
    "af_packet_high": lambda: sys_(41, HIGH | AF_PACKET, SOCK_RAW, 0),
    "af_vsock": lambda: sys_(41, AF_VSOCK, SOCK_STREAM, 0),
    "netlink_audit": lambda: sys_(41, AF_NETLINK, SOCK_RAW, NETLINK_AUDIT),
    "raw_inet": lambda: sys_(41, AF_INET, SOCK_RAW | SOCK_NONBLOCK, 1),
    "personality_rie": lambda: sys_(135, READ_IMPLIES_EXEC),
    "personality_rie_high": lambda: sys_(135, HIGH | READ_IMPLIES_EXEC),
    "clone3": lambda: sys_(435, 0, 0),
    # mov eax, 20 (i386 getpid); int 0x80; ret
    "i386_getpid": lambda: machine_code(b"\xb8\x14\x00\x00\x00\xcd\x80\xc3", ctypes.c_int),
    # mov eax, 0x40000000 | 39 (x32 getpid); syscall; ret
    "x32_getpid": lambda: machine_code(b"\xb8\x27\x00\x00\x40\x0f\x05\xc3", ctypes.c_long),
    # strict only
    "chroot": lambda: sys_(161, 0),
    "modify_ldt": lambda: sys_(154, 0, 0, 0),
    "mincore": lambda: sys_(27, 1, 4096, 0),
    "af_alg": lambda: sys_(41, AF_ALG, SOCK_SEQPACKET, 0),
    # must keep working
    "netlink_route": lambda: sys_(41, AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE),
    "af_unix": lambda: sys_(41, AF_UNIX, SOCK_STREAM, 0),
    "udp6": lambda: sys_(41, AF_INET6, SOCK_DGRAM, 0),
    "personality_query": lambda: sys_(135, 0xFFFFFFFF),
    "personality_linux": lambda: sys_(135, 0),
    "getpid": lambda: machine_code(b"\xb8\x27\x00\x00\x00\x0f\x05\xc3", ctypes.c_long),
    "files": files,
    "fork_exec": fork_exec,
    "threads": threads,
    "getaddrinfo": getaddrinfo,
}


class SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def install(bpf: bytes) -> None:
    program = ctypes.create_string_buffer(bpf, len(bpf))
    fprog = SockFprog(len(bpf) // 8, ctypes.addressof(program))
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    one, zero = ctypes.c_ulong(1), ctypes.c_ulong(0)
    if libc.prctl(pr_set_no_new_privs, one, zero, zero, zero) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    mode = ctypes.c_ulong(seccomp_mode_filter)
    if libc.prctl(pr_set_seccomp, mode, ctypes.byref(fprog), zero, zero) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


def run_isolated(probe: Callable[[], int]) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            code = probe()
        except BaseException:
            code = 255
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def main() -> None:
    bpf = sys.stdin.buffer.read()
    if bpf:
        install(bpf)
    print(json.dumps({name: run_isolated(probe) for name, probe in PROBES.items()}))


if __name__ == "__main__":
    main()
