"""One Kubernetes box: its Pod (and NetworkPolicy), and the exec stream into it.

The Pod's pid 1 only reaps (``_render.PID1``); the box's first program (the
agent, or a one-shot command) is started by exec through the launcher
(``_launcher.py``), which is streamed in with the agent's files over the
exec's stdin: any image with ``/usr/bin/python3`` works and nothing of corral
is in the image. The box ends when that process ends (its exec stream
closes with its status) or the Pod does (deleted, evicted, past its
deadline: the exec stream closes then too).

Why it ended is read from the Pod's status, never guessed: the container's
``terminated.reason`` (``OOMKilled``: containerd marks a container whose
memory cgroup killed any process), the Pod's ``reason`` (``Evicted``,
``DeadlineExceeded``), or its deletion. A process the memory limit killed
does not end the container by itself, so when a box's program dies of
SIGKILL the box asks its pid 1 to end and reads the container's reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from corral._box import AGENT_DIR
from corral._errors import SandboxError, UnsupportedPolicy
from corral.backends._base import BoxExit, BoxSpec, Usage
from corral.backends.kubernetes import _render
from corral.backends.kubernetes._exec import PYTHON, ExecStatus, ExecStream, launcher_payload
from corral.plan._rlimits import plan_rlimits

if TYPE_CHECKING:
    from corral.backends.kubernetes import KubernetesBackend

_START_TIMEOUT_S = 120.0  # scheduling, image, container start
_EVIDENCE_TIMEOUT_S = 10.0
_DELETE_TIMEOUT_S = 30.0
_WAITING_FAILURES = frozenset(
    (
        "ErrImagePull",
        "ImagePullBackOff",
        "ErrImageNeverPull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
        "CrashLoopBackOff",
    )
)
_END_PID1 = "import os, signal\nos.kill(1, signal.SIGTERM)\n"


class KubernetesBox:
    """One Pod. Implements ``corral.backends.Box``."""

    def __init__(
        self, backend: KubernetesBackend, spec: BoxSpec, degraded: tuple[str, ...]
    ) -> None:
        self.backend = backend
        self.cluster = backend.cluster
        self.spec = spec
        self.policy = spec.policy
        self._degraded = degraded
        # a caller's image (BoxSpec.image) over the backend's
        image = spec.image
        self.facts = dataclasses.replace(backend.facts, image=image) if image else backend.facts
        self.box_id = secrets.token_hex(6)
        self.name = f"corral-{self.box_id}"
        self.namespace = self.cluster.namespace
        self.pod_uid: str | None = None
        self.end_reason: str | None = None  # from the Pod's status: why it ended
        self._netpol = False
        self._pod_created = False
        self._exec: ExecStream | None = None
        self._loop = asyncio.get_running_loop()
        self._ended: asyncio.Future[ExecStatus] = self._loop.create_future()
        self._running: asyncio.Future[None] = self._loop.create_future()
        self._pod: Any = None
        self._pod_gone = asyncio.Event()
        self._pod_terminated = asyncio.Event()
        self._killed = False
        self._kill_task: asyncio.Future[Any] | None = None
        self._oom = False
        self._status: BoxExit | None = None
        self._closing: asyncio.Future[None] | None = None

    # -- the Box interface ---------------------------------------------------------------

    @property
    def degraded(self) -> tuple[str, ...]:
        return self._degraded

    @property
    def channel(self) -> tuple[int, int] | None:
        if self.spec.stdio != "channel" or self._exec is None:
            return None
        return (self._exec.host_stdout, self._exec.host_stdin)

    @property
    def stdout(self) -> int | None:
        if self.spec.stdio == "channel" or self._exec is None:
            return None
        return self._exec.host_stdout

    @property
    def stderr(self) -> int | None:
        return self._exec.host_stderr if self._exec is not None else None

    @property
    def env(self) -> Mapping[str, str]:
        return dict(self.policy.env)

    @property
    def network(self) -> None:
        return None

    async def wait(self) -> BoxExit:
        if self._status is None:
            status = await asyncio.shield(self._ended)
            if status.exit_code is None or (status.exit_code == 137 and not self._killed):
                await self._gather_evidence()
            code = status.exit_code if status.exit_code is not None else 137
            if self._status is None:
                self._status = BoxExit.from_code(code)
        return self._status

    def usage(self) -> Usage:
        # the API has no per-Pod counters without metrics-server; the OOM kill is the
        # container's terminated reason (see the module's docstring)
        return Usage(oom_kills=1 if self._oom else 0)

    def info(self) -> Mapping[str, str]:
        return {
            "backend": "kubernetes",
            "namespace": self.namespace,
            "pod": self.name,
            "uid": self.pod_uid or "",
            "box": self.box_id,
        }

    def exec_failure(self, exit_code: int, stderr: bytes) -> bytes | None:
        # the launcher (_launcher.py) already says it in corral's words
        return None

    def kill(self) -> None:
        """Delete the Pod (every process in it ends) and drop the exec stream. Never waits."""
        if self._killed or not self._pod_created:
            self._killed = True
            if self._exec is not None:
                self._exec.close_stream()
            return
        self._killed = True
        if self.end_reason is None:
            self.end_reason = "killed by corral"
        if self._exec is not None:
            self._exec.close_stream()
        self._kill_task = asyncio.ensure_future(self._delete_pod())

    async def pause(self) -> None:
        raise SandboxError(
            "cannot pause: Kubernetes has no way to freeze a Pod's processes "
            "(the container runtime's pause is not in its API)"
        )

    async def resume(self) -> None:
        raise SandboxError("cannot resume: a Kubernetes box is never paused")

    async def aclose(self) -> None:
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    # -- launch --------------------------------------------------------------------------

    @classmethod
    async def start(cls, backend: KubernetesBackend, spec: BoxSpec) -> KubernetesBox:
        command = spec.command
        if not command:
            raise ValueError("command must not be empty")
        if any("\0" in str(arg) for arg in command):
            raise ValueError("a command argument must not contain NUL bytes")
        for f in spec.extra_files:
            if not f.path.startswith(AGENT_DIR + "/"):
                raise ValueError(
                    f"extra file {f.path!r}: a Pod takes extra files under {AGENT_DIR}"
                )
        if spec.workdir is not None and not spec.own_workdir:
            raise UnsupportedPolicy(
                "workdir",
                "a host directory cannot be a Pod's workspace (its workspace is an emptyDir "
                "on its node): write files in with sandbox.files",
            )
        degraded = _render.check(spec.policy, backend.facts)
        box = cls(backend, spec, degraded)
        try:
            await box._create()
            await asyncio.wait_for(asyncio.shield(box._running), _START_TIMEOUT_S)
            await box._start_exec()
        except BaseException as exc:
            await box.aclose()
            if isinstance(exc, TimeoutError):
                raise SandboxError(
                    f"the Pod {box.name} did not start within {_START_TIMEOUT_S:.0f} s"
                    f"{box._pod_summary()}"
                ) from exc
            raise
        return box

    def _inputs(self) -> _render.PodInputs:
        return _render.PodInputs(
            name=self.name,
            box_id=self.box_id,
            owner=self.cluster.owner,
            one_shot=self.spec.stdio == "pipes",
            owner_refs=self.backend.owner_refs,
        )

    async def _create(self) -> None:
        inputs = self._inputs()
        pod = _render.render_pod(self.policy, self.facts, inputs)
        self.cluster.follow(self.name, self._on_pod_event)
        # one call on a thread, which records what exists as it goes: cancelled,
        # the call still finishes (Cluster.call), and aclose deletes what it made
        await self.cluster.call(self._create_objects, inputs, pod)

    def _create_objects(self, inputs: _render.PodInputs, pod: dict[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException

        cluster = self.cluster
        try:
            # the NetworkPolicy first: it selects the Pod by label from its first packet
            cluster.net.create_namespaced_network_policy(
                self.namespace, _render.render_network_policy(inputs)
            )
            self._netpol = True
            created = cluster.core.create_namespaced_pod(self.namespace, pod)
            self._pod_created = True
            self.pod_uid = created.metadata.uid
            # the Pod owns its NetworkPolicy: the garbage collector removes both together
            cluster.net.patch_namespaced_network_policy(
                self.name,
                self.namespace,
                {"metadata": {"ownerReferences": [_pod_owner_ref(self.name, self.pod_uid)]}},
            )
        except ApiException as exc:
            raise SandboxError(
                f"cannot create the Pod in namespace {self.namespace!r}: "
                f"{exc.status} {exc.reason}: {_api_message(exc)}"
            ) from exc

    async def _start_exec(self) -> None:
        spec, policy = self.spec, self.policy
        rlimits = [
            (r.resource, r.soft, r.hard)
            for r in plan_rlimits(policy.limits, cgroups=frozenset(("memory", "cpu")))
            if not (spec.per_command_cpu and r.resource == "RLIMIT_CPU")
        ]
        header = {
            "argv": list(spec.command),
            "env": [list(kv) for kv in policy.env],
            "cwd": policy.filesystem.workspace,
            "rlimits": rlimits,
            "files": [(f.path, f.mode, len(f.content)) for f in spec.extra_files],
            "stdin": len(spec.stdin) if spec.stdin is not None else None,
            "channel": spec.stdio == "channel",
        }
        payload = launcher_payload(header, [f.content for f in spec.extra_files], spec.stdin)
        await self.cluster.call(self._open_exec, payload)

    def _open_exec(self, payload: bytes) -> None:
        # on a thread, recorded as soon as it exists: aclose closes it whatever happened
        self._exec = ExecStream.open(
            self.cluster.configuration,
            self.namespace,
            self.name,
            _render.CONTAINER,
            self._on_exec_end,
        )
        self._exec.start(payload)

    # -- events (from the backend's threads) -------------------------------------------

    def _on_exec_end(self, status: ExecStatus) -> None:
        self._loop.call_soon_threadsafe(self._exec_ended, status)

    def _exec_ended(self, status: ExecStatus) -> None:
        if not self._ended.done():
            self._ended.set_result(status)

    def _on_pod_event(self, kind: str, pod: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
            self._loop.call_soon_threadsafe(self._pod_changed, kind, pod)

    def _pod_changed(self, kind: str, pod: Any) -> None:
        if self.pod_uid is not None and pod.metadata.uid != self.pod_uid:
            return  # an older Pod of the same name
        self._pod = pod
        status = pod.status
        container = _container_status(pod)
        if kind == "DELETED":
            self._pod_gone.set()
            self._pod_terminated.set()
            if self.end_reason is None and not self._ended.done():
                self.end_reason = "the Pod was deleted"
        terminated = container.state.terminated if container and container.state else None
        waiting = container.state.waiting if container and container.state else None
        if terminated is not None:
            self._pod_terminated.set()
            if terminated.reason == "OOMKilled":
                self._oom = True
                self.end_reason = self.end_reason or "OOMKilled"
        if status is not None and status.phase in ("Failed", "Succeeded"):
            self._pod_terminated.set()
            if status.reason and (self.end_reason is None or self.end_reason == "OOMKilled"):
                # Evicted (past its ephemeral storage, node pressure), DeadlineExceeded, ...
                self.end_reason = f"{status.reason}: {status.message or ''}".strip(": ")
        if not self._running.done():
            if container is not None and container.state and container.state.running:
                self._running.set_result(None)
            elif (waiting is not None and waiting.reason in _WAITING_FAILURES) or (
                self._pod_terminated.is_set()
            ):
                state = terminated or waiting
                why = f"{state.reason}: {state.message or ''}" if state is not None else ""
                hint = (
                    f" (its image {self.facts.image!r} must be present on the node and "
                    f"have {PYTHON})"
                    if state is not None
                    else ""
                )
                self._running.set_exception(
                    SandboxError(
                        f"the Pod {self.name} cannot start{self._pod_summary()}: "
                        f"{why.strip(': ') or self.end_reason or 'no reason given'}{hint}"
                    )
                )
                self._running.exception()  # retrieved: a start given up on awaits it no more
        if self._pod_terminated.is_set() and self._exec is None and not self._ended.done():
            self._ended.set_result(ExecStatus(None, self.end_reason or "the Pod ended"))

    def _pod_summary(self) -> str:
        pod = self._pod
        if pod is None or pod.status is None:
            return ""
        bits = [f"phase {pod.status.phase}"]
        for cond in pod.status.conditions or ():
            if cond.status != "True" and cond.message:
                bits.append(f"{cond.type}: {cond.message}")
        return f" ({'; '.join(bits)})"

    # -- evidence ------------------------------------------------------------------------

    async def _gather_evidence(self) -> None:
        """Why a program died of SIGKILL (or vanished): end the container and read its reason."""
        if self._killed or not self._pod_created:
            return
        if not self._pod_terminated.is_set():
            with contextlib.suppress(Exception):
                await self.cluster.call(self._end_pid1)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._pod_terminated.wait(), _EVIDENCE_TIMEOUT_S)

    def _end_pid1(self) -> None:
        from kubernetes import client
        from kubernetes.stream import stream

        api = client.ApiClient(self.cluster.configuration)
        try:
            ws = stream(
                client.CoreV1Api(api).connect_get_namespaced_pod_exec,
                self.name,
                self.namespace,
                container=_render.CONTAINER,
                command=[PYTHON, "-I", "-S", "-c", _END_PID1],
                stdin=False,
                stdout=True,
                stderr=True,
                tty=False,
                _preload_content=False,  # preloaded, the client never closes its socket
            )
            try:
                ws.run_forever(timeout=_EVIDENCE_TIMEOUT_S)
            finally:
                ws.close()
                ws.sock.shutdown()  # close() leaves it open once the peer has closed
        finally:
            api.close()  # type: ignore[no-untyped-call]

    # -- teardown ------------------------------------------------------------------------

    async def _delete_pod(self) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            await self.cluster.call(
                self.cluster.core.delete_namespaced_pod,
                self.name,
                self.namespace,
                grace_period_seconds=1,  # pid 1 ends on SIGTERM at once; SIGKILL after 1 s
            )
        except ApiException as exc:
            if exc.status != 404:
                raise SandboxError(f"cannot delete the Pod {self.name}: {exc.reason}") from exc
            self._pod_gone.set()
            self._pod_terminated.set()

    async def _close(self) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            if self._pod_created:
                if self._kill_task is None:
                    self._killed = True
                    self._kill_task = asyncio.ensure_future(self._delete_pod())
                await asyncio.shield(self._kill_task)
                # until every process of the box has ended (its container terminated);
                # the kubelet then removes the Pod object itself (on 1.20 up to ~20 s later)
                if not self._pod_terminated.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._pod_terminated.wait(), _DELETE_TIMEOUT_S)
            if self._netpol:
                with contextlib.suppress(ApiException):
                    await self.cluster.call(
                        self.cluster.net.delete_namespaced_network_policy, self.name, self.namespace
                    )
        finally:
            self.cluster.unfollow(self.name)
            if self._exec is not None:
                self._exec.close_stream()
                self._exec.end_input()
                await self.cluster.call(self._exec.join, 5.0)
                self._exec.close()
            if not self._ended.done():
                self._ended.set_result(ExecStatus(None, "the box was closed"))


def _container_status(pod: Any) -> Any:
    for status in (pod.status.container_statuses or ()) if pod.status else ():
        if status.name == _render.CONTAINER:
            return status
    return None


def _pod_owner_ref(name: str, uid: str | None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}


def _api_message(exc: Any) -> str:
    import json

    try:
        return str(json.loads(exc.body).get("message", ""))
    except (TypeError, ValueError, AttributeError):
        return str(exc.body or "")[:300]
