"""One exec stream into a Pod, bridged to pipes: what ``Box.channel`` and ``Box.stdout`` are.

The exec subresource (``POST pods/<name>/exec``) speaks Kubernetes' channel
protocol over a websocket (``v4.channel.k8s.io``: each binary message is one
channel byte, 0 stdin, 1 stdout, 2 stderr, 3 the final ``Status``, then the
data). Exec, not port-forward: an exec stream needs nothing listening in the
box (port-forward would need the agent to open a port every process of the
box could connect to as well), it carries stderr apart (the agent's
diagnostics), and it ends with the process's exit status.

Two threads per stream, each blocking on one side: the reader takes one
websocket message at a time and writes it to the pipe of its channel, so
while the host is not reading, nothing more is taken off the socket (TCP,
then the kubelet and the box, hold back): the agent's own flow control
(credit per stream, ``_wire``) works end to end as over a local pipe, and
host memory stays bounded. The writer sends what the host writes into the
stdin pipe. The websocket is websocket-client's, opened by the official
client's ``kubernetes.stream.stream`` on an ApiClient of its own (``stream``
swaps the client's transport while it runs, so it never shares one).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from corral._errors import SandboxError

STDIN, STDOUT, STDERR, STATUS = 0, 1, 2, 3
LAUNCHER = (resources.files(__package__) / "_launcher.py").read_text(encoding="utf-8")
PYTHON = "/usr/bin/python3"


def launcher_command() -> list[str]:
    """The exec's argv: the launcher (``_launcher.py``) as ``python3 -I -S -c``."""
    return [PYTHON, "-I", "-S", "-c", LAUNCHER]


def launcher_payload(header: dict[str, Any], files: Sequence[bytes], stdin: bytes | None) -> bytes:
    """What the launcher reads first: length, JSON header, the files, the stdin bytes."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    return b"".join((struct.pack(">I", len(raw)), raw, *files, stdin or b""))


@dataclass(frozen=True, slots=True)
class ExecStatus:
    """How the exec'd process ended: ``exit_code``, or None with ``message``
    when the stream ended without one (the Pod or the connection went away)
    or the exec itself failed (``message`` from the API's Status)."""

    exit_code: int | None
    message: str = ""


def parse_status(raw: bytes) -> ExecStatus:
    """The exec's final ``metav1.Status`` (channel 3) as an exit code."""
    try:
        status = json.loads(raw)
    except ValueError:
        return ExecStatus(None, f"an unreadable exec status: {raw[:200]!r}")
    if not isinstance(status, dict):
        return ExecStatus(None, f"an unreadable exec status: {raw[:200]!r}")
    if status.get("status") == "Success":
        return ExecStatus(0)
    message = str(status.get("message", ""))
    if status.get("reason") == "NonZeroExitCode":
        for cause in (status.get("details") or {}).get("causes") or ():
            if isinstance(cause, dict) and cause.get("reason") == "ExitCode":
                with contextlib.suppress(TypeError, ValueError):
                    return ExecStatus(int(cause.get("message", "")), message)
    return ExecStatus(None, message or "the exec failed with no message")


class ExecStream:
    """One exec'd process and the host's pipe ends of its stdin, stdout, stderr.

    ``host_stdin`` (write), ``host_stdout`` and ``host_stderr`` (read) are
    the host's; ``on_end(status)`` is called once, from the reader thread,
    after every byte the box sent was written into the pipes (and their
    write ends closed)."""

    def __init__(self, ws: Any, on_end: Callable[[ExecStatus], None]) -> None:
        self._ws = ws  # kubernetes.stream.ws_client.WSClient (binary)
        self._on_end = on_end
        self._in_r, self.host_stdin = os.pipe()
        self.host_stdout, self._out_w = os.pipe()
        self.host_stderr, self._err_w = os.pipe()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, name="corral-k8s-exec-r", daemon=True)
        self._writer = threading.Thread(target=self._write, name="corral-k8s-exec-w", daemon=True)

    @classmethod
    def open(cls, configuration: Any, namespace: str, pod: str, container: str,
             on_end: Callable[[ExecStatus], None]) -> ExecStream:  # fmt: skip
        """Start the launcher in ``pod`` (blocking: run in a thread)."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException
        from kubernetes.stream import stream

        api = client.ApiClient(configuration)
        try:
            ws = stream(
                client.CoreV1Api(api).connect_get_namespaced_pod_exec,
                pod,
                namespace,
                container=container,
                command=launcher_command(),
                stdin=True,
                stdout=True,
                stderr=True,
                tty=False,
                _preload_content=False,
                binary=True,
            )
        except ApiException as exc:
            raise SandboxError(f"cannot exec in the Pod {pod}: {exc.reason}") from exc
        finally:
            api.close()  # type: ignore[no-untyped-call]
        return cls(ws, on_end)

    def start(self, payload: bytes) -> None:
        """Send the launcher's payload, then pump both ways (blocking until sent).
        The reader runs first: a command may answer before its stdin is all sent."""
        self._reader.start()
        try:
            self._send(payload)
        except Exception as exc:
            self.close()
            raise SandboxError(f"the exec stream broke while starting the box: {exc}") from exc
        self._writer.start()

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # one message per 1 MiB: the apiserver's frame limits are generous
            chunk, view = view[: 1 << 20], view[1 << 20 :]
            self._ws.sock.send_binary(bytes([STDIN]) + bytes(chunk))

    def _read(self) -> None:
        from websocket import ABNF

        status = ExecStatus(None, "the exec stream ended without a status")
        out = {STDOUT: self._out_w, STDERR: self._err_w}
        dead: set[int] = set()
        try:
            while True:
                opcode, frame = self._ws.sock.recv_data_frame(True)
                if opcode == ABNF.OPCODE_CLOSE:
                    break
                if opcode not in (ABNF.OPCODE_BINARY, ABNF.OPCODE_TEXT) or not frame.data:
                    continue
                data = frame.data if isinstance(frame.data, bytes) else frame.data.encode()
                channel, body = data[0], memoryview(data)[1:]
                if channel == STATUS:
                    status = parse_status(bytes(body))
                elif channel in out and channel not in dead:
                    try:
                        while body:  # blocks while the host's pipe is full: backpressure
                            body = body[os.write(out[channel], body) :]
                    except OSError:
                        dead.add(channel)  # the host closed its end: drop the rest
        except Exception:  # noqa: S110 - a closed or broken socket ends the stream alike
            pass
        finally:
            for fd in (self._out_w, self._err_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._closed.set()
            with contextlib.suppress(Exception):
                self._ws.close()
            # a stream the peer closed first is not "connected": close() then
            # leaves its socket open, so it is closed here whatever happened
            self._ws.sock.shutdown()
            self._on_end(status)

    def _write(self) -> None:
        try:
            while not self._closed.is_set():
                data = os.read(self._in_r, 1 << 16)
                if not data:
                    return  # the host closed its end
                self._send(data)
        except Exception:  # noqa: S110 - the stream is gone: nothing to send to
            pass
        finally:
            with contextlib.suppress(OSError):
                os.close(self._in_r)

    def close_stream(self) -> None:
        """Drop the websocket (the reader then ends, and ``on_end`` is called).
        Never blocks: the threads end on their own."""
        with contextlib.suppress(Exception):
            self._ws.sock.sock.shutdown(2)  # socket.SHUT_RDWR: wakes the reader

    def end_input(self) -> None:
        """Close the host's stdin end: the writer thread reads its end and ends."""
        with contextlib.suppress(OSError):
            if self.host_stdin >= 0:
                os.close(self.host_stdin)
        self.host_stdin = -1

    def close(self) -> None:
        """``close_stream``, then close the host's pipe ends (once the threads are done)."""
        self.close_stream()
        self.end_input()
        for fd in (self.host_stdout, self.host_stderr):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.host_stdin = self.host_stdout = self.host_stderr = -1

    def join(self, timeout: float) -> None:
        for thread in (self._reader, self._writer):
            if thread.is_alive():
                thread.join(timeout)
