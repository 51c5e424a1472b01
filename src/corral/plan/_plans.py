"""make_plans: every planner for one box, and the degrade-or-refuse decisions.

Pure: a Policy and the host's facts (``HostFacts``) in, frozen plans out. A
control this host cannot enforce as asked is either listed in
``Plans.degraded`` (something weaker stands in, and every result says so) or
refused with ``UnsupportedPolicy`` naming the field (nothing would stand in).
Shared by every Linux backend.
"""

from __future__ import annotations

from dataclasses import dataclass

from corral._errors import UnsupportedPolicy
from corral._policy import Policy
from corral.plan import _capabilities, _mounts, _namespaces, _rlimits
from corral.plan import _cgroups as _plan_cgroups
from corral.plan import _seccomp as _plan_seccomp
from corral.plan._facts import HostFacts

_FALLBACKS = {
    "memory": "RLIMIT_AS per process; shared memory (memfd, pipes) is not bounded",
    "pids": "RLIMIT_NPROC per uid",
    "cpu": "nothing for the rate; each process gets cpu_time_s of CPU (RLIMIT_CPU)",
}


@dataclass(frozen=True, slots=True)
class Plans:
    mounts: tuple[_mounts.MountOp, ...]
    namespaces: tuple[_namespaces.NamespaceOp, ...]
    capabilities: tuple[_capabilities.CapabilityOp, ...]
    rlimits: tuple[_rlimits.Rlimit, ...]
    seccomp: _plan_seccomp.SeccompPlan
    cgroups: tuple[_plan_cgroups.CgroupWrite, ...]
    cgroup_controllers: frozenset[str]
    degraded: tuple[str, ...]


# open: slirp4netns's resolver; allowlist: corral's DNS responder (the box's
# nftables rules send port 53 to it, whatever address is named here)
_RESOLV_CONF = {"open": b"nameserver 10.0.2.3\n", "allowlist": b"nameserver 127.0.0.1\n"}


def make_plans(
    policy: Policy,
    facts: HostFacts,
    *,
    workspace_source: str | None = None,
    extra_files: tuple[_mounts.File, ...] = (),
    per_command_cpu: bool = False,
    fresh_workdir: bool = False,
    image_root: bool = False,
) -> Plans:
    """Every plan for one box on a host with ``facts``, and the list of
    controls this host weakens. Raises ``UnsupportedPolicy`` (naming the
    field) for a control nothing here would enforce.

    ``workspace_source``: the host directory bound as the workspace (None: a
    private tmpfs). ``per_command_cpu``: the box's first program (a
    long-lived box's agent) applies RLIMIT_CPU to each command it starts, so
    the agent's own CPU over a long life does not end the box.
    ``fresh_workdir``: ``workspace_source`` is an empty directory corral made
    for this box (a server's workspace; see ``backends.linux._workdir``).
    ``image_root``: the box runs a container image's root (read-only) rather
    than the host's system directories: no host ``/usr`` or ``/etc`` binds."""
    limits = policy.limits
    wanted = {
        "memory": limits.memory_bytes is not None,
        "pids": limits.pids is not None,
        "cpu": limits.cpu_cores is not None,
    }
    usable = frozenset(c for c in ("memory", "pids", "cpu") if c in facts.cgroup_controllers)
    degraded: list[str] = []
    for controller, needed in wanted.items():
        if needed and controller not in usable:
            degraded.append(
                f"limits: no {controller} cgroup ({facts.cgroup_reason}); "
                f"bounded by {_FALLBACKS[controller]}"
            )
    if wanted["cpu"] and "cpu" not in usable and limits.cpu_time_s is None:
        # no quota and no CPU-time cap would be no CPU control at all: refuse
        raise UnsupportedPolicy(
            "limits.cpu_cores",
            f"cannot enforce a CPU quota without a cpu cgroup ({facts.cgroup_reason}) and "
            "limits.cpu_time_s is not set; set one of them to a finite value or cpu_cores to none",
        )
    if policy.network.mode == "open" and not facts.net_tun:
        raise UnsupportedPolicy(
            "network.mode",
            "'open' needs /dev/net/tun usable by this user for slirp4netns "
            "(it is mode 0666 on most hosts; here it is not): run as root, or use 'allowlist'",
        )
    if workspace_source is not None and limits.disk_bytes is not None:
        why = facts.image_support if fresh_workdir else "it holds the caller's files in place"
        if why is not None:  # else: a bounded image backs it (backends.linux._workdir)
            degraded.append(
                "limits.disk_bytes: the host workspace directory is not bounded in total "
                f"({why}), only per file (limits.file_size_bytes); /tmp and /dev/shm are "
                "bounded; corral serve's reaper ends a box whose workspace outgrows it"
            )
    cgroup_writes = (
        tuple(
            w
            for w in _plan_cgroups.plan_cgroups(limits, facts.cgroup_version)
            if w.controller in usable
        )
        if facts.cgroup_version is not None
        else ()
    )
    seccomp = _plan_seccomp.plan_seccomp(policy.syscalls)
    in_plan = {rule.syscall for rule in seccomp.rules}
    for name, why in facts.seccomp_unfiltered:
        if name in in_plan:  # an old libseccomp: say so, on every result
            degraded.append(f"syscalls: {name} is {why}")
    return Plans(
        mounts=_mounts.plan_mounts(
            policy.filesystem,
            policy.identity,
            facts.layout,
            workspace_source=workspace_source,
            workspace_bytes=policy.workspace_bytes,
            extra_files=extra_files,
            resolv_conf=_RESOLV_CONF.get(policy.network.mode),
            image_root=image_root,
        ),
        namespaces=_namespaces.plan_namespaces(policy.network, policy.identity),
        capabilities=_capabilities.plan_capabilities(policy.identity),
        rlimits=tuple(
            r
            for r in _rlimits.plan_rlimits(limits, cgroups=usable)
            if not (per_command_cpu and r.resource == "RLIMIT_CPU")
        ),
        seccomp=seccomp,
        cgroups=cgroup_writes,
        cgroup_controllers=usable,
        degraded=tuple(degraded),
    )


def render(plans: Plans) -> str:
    """The decisions of ``make_plans`` (degraded controls, cgroup writes, rlimits),
    for golden files and debugging; mounts, namespaces and seccomp have their own."""
    out = [f"degraded: {note}\n" for note in plans.degraded] or ["degraded: none\n"]
    out.append(f"cgroup controllers: {', '.join(sorted(plans.cgroup_controllers)) or 'none'}\n")
    out.append(_plan_cgroups.render(plans.cgroups))
    out.append(_rlimits.render(plans.rlimits))
    return "".join(out)
