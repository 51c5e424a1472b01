"""The pure planners, against golden files: no root, no kernel."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from corral import Policy
from corral.plan import _capabilities, _mounts, _namespaces, _rlimits

Golden = Callable[[str, str], None]

# A fixed merged-/usr Debian host, so the golden files do not depend on this machine.
DEBIAN = _mounts.HostLayout(
    system_symlinks=(
        ("/bin", "usr/bin"),
        ("/lib", "usr/lib"),
        ("/lib64", "usr/lib64"),
        ("/sbin", "usr/sbin"),
    ),
    system_dirs=(),
    etc_present=("/etc/alternatives", "/etc/ld.so.cache", "/etc/localtime", "/etc/ssl/certs"),
)
# An older split-/usr host: /bin and /lib are real directories, bound read-only.
SPLIT_USR = _mounts.HostLayout(
    system_symlinks=(), system_dirs=("/bin", "/lib", "/lib64", "/sbin"), etc_present=()
)


@pytest.mark.parametrize("preset", ["strict", "default", "dev"])
def test_mounts_golden(preset: str, golden: Golden) -> None:
    policy = Policy.preset(preset)
    ops = _mounts.plan_mounts(
        policy.filesystem,
        policy.identity,
        DEBIAN,
        workspace_source=None,
        workspace_bytes=policy.workspace_bytes,
    )
    golden(f"mounts_{preset}.txt", _mounts.render(ops))


def test_mounts_split_usr_and_extra_binds(golden: Golden) -> None:
    policy = Policy.preset("default").with_filesystem(
        read_only=["/srv/data:/data"], writable=["/var/out:/out"], hidden=["/data/secret"]
    )
    ops = _mounts.plan_mounts(
        policy.filesystem,
        policy.identity,
        SPLIT_USR,
        workspace_source="/home/me/project",
        workspace_bytes=None,
    )
    golden("mounts_split_usr_binds.txt", _mounts.render(ops))


def test_mount_plan_never_exposes_host_secrets() -> None:
    policy = Policy.preset("default")
    ops = _mounts.plan_mounts(
        policy.filesystem,
        policy.identity,
        _mounts.HostLayout((), (), _mounts.ETC_ALLOWLIST),
        workspace_source=None,
        workspace_bytes=1 << 20,
    )
    sources = [op.source for op in ops if isinstance(op, _mounts.RoBind | _mounts.Bind)]
    for secret in (
        "/etc/shadow",
        "/etc/gshadow",
        "/etc/sudoers",
        "/etc/ssh",
        "/root",
        "/home",
        "/work",
        "/run",
        "/var/run",
        "/etc/passwd",
        "/sys",
    ):
        assert not any(s == secret or s.startswith(secret + "/") for s in sources), secret
    # the generated passwd names the sandbox user, not the host's accounts
    passwd = next(op for op in ops if isinstance(op, _mounts.File) and op.path == "/etc/passwd")
    assert b"sandbox:x:1000:1000" in passwd.content
    assert ops[-2] == _mounts.RemountRo("/")


def test_namespaces_golden(golden: Golden) -> None:
    policy = Policy.preset("default")
    golden(
        "namespaces.txt",
        _namespaces.render(_namespaces.plan_namespaces(policy.network, policy.identity)),
    )


def test_every_namespace_is_unshared() -> None:
    policy = Policy.preset("dev")
    ops = _namespaces.plan_namespaces(policy.network, policy.identity)
    unshared = {op.namespace for op in ops if isinstance(op, _namespaces.Unshare)}
    assert unshared == {"user", "mount", "pid", "net", "ipc", "uts", "cgroup"}


def test_capabilities_golden(golden: Golden) -> None:
    golden(
        "capabilities.txt", _capabilities.render(_capabilities.plan_capabilities(Policy().identity))
    )


def test_rlimits_golden(golden: Golden) -> None:
    limits = Policy.preset("default").limits
    with_cgroups = _rlimits.plan_rlimits(limits, cgroups=frozenset({"memory", "pids", "cpu"}))
    without = _rlimits.plan_rlimits(limits, cgroups=frozenset())
    golden("rlimits_cgroups.txt", _rlimits.render(with_cgroups))
    golden("rlimits_fallback.txt", _rlimits.render(without))
    assert {op.resource for op in without} - {op.resource for op in with_cgroups} == {
        "RLIMIT_AS",
        "RLIMIT_NPROC",
    }


def test_rlimits_skip_unlimited_fields() -> None:
    limits = Policy.preset("default").with_limits(open_files=None, cpu_time_s=None).limits
    names = {op.resource for op in _rlimits.plan_rlimits(limits, cgroups=frozenset({"memory"}))}
    assert "RLIMIT_NOFILE" not in names
    assert "RLIMIT_CPU" not in names
    assert {"RLIMIT_CORE", "RLIMIT_STACK", "RLIMIT_FSIZE"} <= names
