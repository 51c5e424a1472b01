"""The Kubernetes backend: ``"kubernetes"``, each box a Pod.

``Sandbox(backend="kubernetes")`` and ``corral serve --backend kubernetes
--namespace sandboxes`` run every box as one Pod of the current kubeconfig's
cluster (or the in-cluster service account's), rendered from the Policy by
``_render`` (a pure function, golden-tested), with the agent streamed in and
spoken to over an exec stream (``_exec``). Configured from the environment
(the server and ``get_backend`` make it with no arguments):

``CORRAL_K8S_NAMESPACE``   the namespace (default: the context's, else ``default``)
``CORRAL_K8S_IMAGE``       the box image (default ``corral-box:latest``)
``CORRAL_K8S_RUNTIME_CLASS`` a RuntimeClass for every Pod (gVisor, Kata)
``CORRAL_K8S_SECCOMP_PROFILE`` the directory, under each node's ``<kubelet root>/seccomp``,
                           holding ``node_seccomp_profiles()`` (then ``Localhost``)
``CORRAL_K8S_NETWORK_POLICY`` ``enforced`` when the CNI enforces NetworkPolicy
``CORRAL_K8S_REQUEST_RATIO`` requests = limits x this (default 1: Guaranteed QoS)
``CORRAL_K8S_OWNER_POD``   ``<name>/<uid>`` of the Pod corral itself runs in: the
                           owner of every box (the garbage collector removes them with it)
``KUBECONFIG``             the kubeconfig, as for every Kubernetes tool
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

from corral._errors import CorralError
from corral._policy import Policy
from corral.backends._base import BoxSpec, Check
from corral.backends.kubernetes._box import KubernetesBox
from corral.backends.kubernetes._cluster import Cluster, owner_alive
from corral.backends.kubernetes._render import (
    MANAGED_BY,
    OWNER_LABEL,
    ClusterFacts,
    PodInputs,
    check,
    node_seccomp_profiles,
    render_network_policy,
    render_pod,
)

__all__ = [
    "ClusterFacts",
    "KubernetesBackend",
    "KubernetesBox",
    "PodInputs",
    "node_seccomp_profiles",
    "render_network_policy",
    "render_pod",
]

DEFAULT_IMAGE = "corral-box:latest"


def facts_from_env(env: Mapping[str, str] | None = None) -> ClusterFacts:
    """The operator's declarations (``CORRAL_K8S_*``) as ``ClusterFacts``;
    ``ValueError`` naming the variable for a bad value."""
    env = os.environ if env is None else env
    ratio_text = env.get("CORRAL_K8S_REQUEST_RATIO", "1")
    try:
        ratio = float(ratio_text)
    except ValueError:
        ratio = -1.0
    if not 0 < ratio <= 1:
        raise ValueError(f"CORRAL_K8S_REQUEST_RATIO={ratio_text!r}: a number in (0, 1]")
    netpol = env.get("CORRAL_K8S_NETWORK_POLICY", "")
    if netpol not in ("", "enforced", "unenforced"):
        raise ValueError(f"CORRAL_K8S_NETWORK_POLICY={netpol!r}: 'enforced' or 'unenforced'")
    return ClusterFacts(
        image=env.get("CORRAL_K8S_IMAGE") or DEFAULT_IMAGE,
        runtime_class=env.get("CORRAL_K8S_RUNTIME_CLASS") or None,
        seccomp_localhost=env.get("CORRAL_K8S_SECCOMP_PROFILE") or None,
        network_policy_enforced=netpol == "enforced",
        request_ratio=ratio,
    )


class KubernetesBackend:
    """Boxes as Pods. Implements ``corral.backends.Backend``.

    ``namespace``, ``kubeconfig`` and ``facts`` default to the environment
    (see the module). The cluster is contacted on first use, not here."""

    def __init__(
        self,
        namespace: str | None = None,
        *,
        kubeconfig: str | None = None,
        facts: ClusterFacts | None = None,
    ) -> None:
        self._namespace = namespace or os.environ.get("CORRAL_K8S_NAMESPACE") or None
        self._kubeconfig = kubeconfig
        self.facts = facts if facts is not None else facts_from_env()
        self._cluster: Cluster | None = None
        self._swept = False
        owner = os.environ.get("CORRAL_K8S_OWNER_POD", "")
        self.owner_refs: tuple[Mapping[str, Any], ...] = ()
        if owner:
            name, _, uid = owner.partition("/")
            if not name or not uid:
                raise ValueError(f"CORRAL_K8S_OWNER_POD={owner!r}: '<pod name>/<pod uid>'")
            self.owner_refs = ({"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid},)

    @property
    def name(self) -> str:
        return "kubernetes"

    @property
    def cluster(self) -> Cluster:
        """The API connection (made on first use). ``HostToolMissing`` without
        the client; ``SandboxError`` without a usable kubeconfig."""
        if self._cluster is None:
            self._cluster = Cluster(self._namespace, self._kubeconfig)
        return self._cluster

    def check(self, policy: Policy) -> tuple[str, ...]:
        """Degraded controls for ``policy`` on this cluster (as declared), or
        ``UnsupportedPolicy`` naming the field. Contacts nothing."""
        return check(policy, self.facts)

    async def launch(self, spec: BoxSpec) -> KubernetesBox:
        if spec.command and not any("\0" in str(a) for a in spec.command):
            self.cluster  # noqa: B018 - HostToolMissing/SandboxError before anything starts
            if not self._swept:
                self._swept = True
                await self.sweep()
        return await KubernetesBox.start(self, spec)

    async def sweep(self) -> None:
        """Delete the Pods and NetworkPolicies of corral processes of this host
        that are gone (by their owner label). Others' are left alone: this host
        cannot tell whether a process elsewhere still runs."""
        try:
            cluster = self.cluster
        except CorralError:
            return
        from kubernetes.client.exceptions import ApiException

        selector = f"{MANAGED_BY[0]}={MANAGED_BY[1]}"
        try:
            pods = await cluster.call(
                cluster.core.list_namespaced_pod, cluster.namespace, label_selector=selector
            )
            policies = await cluster.call(
                cluster.net.list_namespaced_network_policy,
                cluster.namespace,
                label_selector=selector,
            )
        except ApiException:
            return
        for kind, items, delete in (
            ("pod", pods.items, cluster.core.delete_namespaced_pod),
            ("netpol", policies.items, cluster.net.delete_namespaced_network_policy),
        ):
            for item in items:
                owner = (item.metadata.labels or {}).get(OWNER_LABEL, "")
                if owner_alive(owner) is False:
                    with contextlib.suppress(ApiException):
                        kwargs = {"grace_period_seconds": 1} if kind == "pod" else {}
                        await cluster.call(delete, item.metadata.name, cluster.namespace, **kwargs)

    def doctor(self) -> list[Check]:
        try:
            cluster = self.cluster
            from kubernetes.client import VersionApi

            version = VersionApi(cluster.api_client).get_code()
        except CorralError as exc:
            return [Check("kubernetes", "fail", str(exc), "set KUBECONFIG to your cluster's")]
        except Exception as exc:  # any transport failure says the same
            return [
                Check(
                    "kubernetes",
                    "fail",
                    f"the API server does not answer: {exc}",
                    "check KUBECONFIG and that the cluster is up",
                )
            ]
        checks = [
            Check(
                "kubernetes",
                "ok",
                f"API server {getattr(version, 'git_version', version)}, "
                f"namespace {cluster.namespace!r}, image {self.facts.image!r}",
            )
        ]
        checks.append(self._image_check(cluster))
        if self.facts.network_policy_enforced:
            checks.append(Check("network", "ok", "NetworkPolicy enforced (declared)"))
        else:
            checks.append(
                Check(
                    "network",
                    "warn",
                    "a deny-all NetworkPolicy is made for every box, but whether the CNI "
                    "enforces it is not declared",
                    "use a CNI that enforces NetworkPolicy (Calico, Cilium) and set "
                    "CORRAL_K8S_NETWORK_POLICY=enforced",
                )
            )
        if self.facts.seccomp_localhost is None:
            checks.append(
                Check(
                    "seccomp",
                    "warn",
                    "the runtime's default profile (RuntimeDefault), not corral's",
                    "install corral's profile on the nodes; set CORRAL_K8S_SECCOMP_PROFILE",
                )
            )
        return checks

    def _image_check(self, cluster: Cluster) -> Check:
        """Whether a node reports the box image (the kubelet lists a node's images)."""
        image = self.facts.image
        try:
            nodes = cluster.core.list_node().items
        except Exception as exc:  # forbidden to list nodes, or gone: cannot tell
            return Check("image", "warn", f"cannot list the nodes to find {image!r}: {exc}")
        wanted = {image, f"docker.io/library/{image}", f"docker.io/{image}"}
        have = [
            n.metadata.name
            for n in nodes
            if any(wanted & set(i.names or ()) for i in (n.status.images or ()))
        ]
        if have:
            return Check("image", "ok", f"{image!r} on {len(have)} of {len(nodes)} nodes")
        return Check(
            "image",
            "fail",
            f"no node has the box image {image!r} (corral never pulls)",
            "corral image build --into containerd=<the node's containerd socket>, "
            "or set CORRAL_K8S_IMAGE to an image the nodes have",
        )

    async def reattach(self, info: Mapping[str, str]) -> KubernetesBox | None:
        """Never adopts a box: its channel was its owner's exec stream, gone with
        it (the Pod may still run: ``sweep`` removes it once its owner is gone)."""
        return None
