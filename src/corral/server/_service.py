"""The sandboxes of ``corral serve``: who owns which, how long they live, why they ended.

``Service`` is the HTTP API's engine, free of HTTP: it keeps the live
``AsyncSandbox`` objects of this process, records every sandbox in the
``Store``, enforces the per-key quotas, and ends sandboxes for an explicit
reason. Nothing ends silently: every end is one of ``END_REASONS``, written to
the database with the time and (for limits) which limit, and stays readable for
the retention period, with the workspace still downloadable.

Boxes die with the process that started them (``setpriv --pdeathsig``), so a
server killed with ``kill -9`` cannot re-adopt them: at the next start every
sandbox the database still calls running is ended with reason
``server_restarted``, its half-written uploads are removed, and its workspace
stays downloadable until its retention ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from corral import _runtime
from corral._errors import CorralError, PolicyError, SandboxClosed, public_message
from corral._policy import Policy
from corral._sandbox import AsyncSandbox, EntryInfo, workspace_relative
from corral.backends import get_backend
from corral.net._events import NetworkEvent
from corral.net._rules import unsafe_allow_rule

from . import _internals
from ._live import Live, ServiceError
from ._metrics import Metrics
from ._store import ApiKey, SandboxRow, Store
from ._usage import UsageConfig, UsageHistory
from ._workspace import (
    _DIR_FLAGS,
    _usage,
    list_beneath,
    open_file_beneath,
    prepare_data_dir,
    remove_tree,
    stat_beneath,
)

EndReason = Literal[
    "closed",  # the client closed it
    "timeout",  # its lifetime ran out
    "idle",  # nothing used it for idle_timeout_s
    "limit",  # a limit killed it (``limit_hit`` says which)
    "crashed",  # the box ended underneath us
    "start_failed",  # it never started (the error said why)
    "server_shutdown",  # the server stopped cleanly
    "server_restarted",  # the server was killed; found at the next start
]
END_REASONS: tuple[str, ...] = EndReason.__args__  # type: ignore[attr-defined]

_DISK_CHECK_S = 2.0
_MAX_FILES = 200_000  # entries in one workspace: inodes are a host resource too


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    data_dir: Path
    retention_s: float = 7 * 24 * 3600.0  # ended sandboxes: record and workspace
    default_timeout_s: float = 300.0
    max_timeout_s: float = 24 * 3600.0
    max_sandboxes: int = 200  # the whole server
    max_upload_bytes: int = 1 << 30
    max_output_bytes: int = 64 << 20  # a command's kept output: it lives in the server's memory
    allow_private_network: bool = False  # address rules to private ranges, and mode open
    reap_interval_s: float = 0.5
    backend: str = "bwrap"  # what starts every box (corral.backends)
    usage: UsageConfig = field(default_factory=UsageConfig)  # the per-sandbox usage series


class Service:
    def __init__(self, store: Store, config: ServiceConfig, metrics: Metrics | None = None) -> None:
        self.store = store
        self.config = config
        self.metrics = metrics or Metrics()
        self.instance = os.urandom(8).hex()
        self.live: dict[str, Live] = {}
        self.workspaces = config.data_dir / "workspaces"
        self._create_lock = asyncio.Lock()
        self._starting = 0
        self._reaper: asyncio.Task[None] | None = None
        self._sampler: asyncio.Task[None] | None = None
        # usage series: one per live sandbox, and ended ones for a while (oldest first)
        self.usage_series: dict[str, UsageHistory] = {}
        # per-sandbox objects not yet freed, for /metrics: a long-running
        # server must hold none of an ended sandbox's
        self.objects: dict[str, weakref.WeakSet[Any]] = {
            "AsyncSandbox": weakref.WeakSet(),
            "Live": weakref.WeakSet(),
            "OutputLog": weakref.WeakSet(),
        }
        self.metrics.server_counts = self._server_counts

    def _server_counts(self) -> dict[str, int]:
        gc.collect()  # count what is alive, not garbage awaiting the cyclic collector
        return {
            "live_sandboxes": len(self.live),
            "starting_sandboxes": self._starting,
            "tasks": len(asyncio.all_tasks()),
            "threads": threading.active_count(),
            **{f"objects_{name}": len(alive) for name, alive in self.objects.items()},
        }

    # -- life of the service -------------------------------------------------------

    async def start(self) -> None:
        prepare_data_dir(self.config.data_dir, self.workspaces)
        # boxes of a killed server died with it (pdeathsig); their cgroups,
        # mounts and workspace images stay: undone (and the workspaces' content
        # copied out) before anything reads a workspace
        await get_backend(self.config.backend).sweep()
        for row in self.store.list_sandboxes(state="running", limit=1_000_000):
            self.store.end_sandbox(
                row.id,
                reason="server_restarted",
                detail="the server that ran it stopped without closing it",
                limit_hit=None,
                retain_until=time.time() + self.config.retention_s,
            )
            self._seal_workspace(row.id)
            self.store.audit(
                "sandbox.end", key_id=row.key_id, sandbox_id=row.id, reason="server_restarted"
            )
            self.metrics.ended("server_restarted")
        self._purge_expired()
        self._reaper = asyncio.ensure_future(self._reap())
        self._sampler = asyncio.ensure_future(self._sample())

    async def stop(self) -> None:
        for task in (self._reaper, self._sampler):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await asyncio.gather(
            *(self.end(sid, "server_shutdown") for sid in list(self.live)),
            return_exceptions=True,
        )

    # -- sandboxes -----------------------------------------------------------------

    def resolve_policy(self, spec: str | Mapping[str, Any] | None) -> Policy:
        """A preset name or a policy object. Host binds are refused: a remote
        client naming host paths would read (or write) the server's files."""
        if spec is None:
            return Policy.preset("default")
        policy = Policy.preset(spec) if isinstance(spec, str) else Policy.from_dict(spec)
        for name in ("read_only", "writable"):
            if getattr(policy.filesystem, name):
                raise ServiceError(
                    403,
                    "policy_forbidden",
                    f"filesystem.{name}: binding host paths is not allowed through the API",
                )
        if policy.network.mode == "open" and not self.config.allow_private_network:
            # slirp4netns NATs to the host's LAN and metadata endpoints
            raise ServiceError(
                403,
                "policy_forbidden",
                "network.mode: 'open' reaches the server's LAN; this server does not allow it "
                "(corral serve --allow-private-network)",
            )
        self.check_rules(policy.network.allow)
        output = policy.limits.output_bytes
        if output is None or output > self.config.max_output_bytes:
            # kept output lives in the server's memory until the call returns
            raise ServiceError(
                403,
                "policy_forbidden",
                f"limits.output_bytes: at most {self.config.max_output_bytes} on this server",
            )
        return policy

    def check_rules(self, allow: Sequence[str]) -> None:
        """The proxy runs in the server's network namespace: an address rule to
        loopback or private ranges would let a box reach the server itself."""
        if self.config.allow_private_network:
            return
        for rule in allow:
            try:
                why = unsafe_allow_rule(rule)
            except ValueError as exc:
                raise PolicyError("network.allow", str(exc)) from None
            if why:
                raise ServiceError(
                    403,
                    "policy_forbidden",
                    f"network.allow: {rule!r} is refused on this server: {why} "
                    "(corral serve --allow-private-network)",
                )

    async def create(
        self,
        key: ApiKey,
        *,
        policy: Policy,
        runtime: str | None,
        timeout_s: float | None,
        idle_timeout_s: float | None,
        metadata: Mapping[str, str],
        env: Mapping[str, str],
        network_approval: bool,
    ) -> SandboxRow:
        """Start a sandbox for ``key``; its record. Refusals are ``ServiceError``
        (400 bad values, 403 beyond the key's per-sandbox limits, 429 quota)."""
        if timeout_s is None:
            timeout_s = self.config.default_timeout_s
        self._check_request(key, timeout_s, idle_timeout_s, runtime)
        if env:
            policy = policy.with_env(env)
        self._check_key_limits(key, policy)
        async with self._create_lock:  # quota check and insert as one step
            self._check_quota(key, policy)
            sandbox = AsyncSandbox(
                policy, timeout_s=None, runtime=runtime, backend=self.config.backend
            )
            workspace = self.workspaces / sandbox.id
            workspace.mkdir(mode=0o700)
            now = time.time()
            self.store.insert_sandbox(
                id=sandbox.id,
                key_id=key.id,
                policy=policy.to_dict(),
                metadata=dict(metadata),
                runtime=runtime,
                memory_bytes=policy.limits.memory_bytes,
                disk_bytes=policy.limits.disk_bytes,
                created_at=now,
                expires_at=now + timeout_s,
                idle_timeout_s=idle_timeout_s,
                instance=self.instance,
            )
            self._starting += 1  # a slot, held while the box starts
        live = Live(
            sandbox,
            key,
            now + timeout_s,
            idle_timeout_s,
            workspace,
            self.store,
            self.metrics,
            self.objects["OutputLog"].add,
        )
        await self._launch(live, network_approval)
        self.store.audit(
            "sandbox.create",
            key_id=key.id,
            sandbox_id=sandbox.id,
            policy=policy.name,
            metadata=dict(metadata),
            timeout_s=timeout_s,
        )
        row = self.store.get_sandbox(sandbox.id)
        assert row is not None
        return row

    def _check_request(
        self, key: ApiKey, timeout_s: float, idle_timeout_s: float | None, runtime: str | None
    ) -> None:
        if not 0 < timeout_s <= self.config.max_timeout_s:
            raise ServiceError(
                400,
                "invalid_request",
                f"timeout_s: must be > 0 and at most {self.config.max_timeout_s:g}",
            )
        if key.max_lifetime_s is not None and timeout_s > key.max_lifetime_s:
            raise ServiceError(
                403,
                "quota_forbidden",
                f"timeout_s: this key allows sandboxes of at most {key.max_lifetime_s:g} s",
            )
        if idle_timeout_s is not None and not 0 < idle_timeout_s < float("inf"):
            raise ServiceError(400, "invalid_request", "idle_timeout_s: must be > 0")
        try:
            missing = runtime is not None and _runtime.find(runtime) is None
        except CorralError as exc:  # a malformed name
            raise ServiceError(400, "invalid_request", f"runtime: {exc}") from None
        if missing:
            raise ServiceError(400, "invalid_request", f"runtime: no runtime named {runtime!r}")

    @staticmethod
    def _check_key_limits(key: ApiKey, policy: Policy) -> None:
        """The key's limits on one sandbox (403): each needs a finite limit."""
        for name, limit, value in (
            ("memory_bytes", key.max_memory_bytes, policy.limits.memory_bytes),
            ("disk_bytes", key.max_disk_bytes, policy.limits.disk_bytes),
        ):
            if limit is not None and (value is None or value > limit):
                raise ServiceError(
                    403,
                    "quota_forbidden",
                    f"limits.{name}: this key allows at most {limit} bytes "
                    "per sandbox (and needs a limit)",
                )

    def _check_quota(self, key: ApiKey, policy: Policy) -> None:
        """The server's and the key's totals (429); called under the create lock."""
        memory, disk = policy.limits.memory_bytes, policy.limits.disk_bytes
        if len(self.live) + self._starting >= self.config.max_sandboxes:
            raise ServiceError(429, "server_full", "the server runs its maximum of sandboxes")
        count, memory_used = self.store.running_usage(key.id)
        if key.max_sandboxes is not None and count >= key.max_sandboxes:
            raise ServiceError(
                429,
                "quota_exceeded",
                f"this key may run {key.max_sandboxes} sandboxes at once; close one first",
            )
        if key.max_memory_bytes is not None and memory_used + (memory or 0) > (
            key.max_memory_bytes
        ):
            raise ServiceError(
                429,
                "quota_exceeded",
                f"this key's running sandboxes may use {key.max_memory_bytes} bytes of "
                f"memory in total; {memory_used} are in use",
            )
        if key.max_disk_bytes is not None:
            # ended workspaces are kept for the retention period: they count
            # until purged, else a key could fill the server's disk with them
            disk_used = self.store.disk_usage(key.id)
            if disk_used + (disk or 0) > key.max_disk_bytes:
                raise ServiceError(
                    429,
                    "quota_exceeded",
                    f"this key's sandboxes may take {key.max_disk_bytes} bytes of disk in "
                    f"total (running: their disk limit, ended: their retained workspace "
                    f"until purged); {disk_used} are taken. Delete an ended sandbox's "
                    "workspace (DELETE /v1/sandboxes/{id}/workspace) or wait for its "
                    "retention to end",
                )

    async def _launch(self, live: Live, network_approval: bool) -> None:
        """Start the reserved sandbox; on failure it is ended ``start_failed``."""
        sandbox = live.sandbox
        self.objects["AsyncSandbox"].add(sandbox)
        self.objects["Live"].add(live)
        # the callbacks name the sandbox, not ``live``: whatever keeps them
        # (the box, its proxy) must not keep an ended sandbox's tables alive
        sandbox_id, key_id = sandbox.id, live.key.id
        _internals.adopt(
            sandbox,
            live.workspace,
            lambda event: self._network_event(key_id, sandbox_id, event),
            (lambda host, port: self._ask(sandbox_id, host, port)) if network_approval else None,
        )
        try:
            await sandbox.start()
        except BaseException as exc:
            self._finish(sandbox_id, key_id, "start_failed", public_message(str(exc)), None)
            try:
                await sandbox.close()
            finally:
                self._starting -= 1
                self._seal_workspace(sandbox_id)
            raise
        self.live[sandbox_id] = live
        self.usage_series[sandbox_id] = UsageHistory.new(self.config.usage)
        self._starting -= 1
        self.metrics.created()

    def info(self, row: SandboxRow) -> dict[str, Any]:
        """A sandbox as the API shows it (``SandboxInfo``)."""
        live = self.live.get(row.id)
        return {
            "id": row.id,
            "state": row.state,
            "end_reason": row.end_reason,
            "limit_hit": row.limit_hit,
            "end_detail": row.end_detail,
            "created_at": row.created_at,
            "expires_at": row.expires_at,
            "ended_at": row.ended_at,
            "retain_until": row.retain_until,
            "workspace_available": row.state == "running" or not row.purged,
            "metadata": row.metadata,
            "runtime": row.runtime,
            "policy": row.policy,
            "degraded": list(live.sandbox.degraded) if live is not None else [],
        }

    def row(self, key: ApiKey, sandbox_id: str) -> SandboxRow:
        """The key's sandbox; another key's is as absent as a missing one (404)."""
        row = self.store.get_sandbox(sandbox_id)
        if row is None or row.key_id != key.id:
            raise ServiceError(404, "not_found", f"no sandbox {sandbox_id!r}")
        return row

    def get_live(self, key: ApiKey, sandbox_id: str) -> Live:
        live = self.live.get(sandbox_id)
        if live is not None and live.key.id == key.id:
            return live  # the hot path: no database read
        row = self.row(key, sandbox_id)
        if live is None or row.state != "running":
            raise ServiceError(
                409,
                "sandbox_ended",
                f"sandbox {sandbox_id} has ended ({row.end_reason or 'unknown'}"
                + (f": {row.limit_hit}" if row.limit_hit else "")
                + ")",
            )
        return live

    @contextlib.asynccontextmanager
    async def using(self, key: ApiKey, sandbox_id: str) -> AsyncIterator[Live]:
        """A live sandbox for one request: not idle while in use."""
        live = self.get_live(key, sandbox_id)
        live.busy += 1
        try:
            yield live
        except SandboxClosed:
            raise self._ended_error(sandbox_id) from None
        finally:
            live.busy -= 1
            live.last_used = time.monotonic()

    def _ended_error(self, sandbox_id: str) -> ServiceError:
        row = self.store.get_sandbox(sandbox_id)
        reason = row.end_reason if row is not None else None
        return ServiceError(409, "sandbox_ended", f"sandbox {sandbox_id} has ended ({reason})")

    def extend(self, key: ApiKey, sandbox_id: str, timeout_s: float) -> SandboxRow:
        live = self.get_live(key, sandbox_id)
        if not 0 < timeout_s <= self.config.max_timeout_s:
            raise ServiceError(
                400,
                "invalid_request",
                f"timeout_s: must be > 0 and at most {self.config.max_timeout_s:g}",
            )
        row = self.row(key, sandbox_id)
        expires_at = time.time() + timeout_s
        if key.max_lifetime_s is not None and expires_at - row.created_at > key.max_lifetime_s:
            raise ServiceError(
                403,
                "quota_forbidden",
                f"timeout_s: this key allows sandboxes of at most {key.max_lifetime_s:g} s",
            )
        live.expires_at = expires_at
        self.store.set_expiry(sandbox_id, expires_at)
        return self.row(key, sandbox_id)

    async def end(
        self,
        sandbox_id: str,
        reason: EndReason,
        *,
        detail: str | None = None,
        limit: str | None = None,
    ) -> None:
        live = self.live.pop(sandbox_id, None)
        if live is None:
            return
        live.ended(reason)
        self._usage_ended(sandbox_id, live)
        # recorded first: calls cut short by the close read this reason
        self._finish(sandbox_id, live.key.id, reason, detail, limit)
        try:
            await live.sandbox.close()
        finally:
            live.clear()
            await asyncio.to_thread(self._seal_workspace, sandbox_id)

    def _finish(
        self, sandbox_id: str, key_id: str, reason: EndReason, detail: str | None, limit: str | None
    ) -> None:
        if self.store.end_sandbox(
            sandbox_id,
            reason=reason,
            detail=detail,
            limit_hit=limit,
            retain_until=time.time() + self.config.retention_s,
        ):
            self.store.audit(
                "sandbox.end", key_id=key_id, sandbox_id=sandbox_id, reason=reason, limit=limit
            )
            self.metrics.ended(reason)
            if limit is not None:
                self.metrics.limit_hit(limit)

    def _seal_workspace(self, sandbox_id: str) -> None:
        """An ended box's workspace: the top directory taken back from the
        box's uid (which another box may get), half-written uploads removed
        and its size recorded (it counts against the key's max_disk_bytes)."""
        workspace = self.workspaces / sandbox_id
        try:
            fd = os.open(workspace, _DIR_FLAGS)
        except FileNotFoundError:
            return
        try:  # by fd: the workspace's own name is the server's, but no path is trusted here
            if os.geteuid() == 0:
                os.fchown(fd, 0, 0)
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
        usage = _usage(workspace, 1 << 62, 1 << 62, remove_temps=True)
        self.store.set_retained(sandbox_id, usage.bytes)

    # -- the reaper ----------------------------------------------------------------

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(self.config.reap_interval_s)
            try:
                await self._reap_once()
            except Exception as exc:  # the reaper must outlive any one sandbox's trouble
                self.store.audit(
                    "server.reaper_error", key_id=None, sandbox_id=None, error=str(exc)
                )

    async def _reap_once(self) -> None:
        now, mono = time.time(), time.monotonic()
        for sandbox_id, live in list(self.live.items()):
            sb = live.sandbox
            if not await sb.is_running():
                if _internals.died_of_oom(sb):
                    await self.end(sandbox_id, "limit", limit="memory", detail="out of memory")
                else:
                    detail = public_message(_internals.failure(sb))
                    await self.end(sandbox_id, "crashed", detail=detail)
            elif live.expires_at is not None and now >= live.expires_at:
                await self.end(sandbox_id, "timeout")
            elif (
                live.idle_timeout_s is not None
                and live.busy == 0
                and not live.commands_running()
                and mono - live.last_used >= live.idle_timeout_s
            ):
                await self.end(sandbox_id, "idle")
            elif mono >= live.next_disk_check:
                live.next_disk_check = mono + _DISK_CHECK_S
                limit = sb.policy.limits.disk_bytes
                usage = await asyncio.to_thread(
                    _usage, live.workspace, limit if limit is not None else 1 << 62, _MAX_FILES
                )
                # the host workspace has no total bound of its own (per-file
                # only): a box that fills the host's disk, or its inodes, ends here
                live.disk_bytes = usage.bytes
                if limit is not None and usage.bytes > limit:
                    await self.end(sandbox_id, "limit", limit="disk", detail="workspace full")
                elif usage.files > _MAX_FILES:
                    await self.end(
                        sandbox_id, "limit", limit="disk", detail=f"over {_MAX_FILES} files"
                    )
                elif usage.too_deep:  # what the walker cannot count is refused, not ignored
                    await self.end(sandbox_id, "limit", limit="disk", detail=usage.why)
        await asyncio.to_thread(self._purge_expired)

    def _purge_expired(self) -> None:
        for row in self.store.due_for_purge(time.time()):
            # one workspace that cannot be removed must not keep every other
            # tenant's from being freed: it is tried again at the next pass
            with contextlib.suppress(OSError):
                self._purge(row.id)

    def _purge(self, sandbox_id: str) -> None:
        """Remove an ended workspace (symlinks the box left are never
        followed; any depth); OSError, and it stays counted, if that fails."""
        remove_tree(self.workspaces / sandbox_id)
        self.store.mark_purged(sandbox_id)

    async def delete_workspace(self, key: ApiKey, sandbox_id: str) -> SandboxRow:
        """Purge an ended sandbox's workspace now (its record stays): frees the
        key's max_disk_bytes before the retention ends. 409 while it runs."""
        row = self.row(key, sandbox_id)
        if row.state == "running" or sandbox_id in self.live:
            raise ServiceError(
                409, "sandbox_running", f"sandbox {sandbox_id} is running: close it first"
            )
        if not row.purged:
            await asyncio.to_thread(self._purge, sandbox_id)
            self.store.audit("sandbox.purge", key_id=key.id, sandbox_id=sandbox_id)
        return self.row(key, sandbox_id)

    # -- usage series ----------------------------------------------------------------

    def usage(self, key: ApiKey, sandbox_id: str) -> UsageHistory | None:
        """The key's sandbox's recent usage (``UsageHistory``, oldest sample
        first): live, or ended within ``ServiceConfig.usage.keep_ended_s``;
        None for an ended one whose series is gone. 404 (``ServiceError``) for
        a sandbox that is not the key's."""
        self.row(key, sandbox_id)  # another key's is as absent as a missing one
        return self.usage_series.get(sandbox_id)

    def usage_report(self, key: ApiKey, sandbox_id: str, since: float | None) -> dict[str, Any]:
        """``usage`` as the API shows it (``UsageReport``): the samples after
        Unix time ``since`` (all when None) and the limits they count against."""
        row = self.row(key, sandbox_id)
        series = self.usage_series.get(sandbox_id)
        limits = row.policy.get("limits", {})
        return {
            "sandbox_id": sandbox_id,
            "state": row.state,
            "interval_s": self.config.usage.interval_s,
            "limits": {
                "memory_bytes": row.memory_bytes,
                "disk_bytes": row.disk_bytes,
                "pids": limits.get("pids"),
                "cpu_cores": limits.get("cpu_cores"),
            },
            "samples": [s.to_dict() for s in series.since(since)] if series is not None else [],
        }

    async def _sample(self) -> None:
        """Every ``usage.interval_s``: one sample of each live sandbox."""
        while True:
            await asyncio.sleep(self.config.usage.interval_s)
            try:
                await self._sample_once()
            except Exception as exc:  # the sampler must outlive any one box's trouble
                self.store.audit(
                    "server.sampler_error", key_id=None, sandbox_id=None, error=str(exc)
                )

    async def _sample_once(self) -> None:
        # a function of its own: nothing of a sandbox stays in the sampler's frame
        # between ticks (an ended sandbox's Live must be freed)
        self._drop_ended_usage()
        lives = [(sid, live) for sid, live in self.live.items() if sid in self.usage_series]
        if not lives:
            return
        # cgroup files: quick, but a thread keeps the loop free
        readings = await asyncio.to_thread(
            lambda boxes: [_internals.usage(live.sandbox) for _, live in boxes], lives
        )
        for (sandbox_id, live), reading in zip(lives, readings, strict=True):
            series = self.usage_series.get(sandbox_id)
            if reading is not None and series is not None and series.ended_at is None:
                series.add(reading, live.disk_bytes)

    def _usage_ended(self, sandbox_id: str, live: Live) -> None:
        """The box ends: its series takes a last sample and is kept for a while."""
        series = self.usage_series.pop(sandbox_id, None)
        if series is None:
            return
        with contextlib.suppress(Exception):  # best effort: the box is going
            reading = _internals.usage(live.sandbox)
            if reading is not None:
                series.add(reading, live.disk_bytes)
        series.ended_at = time.monotonic()
        self.usage_series[sandbox_id] = series  # re-inserted: ended ones in end order
        self._drop_ended_usage()

    def _drop_ended_usage(self) -> None:
        keep = self.config.usage
        ended = [sid for sid, series in self.usage_series.items() if series.ended_at is not None]
        too_many = len(ended) - keep.keep_ended
        now = time.monotonic()
        for i, sandbox_id in enumerate(ended):
            ended_at = self.usage_series[sandbox_id].ended_at
            assert ended_at is not None
            if i < too_many or now - ended_at >= keep.keep_ended_s:
                del self.usage_series[sandbox_id]

    # -- network -------------------------------------------------------------------

    def _network_event(self, key_id: str, sandbox_id: str, event: NetworkEvent) -> None:
        self.metrics.proxy_decision(event.allowed)
        self.store.audit(
            "network.decision",
            key_id=key_id,
            sandbox_id=sandbox_id,
            host=event.host,
            port=event.port,
            allowed=event.allowed,
            rule=event.rule,
            reason=event.reason,
        )

    async def _ask(self, sandbox_id: str, host: str, port: int) -> bool:
        """A host the rules do not name: ask the client over the API, deny on
        silence (and for a sandbox not running: no client can see the question)."""
        live = self.live.get(sandbox_id)
        return await live.ask(host, port) if live is not None else False

    # -- files of ended sandboxes: read on the host, never following the box's links --

    def ended_workspace(self, key: ApiKey, sandbox_id: str) -> tuple[Path, str] | None:
        """The host workspace of an ended sandbox and the ``path`` the box saw,
        relative to it; None while the sandbox runs. 410 once purged."""
        row = self.row(key, sandbox_id)
        if row.state == "running":
            return None
        if row.purged:
            raise ServiceError(410, "purged", f"sandbox {sandbox_id}'s workspace was purged")
        return self.workspaces / sandbox_id, str(
            row.policy.get("filesystem", {}).get("workspace", "/workspace")
        )

    async def list_ended(self, ended: tuple[Path, str], path: str) -> list[EntryInfo]:
        root, workspace = ended
        return await asyncio.to_thread(list_beneath, root, workspace_relative(workspace, path))

    async def stat_ended(self, ended: tuple[Path, str], path: str) -> EntryInfo:
        root, workspace = ended
        return await asyncio.to_thread(stat_beneath, root, workspace_relative(workspace, path))

    async def read_ended(self, ended: tuple[Path, str], path: str) -> tuple[Iterator[bytes], int]:
        """A file's chunks (a sync iterator: Starlette runs it in its thread
        pool) and its size."""
        root, workspace = ended
        relative = workspace_relative(workspace, path)
        fd, size = await asyncio.to_thread(open_file_beneath, root, relative)

        def chunks() -> Iterator[bytes]:
            try:
                while data := os.read(fd, 1 << 20):
                    yield data
            finally:
                os.close(fd)

        return chunks(), size
