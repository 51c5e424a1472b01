"""The kubernetes backend on a real cluster: ``scripts/dev-cluster`` (Kubernetes
1.20 in a network namespace of its own), or the cluster ``CORRAL_K8S_TEST_KUBECONFIG``
names. Skipped only when no cluster can run here, with the reason.

The conformance suite (``corral.testing``) and the audit's probes run against
it, then what is the backend's own: the limit a Pod's status reports, the
Pods and NetworkPolicies left after close (none), the sweep of a dead
owner's Pods, an image without python3.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral import AsyncSandbox, Policy
from corral._errors import SandboxError
from corral._run import run_async
from corral.backends import BoxSpec
from corral.backends.kubernetes import (
    ClusterFacts,
    KubernetesBackend,
    KubernetesBox,
    node_seccomp_profiles,
)
from corral.backends.kubernetes._render import OWNER_LABEL
from corral.testing import BACKEND_CHECKS
from tests._k8s_image import MINIMAL_REF, box_image

NAMESPACE = "corral-test"
DEV_CLUSTER = Path(__file__).resolve().parent.parent / "scripts" / "dev-cluster"
_QUICK = Policy.preset("default").with_limits(wall_time_s=60.0)


@pytest.fixture(scope="module")
def kubeconfig() -> str:
    given = os.environ.get("CORRAL_K8S_TEST_KUBECONFIG")
    if given:
        return given
    try:
        from tests import _cluster  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        pytest.skip("no scripts/dev-cluster in this tree and CORRAL_K8S_TEST_KUBECONFIG unset")
    why = _cluster.available()
    if why is not None:
        pytest.skip(why)
    path: str = _cluster.kubeconfig()
    return path


@pytest.fixture(scope="module")
def image(kubeconfig: str) -> str:
    given = os.environ.get("CORRAL_K8S_TEST_IMAGE")  # already on the cluster's nodes
    if given:
        return given
    if not DEV_CLUSTER.exists():
        pytest.skip(
            "no scripts/dev-cluster to import the box image and CORRAL_K8S_TEST_IMAGE unset"
        )
    return box_image(DEV_CLUSTER)


def _seccomp_profiles() -> str | None:
    """corral's profiles installed where the dev cluster's kubelet reads them (its
    node is this host; ``down`` removes /var/lib/kubelet), so the boxes run under
    corral's rules as ``Localhost``; None for another cluster (RuntimeDefault)."""
    given = os.environ.get("CORRAL_K8S_TEST_SECCOMP_ROOT")  # another cluster's node root
    if not given and os.environ.get("CORRAL_K8S_TEST_KUBECONFIG"):
        return None
    root = Path(given or "/var/lib/kubelet/seccomp")
    (root / "corral").mkdir(parents=True, exist_ok=True)
    for name, text in node_seccomp_profiles().items():
        (root / "corral" / name).write_text(text)
    return "corral"


@pytest.fixture(scope="module")
def backend(kubeconfig: str, image: str) -> Iterator[KubernetesBackend]:
    from kubernetes.client.exceptions import ApiException

    # requests at a tenth of the limits: a pool's Pods and the conformance's boxes fit a
    # 2-core node's CPU requests together (the limits, the isolation, stay the policy's)
    facts = ClusterFacts(image=image, request_ratio=0.1, seccomp_localhost=_seccomp_profiles())
    backend = KubernetesBackend(NAMESPACE, kubeconfig=kubeconfig, facts=facts)
    try:
        backend.cluster.core.create_namespace({"metadata": {"name": NAMESPACE}})
    except ApiException as exc:
        if exc.status != 409:  # already there
            raise
    yield backend
    backend.cluster.pool.shutdown(wait=False)


def _ours(backend: KubernetesBackend) -> tuple[list[str], list[str]]:
    """The Pods and NetworkPolicies this process owns now."""
    cluster = backend.cluster
    selector = f"{OWNER_LABEL}={cluster.owner}"
    pods = [
        p
        for p in cluster.core.list_namespaced_pod(NAMESPACE, label_selector=selector).items
        # being deleted: the kubelet ends what runs and removes the object itself
        # (test_zz_every_pod_is_gone_in_the_end waits for that)
        if not p.metadata.deletion_timestamp
    ]
    nps = cluster.net.list_namespaced_network_policy(NAMESPACE, label_selector=selector).items
    return [p.metadata.name for p in pods], [n.metadata.name for n in nps]


@pytest.mark.parametrize("check", list(BACKEND_CHECKS))
async def test_conforms(backend: KubernetesBackend, check: str) -> None:
    await BACKEND_CHECKS[check](backend)
    assert await asyncio.to_thread(_ours, backend) == ([], [])


async def test_a_sandbox_runs_commands_files_and_a_terminal(backend: KubernetesBackend) -> None:
    async with AsyncSandbox(_QUICK, runtime=None, backend=backend) as sb:
        await sb.files.write("dir/a.txt", b"hello")
        result = await sb.commands.run("cat dir/a.txt; echo; id -u; pwd; echo $HOME")
        assert result.stdout == f"hello\n{_QUICK.identity.uid}\n/workspace\n/workspace\n".encode()
        assert (await sb.files.read("dir/a.txt")) == b"hello"
        big = os.urandom(3 << 20)  # larger than the exec stream's frames and the agent's window
        await sb.files.write("big", big)
        assert (await sb.files.read("big")) == big
        entries = await sb.files.list(".")
        assert {e.name for e in entries} >= {"dir", "big"}
    assert await asyncio.to_thread(_ours, backend) == ([], [])


async def test_the_memory_limit_is_read_from_the_pod_status(backend: KubernetesBackend) -> None:
    policy = _QUICK.with_limits(memory_bytes=64 << 20)
    result = await run_async(
        ["/usr/bin/python3", "-c", "x = bytearray(512 << 20); x[::4096] = b'x' * len(x[::4096])"],
        policy=policy,
        backend=backend,
    )
    assert result.exit_code == 137, result
    assert result.limit_hit == "memory", result


async def test_a_sigkill_that_was_not_the_memory_limit_is_not_called_one(
    backend: KubernetesBackend,
) -> None:
    result = await run_async(["/bin/sh", "-c", "kill -9 $$"], policy=_QUICK, backend=backend)
    assert (result.exit_code, result.limit_hit) == (137, None), result


async def test_corrals_seccomp_rules_hold_in_the_pod(backend: KubernetesBackend) -> None:
    """With corral's profile as Localhost, what RuntimeDefault lets through is refused."""
    if backend.facts.seccomp_localhost is None:
        pytest.skip("corral's profiles are not installed on this cluster's nodes")
    code = (
        "import ctypes, errno, socket\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.syscall(101, 16, 0, 0, 0) == -1 and errno.errorcode[ctypes.get_errno()])\n"
        "try:\n    socket.socket(40, socket.SOCK_STREAM)\nexcept OSError as e:\n"
        "    print(errno.errorcode[e.errno])\n"
    )
    result = await run_async(["/usr/bin/python3", "-c", code], policy=_QUICK, backend=backend)
    assert result.stdout.decode().split() == ["EPERM", "EPERM"], result  # ptrace, AF_VSOCK


async def test_the_box_cannot_reach_the_api_server_or_anything_else(
    backend: KubernetesBackend,
) -> None:
    """No service account token, no Service variables, no route off its bridge."""
    code = (
        "import os\n"
        "print(os.path.exists('/var/run/secrets/kubernetes.io/serviceaccount/token'))\n"
        "print(sorted(k for k in os.environ if k.startswith('KUBERNETES')))\n"
        "print([l.split()[1] for l in open('/proc/net/route').readlines()[1:]])\n"
    )
    result = await run_async(["/usr/bin/python3", "-c", code], policy=_QUICK, backend=backend)
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "False", result
    assert lines[1] == "[]", result
    assert "00000000" not in lines[2], f"a default route in the box: {lines[2]}"


async def test_an_image_without_python_is_refused_clearly(
    kubeconfig: str, backend: KubernetesBackend
) -> None:
    try:
        from tests import _cluster  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        pytest.skip("no tests/_cluster.py: its busybox image (no python3) is the one to try")
    other = KubernetesBackend(
        NAMESPACE, kubeconfig=kubeconfig, facts=ClusterFacts(image=_cluster.BUSYBOX_IMAGE)
    )
    with pytest.raises(SandboxError, match="python3"):
        await AsyncSandbox(_QUICK, runtime=None, backend=other).start()
    assert await asyncio.to_thread(_ours, other) == ([], [])


async def test_sweep_deletes_the_pods_of_a_dead_owner(backend: KubernetesBackend) -> None:
    from corral.backends.kubernetes._render import PodInputs, render_pod

    cluster = backend.cluster
    dead_owner = f"{cluster.owner.split('.')[0]}.999999999.1"
    inputs = PodInputs(name="corral-orphan-test", box_id="orphan", owner=dead_owner, one_shot=True)
    pod = render_pod(_QUICK, backend.facts, inputs)
    await asyncio.to_thread(cluster.core.create_namespaced_pod, NAMESPACE, pod)
    await backend.sweep()
    names = [
        p.metadata.name
        for p in cluster.core.list_namespaced_pod(
            NAMESPACE, label_selector=f"{OWNER_LABEL}={dead_owner}"
        ).items
        if p.metadata.deletion_timestamp is None
    ]
    assert names == []


async def test_a_warm_pool_of_pods(backend: KubernetesBackend) -> None:
    """The pool interface as it is: ready Pods handed out, the rest deleted at close."""
    from corral import AsyncPool

    async with AsyncPool(_QUICK, runtime=None, kernels=(), size=2, backend=backend) as pool:
        await pool.wait_ready(180)
        sb = await pool.take()
        try:
            assert (await sb.commands.run("echo pooled")).stdout == b"pooled\n"
        finally:
            await sb.close()
    assert await asyncio.to_thread(_ours, backend) == ([], [])


async def test_run_code_in_a_pod(backend: KubernetesBackend, image: str) -> None:
    """The code interpreter over the exec stream (the image's runtime: corral's default image)."""
    if image == MINIMAL_REF:
        pytest.skip("the minimal test image has no code runtime (corral image build makes one)")
    async with AsyncSandbox(_QUICK, backend=backend) as sb:
        execution = await sb.run_code("x = 6\nx * 7")
        assert execution.text == "42", execution
        again = await sb.run_code("print(x + 1)")
        assert "".join(again.logs.stdout) == "7\n", again


async def test_corral_serve_on_kubernetes(
    backend: KubernetesBackend, kubeconfig: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``corral serve --backend kubernetes --namespace NS``: a sandbox over HTTP is a Pod."""
    from corral import AsyncClient
    from tests.server_helpers import serving

    facts = backend.facts
    monkeypatch.setenv("KUBECONFIG", kubeconfig)
    monkeypatch.setenv("CORRAL_K8S_IMAGE", facts.image)
    monkeypatch.setenv("CORRAL_K8S_REQUEST_RATIO", str(facts.request_ratio))
    if facts.seccomp_localhost is not None:
        monkeypatch.setenv("CORRAL_K8S_SECCOMP_PROFILE", facts.seccomp_localhost)
    with serving("--backend", "kubernetes", "--namespace", NAMESPACE) as server:
        key = server.key()
        async with AsyncClient(server.url, api_key=key) as client, client.sandbox() as sb:
            await sb.files.write("x.txt", b"over http")
            result = await sb.commands.run("cat x.txt; hostname")
            assert result.stdout == b"over http" + b"sandbox\n", result
            pods, _ = await asyncio.to_thread(_all_corral_pods, backend)
            assert pods, "no Pod behind the server's sandbox"


def _all_corral_pods(backend: KubernetesBackend) -> tuple[list[str], None]:
    cluster = backend.cluster
    items = cluster.core.list_namespaced_pod(
        NAMESPACE, label_selector="app.kubernetes.io/managed-by=corral"
    ).items
    return [p.metadata.name for p in items if p.metadata.deletion_timestamp is None], None


async def test_a_pod_deleted_from_outside_ends_the_sandbox_with_that_reason(
    backend: KubernetesBackend,
) -> None:
    from corral._errors import SandboxBroken

    sb = AsyncSandbox(_QUICK, runtime=None, backend=backend)
    await sb.start()
    try:
        box = sb._box
        assert isinstance(box, KubernetesBox)
        await asyncio.to_thread(
            backend.cluster.core.delete_namespaced_pod, box.name, NAMESPACE, grace_period_seconds=0
        )
        await asyncio.wait_for(box.wait(), 60)
        assert box.end_reason == "the Pod was deleted", box.end_reason
        with pytest.raises(SandboxBroken):
            await sb.commands.run("true")
    finally:
        await sb.close()


async def test_the_pods_deadline_ends_a_one_shot_box_with_that_reason(
    backend: KubernetesBackend,
) -> None:
    """activeDeadlineSeconds (the wall limit + 30 s) ends a box no corral timer ends."""
    policy = _QUICK.with_limits(wall_time_s=1.0)
    box = await backend.launch(BoxSpec(("sleep", "600"), policy))
    try:
        status = await asyncio.wait_for(box.wait(), 120)
        assert status.exit_code == 137, status
        assert box.end_reason is not None, box.end_reason
        assert box.end_reason.startswith("DeadlineExceeded"), box.end_reason
    finally:
        await box.aclose()


async def test_zz_every_pod_is_gone_in_the_end(backend: KubernetesBackend) -> None:
    """Last: every Pod this process made, deleted ones included, is gone within 2 minutes."""
    cluster = backend.cluster
    selector = f"{OWNER_LABEL}={cluster.owner}"
    left: list[str] = []
    for _ in range(120):
        pods = await asyncio.to_thread(
            cluster.core.list_namespaced_pod, NAMESPACE, label_selector=selector
        )
        left = [p.metadata.name for p in pods.items]
        if not left:
            return
        await asyncio.sleep(1)
    raise AssertionError(f"Pods left behind: {left}")
