"""The Policy: everything a sandbox may do, as frozen, validated data.

A Policy is the only knob on isolation. It is checked when it is built, so a
sandbox never starts from a half-valid one; every error names the exact field
(``limits.memory_bytes: must be > 0``). Presets are ordinary Policies.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from ._errors import PolicyError
from ._units import parse_duration, parse_size

NetworkMode = Literal["none", "allowlist", "open"]
SeccompProfile = Literal["default", "strict"]

SECCOMP_PROFILES: tuple[str, ...] = ("default", "strict")
# Network modes the code can enforce today; the others are refused by name.
SUPPORTED_NETWORK_MODES: tuple[str, ...] = ("none", "allowlist", "open")

_ENV_NAME_FORBIDDEN = frozenset("=\0")
# Variables that would let a caller's policy turn the dynamic loader against the
# sandbox's own tools are still allowed: the box is untrusted anyway. What is
# refused is malformed data.


def _abs_path(fieldname: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise PolicyError(fieldname, "must be a non-empty absolute path")
    if "\0" in value:
        raise PolicyError(fieldname, "must not contain NUL bytes")
    path = PurePosixPath(value)
    if not path.is_absolute():
        raise PolicyError(fieldname, f"{value!r} must be an absolute path")
    if ".." in path.parts:
        raise PolicyError(fieldname, f"{value!r} must not contain '..'")
    return str(path)


@dataclass(frozen=True, slots=True)
class Bind:
    """A host path made visible inside the box at ``target`` (defaults to the same path)."""

    source: str
    target: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", _abs_path("source", self.source))
        object.__setattr__(self, "target", _abs_path("target", self.target or self.source))

    @classmethod
    def parse(cls, fieldname: str, value: object) -> Bind:
        """Accept ``"/src"``, ``"/src:/dst"`` or ``{"source": ..., "target": ...}``."""
        try:
            if isinstance(value, Bind):
                return value
            if isinstance(value, str):
                source, _, target = value.partition(":")
                return cls(source, target)
            if isinstance(value, Mapping):
                unknown = set(value) - {"source", "target"}
                if unknown:
                    raise PolicyError(f"{fieldname}.{sorted(unknown)[0]}", "unknown field")
                return cls(value.get("source", ""), value.get("target", ""))
        except PolicyError as exc:
            if exc.field in ("source", "target"):
                raise PolicyError(f"{fieldname}.{exc.field}", exc.reason) from None
            raise
        raise PolicyError(fieldname, "must be a path, 'source:target' or a table")


@dataclass(frozen=True, slots=True)
class FilesystemPolicy:
    """What of the host filesystem the box sees, and where it may write.

    The system directories (``/usr`` and the merged-/usr links), a minimal
    generated ``/etc``, a fresh ``/proc``, a minimal ``/dev``, a size-limited
    ``/tmp`` and the workspace are always there; these fields add to or take
    from that base.
    """

    read_only: tuple[Bind, ...] = ()
    writable: tuple[Bind, ...] = ()
    hidden: tuple[str, ...] = ()
    workspace: str = "/workspace"
    tmp_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        _set(self, "read_only", tuple(_bind_list("filesystem.read_only", self.read_only)))
        _set(self, "writable", tuple(_bind_list("filesystem.writable", self.writable)))
        hidden = _seq("filesystem.hidden", self.hidden)
        _set(
            self,
            "hidden",
            tuple(_abs_path(f"filesystem.hidden[{i}]", p) for i, p in enumerate(hidden)),
        )
        _set(self, "workspace", _abs_path("filesystem.workspace", self.workspace))
        if self.workspace in ("/", "/usr", "/etc", "/proc", "/dev", "/tmp", "/sys"):
            raise PolicyError("filesystem.workspace", f"{self.workspace!r} is a system path")
        _set(self, "tmp_bytes", _positive_int("filesystem.tmp_bytes", self.tmp_bytes))
        for i, path in enumerate(self.hidden):
            if self.host_path_of(path) == "":
                raise PolicyError(
                    f"filesystem.hidden[{i}]",
                    f"{path!r} must be inside a read_only bind: only those show host files, "
                    "and a writable tree would let the box move the hidden path",
                )
        targets: dict[str, str] = {}
        for name, binds in (("read_only", self.read_only), ("writable", self.writable)):
            for i, bind in enumerate(binds):
                where = f"filesystem.{name}[{i}]"
                if bind.target in targets:
                    raise PolicyError(
                        where, f"target {bind.target!r} is already used by {targets[bind.target]}"
                    )
                if bind.target == "/" or _under(bind.target, ("/proc", "/dev")):
                    raise PolicyError(where, f"target {bind.target!r} would shadow a system mount")
                targets[bind.target] = where

    def host_path_of(self, path: str) -> str:
        """The host path behind box ``path`` strictly inside a read-only bind, or ""."""
        best: Bind | None = None
        for bind in self.read_only:
            inside = _under(path, (bind.target,)) and path != bind.target
            if inside and (best is None or len(bind.target) > len(best.target)):
                best = bind
        if best is None:
            return ""
        return best.source + path[len(best.target) :]


def _under(path: str, roots: tuple[str, ...]) -> bool:
    """``path`` is one of ``roots`` or below one of them (whole components only)."""
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    """How the box reaches the network.

    ``none``: loopback only, its own. ``allowlist``: through corral's proxy, to
    the hosts ``allow`` names and ``deny`` does not (deny wins; see
    ``corral.net._rules`` for the rule syntax). ``open``: outbound through a user-space
    network stack (slirp4netns) in the box's own namespace, never the host's
    127.0.0.1 — but anything else the host reaches (LAN, cloud metadata), the
    box reaches too. ``hosts`` maps names to addresses for
    the proxy's resolver (tests); an internal address still needs an IP rule.
    """

    mode: NetworkMode = "none"
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    hosts: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        from .net._rules import RuleError, canonical_host, parse_address, parse_rule

        if self.mode not in ("none", "allowlist", "open"):
            raise PolicyError("network.mode", f"{self.mode!r} is not one of none, allowlist, open")
        if self.mode not in SUPPORTED_NETWORK_MODES:
            raise PolicyError(
                "network.mode",
                f"{self.mode!r} is not supported yet (a user-space network stack is planned); "
                "use 'none' or 'allowlist'",
            )
        for name in ("allow", "deny"):
            rules = tuple(
                str(r) if isinstance(r, str) else r
                for r in _seq(f"network.{name}", getattr(self, name))
            )
            for i, rule in enumerate(rules):
                if not isinstance(rule, str):
                    raise PolicyError(f"network.{name}[{i}]", "must be a string")
                try:
                    parse_rule(rule, allow=name == "allow")
                except RuleError as exc:
                    raise PolicyError(f"network.{name}[{i}]", str(exc)) from None
            _set(self, name, rules)
        hosts = self.hosts.items() if isinstance(self.hosts, Mapping) else self.hosts
        pairs = []
        for key, value in hosts:
            try:
                canonical_host(str(key))
            except RuleError as exc:
                raise PolicyError(f"network.hosts.{key}", str(exc)) from None
            if parse_address(str(value)) is None:
                raise PolicyError(f"network.hosts.{key}", f"{value!r} is not an IP address")
            pairs.append((str(key), str(value)))
        _set(self, "hosts", tuple(sorted(pairs)))
        if self.mode != "allowlist" and (self.allow or self.deny):
            raise PolicyError("network.allow", "rules need mode 'allowlist'")


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits. ``None`` means no limit; presets set every one of them."""

    memory_bytes: int | None = 512 << 20
    swap_bytes: int = 0
    pids: int | None = 128
    cpu_cores: float | None = 1.0
    cpu_time_s: float | None = 60.0
    wall_time_s: float | None = 60.0
    disk_bytes: int | None = 512 << 20
    open_files: int | None = 1024
    file_size_bytes: int | None = 256 << 20
    output_bytes: int | None = 16 << 20

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "pids", "disk_bytes", "open_files", "file_size_bytes"):
            value = getattr(self, name)
            if value is not None:
                _set(self, name, _positive_int(f"limits.{name}", value))
        if self.output_bytes is not None:
            _set(self, "output_bytes", _nonneg_int("limits.output_bytes", self.output_bytes))
        _set(self, "swap_bytes", _nonneg_int("limits.swap_bytes", self.swap_bytes))
        if self.swap_bytes != 0:
            raise PolicyError("limits.swap_bytes", "only 0 (swap off) is supported")
        for name in ("cpu_cores", "cpu_time_s", "wall_time_s"):
            value = getattr(self, name)
            if value is not None:
                _set(self, name, _positive_float(f"limits.{name}", value))
        if self.memory_bytes is not None and self.memory_bytes < 8 << 20:
            raise PolicyError("limits.memory_bytes", "must be at least 8M to start anything")
        if self.pids is not None and self.pids < 2:
            raise PolicyError("limits.pids", "must be at least 2 (the box's init and one process)")
        if self.open_files is not None and self.open_files < 16:
            raise PolicyError("limits.open_files", "must be at least 16")


@dataclass(frozen=True, slots=True)
class SyscallPolicy:
    """Which seccomp profile filters the box's system calls."""

    profile: SeccompProfile = "default"

    def __post_init__(self) -> None:
        if self.profile not in SECCOMP_PROFILES:
            raise PolicyError(
                "syscalls.profile",
                f"{self.profile!r} is not a profile (one of {', '.join(SECCOMP_PROFILES)})",
            )


@dataclass(frozen=True, slots=True)
class IdentityPolicy:
    """Who the box's processes are inside. Never root, never with capabilities."""

    uid: int = 1000
    gid: int = 1000
    username: str = "sandbox"
    hostname: str = "sandbox"

    def __post_init__(self) -> None:
        for name in ("uid", "gid"):
            value = _nonneg_int(f"identity.{name}", getattr(self, name))
            if value == 0:
                raise PolicyError(f"identity.{name}", "must not be 0: the box never runs as root")
            if value >= 65534:
                raise PolicyError(f"identity.{name}", "must be below 65534 (nobody/overflow id)")
        for name in ("username", "hostname"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.replace("-", "").replace("_", "").isalnum():
                raise PolicyError(f"identity.{name}", "must be letters, digits, '-' or '_'")
            if len(value) > 32:
                raise PolicyError(f"identity.{name}", "must be at most 32 characters")


DEFAULT_ENV: tuple[tuple[str, str], ...] = (
    ("HOME", "/workspace"),
    ("LANG", "C.UTF-8"),
    ("PATH", "/usr/local/bin:/usr/bin:/bin"),
    # stdout is a pipe: a block-buffered Python loses what it printed when a
    # limit kills it, and streams arrive in 8 KiB lumps (set it to "" to buffer)
    ("PYTHONUNBUFFERED", "1"),
)


@dataclass(frozen=True, slots=True)
class Policy:
    """Everything a sandbox may do. Frozen and validated on construction.

    Nothing of the caller's environment reaches the box: ``env`` is the whole
    environment the sandboxed process starts with.
    """

    name: str = "custom"
    filesystem: FilesystemPolicy = field(default_factory=FilesystemPolicy)
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    limits: Limits = field(default_factory=Limits)
    syscalls: SyscallPolicy = field(default_factory=SyscallPolicy)
    identity: IdentityPolicy = field(default_factory=IdentityPolicy)
    env: tuple[tuple[str, str], ...] = DEFAULT_ENV

    def __post_init__(self) -> None:
        sections = {
            "filesystem": FilesystemPolicy,
            "network": NetworkPolicy,
            "limits": Limits,
            "syscalls": SyscallPolicy,
            "identity": IdentityPolicy,
        }
        for name, cls in sections.items():
            if not isinstance(getattr(self, name), cls):
                raise PolicyError(name, f"must be a {cls.__name__}")
        _set(self, "env", _env_pairs(self.env))
        limits, fs = self.limits, self.filesystem
        if limits.disk_bytes is not None and 2 * fs.tmp_bytes >= limits.disk_bytes:
            raise PolicyError(
                "filesystem.tmp_bytes",
                "twice it (/tmp and /dev/shm) must be smaller than limits.disk_bytes, "
                "which covers /tmp, /dev/shm and the workspace",
            )

    @property
    def workspace_bytes(self) -> int | None:
        """The size of a private workspace: what ``disk_bytes`` leaves after /tmp and /dev/shm."""
        if self.limits.disk_bytes is None:
            return None
        return self.limits.disk_bytes - 2 * self.filesystem.tmp_bytes

    # -- presets ---------------------------------------------------------------

    @classmethod
    def preset(cls, name: str) -> Policy:
        """``strict``, ``default`` or ``dev``: ordinary Policies with finite limits."""
        try:
            return _PRESETS[name]
        except KeyError:
            raise PolicyError(
                "preset", f"{name!r} is not a preset ({', '.join(_PRESETS)})"
            ) from None

    # -- derivation --------------------------------------------------------------

    def with_limits(self, **changes: Any) -> Policy:
        """A copy with some limits changed (``memory_bytes=512 << 20``, ``pids=None``)."""
        return self._replace_section("limits", changes)

    def with_filesystem(self, **changes: Any) -> Policy:
        return self._replace_section("filesystem", changes)

    def with_identity(self, **changes: Any) -> Policy:
        return self._replace_section("identity", changes)

    def with_syscalls(self, **changes: Any) -> Policy:
        return self._replace_section("syscalls", changes)

    def with_network(self, **changes: Any) -> Policy:
        return self._replace_section("network", changes)

    def with_env(self, env: Mapping[str, str], *, replace: bool = False) -> Policy:
        """A copy whose environment has ``env`` added (or is exactly ``env``)."""
        merged = {} if replace else dict(self.env)
        merged.update(env)
        return dataclasses.replace(self, env=tuple(sorted(merged.items())))

    def _replace_section(self, section: str, changes: Mapping[str, Any]) -> Policy:
        current = getattr(self, section)
        known = {f.name for f in dataclasses.fields(current)}
        for key in changes:
            if key not in known:
                raise PolicyError(f"{section}.{key}", "unknown field")
        return dataclasses.replace(self, **{section: dataclasses.replace(current, **changes)})

    # -- files -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        """Build from plain data (a parsed TOML or JSON document).

        ``extends = "default"`` starts from a preset; every other key overrides
        it. Sizes may be written ``"512M"`` and durations ``"10s"``.
        """
        if not isinstance(data, Mapping):
            raise PolicyError("", "a policy must be a table/object")
        data = dict(data)
        base = cls.preset(str(data.pop("extends"))) if "extends" in data else cls()
        known = {"name", "env", *_SECTIONS}
        for key in data:
            if key not in known:
                raise PolicyError(
                    str(key), f"unknown field (expected one of {', '.join(sorted(known))})"
                )
        policy = base
        if "name" in data:
            if not isinstance(data["name"], str):
                raise PolicyError("name", "must be a string")
            policy = dataclasses.replace(policy, name=data["name"])
        for section, converters in _SECTIONS.items():
            if section not in data:
                continue
            raw = data[section]
            if not isinstance(raw, Mapping):
                raise PolicyError(section, "must be a table/object")
            changes: dict[str, Any] = {}
            for key, value in raw.items():
                if key not in converters:
                    allowed = ", ".join(sorted(converters))
                    raise PolicyError(
                        f"{section}.{key}", f"unknown field (expected one of {allowed})"
                    )
                changes[key] = converters[key](f"{section}.{key}", value)
            policy = policy._replace_section(section, changes)
        if "env" in data:
            env = data["env"]
            if not isinstance(env, Mapping):
                raise PolicyError("env", "must be a table of NAME = value")
            policy = policy.with_env({str(k): v for k, v in env.items()})
        return policy

    @classmethod
    def from_toml(cls, text: str) -> Policy:
        import tomllib  # only policy files need it: keeps `corral run` quick to start

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError("", f"not valid TOML: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_json(cls, text: str) -> Policy:
        import json

        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyError("", f"not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a ``.toml`` or ``.json`` policy file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PolicyError("", f"cannot read policy file {path}: {exc.strerror}") from None
        if path.suffix == ".json":
            return cls.from_json(text)
        return cls.from_toml(text)

    def to_dict(self) -> dict[str, Any]:
        """Plain data that ``from_dict`` turns back into an equal Policy."""
        out: dict[str, Any] = {"name": self.name}
        for section in _SECTIONS:
            value = getattr(self, section)
            table: dict[str, Any] = {}
            for f in dataclasses.fields(value):
                item = getattr(value, f.name)
                if isinstance(item, tuple):
                    item = [f"{b.source}:{b.target}" if isinstance(b, Bind) else b for b in item]
                table[f.name] = item
            out[section] = table
        out["env"] = dict(self.env)
        return out


# -- validation helpers ------------------------------------------------------------


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


def _seq(fieldname: str, value: object) -> tuple[object, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
        raise PolicyError(fieldname, "must be a list")
    return tuple(value)


def _bind_list(fieldname: str, value: object) -> list[Bind]:
    return [Bind.parse(f"{fieldname}[{i}]", v) for i, v in enumerate(_seq(fieldname, value))]


def _positive_int(fieldname: str, value: object) -> int:
    number = _nonneg_int(fieldname, value)
    if number <= 0:
        raise PolicyError(fieldname, "must be > 0")
    return number


def _nonneg_int(fieldname: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(fieldname, f"must be an integer, not {type(value).__name__}")
    if value < 0:
        raise PolicyError(fieldname, "must be >= 0")
    return value


def _positive_float(fieldname: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PolicyError(fieldname, f"must be a number, not {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise PolicyError(fieldname, "must be > 0 and finite")
    return float(value)


def _env_pairs(value: object) -> tuple[tuple[str, str], ...]:
    items: Iterable[object]
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, tuple | list):
        items = value
    else:
        raise PolicyError("env", "must be a mapping of NAME to value")
    pairs: dict[str, str] = {}
    for pair in items:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise PolicyError("env", "must be a mapping of NAME to value")
        name, val = pair
        if not isinstance(name, str) or not name or _ENV_NAME_FORBIDDEN & set(name):
            raise PolicyError(f"env.{name}", "variable names must be non-empty, without '=' or NUL")
        if not isinstance(val, str) or "\0" in val:
            raise PolicyError(f"env.{name}", "must be a string without NUL bytes")
        pairs[name] = val
    return tuple(sorted(pairs.items()))


def _size_field(fieldname: str, value: object) -> object:
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as exc:
            raise PolicyError(fieldname, str(exc)) from None
    return value


def _duration_field(fieldname: str, value: object) -> object:
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise PolicyError(fieldname, str(exc)) from None
    return value


def _as_is(fieldname: str, value: object) -> object:
    return value


def _optional(convert: Any) -> Any:
    """Policy files spell "no limit" as the string ``"none"`` or ``"unlimited"``."""

    def conv(fieldname: str, value: object) -> object:
        if isinstance(value, str) and value.lower() in ("none", "unlimited"):
            return None
        return convert(fieldname, value)

    return conv


_SECTIONS: dict[str, dict[str, Any]] = {
    "filesystem": {
        "read_only": _as_is,
        "writable": _as_is,
        "hidden": _as_is,
        "workspace": _as_is,
        "tmp_bytes": _size_field,
    },
    "network": {"mode": _as_is, "allow": _as_is, "deny": _as_is, "hosts": _as_is},
    "limits": {
        "memory_bytes": _optional(_size_field),
        "swap_bytes": _size_field,
        "pids": _optional(_as_is),
        "cpu_cores": _optional(_as_is),
        "cpu_time_s": _optional(_duration_field),
        "wall_time_s": _optional(_duration_field),
        "disk_bytes": _optional(_size_field),
        "open_files": _optional(_as_is),
        "file_size_bytes": _optional(_size_field),
        "output_bytes": _optional(_size_field),
    },
    "syscalls": {"profile": _as_is},
    "identity": {"uid": _as_is, "gid": _as_is, "username": _as_is, "hostname": _as_is},
}


_PRESETS: dict[str, Policy] = {
    "strict": Policy(
        name="strict",
        limits=Limits(
            memory_bytes=256 << 20,
            pids=64,
            cpu_cores=1.0,
            cpu_time_s=30.0,
            wall_time_s=30.0,
            disk_bytes=128 << 20,
            open_files=256,
            file_size_bytes=64 << 20,
            output_bytes=4 << 20,
        ),
        filesystem=FilesystemPolicy(tmp_bytes=32 << 20),
        syscalls=SyscallPolicy(profile="strict"),
    ),
    "default": Policy(name="default"),
    "dev": Policy(
        name="dev",
        limits=Limits(
            memory_bytes=2 << 30,
            pids=512,
            cpu_cores=2.0,
            cpu_time_s=600.0,
            wall_time_s=600.0,
            disk_bytes=4 << 30,
            open_files=4096,
            file_size_bytes=2 << 30,
            output_bytes=64 << 20,
        ),
        filesystem=FilesystemPolicy(tmp_bytes=1 << 30),
    ),
}
