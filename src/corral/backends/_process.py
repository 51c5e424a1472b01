"""A box's host process, seen from the event loop: the supervisor a backend
starts for each box (bwrap, ``runsc run``, an engine's ``run`` client), whose
pipes carry the box's stdio or channel and whose exit is the box's.

Shared by every backend that runs a box through a host child process,
whatever isolates it (namespaces, gVisor, a container engine): its exit from
a pidfd (no thread, no blocking wait), stdin fed without blocking, its pipes
read and closed. Linux-only (``pidfd_open``, 5.3+), like every such backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from typing import IO


def fileno(stream: IO[bytes] | None) -> int | None:
    """The stream's descriptor, or None once it is closed (or never was)."""
    return stream.fileno() if stream is not None and not stream.closed else None


def close_streams(proc: subprocess.Popen[bytes]) -> None:
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def read_available(stream: IO[bytes] | None) -> bytes:
    """What ``stream`` (a pipe whose writer has exited) holds, without blocking."""
    if stream is None or stream.closed:
        return b""
    fd = stream.fileno()
    os.set_blocking(fd, False)
    out = bytearray()
    with contextlib.suppress(BlockingIOError, OSError):
        while chunk := os.read(fd, 65536):
            out += chunk
            if len(out) > 1 << 20:
                break
    return bytes(out)


def exit_future(proc: subprocess.Popen[bytes]) -> asyncio.Future[int]:
    """A future for ``proc``'s exit status, set from a pidfd reader: no thread,
    no blocking wait. The process is reaped once, here (Popen is told)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()
    pidfd = os.pidfd_open(proc.pid)

    def exited() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        try:
            _, status = os.waitpid(proc.pid, 0)  # it has exited: returns at once
            proc.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # reaped by Popen already
            pass
        if proc.returncode is None:  # reaped behind Popen's back: status unknown
            proc.returncode = 255
        if not fut.done():
            fut.set_result(proc.returncode)

    loop.add_reader(pidfd, exited)
    return fut


async def reaped(proc: subprocess.Popen[bytes]) -> int:
    if proc.returncode is not None:
        return proc.returncode
    return await exit_future(proc)


def feed_stdin(loop: asyncio.AbstractEventLoop, stream: IO[bytes], data: bytes) -> None:
    """Write ``data`` to the box's stdin as it reads it, then close it.

    Non-blocking: a box that never reads its stdin must not block the host.
    """
    fd = stream.fileno()
    os.set_blocking(fd, False)
    view = memoryview(data)

    def writable() -> None:
        nonlocal view
        try:
            view = view[os.write(fd, view[:65536]) :]
        except BlockingIOError:
            return
        except OSError:  # EPIPE: the box closed its stdin or is gone
            view = view[:0]
        if not view:
            loop.remove_writer(fd)
            with contextlib.suppress(OSError):
                stream.close()

    loop.add_writer(fd, writable)
