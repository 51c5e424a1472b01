"""Moving a decided connection's bytes: ``splice_both`` hands both sockets
to the kernel (splice(2) through a pipe each way, driven by the event loop
like a transport, counting bytes for the event); ``pipe`` is the asyncio copy
used while a tunnel's opening is still being checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import time
from typing import cast

# how much a relay lets the kernel-bound side buffer before waiting: fewer,
# larger writes (asyncio's default of 64 KiB costs a wake-up per 64 KiB)
WRITE_BUFFER = 1 << 20
IDLE_TIMEOUT_S = 300.0
SPLICE_CHUNK = 1 << 20
_F_SETPIPE_SZ = 1031


async def pipe(
    src: asyncio.StreamReader, dst: asyncio.StreamWriter, counts: list[int], index: int
) -> None:
    """Copy until EOF (or the idle timeout), counting; then half-close ``dst``
    (not when cancelled: the relay goes on in the kernel, ``splice_both``)."""
    dst.transport.set_write_buffer_limits(high=WRITE_BUFFER)
    try:
        while data := await asyncio.wait_for(src.read(1 << 18), IDLE_TIMEOUT_S):
            counts[index] += len(data)
            dst.write(data)
            await dst.drain()
    except (OSError, TimeoutError):
        pass
    except asyncio.CancelledError:
        raise
    else:
        with contextlib.suppress(OSError):
            if dst.can_write_eof():
                dst.write_eof()


async def detach(
    reader: asyncio.StreamReader | None, writer: asyncio.StreamWriter
) -> tuple[socket.socket, bytes]:
    """Take a connection out of asyncio's hands: its transport stops reading and
    has written everything; returns a duplicate of its socket and the bytes the
    reader had buffered but nobody consumed."""
    # a socket's transport reads and writes (uvloop's are not asyncio.Transport subclasses)
    transport = cast(asyncio.Transport, writer.transport)
    transport.pause_reading()
    transport.set_write_buffer_limits(high=0)
    await writer.drain()  # resumes only once the transport's buffer is empty
    left = b""
    if reader is not None:
        buffer = reader._buffer  # type: ignore[attr-defined]  # no public peek
        left = bytes(buffer)
        buffer.clear()
    sock = writer.get_extra_info("socket")
    dup = socket.socket(fileno=os.dup(sock.fileno()))
    dup.setblocking(False)
    return dup, left


async def send_all(sock: socket.socket, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.sock_sendall(sock, data), IDLE_TIMEOUT_S)


class Splicer:
    """One direction of a relay, driven by the event loop like a transport:
    when ``src`` is readable, splice(2) it into a pipe and on into ``dst``; when
    ``dst`` is full, wait for it instead of reading. No byte passes through
    Python. Done (``finished``) at EOF, on an error, or after IDLE_TIMEOUT_S
    without data; then ``dst`` is half-closed."""

    def __init__(
        self, src: socket.socket, dst: socket.socket, counts: list[int], index: int
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.src, self.dst, self.counts, self.index = src, dst, counts, index
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.w, _F_SETPIPE_SZ, SPLICE_CHUNK)
        self.held = 0  # bytes in the pipe
        self.eof = False
        self.last = time.monotonic()
        self.finished: asyncio.Future[None] = self.loop.create_future()
        self.timer = self.loop.call_later(IDLE_TIMEOUT_S, self._idle)
        self.loop.add_reader(src.fileno(), self._readable)

    def _idle(self) -> None:
        left = self.last + IDLE_TIMEOUT_S - time.monotonic()
        if left > 0:
            self.timer = self.loop.call_later(left, self._idle)
        else:
            self._finish()

    def _readable(self) -> None:
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        for _ in range(16):  # while data keeps coming, without a trip through epoll
            try:
                n = os.splice(self.src.fileno(), self.w, SPLICE_CHUNK, flags=flags)
            except BlockingIOError:
                return
            except OSError:
                self._finish()
                return
            self.last = time.monotonic()
            if n == 0:
                self.eof = True
                self.loop.remove_reader(self.src.fileno())
            self.held += n
            self.counts[self.index] += n
            self._flush()
            if self.held or self.eof:  # dst is full, or done
                return

    def _flush(self) -> None:
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        while self.held:
            try:
                self.held -= os.splice(self.r, self.dst.fileno(), self.held, flags=flags)
            except BlockingIOError:
                # dst is full: stop reading until it drains
                self.loop.remove_reader(self.src.fileno())
                self.loop.add_writer(self.dst.fileno(), self._writable)
                return
            except OSError:
                self._finish()
                return
        if self.eof:
            self._finish()

    def _writable(self) -> None:
        self.loop.remove_writer(self.dst.fileno())
        self._flush()
        if not self.held and not self.finished.done():
            self.loop.add_reader(self.src.fileno(), self._readable)

    def _finish(self) -> None:
        if self.finished.done():
            return
        self.timer.cancel()
        self.loop.remove_reader(self.src.fileno())
        self.loop.remove_writer(self.dst.fileno())
        os.close(self.r)
        os.close(self.w)
        with contextlib.suppress(OSError):
            self.dst.shutdown(socket.SHUT_WR)
        self.finished.set_result(None)


async def splice(src: socket.socket, dst: socket.socket, counts: list[int], index: int) -> None:
    """Move bytes ``src`` -> pipe -> ``dst`` with splice(2), counting into
    ``counts[index]``, until EOF or IDLE_TIMEOUT_S without data; then half-close ``dst``."""
    splicer = Splicer(src, dst, counts, index)
    try:
        await asyncio.shield(splicer.finished)
    finally:
        splicer._finish()  # cancelled (the box closing): stop at once


async def splice_both(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
    first: bytes,
    counts: list[int],
) -> None:
    """After the decision: ``first`` (the checked opening) and whatever either side
    had buffered go out, then the kernel relays both ways until both ends close."""
    client, from_client = await detach(reader, writer)
    try:
        server, from_server = await detach(up_reader, up_writer)
    except BaseException:
        client.close()  # no duplicate descriptor outlives the connection
        raise
    try:
        await send_all(server, first + from_client)
        counts[0] += len(first) + len(from_client)
        if from_server:
            await send_all(client, from_server)
            counts[1] += len(from_server)
        down_done = up_reader.at_eof()
        jobs = [splice(client, server, counts, 0)]
        if not down_done:
            jobs.append(splice(server, client, counts, 1))
        elif not from_server:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_WR)
        await asyncio.gather(*jobs)
    except (OSError, TimeoutError):
        pass
    finally:
        client.close()
        server.close()
