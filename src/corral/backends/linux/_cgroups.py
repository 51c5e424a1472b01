"""Sandbox cgroups at run time: find a parent, create, fill, measure, kill, remove.

cgroup v1 and v2
    v2 is one tree: a cgroup directory holds every controller's files, and a
    controller reaches a cgroup only if its parent lists it in
    ``cgroup.subtree_control``. v1 is one tree (hierarchy) per controller, or per
    group of co-mounted controllers, so a sandbox cgroup is one directory in each
    of them and a process must be placed in all. Hybrid hosts mount the v1
    hierarchies plus a cgroup2 tree (``/sys/fs/cgroup/unified``) that holds no
    controllers. Which version corral uses is decided from ``/proc/self/cgroup``
    and ``/proc/self/mountinfo``, never from fixed paths: the one whose mounts
    offer more of memory, pids and cpu (v2 on a tie).

How the parent is chosen
    Sandbox cgroups are ``<parent>/<name>``; the parent is prepared once, by
    ``detect_cgroups``. ``CORRAL_CGROUP_PARENT`` (a path relative to the cgroup
    root) overrides the choice below, in every hierarchy.

    v1: ``corral/`` under our own cgroup in each hierarchy. v1 has no rule
    against a cgroup holding both processes and children.

    v2: the "no internal processes" rule forbids enabling controllers in the
    ``cgroup.subtree_control`` of a cgroup that has processes of its own (the
    root cgroup is exempt). So, as root: ``/corral`` directly under the root
    cgroup, with the controllers enabled in the root's ``subtree_control`` and in
    ``/corral``'s. Otherwise: ``corral/`` in the nearest writable ancestor of our
    own cgroup, i.e. a cgroup delegated to us (systemd ``Delegate=yes``, the
    ``user@.service`` tree).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import signal
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Literal, Self

from corral._errors import SandboxError
from corral.plan._cgroups import CgroupWrite

PARENT_ENV = "CORRAL_CGROUP_PARENT"
KILL_TIMEOUT_S = 5.0
RMDIR_TIMEOUT_S = 2.0
FREEZE_TIMEOUT_S = 2.0
_LIMITING = ("memory", "pids", "cpu")
# v1 also uses cpuacct (CPU time is counted there) and freezer (kill_all).
_WANTED = {1: (*_LIMITING, "cpuacct", "freezer"), 2: _LIMITING}
# (control file, freeze, thaw, state file, state when frozen)
_FREEZE_V1 = ("freezer.state", "FROZEN", "THAWED", "freezer.state", "FROZEN")
_FREEZE_V2 = ("cgroup.freeze", "1", "0", "cgroup.events", "frozen 1")
_NO_INTERNAL_PROCESSES = (
    " (the cgroup has processes of its own, and v2 enables controllers only for children of "
    f"a cgroup without any: move them to a leaf cgroup, or set {PARENT_ENV} to one that is empty)"
)


@dataclass(frozen=True, slots=True)
class CgroupSupport:
    """What corral can enforce with cgroups on this host, and where.

    ``parents`` maps each usable controller to the directory holding sandbox
    cgroups (one directory for all of them on v2). ``reason`` says why cgroups,
    or some controllers, are not usable and how to fix it; empty when all are.
    """

    version: Literal[1, 2] | None
    controllers: tuple[str, ...]
    parents: Mapping[str, str]
    reason: str

    @property
    def available(self) -> bool:
        return self.version is not None and bool(self.controllers)


@dataclass(frozen=True, slots=True)
class CgroupStats:
    """What a sandbox cgroup measured. ``None``: this kernel or host does not count it."""

    peak_memory_bytes: int | None
    oom_kills: int
    pids_limit_hits: int
    cpu_time_s: float | None
    cpu_throttled_s: float | None
    memory_bytes: int | None = None  # now (v1 memory.usage_in_bytes, v2 memory.current)
    pids: int | None = None  # tasks now (pids.current)


# -- detection ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Mount:
    point: str
    root: str  # the cgroup shown at the mount point
    controllers: frozenset[str]  # v1 only: the hierarchy's controllers

    def dir_for(self, cgroup: str) -> str | None:
        """The directory of ``cgroup`` (a path from the cgroup root) under this mount."""
        if self.root != "/":
            if cgroup != self.root and not cgroup.startswith(self.root + "/"):
                return None
            cgroup = cgroup[len(self.root) :]
        return self.point + cgroup.rstrip("/")


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def _read_mounts() -> tuple[list[_Mount], list[_Mount]]:
    """The (v1, v2) cgroup mounts, from ``/proc/self/mountinfo``."""
    v1: list[_Mount] = []
    v2: list[_Mount] = []
    for line in _read("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        fields, (fstype, _source, options) = left.split(), right.split()[:3]
        root, point = _unescape(fields[3]), _unescape(fields[4])
        if fstype == "cgroup":
            v1.append(_Mount(point, root, frozenset(options.split(","))))
        elif fstype == "cgroup2":
            v2.append(_Mount(point, root, frozenset()))
    return v1, v2


def _read_own_cgroups() -> tuple[dict[str, str], str | None]:
    """Our cgroup per v1 controller, and our v2 cgroup, from ``/proc/self/cgroup``."""
    v1: dict[str, str] = {}
    v2 = None
    for line in _read("/proc/self/cgroup").splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:
            v2 = path
        else:
            v1.update(dict.fromkeys(controllers.split(","), path))
    return v1, v2


@functools.cache
def detect_cgroups() -> CgroupSupport:
    """Find, and on first call prepare, where corral creates sandbox cgroups.

    Cached: the host's layout does not change under a running process. Never
    raises; an unusable host is a ``CgroupSupport`` whose ``reason`` says why.
    """
    try:
        v1_mounts, v2_mounts = _read_mounts()
        own_v1, own_v2 = _read_own_cgroups()
    except (OSError, ValueError) as exc:
        return _unavailable(f"cannot read /proc/self/mountinfo or /proc/self/cgroup: {exc}")
    override = os.environ.get(PARENT_ENV)
    if override is not None:
        override = "/" + override.strip("/")
        if ".." in override.split("/") or "\0" in override:
            return _unavailable(f"{PARENT_ENV}={override!r} must be a plain path, without '..'")

    v1_dirs: dict[str, tuple[_Mount, str]] = {}  # controller -> (mount, our cgroup)
    for controller in _WANTED[1]:
        own = own_v1.get(controller)
        for mount in v1_mounts:
            if own is not None and controller in mount.controllers and mount.dir_for(own):
                v1_dirs[controller] = (mount, own)
                break
    v2_mount = next((m for m in v2_mounts if own_v2 and m.dir_for(own_v2)), None)
    v2_controllers: set[str] = set()
    if v2_mount is not None and own_v2 is not None:
        with contextlib.suppress(OSError):
            v2_controllers = set(_read(f"{v2_mount.point}/cgroup.controllers").split())
    v1_count, v2_count = len(set(_LIMITING) & set(v1_dirs)), len(set(_LIMITING) & v2_controllers)
    if v2_count and v2_count >= v1_count and v2_mount is not None and own_v2 is not None:
        return _prepare_v2(v2_mount, own_v2, override)
    if v1_count:
        return _prepare_v1(v1_dirs, override)
    return _unavailable(
        "no cgroup hierarchy offers the memory, pids or cpu controller; mount cgroup2 at "
        "/sys/fs/cgroup with them enabled (or the v1 hierarchies)"
    )


def _unavailable(reason: str) -> CgroupSupport:
    return CgroupSupport(None, (), MappingProxyType({}), reason)


def _support(version: Literal[1, 2], parents: dict[str, str], problems: list[str]) -> CgroupSupport:
    controllers = tuple(c for c in _WANTED[version] if c in parents)
    if not set(_LIMITING) & set(controllers):
        return _unavailable("; ".join(problems))
    explained = {p.partition(":")[0] for p in problems}
    missing = [c for c in _WANTED[version] if c not in parents and c not in explained]
    if missing:
        problems.insert(0, f"{', '.join(missing)}: not offered by this host's cgroup v{version}")
    return CgroupSupport(version, controllers, MappingProxyType(parents), "; ".join(problems))


def _prepare_v1(dirs: Mapping[str, tuple[_Mount, str]], override: str | None) -> CgroupSupport:
    parents: dict[str, str] = {}
    problems: list[str] = []
    for controller, (mount, own) in dirs.items():
        cgroup = override or own.rstrip("/") + "/corral"
        path = mount.dir_for(cgroup)
        if path is None:
            problems.append(f"{controller}: {cgroup} is outside the hierarchy mounted here")
            continue
        try:
            os.makedirs(path, exist_ok=True)
            if not os.access(path, os.W_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        except OSError as exc:
            problems.append(f"{controller}: cannot create cgroups in {path}: {exc.strerror}")
            continue
        parents[controller] = path
    if problems:
        problems.append(
            f"run as root, or have root delegate a cgroup to this user and set {PARENT_ENV} to it"
        )
    return _support(1, parents, problems)


def _prepare_v2(mount: _Mount, own: str, override: str | None) -> CgroupSupport:
    if override is not None:
        candidates = [override]
    else:
        # As root, the root cgroup (exempt from the no-internal-processes rule);
        # otherwise, nearest first, the ancestors of our cgroup delegated to us.
        parts = [p for p in own.split("/") if p]
        ancestors = ["/"] + ["/" + "/".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
        candidates = [
            f"{a.rstrip('/')}/corral"
            for a in ancestors
            if (path := mount.dir_for(a)) is not None and os.access(path, os.W_OK)
        ]
    problems: list[str] = []
    for candidate in candidates:
        parents = _delegate_v2(mount, candidate, problems)
        if parents:
            return _support(2, parents, problems)
    if not candidates:
        problems.append(
            f"no writable cgroup to create sandbox cgroups in (our cgroup is {own}); run as "
            f"root, or delegate a cgroup to this user (systemd Delegate=yes) and set {PARENT_ENV}"
        )
    return _unavailable("; ".join(problems))


def _delegate_v2(mount: _Mount, cgroup: str, problems: list[str]) -> dict[str, str]:
    """Create ``cgroup`` and enable the controllers on the way down to its children."""
    parts = cgroup.strip("/").split("/")
    chain = ["/" + "/".join(parts[:i]) for i in range(len(parts) + 1)]
    paths = [path for c in chain if (path := mount.dir_for(c)) is not None]
    if mount.dir_for(cgroup) is None:
        problems.append(f"{cgroup} is outside the cgroup tree mounted at {mount.point}")
        return {}
    created: list[str] = []
    try:
        enabled = set(_LIMITING) & set(_read(f"{paths[0]}/cgroup.controllers").split())
        for path in paths:
            if not os.path.isdir(path):
                os.mkdir(path)
                created.append(path)
            have = set(_read(f"{path}/cgroup.subtree_control").split())
            for controller in sorted(enabled - have):
                try:
                    _write(f"{path}/cgroup.subtree_control", f"+{controller}")
                except OSError as exc:
                    hint = _NO_INTERNAL_PROCESSES if exc.errno == errno.EBUSY else ""
                    problems.append(
                        f"{controller}: cannot enable in {path}/cgroup.subtree_control: "
                        f"{exc.strerror}{hint}"
                    )
                    enabled.discard(controller)
        if enabled:
            return dict.fromkeys(sorted(enabled), paths[-1])
    except OSError as exc:
        problems.append(f"cannot create {cgroup}: {exc.strerror}")
    for path in reversed(created):
        with contextlib.suppress(OSError):
            os.rmdir(path)
    return {}


def _mkdir(support: CgroupSupport, path: str) -> None:
    """Create a sandbox cgroup, recreating its parent if it was removed meanwhile.

    An empty parent may be cleaned up at any time (the tests do), even between
    the check and the mkdir, hence the retries.
    """
    error: OSError | None = None
    for _ in range(3):
        try:
            _ensure_parents(support)
            os.mkdir(path)
            return
        except FileNotFoundError as exc:
            error = exc
        except OSError as exc:
            error = exc
            break
    assert error is not None
    raise SandboxError(f"cannot create cgroup {path}: {error.strerror}") from error


def _ensure_parents(support: CgroupSupport) -> None:
    for path in sorted(set(support.parents.values())):
        if not os.path.isdir(path):
            os.makedirs(path, exist_ok=True)
            if support.version == 2:
                enable = " ".join(f"+{c}" for c in support.controllers)
                _write(f"{path}/cgroup.subtree_control", enable)


# -- one sandbox's cgroup ---------------------------------------------------------------


class SandboxCgroup:
    """The cgroup of one sandbox: a directory per hierarchy (one on v2). Use ``create``."""

    def __init__(self, version: Literal[1, 2], name: str, dirs: Mapping[str, str]) -> None:
        self.version = version
        self.name = name
        self.dirs = MappingProxyType(dict(dirs))  # controller -> directory
        self.paths = tuple(dict.fromkeys(dirs.values()))
        self._removed = False
        self._paused = False

    def __repr__(self) -> str:
        return f"<SandboxCgroup v{self.version} {self.name!r} {list(self.paths)}>"

    @classmethod
    def create(
        cls, support: CgroupSupport, name: str, writes: tuple[CgroupWrite, ...]
    ) -> SandboxCgroup:
        """Create ``<parent>/name`` in every usable hierarchy and apply ``writes`` in order.

        On any failure nothing created is left behind and ``SandboxError`` names
        the file: a limit that cannot be set is a refusal to start.
        """
        if support.version is None or not support.available:
            raise SandboxError(f"cgroups are not available: {support.reason}")
        if not name or name in (".", "..") or "/" in name or "\0" in name:
            raise SandboxError(f"{name!r} is not a valid cgroup name")
        for w in writes:
            if w.controller not in support.controllers:
                raise SandboxError(
                    f"{w.file}: the {w.controller} controller is not available, so nothing "
                    f"would stop: {w.threat} ({support.reason or 'not offered by this host'})"
                )
        dirs = {c: f"{support.parents[c]}/{name}" for c in support.controllers}
        made: list[str] = []
        try:
            for path in dict.fromkeys(dirs.values()):
                _mkdir(support, path)
                made.append(path)
            for w in writes:
                _apply(dirs, w)
        except BaseException:
            for path in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            raise
        return cls(support.version, name, dirs)

    def add_process(self, pid: int) -> None:
        """Move ``pid`` (and its threads) into the sandbox cgroup, in every hierarchy.

        Call it before the process runs untrusted code: its children inherit the
        cgroup, and a process missing from one v1 hierarchy escapes that limit.
        """
        if self._removed:
            raise SandboxError(f"{self!r} was removed")
        for path in self.paths:
            try:
                _write(f"{path}/cgroup.procs", str(pid))
            except OSError as exc:
                raise SandboxError(
                    f"cannot move pid {pid} into {path}/cgroup.procs: {exc.strerror}"
                ) from exc

    def pids(self) -> list[int]:
        """Every process in the sandbox cgroup or below it, in any hierarchy."""
        found: set[int] = set()
        for top in self.paths:
            for path, _, _ in os.walk(top):
                with contextlib.suppress(FileNotFoundError):
                    found.update(int(pid) for pid in _read(f"{path}/cgroup.procs").split())
        return sorted(found)

    def stats(self) -> CgroupStats:
        """Counters so far. Read them before ``remove``, which discards them."""
        memory = self.dirs.get("memory")
        hits = self.pids_limit_hits()
        pids = _read_int(self.dirs.get("pids"), "pids.current")
        if self.version == 1:
            cpu_ns = _read_int(self.dirs.get("cpuacct"), "cpuacct.usage")
            throttled_ns = _keyed(self.dirs.get("cpu"), "cpu.stat").get("throttled_time")
            return CgroupStats(
                peak_memory_bytes=_read_int(memory, "memory.max_usage_in_bytes"),
                oom_kills=self.oom_kills(),
                pids_limit_hits=hits,
                cpu_time_s=None if cpu_ns is None else cpu_ns / 1e9,
                cpu_throttled_s=None if throttled_ns is None else throttled_ns / 1e9,
                memory_bytes=_read_int(memory, "memory.usage_in_bytes"),
                pids=pids,
            )
        cpu = _keyed(self.paths[0], "cpu.stat")  # present without the cpu controller too
        usage_us, throttled_us = cpu.get("usage_usec"), cpu.get("throttled_usec")
        return CgroupStats(
            peak_memory_bytes=_read_int(memory, "memory.peak"),
            oom_kills=self.oom_kills(),
            pids_limit_hits=hits,
            cpu_time_s=None if usage_us is None else usage_us / 1e6,
            cpu_throttled_s=None if throttled_us is None else throttled_us / 1e6,
            memory_bytes=_read_int(memory, "memory.current"),
            pids=pids,
        )

    def oom_kills(self) -> int:
        """Processes the memory limit has killed so far (one file: cheap enough to
        read around every command of a long-lived box)."""
        memory = self.dirs.get("memory")
        if self.version == 1:
            return _keyed(memory, "memory.oom_control").get("oom_kill", 0)
        return _keyed(memory, "memory.events").get("oom_kill", 0)

    def pids_limit_hits(self) -> int:
        """Forks ``pids.max`` has refused so far (``pids.events``, v1 and v2)."""
        return _keyed(self.dirs.get("pids"), "pids.events").get("max", 0)

    @property
    def paused(self) -> bool:
        """Whether ``freeze`` froze the cgroup (and ``thaw`` has not thawed it)."""
        return self._paused

    def _freezer(self) -> tuple[str, tuple[str, str, str, str, str]] | None:
        """The directory of the freezer, and its files and values (None: no freezer)."""
        if self.version == 2:
            if not os.path.exists(f"{self.paths[0]}/cgroup.freeze"):
                return None  # a kernel before 5.2
            return self.paths[0], _FREEZE_V2
        path = self.dirs.get("freezer")
        return (path, _FREEZE_V1) if path is not None else None

    def freeze(self, timeout_s: float = FREEZE_TIMEOUT_S) -> None:
        """Stop every process in the cgroup (and below it) where it stands; wait
        until the kernel reports the cgroup frozen. Idempotent.

        Frozen tasks are not scheduled: they use no CPU, keep their memory
        (still charged to the cgroup) and their state. Raises ``SandboxError``
        when this host has no freezer (v1 without the freezer hierarchy, v2
        before Linux 5.2) or the cgroup is not frozen within ``timeout_s``
        (a task in uninterruptible sleep; the cgroup is thawed again then).
        """
        if self._removed:
            raise SandboxError(f"{self!r} was removed")
        freezer = self._freezer()
        if freezer is None:
            raise SandboxError(
                "cannot pause: this host has no cgroup freezer (cgroup v1 without the freezer "
                "hierarchy, or cgroup v2 before Linux 5.2)"
            )
        path, (control, freeze, thaw, state, frozen) = freezer
        try:
            _write(f"{path}/{control}", freeze)
            self._paused = True
            deadline = time.monotonic() + timeout_s
            # v1 reports FREEZING until every task stopped; v2's cgroup.events "frozen 1"
            tries = 0
            while frozen not in _read(f"{path}/{state}"):
                if time.monotonic() > deadline:
                    raise SandboxError(f"{path} did not freeze within {timeout_s} s")
                tries += 1
                if tries % 20 == 0:
                    # v1 freezes the tasks it sees when the state is written: one
                    # forked or migrated meanwhile can keep it FREEZING; ask again
                    _write(f"{path}/{control}", freeze)
                time.sleep(0.001)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                _write(f"{path}/{control}", thaw)
            self._paused = False
            if isinstance(exc, OSError):
                raise SandboxError(f"cannot freeze {path}: {exc.strerror}") from exc
            raise

    def thaw(self) -> None:
        """Let the processes frozen by ``freeze`` run again. Idempotent."""
        freezer = self._freezer()
        if freezer is None or self._removed:
            self._paused = False
            return
        path, (control, _freeze, thaw, _state, _frozen) = freezer
        try:
            _write(f"{path}/{control}", thaw)
        except FileNotFoundError:
            pass  # removed meanwhile: nothing left to thaw
        except OSError as exc:
            raise SandboxError(f"cannot thaw {path}: {exc.strerror}") from exc
        self._paused = False

    def signal_all(self) -> None:
        """SIGKILL every process in the sandbox cgroup once, without waiting
        (``kill_all`` waits until it is empty): for an event loop."""
        kill_file = f"{self.paths[0]}/cgroup.kill"
        if self.version == 2 and os.path.exists(kill_file):
            with contextlib.suppress(FileNotFoundError):
                _write(kill_file, "1")  # the kernel kills the whole subtree at once
        else:
            self._sigkill(self.pids())
        if self._paused:
            # a v1-frozen task does not act on SIGKILL until it is thawed
            with contextlib.suppress(SandboxError):
                self.thaw()

    def kill_all(self) -> None:
        """SIGKILL every process in the sandbox cgroup and wait until it is empty.

        Raises ``SandboxError`` if it is not empty within ``KILL_TIMEOUT_S``.
        """
        deadline = time.monotonic() + KILL_TIMEOUT_S
        kill_file = f"{self.paths[0]}/cgroup.kill"
        atomic = self.version == 2 and os.path.exists(kill_file)
        while pids := self.pids():
            if time.monotonic() > deadline:
                raise SandboxError(
                    f"could not empty {', '.join(self.paths)} within {KILL_TIMEOUT_S} s; "
                    f"still there: {pids[:20]}"
                )
            if atomic:
                # The kernel kills the whole subtree, including processes forked meanwhile.
                with contextlib.suppress(FileNotFoundError):
                    _write(kill_file, "1")
            else:
                # Frozen first: a fork bomb cannot fork faster than we kill.
                with self._frozen():
                    self._sigkill(self.pids())
            time.sleep(0.005)

    @contextlib.contextmanager
    def _frozen(self) -> Iterator[None]:
        if self.version == 2:
            path: str | None = self.paths[0]
            control, freeze, thaw, state, frozen = _FREEZE_V2
        else:  # without a freezer hierarchy, pids.max is what bounds a fork bomb
            path = self.dirs.get("freezer")
            control, freeze, thaw, state, frozen = _FREEZE_V1
        try:
            if path is not None:
                _write(f"{path}/{control}", freeze)
        except FileNotFoundError:
            path = None  # a kernel without the v2 freezer (before 5.2)
        try:
            # Bounded: a task in uninterruptible sleep can keep a cgroup "freezing".
            until = time.monotonic() + 0.2
            while path and frozen not in _read(f"{path}/{state}") and time.monotonic() < until:
                time.sleep(0.001)
            yield
        finally:
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    _write(f"{path}/{control}", thaw)
                self._paused = False

    def _sigkill(self, pids: Iterable[int]) -> None:
        # Through pidfds, re-checked against the cgroup after opening them: a pid
        # that exited and was reused by a host process is never signalled.
        pidfds: list[tuple[int, int]] = []
        try:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    pidfds.append((pid, os.pidfd_open(pid)))
                if len(pidfds) >= 256:
                    break  # stay below the fd limit; the caller loops until empty
            inside = set(self.pids())
            for pid, pidfd in pidfds:
                if pid in inside:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        finally:
            for _, pidfd in pidfds:
                os.close(pidfd)

    def remove(self) -> None:
        """Kill everything inside, then delete the cgroup in every hierarchy. Idempotent."""
        if self._removed:
            return
        self.kill_all()
        for top in self.paths:
            below = [path for path, _, _ in os.walk(top, topdown=False)]
            for path in below or [top]:
                _rmdir(path)
        self._removed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


def leftover_cgroups() -> list[str]:
    """Every sandbox cgroup directory under corral's parents that still exists."""
    found: list[str] = []
    for parent in sorted(set(detect_cgroups().parents.values())):
        with contextlib.suppress(FileNotFoundError):
            found += sorted(e.path for e in os.scandir(parent) if e.is_dir(follow_symlinks=False))
    return found


_OWNED_NAME = re.compile(r"^box-(\d+)-\d+$")


def sweep_orphans() -> list[str]:
    """Remove the cgroups of boxes whose corral process died without cleaning up.

    A box is named ``box-<owner pid>-<n>``; when the owner is gone (kill -9, a
    crash), its boxes were killed with it (bwrap's pdeathsig), but their
    cgroup directories stay. Returns the names removed.
    """
    support = detect_cgroups()
    if support.version is None:
        return []
    by_name: dict[str, dict[str, str]] = {}
    for controller, parent in support.parents.items():
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(parent):
                match = _OWNED_NAME.match(entry.name)
                if match and entry.is_dir(follow_symlinks=False) and not _alive(int(match[1])):
                    by_name.setdefault(entry.name, {})[controller] = entry.path
    for name, dirs in by_name.items():
        with contextlib.suppress(SandboxError, OSError):
            SandboxCgroup(support.version, name, dirs).remove()
    return sorted(by_name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- file helpers ----------------------------------------------------------------------


def _apply(dirs: Mapping[str, str], w: CgroupWrite) -> None:
    path = f"{dirs[w.controller]}/{w.file}"
    try:
        _write(path, w.value)
    except FileNotFoundError:
        if w.fallback is None:
            raise SandboxError(
                f"{path} does not exist on this kernel, and it is needed against: {w.threat}"
            ) from None
        _apply(dirs, w.fallback)
    except OSError as exc:
        raise SandboxError(
            f"cannot write {w.value!r} to {path} ({w.threat}): {exc.strerror}"
        ) from exc


def _rmdir(path: str) -> None:
    deadline = time.monotonic() + RMDIR_TIMEOUT_S
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            # Busy for a moment after the last process exits.
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise SandboxError(f"cannot remove cgroup {path}: {exc.strerror}") from exc
            time.sleep(0.01)


def _read(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read()


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read_int(directory: str | None, file: str) -> int | None:
    if directory is None:
        return None
    try:
        return int(_read(f"{directory}/{file}"))
    except (FileNotFoundError, ValueError):
        return None


def _keyed(directory: str | None, file: str) -> dict[str, int]:
    """``key value`` lines (``memory.events``, ``cpu.stat``) as a dict; empty if absent."""
    if directory is None:
        return {}
    try:
        text = _read(f"{directory}/{file}")
    except FileNotFoundError:
        return {}
    pairs = (line.split() for line in text.splitlines())
    return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].lstrip("-").isdigit()}
