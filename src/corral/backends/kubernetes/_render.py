"""Policy -> a Pod manifest and its NetworkPolicy (plain dicts, as the API takes them). Pure.

Every field of the Pod is chosen here, from the ``Policy`` and the few
facts about the cluster the operator declares (``ClusterFacts``); nothing
is read from the cluster. Golden-tested in tests/test_kubernetes.py. The
names are Kubernetes' own (``securityContext``, ``emptyDir.sizeLimit``,
``activeDeadlineSeconds``); see
https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/.

What each line stops is said beside it (and in SECURITY.md).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_args

from corral._box import AGENT_DIR
from corral._errors import UnsupportedPolicy
from corral._policy import Policy, SeccompProfile, SyscallPolicy
from corral._runtime import BOX_PATH as RUNTIME_PATH

MANAGED_BY = ("app.kubernetes.io/managed-by", "corral")
BOX_LABEL = "corral.dev/box"  # the box's own id: what its NetworkPolicy selects
OWNER_LABEL = "corral.dev/owner"  # the corral process that made it: what the sweep reads
POOL_LABEL = "corral.dev/pool"  # a warm Pod not yet claimed
CONTAINER = "box"
AGENT_BYTES = 16 << 20  # the agent's emptyDir (its three files, a few hundred KiB)
# after the wall limit, the kubelet ends a one-shot Pod itself: the backstop
# when corral's own timer (which acts first) is gone with a dead server
DEADLINE_SLACK_S = 30

# pid 1 of the box: reaps every orphan (commands run by exec are its
# children's children, reparented to it) and ends on SIGTERM. The signals get
# a handler (a namespace's init never receives one left at SIG_DFL) but stay
# blocked: sigwait takes them, so a SIGCHLD between the last reap and the wait
# is never lost.
PID1 = (
    "import os, signal\n"
    "s = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}\n"
    "for n in s: signal.signal(n, lambda *a: None)\n"
    "signal.pthread_sigmask(signal.SIG_BLOCK, s)\n"
    "while True:\n"
    "    try:\n"
    "        while os.waitpid(-1, os.WNOHANG)[0]: pass\n"
    "    except ChildProcessError: pass\n"
    "    if signal.sigwait(s) != signal.SIGCHLD: break\n"
)

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class ClusterFacts:
    """What the operator declares about the cluster (nothing here is probed).

    ``image``: the box image (any image with ``/usr/bin/python3``; run_code
    needs corral's code runtime at ``/opt/corral/runtime`` in it, as ``corral
    image build`` makes). ``runtime_class``: a RuntimeClass (gVisor, Kata) or
    None. ``seccomp_localhost``: the directory under every node's kubelet
    seccomp root (``<kubelet root>/seccomp``) holding corral's profiles as
    ``<profile>.json`` (``node_seccomp_profiles``; the kubelet's seccomp root
    is ``--seccomp-profile-root``, /var/lib/kubelet/seccomp by default); the Pod then names the
    policy's as ``Localhost``. None: ``RuntimeDefault``.
    ``network_policy_enforced``: the CNI enforces NetworkPolicy (Calico,
    Cilium, ...: a bridge CNI does not).
    ``request_ratio``: requests = limits x this (1.0: the Guaranteed QoS
    class, the last a node evicts under pressure)."""

    image: str
    runtime_class: str | None = None
    seccomp_localhost: str | None = None
    network_policy_enforced: bool = False
    request_ratio: float = 1.0
    image_pull_policy: str = "IfNotPresent"


@dataclass(frozen=True, slots=True)
class PodInputs:
    """The per-Pod inputs besides the Policy. ``owner_refs``: Kubernetes
    ownerReferences (the corral server's own Pod, when it runs in one: the
    garbage collector then deletes the box with it). ``one_shot``: a
    ``run`` box (it gets ``activeDeadlineSeconds``; a long-lived sandbox's
    lifetime can be extended, which a deadline cannot)."""

    name: str
    box_id: str
    owner: str
    one_shot: bool
    owner_refs: tuple[Mapping[str, Any], ...] = ()
    pool: str | None = None
    extra_labels: Mapping[str, str] = field(default_factory=dict)


def check(policy: Policy, facts: ClusterFacts) -> tuple[str, ...]:
    """The controls a Pod enforces more weakly than ``policy`` asks (each says
    how), or ``UnsupportedPolicy`` naming the field a Pod cannot enforce."""
    fs, net, limits = policy.filesystem, policy.network, policy.limits
    for i, bind in enumerate(fs.read_only):
        if bind.target != RUNTIME_PATH:  # the code runtime: the image carries it
            raise UnsupportedPolicy(
                f"filesystem.read_only[{i}].source",
                f"{bind.source!r} is a path on this host; a Pod gets no host paths "
                "(hostPath is never used): put what the box needs in its image",
            )
    for i, _ in enumerate(fs.writable):
        raise UnsupportedPolicy(
            f"filesystem.writable[{i}].source",
            "a host directory cannot be shared with a Pod (hostPath is never used)",
        )
    if fs.hidden:
        raise UnsupportedPolicy("filesystem.hidden", "nothing of the host is in a Pod to hide")
    if net.mode != "none":
        why = {
            "open": "a Pod's network is the cluster's (other Pods, Services, the node, "
            "cloud metadata): corral cannot bound it to the internet only as "
            "slirp4netns does",
            "allowlist": "corral's allowlist proxy runs beside the box on the host; a Pod "
            "has no path to it that the box could not also use to reach the rest of "
            "the cluster (not built for kubernetes yet)",
        }[net.mode]
        raise UnsupportedPolicy("network.mode", f"{net.mode!r} is not enforced here: {why}")
    if not _DNS_LABEL.match(policy.identity.hostname):
        raise UnsupportedPolicy(
            "identity.hostname",
            f"{policy.identity.hostname!r} is not a DNS label (a Pod's hostname must be)",
        )
    degraded = []
    if not facts.network_policy_enforced:
        degraded.append(
            "network: a deny-all NetworkPolicy is created for the Pod, but this cluster is "
            "not declared to enforce NetworkPolicy (CORRAL_K8S_NETWORK_POLICY=enforced); "
            "the box's network is what the CNI gives its Pods"
        )
    if limits.pids is not None:
        degraded.append(
            "limits.pids: a Pod has no pids limit of its own (the kubelet's --pod-max-pids "
            "is node-wide); bounded by RLIMIT_NPROC for the box's uid on its node"
        )
    if facts.seccomp_localhost is None:
        degraded.append(
            f"syscalls: the container runtime's default seccomp profile (RuntimeDefault), "
            f"not corral's {policy.syscalls.profile!r} profile "
            "(install it on the nodes and set CORRAL_K8S_SECCOMP_PROFILE)"
        )
    if limits.swap_bytes:
        degraded.append("limits.swap_bytes: a Pod gets no swap; memory_bytes is its RAM")
    return tuple(degraded)


def _quantity(n: int) -> str:
    return str(n)  # bytes: a plain integer is a valid Kubernetes quantity


def _cpu(cores: float) -> str:
    return f"{max(1, math.ceil(cores * 1000))}m"


def node_seccomp_profiles() -> dict[str, str]:
    """corral's seccomp profiles as the files a node's kubelet reads for a
    ``Localhost`` profile: ``<profile>.json`` -> the JSON (the engines' format,
    from the same rules the bwrap backend compiles; see ``engine._seccomp``)."""
    from corral.backends.engine._seccomp import render as render_profile
    from corral.plan._seccomp import plan_seccomp

    return {
        f"{name}.json": render_profile(plan_seccomp(SyscallPolicy(profile=name)))
        for name in get_args(SeccompProfile)
    }


def labels(inputs: PodInputs) -> dict[str, str]:
    out = {MANAGED_BY[0]: MANAGED_BY[1], BOX_LABEL: inputs.box_id, OWNER_LABEL: inputs.owner}
    if inputs.pool is not None:
        out[POOL_LABEL] = inputs.pool
    out.update(inputs.extra_labels)
    return out


def render_pod(policy: Policy, facts: ClusterFacts, inputs: PodInputs) -> dict[str, Any]:
    """The Pod for one box. Raises ``UnsupportedPolicy`` as ``check`` does."""
    check(policy, facts)
    limits, fs, ident = policy.limits, policy.filesystem, policy.identity
    seccomp: dict[str, str] = (
        {
            "type": "Localhost",
            "localhostProfile": f"{facts.seccomp_localhost}/{policy.syscalls.profile}.json",
        }
        if facts.seccomp_localhost is not None
        else {"type": "RuntimeDefault"}
    )
    resource_limits: dict[str, str] = {}
    resource_requests: dict[str, str] = {}
    if limits.memory_bytes is not None:
        # the memory cgroup of the container: memory bombs are OOM-killed inside it
        resource_limits["memory"] = _quantity(limits.memory_bytes)
        resource_requests["memory"] = _quantity(
            max(1 << 20, int(limits.memory_bytes * facts.request_ratio))
        )
    if limits.cpu_cores is not None:
        # a CFS quota: busy loops get cpu_cores, never the node
        resource_limits["cpu"] = _cpu(limits.cpu_cores)
        resource_requests["cpu"] = _cpu(limits.cpu_cores * facts.request_ratio)
    if limits.disk_bytes is not None:
        # the kubelet evicts a Pod whose writable layer, logs and disk emptyDirs outgrow it
        resource_limits["ephemeral-storage"] = _quantity(limits.disk_bytes)
        resource_requests["ephemeral-storage"] = _quantity(
            max(1 << 20, int(limits.disk_bytes * facts.request_ratio))
        )
    workspace_volume: dict[str, Any] = {}
    if policy.workspace_bytes is not None:
        workspace_volume["sizeLimit"] = _quantity(policy.workspace_bytes)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": facts.image,
        "imagePullPolicy": facts.image_pull_policy,
        "command": ["/usr/bin/python3", "-I", "-S", "-c", PID1],
        "workingDir": fs.workspace,
        "resources": {"limits": resource_limits, "requests": resource_requests},
        "securityContext": {
            # never root, and the policy's ids: the image's root-owned files stay read-only
            "runAsUser": ident.uid,
            "runAsGroup": ident.gid,
            "runAsNonRoot": True,
            # setuid binaries and file capabilities cannot raise privilege (no_new_privs)
            "allowPrivilegeEscalation": False,
            "privileged": False,
            # every capability dropped: no root-equivalent power even for a setuid path
            "capabilities": {"drop": ["ALL"]},
            # the image cannot be altered: writes go only to the size-limited volumes
            "readOnlyRootFilesystem": True,
            # /proc keeps the runtime's masked and read-only paths (/proc/kcore, sysrq)
            "procMount": "Default",
            # the kernel surface the box reaches
            "seccompProfile": seccomp,
        },
        "volumeMounts": [
            {"name": "workspace", "mountPath": fs.workspace},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "agent", "mountPath": AGENT_DIR},
        ],
        # nothing from the exec stream or the node reaches the box as input
        "stdin": False,
        "tty": False,
        "terminationMessagePolicy": "File",
    }
    spec: dict[str, Any] = {
        "containers": [container],
        "restartPolicy": "Never",  # a box that ended stays ended (its status is the evidence)
        # the API server's credentials are never in the box
        "automountServiceAccountToken": False,
        # no Service addresses of the namespace injected into the box's environment
        "enableServiceLinks": False,
        # none of the node's namespaces: its network, processes and IPC stay out of reach
        "hostNetwork": False,
        "hostPID": False,
        "hostIPC": False,
        "shareProcessNamespace": False,
        "hostname": ident.hostname,
        "terminationGracePeriodSeconds": 1,
        "securityContext": {
            "runAsUser": ident.uid,
            "runAsGroup": ident.gid,
            "runAsNonRoot": True,
            "fsGroup": ident.gid,
            "supplementalGroups": [],
            "seccompProfile": seccomp,
        },
        "volumes": [
            # the workspace: on the node's disk, bounded by sizeLimit (the kubelet evicts past it)
            {"name": "workspace", "emptyDir": workspace_volume},
            # /tmp, /dev/shm: memory-backed like every backend's tmpfs, charged to the memory limit
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": _quantity(fs.tmp_bytes)}},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": _quantity(fs.tmp_bytes)}},
            # the agent's files, streamed in over exec (never baked into the image)
            {"name": "agent", "emptyDir": {"medium": "Memory", "sizeLimit": str(AGENT_BYTES)}},
        ],
    }
    if facts.runtime_class is not None:
        spec["runtimeClassName"] = facts.runtime_class  # gVisor, Kata: another kernel boundary
    if inputs.one_shot and limits.wall_time_s is not None:
        spec["activeDeadlineSeconds"] = math.ceil(limits.wall_time_s) + DEADLINE_SLACK_S
    metadata: dict[str, Any] = {"name": inputs.name, "labels": labels(inputs)}
    if inputs.owner_refs:
        metadata["ownerReferences"] = [dict(ref) for ref in inputs.owner_refs]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def render_network_policy(inputs: PodInputs) -> dict[str, Any]:
    """Deny every packet in and out of the box's Pod (network mode ``none``):
    both policy types, no rules. Enforced only by a CNI that implements
    NetworkPolicy. Selects the Pod by its own box label, so it is in force
    from the Pod's first packet (it is created before the Pod)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": inputs.name, "labels": labels(inputs)},
        "spec": {
            "podSelector": {"matchLabels": {BOX_LABEL: inputs.box_id}},
            "policyTypes": ["Ingress", "Egress"],
        },
    }
