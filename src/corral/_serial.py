"""The JSON shapes of corral's results, shared by the HTTP server and the remote client.

One place for both directions, so the client rebuilds exactly the objects the
local library returns. Bytes travel as base64; everything else as plain JSON.
Decoding is strict about types: a server (or a man in the middle of a
misconfigured proxy) that sends garbage gets ``SandboxBroken``, not a
half-built result.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any, cast

from ._errors import SandboxBroken
from ._interpreter import CodeContext, CodeEvent, Execution, ExecutionError, Logs, Result
from ._sandbox import CommandResult, EntryInfo, ProcessInfo
from .net._events import NetworkEvent

_RESULT_TEXT = ("text", "html", "markdown", "svg", "latex", "javascript")
_RESULT_BINARY = ("png", "jpeg", "pdf")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(value: object) -> bytes:
    if not isinstance(value, str):
        raise SandboxBroken("expected base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SandboxBroken("malformed base64") from None


def unb64_request(value: str, name: str) -> bytes:
    """Base64 from a client: bad input is the client's error (ValueError), not ours."""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name}: not valid base64") from None


def _get(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        raise SandboxBroken(f"malformed field {key!r} in a server reply")
    return value


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _opt(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    return None if data.get(key) is None else _get(data, key, kind)


# -- code -------------------------------------------------------------------------------


def result_to_dict(result: Result) -> dict[str, Any]:
    out: dict[str, Any] = {"is_main_result": result.is_main_result}
    for name in _RESULT_TEXT:
        if getattr(result, name) is not None:
            out[name] = getattr(result, name)
    for name in _RESULT_BINARY:
        if getattr(result, name) is not None:
            out[name] = b64(getattr(result, name))
    if result.json is not None:
        out["json"] = result.json
    if result.chart is not None:
        out["chart"] = result.chart
    if result.data is not None:
        out["data"] = result.data
    if result.extra:
        out["extra"] = result.extra
    return out


def result_from_dict(data: Mapping[str, Any]) -> Result:
    fields: dict[str, Any] = {"is_main_result": bool(data.get("is_main_result"))}
    for name in _RESULT_TEXT:
        fields[name] = _opt(data, name, str)
    for name in _RESULT_BINARY:
        fields[name] = None if data.get(name) is None else unb64(data[name])
    extra = data.get("extra") or {}
    if not isinstance(extra, dict):
        raise SandboxBroken("malformed field 'extra' in a server reply")
    for name in ("chart", "data"):
        fields[name] = _opt(data, name, dict)
    return Result(**fields, json=data.get("json"), extra=extra)


def error_to_dict(error: ExecutionError) -> dict[str, Any]:
    return {
        "name": error.name,
        "value": error.value,
        "traceback": error.traceback,
        "limit_hit": error.limit_hit,
    }


def error_from_dict(data: Mapping[str, Any]) -> ExecutionError:
    return ExecutionError(
        name=_get(data, "name", str),
        value=_get(data, "value", str),
        traceback=_get(data, "traceback", str),
        limit_hit=_opt(data, "limit_hit", str),
    )


def execution_to_dict(execution: Execution) -> dict[str, Any]:
    return {
        "results": [result_to_dict(r) for r in execution.results],
        "logs": {"stdout": list(execution.logs.stdout), "stderr": list(execution.logs.stderr)},
        "error": error_to_dict(execution.error) if execution.error else None,
        "execution_count": execution.execution_count,
        "duration_s": execution.duration_s,
        "restarted": execution.restarted,
    }


def execution_from_dict(data: Mapping[str, Any]) -> Execution:
    logs = _get(data, "logs", dict)
    error = _opt(data, "error", dict)
    return Execution(
        results=tuple(result_from_dict(r) for r in _get(data, "results", list)),
        logs=Logs(
            stdout=tuple(str(s) for s in _get(logs, "stdout", list)),
            stderr=tuple(str(s) for s in _get(logs, "stderr", list)),
        ),
        error=error_from_dict(error) if error is not None else None,
        execution_count=_opt(data, "execution_count", int),
        duration_s=float(_get(data, "duration_s", (int, float))),
        restarted=bool(data.get("restarted")),
    )


def code_event_to_dict(event: CodeEvent) -> dict[str, Any]:
    kind, value = event
    if kind in ("stdout", "stderr"):
        return {"type": kind, "text": value}
    if kind == "result":
        return {"type": kind, "result": result_to_dict(cast(Result, value))}
    if kind == "error":
        return {"type": kind, "error": error_to_dict(cast(ExecutionError, value))}
    return {"type": "done", "execution": execution_to_dict(cast(Execution, value))}


def code_event_from_dict(data: Mapping[str, Any]) -> CodeEvent:
    kind = data.get("type")
    if kind == "stdout":
        return ("stdout", _get(data, "text", str))
    if kind == "stderr":
        return ("stderr", _get(data, "text", str))
    if kind == "result":
        return ("result", result_from_dict(_get(data, "result", dict)))
    if kind == "error":
        return ("error", error_from_dict(_get(data, "error", dict)))
    if kind == "done":
        return ("done", execution_from_dict(_get(data, "execution", dict)))
    raise SandboxBroken(f"unknown code event {kind!r} from the server")


def context_to_dict(context: CodeContext) -> dict[str, Any]:
    return {"id": context.id, "language": context.language, "cwd": context.cwd}


def context_from_dict(data: Mapping[str, Any]) -> CodeContext:
    return CodeContext(
        id=_get(data, "id", str), language=_get(data, "language", str), cwd=_get(data, "cwd", str)
    )


# -- commands and files -----------------------------------------------------------------


def command_result_to_dict(result: CommandResult) -> dict[str, Any]:
    return {
        "exit_code": result.exit_code,
        "signal": result.signal,
        "stdout": b64(result.stdout),
        "stderr": b64(result.stderr),
        "limit_hit": result.limit_hit,
        "truncated": result.truncated,
        "duration_s": result.duration_s,
        "pid": result.pid,
    }


def command_result_from_dict(data: Mapping[str, Any]) -> CommandResult:
    return CommandResult(
        exit_code=_get(data, "exit_code", int),
        signal=_opt(data, "signal", int),
        stdout=unb64(data.get("stdout")),
        stderr=unb64(data.get("stderr")),
        limit_hit=_opt(data, "limit_hit", str),
        truncated=bool(data.get("truncated")),
        duration_s=float(_get(data, "duration_s", (int, float))),
        pid=_opt(data, "pid", int),
    )


def process_to_dict(info: ProcessInfo) -> dict[str, Any]:
    return {"pid": info.pid, "argv": list(info.argv), "pty": info.pty}


def process_from_dict(data: Mapping[str, Any]) -> ProcessInfo:
    return ProcessInfo(
        pid=_get(data, "pid", int),
        argv=tuple(str(a) for a in _get(data, "argv", list)),
        pty=bool(data.get("pty")),
    )


def entry_to_dict(entry: EntryInfo) -> dict[str, Any]:
    return {
        "name": entry.name,
        "path": entry.path,
        "type": entry.type,
        "size": entry.size,
        "mode": entry.mode,
        "mtime": entry.mtime,
    }


def entry_from_dict(data: Mapping[str, Any]) -> EntryInfo:
    kind = _get(data, "type", str)
    if kind not in ("file", "dir", "symlink", "other"):
        raise SandboxBroken("malformed entry type in a server reply")
    return EntryInfo(
        name=_get(data, "name", str),
        path=_get(data, "path", str),
        type=kind,
        size=_get(data, "size", int),
        mode=_get(data, "mode", int),
        mtime=float(_get(data, "mtime", (int, float))),
    )


def network_event_to_dict(event: NetworkEvent) -> dict[str, Any]:
    return {
        "time": event.time,
        "host": event.host,
        "port": event.port,
        "address": event.address,
        "allowed": event.allowed,
        "rule": event.rule,
        "reason": event.reason,
        "bytes_up": event.bytes_up,
        "bytes_down": event.bytes_down,
        "duration_s": event.duration_s,
    }


def network_event_from_dict(data: Mapping[str, Any]) -> NetworkEvent:
    return NetworkEvent(
        time=float(_get(data, "time", (int, float))),
        host=_get(data, "host", str),
        port=_get(data, "port", int),
        address=_opt(data, "address", str),
        allowed=_get(data, "allowed", bool),
        rule=_get(data, "rule", str),
        reason=_get(data, "reason", str),
        bytes_up=_get(data, "bytes_up", int),
        bytes_down=_get(data, "bytes_down", int),
        duration_s=float(_get(data, "duration_s", (int, float))),
    )
