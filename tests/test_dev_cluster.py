"""The test cluster itself (scripts/dev-cluster): sealed in its network namespace, no cloud
metadata probes in its kubelet, and a working node (pods run, exec streams and logs work).

These tests share the running cluster with the other tests and do not take it down; `down`
checks its own work (it fails, naming what is left, if a process, mount, cgroup or network
namespace of the cluster survives) and is exercised by `scripts/bootstrap test` at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import _cluster

pytestmark = [pytest.mark.root, pytest.mark.slow]

RUN = Path("/run/corral-k8s")
NETNS_PATH = Path("/run/netns") / _cluster.NETNS
METADATA_ADDRESSES = (b"169.254.169.254", b"metadata.google.internal")


@pytest.fixture(scope="module")
def kubeconfig() -> str:
    reason = _cluster.available()
    if reason:
        pytest.skip(reason)
    return _cluster.kubeconfig()


@pytest.fixture(scope="module")
def core(kubeconfig: str) -> Iterator[Any]:
    kubernetes = pytest.importorskip("kubernetes")
    client = kubernetes.config.new_client_from_config(config_file=kubeconfig)
    yield kubernetes.client.CoreV1Api(client)
    client.close()


def ip_json(*args: str) -> list[dict[str, Any]]:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out) if out.strip() else []


def pid(component: str) -> int:
    return int((RUN / "pids" / f"{component}.pid").read_text())


def test_namespace_holds_only_loopback_and_the_pods_bridge(kubeconfig: str) -> None:
    links = ip_json("-n", _cluster.NETNS, "-d", "link")
    by_name = {link["ifname"]: link for link in links}
    assert "lo" in by_name
    assert by_name["cni0"]["linkinfo"]["info_kind"] == "bridge"
    for link in links:
        if link["ifname"] in ("lo", "cni0"):
            continue
        # the only other links: the pods' ends of their veth pairs, ports of the bridge
        assert link["linkinfo"]["info_kind"] == "veth", link
        assert link.get("master") == "cni0", link
    # no veth of the host has its peer in the cluster's namespace
    ids = {ns["name"]: ns.get("id") for ns in ip_json("netns", "list")}
    cluster_id = ids[_cluster.NETNS]
    if cluster_id is not None:
        assert not [link for link in ip_json("link") if link.get("link_netnsid") == cluster_id], (
            "a host interface is paired with the cluster's namespace"
        )


def test_namespace_has_no_route_out(kubeconfig: str) -> None:
    for family in ("-4", "-6"):
        routes = ip_json("-n", _cluster.NETNS, family, "route", "show", "table", "all")
        assert routes or family == "-6"
        for route in routes:
            assert route["dst"] != "default", route
            assert route.get("dev") in ("lo", "cni0"), route
            assert "gateway" not in route, route


def test_every_component_runs_in_the_namespace(kubeconfig: str) -> None:
    cluster_ns = NETNS_PATH.stat().st_ino
    host_ns = Path("/proc/self/ns/net").stat().st_ino
    assert cluster_ns != host_ns
    for component in (
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "containerd",
        "kubelet",
    ):
        assert Path(f"/proc/{pid(component)}/ns/net").stat().st_ino == cluster_ns, component
    # and the relay listens on the host's loopback only
    assert Path(f"/proc/{pid('relay')}/ns/net").stat().st_ino == cluster_ns  # after setns
    port = os.environ.get("CORRAL_K8S_PORT", "16443")
    listening = subprocess.run(
        ["ss", "-Hltnp", "sport", f"= :{port}"], capture_output=True, text=True, check=True
    ).stdout
    assert listening.split()[3] == f"127.0.0.1:{port}", listening
    assert f"pid={pid('relay')}," in listening


def test_kubelet_has_no_cloud_metadata_probes(kubeconfig: str) -> None:
    kubelet = Path(f"/proc/{pid('kubelet')}/exe").read_bytes()
    assert len(kubelet) > 10_000_000  # the running kubelet's binary itself
    found = [s for s in METADATA_ADDRESSES if s in kubelet]
    assert not found
    # the same search finds the address in the credential provider the build removes
    orig = Path("/var/cache/corral/kubernetes/kubernetes_1.20.5+really1.20.2.orig.tar.gz")
    if orig.exists():
        with tarfile.open(orig) as tar:
            member = tar.extractfile("kubernetes-1.20.2/pkg/credentialprovider/gcp/metadata.go")
            assert member is not None
            assert b"metadata.google.internal" in member.read()


def test_kubelet_leaves_host_sysctls_alone(kubeconfig: str) -> None:
    """An unpatched kubelet sets kernel.panic_on_oops=1, vm.overcommit_memory=1 and more on
    the host; `up` recorded their values before the kubelet started."""
    before = json.loads((RUN / "sysctls.json").read_text())
    assert set(before) == {
        "vm/overcommit_memory",
        "vm/panic_on_oom",
        "kernel/panic",
        "kernel/panic_on_oops",
    }
    now = {key: Path(f"/proc/sys/{key}").read_text().strip() for key in before}
    assert now == before


@pytest.fixture(scope="module")
def pod(core: Any) -> Iterator[str]:
    """A busybox pod (the image `up` imports; never pulled) that logs a line and sleeps."""
    name = f"dev-cluster-test-{uuid.uuid4().hex[:8]}"
    core.create_namespaced_pod(
        "default",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": "dev-cluster-test"}},
            "spec": {
                "automountServiceAccountToken": False,
                "terminationGracePeriodSeconds": 0,
                "containers": [
                    {
                        "name": "main",
                        "image": _cluster.BUSYBOX_IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["sh", "-c", "echo started-$HOSTNAME; exec sleep 3600"],
                        "securityContext": {
                            "runAsUser": 1000,
                            "runAsNonRoot": True,
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]},
                        },
                    }
                ],
            },
        },
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            phase = core.read_namespaced_pod(name, "default").status.phase
            if phase == "Running":
                break
            assert phase == "Pending", phase
            time.sleep(0.5)
        else:
            pytest.fail(f"pod {name} not Running after 90 s")
        yield name
    finally:
        core.delete_namespaced_pod(name, "default", grace_period_seconds=0)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not core.list_namespaced_pod(
                "default", field_selector=f"metadata.name={name}"
            ).items:
                break
            time.sleep(0.5)


def exec_in(core: Any, pod: str, command: list[str]) -> tuple[int | None, str]:
    """Run ``command`` in the pod over the exec websocket: (exit status, stdout + stderr)."""
    from kubernetes.stream import stream

    ws = stream(
        core.connect_get_namespaced_pod_exec,
        pod,
        "default",
        command=command,
        stderr=True,
        stdin=False,
        stdout=True,
        tty=False,
        _preload_content=False,
    )
    try:
        ws.run_forever(timeout=60)
        return ws.returncode, ws.read_all()
    finally:
        ws.close()
        # once the server has closed the stream, websocket-client's close() returns early and
        # leaves the TLS socket open; shutdown() closes it
        ws.sock.shutdown()


def test_pod_runs_and_exec_and_logs_work(core: Any, pod: str) -> None:
    assert exec_in(core, pod, ["sh", "-c", "echo hello from $(id -u)"]) == (0, "hello from 1000\n")
    assert exec_in(core, pod, ["sh", "-c", "exit 3"])[0] == 3
    assert f"started-{pod}" in core.read_namespaced_pod_log(pod, "default")
    node = core.read_node(_cluster.NODE)
    ready = [c for c in node.status.conditions if c.type == "Ready"]
    assert [c.status for c in ready] == ["True"]


def test_pod_has_no_route_out(core: Any, pod: str) -> None:
    routes = exec_in(core, pod, ["ip", "route", "show"])[1].strip().splitlines()
    assert routes, "no route at all"
    assert all(r.startswith("10.200.0.0/24 dev eth0") for r in routes), routes
    assert exec_in(core, pod, ["ip", "-6", "route", "show", "default"]) == (0, "")


def test_pod_cannot_reach_a_host_listener(core: Any, pod: str) -> None:
    """A listener on one of the host's own addresses (not loopback, which is per namespace):
    were the namespace leaky, the pod's packets would reach it and nothing beyond the host."""
    host_ips = [
        a["local"]
        for link in ip_json("addr")
        for a in link.get("addr_info", [])
        if a["family"] == "inet" and not a["local"].startswith("127.")
    ]
    if not host_ips:
        pytest.skip("the host has no non-loopback IPv4 address")
    listener = socket.create_server((host_ips[0], 0))
    port = listener.getsockname()[1]
    accepted: list[object] = []
    listener.settimeout(5)

    def accept() -> None:
        with contextlib.suppress(OSError):
            accepted.append(listener.accept())

    t = threading.Thread(target=accept)
    t.start()
    rc, out = exec_in(core, pod, ["nc", "-w", "2", host_ips[0], str(port)])
    t.join()
    listener.close()
    assert not accepted
    assert rc == 1, out
    assert "unreachable" in out.lower(), out
