"""The pure planners, against golden files: no root, no kernel."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from corral import Policy, UnsupportedPolicy
from corral.plan import HostFacts, _capabilities, _mounts, _namespaces, _rlimits, make_plans
from corral.plan._plans import render

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


def test_an_image_root_binds_nothing_of_the_hosts_system(golden: Golden) -> None:
    # a container image's root: no host /usr, system directories or /etc files;
    # the generated identity files, /tmp, the workspace and the policy's binds stay
    policy = Policy.preset("default").with_filesystem(read_only=["/srv/data:/data"])
    ops = make_plans(policy, FULL_HOST, image_root=True).mounts
    golden("mounts_image_root.txt", _mounts.render(ops))
    binds = [op for op in ops if isinstance(op, _mounts.RoBind | _mounts.Bind)]
    assert [(b.source, b.target) for b in binds] == [("/srv/data", "/data")]
    assert not any(isinstance(op, _mounts.Symlink | _mounts.Dir) for op in ops)
    assert any(isinstance(op, _mounts.File) and op.path == "/etc/passwd" for op in ops)
    # and nothing else of the plans changes
    host = make_plans(policy, FULL_HOST)
    image = make_plans(policy, FULL_HOST, image_root=True)
    assert (host.seccomp, host.rlimits, host.cgroups, host.degraded) == (
        image.seccomp,
        image.rlimits,
        image.cgroups,
        image.degraded,
    )


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


# -- make_plans: the degrade-or-refuse decisions, from made-up hosts -------------------------

FULL_HOST = HostFacts(
    layout=DEBIAN,
    cgroup_version=2,
    cgroup_controllers=frozenset({"memory", "pids", "cpu"}),
    net_tun=True,
    image_support=None,
    root=True,
)
NO_CGROUPS = HostFacts(
    layout=DEBIAN,
    cgroup_reason="no cgroup delegated to this user",
    net_tun=False,
    image_support="loop-mounted images need root",
)
OLD_LIBSECCOMP_V1 = HostFacts(
    layout=SPLIT_USR,
    cgroup_version=1,
    cgroup_controllers=frozenset({"memory", "pids"}),
    cgroup_reason="no cpu controller in this hierarchy",
    net_tun=True,
    seccomp_unfiltered=(("io_uring_setup", "unknown to libseccomp 2.3.1: NOT filtered"),),
    image_support=None,
)


@pytest.mark.parametrize(
    ("name", "facts"),
    [("full_v2", FULL_HOST), ("no_cgroups", NO_CGROUPS), ("old_libseccomp_v1", OLD_LIBSECCOMP_V1)],
)
def test_make_plans_golden(name: str, facts: HostFacts, golden: Golden) -> None:
    """Every host fact the planner reads is data: a host without cgroups gets the
    rlimit fallback and says so in ``degraded``; no root, no kernel involved."""
    golden(f"plans_{name}.txt", render(make_plans(Policy.preset("default"), facts)))


def test_no_cgroups_degrades_every_limit_and_falls_back_to_rlimits() -> None:
    plans = make_plans(Policy.preset("default"), NO_CGROUPS)
    assert plans.cgroups == ()
    assert {r.resource for r in plans.rlimits} >= {"RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_CPU"}
    assert [note.split(" cgroup")[0] for note in plans.degraded] == [
        "limits: no memory",
        "limits: no pids",
        "limits: no cpu",
    ]
    assert make_plans(Policy.preset("default"), FULL_HOST).degraded == ()


def test_what_nothing_would_enforce_is_refused_naming_the_field() -> None:
    quota_only = Policy.preset("default").with_limits(cpu_time_s=None)
    with pytest.raises(UnsupportedPolicy) as info:
        make_plans(quota_only, NO_CGROUPS)
    assert info.value.field == "limits.cpu_cores"
    make_plans(quota_only, FULL_HOST)  # a cpu cgroup enforces it
    open_net = Policy.preset("default").with_network(mode="open")
    with pytest.raises(UnsupportedPolicy) as info:
        make_plans(open_net, NO_CGROUPS)
    assert info.value.field == "network.mode"


def test_the_workspace_disk_bound_is_degraded_only_without_an_image() -> None:
    policy = Policy.preset("default")
    fresh = make_plans(policy, FULL_HOST, workspace_source="/srv/ws", fresh_workdir=True)
    assert not any("disk_bytes" in note for note in fresh.degraded)
    handed_in = make_plans(policy, FULL_HOST, workspace_source="/srv/ws")
    assert any("caller's files in place" in note for note in handed_in.degraded)
    not_root = make_plans(policy, NO_CGROUPS, workspace_source="/srv/ws", fresh_workdir=True)
    assert any("need root" in note for note in not_root.degraded)


def test_an_agent_box_gets_no_rlimit_cpu_of_its_own() -> None:
    plans = make_plans(Policy.preset("default"), FULL_HOST, per_command_cpu=True)
    assert "RLIMIT_CPU" not in {r.resource for r in plans.rlimits}
