"""Host identities for sandboxes started by root.

bubblewrap started by root keeps host uid 0 for file permissions, so root
never runs a box as itself: each box gets its own unprivileged host uid/gid,
distinct from every other box running at the same time on this host (in this
process or another), so one box cannot signal, ptrace or read the files of
another, and root-only host files stay unreadable.

Uniqueness across processes comes from a byte-range lock per uid on one lock
file; within this process, from a set guarded by a lock (POSIX record locks do
not conflict inside one process).
"""

from __future__ import annotations

import fcntl
import os
import random
import threading
from dataclasses import dataclass

from corral._errors import SandboxError

# Far above login users (1000+) and the /etc/subuid ranges (100000+): no host
# account or file owner uses these ids. CORRAL_UID_RANGE="start-end" overrides.
DEFAULT_RANGE = (2_100_000_000, 2_100_065_535)
LOCK_PATH = "/run/corral-uids.lock"


def _configured_range() -> tuple[int, int]:
    raw = os.environ.get("CORRAL_UID_RANGE")
    if not raw:
        return DEFAULT_RANGE
    try:
        start_text, end_text = raw.split("-", 1)
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise SandboxError(
            f"CORRAL_UID_RANGE={raw!r} must look like 2100000000-2100065535"
        ) from None
    # below 65536 live login users and system accounts: a box sharing their uid
    # could read and signal what is theirs
    if not 65536 <= start <= end < 4_294_967_294:
        raise SandboxError(f"CORRAL_UID_RANGE={raw!r} must be within 65536..4294967293")
    return start, end


@dataclass(frozen=True, slots=True)
class HostIdentity:
    uid: int
    gid: int


class _Pool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._taken: set[int] = set()
        self._fd: int | None = None

    def _lock_fd(self) -> int:
        if self._fd is None:
            self._fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self._fd

    def acquire(self) -> HostIdentity:
        start, end = _configured_range()
        size = end - start + 1
        with self._lock:
            fd = self._lock_fd()
            first = random.randrange(size)  # noqa: S311 - spreading, not secrecy
            for step in range(min(size, 4096)):
                uid = start + (first + step) % size
                if uid in self._taken:
                    continue
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, uid - start)
                except OSError:
                    continue  # held by another corral process
                self._taken.add(uid)
                return HostIdentity(uid, uid)
        raise SandboxError(f"no free sandbox uid in {start}-{end}: too many boxes running")

    def release(self, identity: HostIdentity) -> None:
        start, _ = _configured_range()
        with self._lock:
            if identity.uid in self._taken and self._fd is not None:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, identity.uid - start)
                self._taken.discard(identity.uid)


_POOL = _Pool()


def acquire_host_identity() -> HostIdentity:
    return _POOL.acquire()


def release_host_identity(identity: HostIdentity) -> None:
    _POOL.release(identity)
