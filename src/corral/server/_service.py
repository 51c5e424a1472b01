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
import errno
import gc
import os
import re
import shutil
import stat
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from corral import _bwrap, _runtime
from corral._errors import CorralError, PolicyError, SandboxClosed
from corral._interpreter import CodeContext
from corral._netrules import unsafe_allow_rule
from corral._policy import Policy
from corral._proxy import NetworkEvent
from corral._sandbox import AsyncSandbox, CommandHandle, EntryInfo, PathOutsideWorkspace, PtyHandle
from corral._serial import b64

from ._store import ApiKey, SandboxRow, Store

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

_UPLOAD_PREFIX = ".corral-upload-"  # the agent's temp names: never a finished file
_DISK_CHECK_S = 2.0
_MAX_FILES = 200_000  # entries in one workspace: inodes are a host resource too
_MAX_LISTING = 10_000  # entries in one listing of an ended workspace
_APPROVAL_TIMEOUT_S = 30.0


class ServiceError(CorralError):
    """A refusal of the service, with an HTTP status and a stable code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


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


class OutputLog:
    """A background command's output for any number of followers, in order.

    The bytes live once, in the handle's own buffers (bounded by the policy's
    output_bytes); the log keeps only segments ``[stream, start, end]``, a new
    one when the stream switches, so a program writing a byte at a time costs
    no per-chunk memory.
    """

    def __init__(self) -> None:
        self.buffers: Mapping[Any, bytearray] | None = None
        self.segments: list[list[Any]] = []
        self.end: tuple[str, dict[str, Any]] | None = None
        self.changed = asyncio.Event()
        self.done = False
        self._early: list[tuple[str, int]] = []  # output before the handle was known

    @property
    def kept(self) -> int:
        return sum(len(b) for b in self.buffers.values()) if self.buffers is not None else 0

    def attach(self, handle: CommandHandle) -> None:
        buffers: Mapping[Any, bytearray] = handle._buffers()
        self.buffers = buffers
        for stream, size in self._early:
            self._extend(stream, min(self._stream_end(stream) + size, len(buffers[stream])))
        self._early = []
        self._wake()

    def on_output(self, stream: str, size: int) -> None:
        """The handle kept more of ``stream`` (its callback runs after it kept it)."""
        if self.buffers is None:
            self._early.append((stream, size))
            return
        self._extend(stream, len(self.buffers[stream]))
        self._wake()

    def _extend(self, stream: str, size: int) -> None:
        last = self.segments[-1] if self.segments else None
        if last is not None and last[0] == stream:
            last[2] = size
        elif size > self._stream_end(stream):
            self.segments.append([stream, self._stream_end(stream), size])

    def _stream_end(self, stream: str) -> int:
        for segment in reversed(self.segments):
            if segment[0] == stream:
                return int(segment[2])
        return 0

    def finish(self, kind: str, body: dict[str, Any]) -> None:
        self.end = (kind, body)
        self.done = True
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def follow(self) -> AsyncIterator[dict[str, Any]]:
        index, pos = 0, None
        while True:
            changed = self.changed
            while index < len(self.segments):
                stream, start, end = self.segments[index]
                at = start if pos is None else pos
                while at < end:  # at most 1 MiB an event
                    upto = min(end, at + (1 << 20))
                    assert self.buffers is not None
                    yield {"type": stream, "data": b64(bytes(self.buffers[stream][at:upto]))}
                    at = upto
                pos = at
                if pos < self.segments[index][2]:
                    continue  # it grew while we were yielding: take the rest first
                if index + 1 < len(self.segments):
                    index, pos = index + 1, None
                elif self.segments[index][2] == pos:
                    break
            if self.done and (not self.segments or self.segments[-1][2] == pos):
                if self.end is not None:
                    yield {"type": self.end[0], **self.end[1]}
                return
            await changed.wait()


@dataclass
class Approval:
    id: str
    host: str
    port: int
    time: float
    answer: asyncio.Future[bool]


@dataclass(eq=False)  # identity: tracked in a WeakSet
class Live:
    """A running sandbox of this process, and what the API keeps beside it."""

    sandbox: AsyncSandbox
    key: ApiKey
    expires_at: float | None
    idle_timeout_s: float | None
    workspace: Path
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0
    commands: dict[int, tuple[CommandHandle, OutputLog]] = field(default_factory=dict)
    terminals: dict[int, PtyHandle] = field(default_factory=dict)
    terminal_locks: dict[int, asyncio.Lock] = field(default_factory=dict)
    starting: int = 0  # background commands and terminals being started (counted in caps)
    contexts: dict[str, CodeContext] = field(default_factory=dict)
    approvals: dict[str, Approval] = field(default_factory=dict)
    approvals_changed: asyncio.Event = field(default_factory=asyncio.Event)
    next_disk_check: float = 0.0

    def commands_running(self) -> bool:
        return any(not log.done for _, log in self.commands.values())


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
        _prepare_data_dir(self.config.data_dir, self.workspaces)
        # boxes of a killed server died with it (pdeathsig); their cgroups,
        # mounts and workspace images stay: undone (and the workspaces' content
        # copied out) before anything reads a workspace
        await asyncio.to_thread(_bwrap.sweep_orphans)
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

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
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
        if timeout_s is None:
            timeout_s = self.config.default_timeout_s
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
        if env:
            policy = policy.with_env(env)
        memory = policy.limits.memory_bytes
        if key.max_memory_bytes is not None and (memory is None or memory > key.max_memory_bytes):
            raise ServiceError(
                403,
                "quota_forbidden",
                f"limits.memory_bytes: this key allows at most {key.max_memory_bytes} bytes "
                "per sandbox (and needs a limit)",
            )
        disk = policy.limits.disk_bytes
        if key.max_disk_bytes is not None and (disk is None or disk > key.max_disk_bytes):
            raise ServiceError(
                403,
                "quota_forbidden",
                f"limits.disk_bytes: this key allows at most {key.max_disk_bytes} bytes "
                "per sandbox (and needs a limit)",
            )
        async with self._create_lock:  # quota check and insert as one step
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
            sandbox = AsyncSandbox(policy, timeout_s=None, runtime=runtime)
            workspace = self.workspaces / sandbox.id
            workspace.mkdir(mode=0o700)
            now = time.time()
            self.store.insert_sandbox(
                id=sandbox.id,
                key_id=key.id,
                policy=policy.to_dict(),
                metadata=dict(metadata),
                runtime=runtime,
                memory_bytes=memory,
                disk_bytes=disk,
                created_at=now,
                expires_at=now + timeout_s,
                idle_timeout_s=idle_timeout_s,
                instance=self.instance,
            )
            self._starting += 1  # a slot, held while the box starts
        live = Live(sandbox, key, now + timeout_s, idle_timeout_s, workspace)
        self.objects["AsyncSandbox"].add(sandbox)
        self.objects["Live"].add(live)
        sandbox._workdir = workspace
        sandbox._own_workdir = True
        # the callbacks name the sandbox, not ``live``: whatever keeps them
        # (the box, its proxy) must not keep an ended sandbox's tables alive
        sandbox_id, key_id = sandbox.id, key.id
        sandbox._on_network_event = lambda event: self._network_event(key_id, sandbox_id, event)
        if network_approval:
            sandbox._approve = lambda host, port: self._ask(sandbox_id, host, port)
        try:
            await sandbox.start()
        except BaseException as exc:
            self._finish(sandbox.id, key.id, "start_failed", public_message(str(exc)), None)
            try:
                await sandbox.close()
            finally:
                self._starting -= 1
                self._seal_workspace(sandbox.id)
            raise
        self.live[sandbox.id] = live
        self._starting -= 1
        self.metrics.created()
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
        for approval in live.approvals.values():
            if not approval.answer.done():
                approval.answer.set_result(False)
        for _, log in live.commands.values():
            if not log.done:
                log.finish("error", {"error": {"code": "sandbox_ended", "message": reason}})
        # recorded first: calls cut short by the close read this reason
        self._finish(sandbox_id, live.key.id, reason, detail, limit)
        try:
            await live.sandbox.close()
        finally:
            # nothing of an ended sandbox stays in this process: the API's
            # per-sandbox tables go now, whoever still holds ``live``
            live.commands.clear()
            live.terminals.clear()
            live.terminal_locks.clear()
            live.contexts.clear()
            live.approvals.clear()
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
            if not sb.is_running():
                if sb._oom_kills() > 0:
                    await self.end(sandbox_id, "limit", limit="memory", detail="out of memory")
                else:
                    failure = sb._connection.failure if sb._connection is not None else None
                    await self.end(sandbox_id, "crashed", detail=public_message(str(failure or "")))
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
                if limit is not None and usage.bytes > limit:
                    await self.end(sandbox_id, "limit", limit="disk", detail="workspace full")
                elif usage.files > _MAX_FILES:
                    await self.end(
                        sandbox_id, "limit", limit="disk", detail=f"over {_MAX_FILES} files"
                    )
                elif usage.too_deep:  # what the walker cannot count is refused, not ignored
                    await self.end(
                        sandbox_id,
                        "limit",
                        limit="disk",
                        detail=f"directories nested over {_MAX_DEPTH} deep",
                    )
        await asyncio.to_thread(self._purge_expired)

    def _purge_expired(self) -> None:
        for row in self.store.due_for_purge(time.time()):
            self._purge(row.id)

    def _purge(self, sandbox_id: str) -> None:
        # shutil.rmtree walks by directory fds on Linux (avoids_symlink_attacks):
        # a symlink the box left is unlinked, never followed
        shutil.rmtree(self.workspaces / sandbox_id, ignore_errors=True)
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
        if live is None:
            return False
        approval = Approval(
            os.urandom(6).hex(), host, port, time.time(), asyncio.get_running_loop().create_future()
        )
        live.approvals[approval.id] = approval
        live.approvals_changed.set()
        live.approvals_changed = asyncio.Event()
        try:
            return await asyncio.wait_for(asyncio.shield(approval.answer), _APPROVAL_TIMEOUT_S)
        except TimeoutError:
            return False
        finally:
            live.approvals.pop(approval.id, None)

    async def pending_approvals(self, live: Live, wait_s: float) -> list[Approval]:
        if not live.approvals and wait_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(live.approvals_changed.wait(), wait_s)
        return [a for a in live.approvals.values() if not a.answer.done()]

    # -- files of ended sandboxes ----------------------------------------------------

    def ended_workspace(self, key: ApiKey, sandbox_id: str) -> Path:
        row = self.row(key, sandbox_id)
        if row.purged:
            raise ServiceError(410, "purged", f"sandbox {sandbox_id}'s workspace was purged")
        return self.workspaces / sandbox_id


_HOST_PATH = re.compile(r"(?<![\w.])/(?:[\w.@+-]+/)+[\w.@+-]*")


def public_message(message: str) -> str:
    """An infrastructure error fit for a client: host paths of the server
    (bwrap's, the cgroup tree's, the data directory's) become ``<host path>``."""
    return _HOST_PATH.sub("<host path>", message)[:2000]


def _prepare_data_dir(data_dir: Path, workspaces: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
    workspaces.mkdir(exist_ok=True, mode=0o711)
    # traversable, not listable: a box's uid reaches only its own workspace
    os.chmod(workspaces, 0o711)  # noqa: S103
    if os.geteuid() == 0:
        # as root every box runs as its own uid, which must reach its workspace
        for parent in [workspaces, *workspaces.parents]:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                raise CorralError(
                    f"the data directory must be reachable by the boxes' unprivileged uids, "
                    f"but {parent} is not searchable by others (mode "
                    f"{stat.S_IMODE(os.stat(parent).st_mode):o}); use a --data-dir such as "
                    "/var/lib/corral/server"
                )


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_MAX_DEPTH = 256  # one fd per level while walking; deeper trees are refused, not skipped


class TooDeep(CorralError):
    """A workspace nests directories deeper than the walker goes (``_MAX_DEPTH``)."""


def walk_beneath(root: Path) -> Generator[tuple[int, str, os.stat_result], None, None]:
    """Every entry under ``root`` as ``(parent directory fd, name, lstat)``,
    depth first, for the host to act on with ``dir_fd=`` while the box may
    still be changing the tree. The fd is valid until the next step.

    The box owns everything below ``root`` and can swap a directory for a
    symlink at any moment: each directory is entered with
    ``openat(parent_fd, name, O_DIRECTORY|O_NOFOLLOW)``, never by path, and
    must be the inode ``lstat`` saw, so a planted ``d -> /root/secret``
    (before or during the walk) is never entered and a FIFO or device is never
    opened. Raises ``TooDeep`` past ``_MAX_DEPTH`` levels (each open level
    holds an fd), ``OSError`` if ``root`` itself is missing or not a directory."""
    top = os.open(root, _DIR_FLAGS)
    stack: list[tuple[int, Iterator[str]]] = [(top, iter(_names(top)))]
    try:
        while stack:
            fd, names = stack[-1]
            name = next(names, None)
            if name is None:
                os.close(stack.pop()[0])
                continue
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:  # removed meanwhile: the rest still counts
                continue
            yield fd, name, st
            if not stat.S_ISDIR(st.st_mode):
                continue
            if len(stack) >= _MAX_DEPTH:
                raise TooDeep(f"directories nested over {_MAX_DEPTH} deep")
            try:
                # by the parent's fd with O_NOFOLLOW: a symlink swapped in since
                # the lstat fails here (ELOOP/ENOTDIR) instead of leading the
                # root server into a host tree of the box's choosing
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                continue
            opened = os.fstat(child)
            if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
                os.close(child)  # another directory swapped in meanwhile: not this entry
                continue
            stack.append((child, iter(_names(child))))
    finally:
        for fd, _ in stack:
            os.close(fd)


def _names(fd: int) -> list[str]:
    try:
        return os.listdir(fd)
    except OSError:  # not readable: counted as empty
        return []


@dataclass(frozen=True, slots=True)
class Usage:
    bytes: int  # allocated blocks, links not followed
    files: int  # entries
    too_deep: bool  # the walk stopped at _MAX_DEPTH: the rest is not counted


def _usage(root: Path, stop_at: int, max_files: int, *, remove_temps: bool = False) -> Usage:
    """Disk used under ``root``, stopping once past ``stop_at`` bytes or
    ``max_files`` entries; ``remove_temps`` also removes the agent's
    half-written uploads (an ended box's workspace). A missing root uses nothing."""
    total = files = 0
    walk = walk_beneath(root)
    try:
        for fd, name, st in walk:
            if remove_temps and name.startswith(_UPLOAD_PREFIX) and stat.S_ISREG(st.st_mode):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=fd)  # by the parent's fd: never a path the box swapped
                continue
            files += 1
            total += st.st_blocks * 512
            if total > stop_at or files > max_files:
                break
    except TooDeep:
        return Usage(total, files, True)
    except FileNotFoundError:
        pass
    finally:
        walk.close()
    return Usage(total, files, False)


# -- reading an ended sandbox's workspace from the host ------------------------------


def _walk(root: Path, relative: str) -> tuple[int, str | None]:
    """The directory fd holding ``relative``'s last component, and that name
    (None for the root itself), never leaving ``root``: each directory is opened
    with O_NOFOLLOW|O_DIRECTORY from its parent's fd, so a symlink the box left
    (``secret -> /etc/shadow``) is refused, not followed, and a FIFO or socket
    on the way fails at once (ENOTDIR) instead of blocking the server."""
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise PathOutsideWorkspace(f"{relative!r} is outside the workspace")
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(root, flags)
    try:
        for part in parts[:-1]:
            new = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = new
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise PathOutsideWorkspace(f"{relative!r} goes through a non-directory") from None
        raise
    return fd, parts[-1] if parts else None


def stat_beneath(root: Path, relative: str) -> EntryInfo:
    parent, name = _walk(root, relative)
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False) if name else os.fstat(parent)
    finally:
        os.close(parent)
    return _entry(st, name or ".", relative)


def list_beneath(root: Path, relative: str) -> list[EntryInfo]:
    parent, name = _walk(root, relative)
    try:
        if name is None:
            fd = os.dup(parent)
        else:
            try:
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(name, flags, dir_fd=parent)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise NotADirectoryError(errno.ENOTDIR, "not a directory") from None
                raise
    finally:
        os.close(parent)
    try:
        base = "/".join(p for p in relative.split("/") if p not in ("", "."))
        out = []
        for entry in sorted(os.listdir(fd))[:_MAX_LISTING]:
            if entry.startswith(_UPLOAD_PREFIX):
                continue
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
                out.append(_entry(st, entry, f"{base}/{entry}" if base else entry))
        return out
    finally:
        os.close(fd)


def open_file_beneath(root: Path, relative: str) -> tuple[int, int]:
    """A regular file's fd and size. O_NONBLOCK: a FIFO opens at once and is
    then refused, like every other non-regular file (sockets fail with ENXIO)."""
    parent, name = _walk(root, relative)
    try:
        if name is None:
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, dir_fd=parent)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PathOutsideWorkspace(f"{relative!r} is a symbolic link") from None
            if exc.errno == errno.ENXIO:
                raise PermissionError(errno.EACCES, "not a regular file") from None
            raise
    finally:
        os.close(parent)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        raise PermissionError(errno.EACCES, "not a regular file")
    return fd, st.st_size


def _entry(st: os.stat_result, name: str, path: str) -> EntryInfo:
    kind: Literal["file", "dir", "symlink", "other"] = (
        "file"
        if stat.S_ISREG(st.st_mode)
        else "dir"
        if stat.S_ISDIR(st.st_mode)
        else "symlink"
        if stat.S_ISLNK(st.st_mode)
        else "other"
    )
    return EntryInfo(name, path, kind, st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime)


class Metrics:
    """Prometheus metrics of one server (its own registry: two servers in one
    process, as in tests, do not collide)."""

    def __init__(self) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            ProcessCollector,
        )

        self.registry = CollectorRegistry()
        self.sandboxes = Gauge(
            "corral_sandboxes", "Sandboxes by state", ["state"], registry=self.registry
        )
        self.creations = Counter(
            "corral_sandbox_creations", "Sandboxes created", registry=self.registry
        )
        self.ends = Counter(
            "corral_sandbox_ends", "Sandboxes ended, by reason", ["reason"], registry=self.registry
        )
        self.run_code = Histogram(
            "corral_run_code_seconds",
            "run_code latency as the server sees it",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=self.registry,
        )
        self.limits = Counter(
            "corral_limit_hits", "Limits hit, by kind", ["kind"], registry=self.registry
        )
        self.proxy = Counter(
            "corral_proxy_decisions", "Proxy decisions", ["decision"], registry=self.registry
        )
        self.server = Gauge(
            "corral_server_objects",
            "What the server process holds: live sandboxes, asyncio tasks, threads, and "
            "per-sandbox objects not yet freed (counted after a full garbage collection)",
            ["kind"],
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)  # process_open_fds, resident memory
        self.counts: Callable[[], Mapping[str, int]] = dict
        self.server_counts: Callable[[], Mapping[str, int]] = dict

    def created(self) -> None:
        self.creations.inc()

    def ended(self, reason: str) -> None:
        self.ends.labels(reason).inc()

    def limit_hit(self, kind: str) -> None:
        self.limits.labels(kind).inc()

    def proxy_decision(self, allowed: bool) -> None:
        self.proxy.labels("allowed" if allowed else "denied").inc()

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        counts = self.counts()
        for state in ("running", "ended"):
            self.sandboxes.labels(state).set(counts.get(state, 0))
        for kind, value in self.server_counts().items():
            self.server.labels(kind).set(value)
        return generate_latest(self.registry)
