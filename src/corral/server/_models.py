"""The JSON shapes of the HTTP API: request bodies (strict: unknown fields are
a 422) and replies (documented in the OpenAPI document as response schemas).

Replies on the hot paths (code, commands) are serialized once by the route
from ``_serial``'s dicts; their models here document the same shapes.
"""

from __future__ import annotations

import signal as _signal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from corral._interpreter import Language

MAX_SEQ = 2**63 - 1  # cursors are SQLite integers: larger ones are a 422, not an overflow


# -- request bodies -------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class CreateSandbox(_Body):
    policy: str | dict[str, Any] | None = Field(
        None, description="a preset name (strict, default, dev) or a policy object"
    )
    runtime: str | None = Field("default", description="code runtime; null for none")
    timeout_s: float | None = Field(None, description="lifetime in seconds (server default)")
    idle_timeout_s: float | None = Field(None, description="end after this long unused")
    metadata: dict[str, Annotated[str, Field(max_length=1000)]] = Field(
        default_factory=dict, max_length=50
    )
    env: dict[str, str] = Field(default_factory=dict, max_length=200)
    network_approval: bool = Field(
        False, description="hosts the rules do not name wait for an answer over the API"
    )


class Timeout(_Body):
    timeout_s: float


class RunCode(_Body):
    code: str = Field(max_length=10 << 20)
    language: Language = "python"
    context_id: str | None = None
    envs: dict[str, str] | None = Field(None, description="environment for this cell only")
    timeout_s: float | None = Field(None, gt=0)
    stream: bool = Field(False, description="NDJSON events as they happen, then done")


class NewContext(_Body):
    language: Language = "python"
    cwd: str | None = None


class Prewarm(_Body):
    language: Language = "python"


class RunCommand(_Body):
    command: str | list[str] = Field(description="a shell string or an argv list")
    background: bool = False
    timeout_s: float | None = Field(None, gt=0)
    env: dict[str, str] | None = None
    cwd: str | None = None
    stdin: str | None = Field(
        None, description="base64 bytes fed to stdin (then closed, unless background)"
    )
    stdin_open: bool = Field(False, description="background: keep stdin open for /stdin")
    stream: bool = Field(False, description="foreground: NDJSON output events, then exit")


class Kill(_Body):
    signal: int = Field(int(_signal.SIGKILL), ge=1, le=64)


class NewPty(_Body):
    cols: int = Field(80, ge=1, le=1000)
    rows: int = Field(24, ge=1, le=1000)
    command: str | list[str] = ["/bin/sh", "-i"]
    env: dict[str, str] | None = None
    cwd: str | None = None


class Size(_Body):
    cols: int = Field(ge=1, le=1000)
    rows: int = Field(ge=1, le=1000)


class PathBody(_Body):
    path: str


class Rename(_Body):
    src: str
    dst: str


class Rules(_Body):
    allow: list[str] | None = None
    deny: list[str] | None = None


class Answer(_Body):
    allow: bool


# -- replies ------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str = Field(description="stable: see corral._errors for the table")
    message: str
    field: str | None = Field(None, description="the request or policy field at fault")


class ErrorReply(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]
    version: str


class SandboxInfo(BaseModel):
    id: str
    state: Literal["running", "ended"]
    end_reason: str | None = Field(description="closed, timeout, idle, limit, crashed…")
    limit_hit: str | None
    end_detail: str | None
    created_at: float = Field(description="Unix time, seconds")
    expires_at: float | None
    ended_at: float | None
    retain_until: float | None
    workspace_available: bool
    metadata: dict[str, str]
    runtime: str | None
    policy: dict[str, Any]
    degraded: list[str] = Field(description="controls this host enforces only weakened")


class UsageSample(BaseModel):
    time: float = Field(description="Unix time, seconds")
    cpu_time_s: float | None = Field(description="CPU seconds used since the box started")
    cpu_used_pct: float | None = Field(
        description="CPU used since the previous sample, percent of one core (200: two busy)"
    )
    memory_bytes: int | None = Field(description="memory charged to the box now (cache included)")
    pids: int | None = Field(description="tasks (processes and threads) in the box now")
    disk_bytes: int | None = Field(description="the workspace's size at the last disk check")


class UsageLimits(BaseModel):
    memory_bytes: int | None
    disk_bytes: int | None
    pids: int | None
    cpu_cores: float | None


class UsageReport(BaseModel):
    """A sandbox's recent usage, oldest sample first. Sampled every
    ``interval_s`` from the box's cgroup while it runs (a bounded window: the
    server keeps the last few minutes), kept for a while after it ended.
    ``null`` fields: this backend or host does not count them."""

    sandbox_id: str
    state: Literal["running", "ended"]
    interval_s: float
    limits: UsageLimits
    samples: list[UsageSample]


class SandboxList(BaseModel):
    sandboxes: list[SandboxInfo]
    next_cursor: int | None = Field(description="pass as cursor for the next page")


class AuditLog(BaseModel):
    entries: list[dict[str, Any]]


class ResultOut(BaseModel):
    """A rich result; binary kinds (png, jpeg, pdf) are base64."""

    model_config = ConfigDict(extra="allow")
    is_main_result: bool
    text: str | None = None
    html: str | None = None
    png: str | None = None
    json_: Any = Field(None, alias="json")
    extra: dict[str, Any] | None = None


class ExecutionErrorOut(BaseModel):
    name: str
    value: str
    traceback: str
    limit_hit: str | None


class LogsOut(BaseModel):
    stdout: list[str]
    stderr: list[str]


class Execution(BaseModel):
    results: list[ResultOut]
    logs: LogsOut
    error: ExecutionErrorOut | None
    execution_count: int | None
    duration_s: float
    restarted: bool


class CodeContext(BaseModel):
    id: str
    language: str
    cwd: str


class CodeContexts(BaseModel):
    contexts: list[CodeContext]


class Removed(BaseModel):
    removed: str


class PrewarmReply(BaseModel):
    language: str


class CommandResult(BaseModel):
    exit_code: int
    signal: int | None
    stdout: str = Field(description="base64")
    stderr: str = Field(description="base64")
    limit_hit: str | None
    truncated: bool
    duration_s: float
    pid: int | None


class Started(BaseModel):
    pid: int | None = Field(description="null: it could not start, result says why")
    result: CommandResult | None


class Process(BaseModel):
    pid: int
    argv: list[str]
    pty: bool


class ProcessList(BaseModel):
    processes: list[Process]


class Sent(BaseModel):
    sent: int = Field(description="bytes")


class Closed(BaseModel):
    closed: bool


class Killed(BaseModel):
    killed: bool


class Terminal(BaseModel):
    pid: int


class TerminalOutput(BaseModel):
    data: str = Field(description="base64")
    eof: bool
    timed_out: bool


class TerminalSize(BaseModel):
    cols: int
    rows: int


class Written(BaseModel):
    path: str
    size: int


class Entry(BaseModel):
    name: str
    path: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: int
    mtime: float


class EntryList(BaseModel):
    entries: list[Entry]


class Created(BaseModel):
    created: str


class Renamed(BaseModel):
    renamed: str


class NetworkEvent(BaseModel):
    time: float
    host: str
    port: int
    address: str | None
    allowed: bool
    rule: str
    reason: str
    bytes_up: int
    bytes_down: int
    duration_s: float


class NetworkEvents(BaseModel):
    events: list[NetworkEvent]


class RulesReply(BaseModel):
    allow: list[str]
    deny: list[str]


class PendingApproval(BaseModel):
    id: str
    host: str
    port: int
    time: float


class Approvals(BaseModel):
    approvals: list[PendingApproval]


class Answered(BaseModel):
    id: str
    allow: bool
