"""The cluster as the backend sees it: its configuration, API calls, one watch of its Pods.

Through the official Python client (``kubernetes``, kubernetes-client/python):
its configuration loading is the one every Kubernetes tool shares
(``KUBECONFIG``, the current context and its namespace, in-cluster service
account), and its exec stream is websocket-client, maintained beside it. It
is synchronous: every call here blocks, and the backend runs them on a
thread pool of its own (32 threads: a burst of creations is not queued
behind asyncio's default pool of cpu+4). The async fork
(``kubernetes_asyncio``) would save those threads, but the box's channel is a
pair of host pipes (``Box.channel``) pumped with blocking writes for
backpressure, so the exec stream wants threads either way.

One watch per backend follows every Pod this process made (by its owner
label) and hands each change to the box it belongs to, rather than one watch
or poll per box: a hundred boxes cost the apiserver one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from corral._errors import HostToolMissing, SandboxError
from corral.backends.kubernetes._render import OWNER_LABEL

T = TypeVar("T")
_INSTALL = "pip install 'corral[kubernetes]' (the official client, kubernetes)"
_WATCH_TIMEOUT_S = 30  # the watch is renewed this often (and notices it is unwanted)


def _client() -> Any:
    try:
        import kubernetes
    except ImportError as exc:
        raise HostToolMissing("the Kubernetes Python client", _INSTALL) from exc
    return kubernetes


def owner_id() -> str:
    """This process as a label value: ``<host>.<pid>.<start time>`` (a pid
    reused later has another start time), at most 63 characters."""
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            start = int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        start = 0
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40].strip("-") or "host"
    return f"{host}.{pid}.{start}"


def owner_alive(owner: str) -> bool | None:
    """Whether the corral process ``owner`` names still runs: None when it
    was on another host (this host cannot tell)."""
    here = owner_id().split(".")[0]
    parts = owner.rsplit(".", 2)
    if len(parts) != 3 or parts[0] != here:
        return None
    try:
        pid, start = int(parts[1]), int(parts[2])
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19]) == start
    except (OSError, IndexError, ValueError):
        return False


class Cluster:
    """API access to one namespace of one cluster (configuration loaded once).

    ``kubeconfig``: a kubeconfig path (None: ``KUBECONFIG`` or ~/.kube/config,
    or the in-cluster service account inside a Pod). ``namespace``: None
    takes the current context's, else ``default``. Raises
    ``HostToolMissing`` without the client, ``SandboxError`` without a
    usable configuration."""

    def __init__(self, namespace: str | None = None, kubeconfig: str | None = None) -> None:
        k8s = _client()
        self.configuration = k8s.client.Configuration()
        context_ns = None
        try:
            if kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ:
                k8s.config.load_incluster_config(client_configuration=self.configuration)
                with contextlib.suppress(OSError):
                    context_ns = (
                        open(  # noqa: SIM115
                            "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
                        )
                        .read()
                        .strip()
                    )
            else:
                k8s.config.load_kube_config(
                    config_file=kubeconfig, client_configuration=self.configuration
                )
                with contextlib.suppress(Exception):
                    _, active = k8s.config.list_kube_config_contexts(config_file=kubeconfig)
                    context_ns = active["context"].get("namespace")
        except Exception as exc:  # the client raises ConfigException and plain errors alike
            raise SandboxError(
                f"no usable Kubernetes configuration ({exc}): set KUBECONFIG to a kubeconfig, "
                "or run inside a Pod with a service account"
            ) from exc
        self.namespace = namespace or context_ns or "default"
        self.api_client = k8s.client.ApiClient(self.configuration)
        self.core = k8s.client.CoreV1Api(self.api_client)
        self.net = k8s.client.NetworkingV1Api(self.api_client)
        self.pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="corral-k8s")
        self.owner = owner_id()
        self._watchers: dict[str, Callable[[str, Any], None]] = {}
        self._watch_lock = threading.Lock()
        self._watch_thread: threading.Thread | None = None

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the backend's threads. Cancelled, it still
        waits for the call to finish (a thread cannot be stopped, and a Pod it
        creates must be known to be deleted), then raises ``CancelledError``."""
        from urllib3.exceptions import HTTPError

        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.pool, lambda: fn(*args, **kwargs))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            await asyncio.wait({fut})
            raise
        except HTTPError as exc:  # the connection, not the API, failed
            where = self.configuration.host
            raise SandboxError(f"the Kubernetes API server {where} did not answer: {exc}") from exc

    # -- the watch ---------------------------------------------------------------------

    def follow(self, pod: str, on_event: Callable[[str, Any], None]) -> None:
        """Call ``on_event(type, V1Pod)`` (from the watch thread) for each change
        of ``pod`` (one of this process's), until ``unfollow``."""
        with self._watch_lock:
            self._watchers[pod] = on_event
            if self._watch_thread is None or not self._watch_thread.is_alive():
                self._watch_thread = threading.Thread(
                    target=self._watch, name="corral-k8s-watch", daemon=True
                )
                self._watch_thread.start()

    def unfollow(self, pod: str) -> None:
        with self._watch_lock:
            self._watchers.pop(pod, None)

    def _watch(self) -> None:
        k8s = _client()
        selector = f"{OWNER_LABEL}={self.owner}"
        version: str | None = None
        while True:
            with self._watch_lock:
                if not self._watchers:
                    self._watch_thread = None
                    return
            watch = k8s.watch.Watch()
            try:
                if version is None:  # a fresh list: every followed Pod's state now
                    listed = self.core.list_namespaced_pod(self.namespace, label_selector=selector)
                    version = listed.metadata.resource_version
                    for pod in listed.items:
                        self._dispatch("MODIFIED", pod)
                for event in watch.stream(
                    self.core.list_namespaced_pod,
                    self.namespace,
                    label_selector=selector,
                    resource_version=version,
                    timeout_seconds=_WATCH_TIMEOUT_S,
                    allow_watch_bookmarks=True,
                ):
                    pod = event["object"]
                    if pod.metadata is not None and pod.metadata.resource_version:
                        version = pod.metadata.resource_version
                    if event["type"] != "BOOKMARK":
                        self._dispatch(event["type"], pod)
            except Exception:  # expired (410) or a broken connection: relist
                version = None
                threading.Event().wait(0.5)
            finally:
                watch.stop()

    def _dispatch(self, kind: str, pod: Any) -> None:
        with self._watch_lock:
            handler = self._watchers.get(pod.metadata.name)
        if handler is not None:
            handler(kind, pod)
