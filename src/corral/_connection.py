"""The host end of the wire: one connection to one box's agent.

Every byte from the agent is hostile: the agent shares its box with the
untrusted code, which may kill it, replace it, or write into its channel. So
every frame is bounded and validated (``_wire``), every control message is
checked field by field where it is used, nothing in a message chooses a host
path or a host action, and host memory is bounded by flow control: a stream's
data is buffered only up to the credit the host granted.

When the connection ends (the agent died, the box was killed, the owner closed
it, or either end found the frame stream out of step: see ``_wire``'s ``seq``)
every pending call and stream fails at once with the reason.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import mmap
import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ._box import _wire as w
from ._errors import CorralError, SandboxBroken, SandboxClosed, SandboxError

_READ_SIZE = 4 << 20
_PIPE_BYTES = 1 << 20  # the default /proc/sys/fs/pipe-max-size
T = TypeVar("T")
_OUT_HIGH_WATER = 4 << 20


class InStream:
    """Bytes the agent sends on one (call, channel), with the host's credit."""

    def __init__(self, conn: Connection, ident: int, channel: int) -> None:
        self._conn = conn
        self.ident = ident
        self.channel = channel
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._eof = False
        self._error: BaseException | None = None
        self._wakeup = asyncio.Event()

    def _feed(self, data: bytes) -> None:
        if self._buffered + len(data) > w.WINDOW:
            # more than the credit we granted: the agent is lying or broken
            raise w.ProtocolError(f"stream {self.ident}/{self.channel} overran its window")
        self._chunks.append(data)
        self._buffered += len(data)
        self._wakeup.set()

    def _end(self, error: BaseException | None = None) -> None:
        self._eof = True
        if self._error is None:
            self._error = error
        self._wakeup.set()

    async def read(self) -> bytes:
        """The next chunk, or b"" at the end. Returns credit for what was taken."""
        while not self._chunks:
            if self._eof:
                if self._error is not None:
                    raise self._error
                return b""
            self._wakeup.clear()
            await self._wakeup.wait()
        data = self._chunks.popleft()
        self._buffered -= len(data)
        if not self._eof:
            self._conn.send(w.encode_credit(self.ident, self.channel, len(data)))
        return data


class OutStream:
    """Bytes the host sends to the agent on one (call, channel), within its credit."""

    def __init__(self, conn: Connection, ident: int, channel: int) -> None:
        self._conn = conn
        self.ident = ident
        self.channel = channel
        self._credit = w.WINDOW
        self._credit_changed = asyncio.Event()
        self.closed_by_peer = False

    def _grant(self, amount: int) -> None:
        self._credit = min(self._credit + amount, 1 << 30)
        self._credit_changed.set()

    def _peer_closed(self) -> None:
        """The agent ended this stream (the process exited, the upload failed)."""
        self.closed_by_peer = True
        self._credit_changed.set()

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            while self._credit <= 0 or self.closed_by_peer:
                self._conn.check_open()
                if self.closed_by_peer:
                    raise BrokenPipeError("the box closed this stream")
                self._credit_changed.clear()
                await self._conn.wait_or_fail(self._credit_changed.wait())
            n = min(len(view), self._credit, w.DATA_CHUNK)
            self._credit -= n
            self._conn.send_data(self.ident, self.channel, view[:n])
            view = view[n:]
            await self._conn.drain()

    def close(self) -> None:
        self._conn.send(w.encode(w.EOF, self.ident, self.channel))


class Connection:
    """The host end over two file descriptors (from the agent, to the agent).

    The descriptors stay the caller's: ``close`` stops using them, it does not
    close them."""

    def __init__(self, reader: int, writer: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._rfd = reader
        self._wfd = writer
        for fd in (self._rfd, self._wfd):
            os.set_blocking(fd, False)
            # a 64 KiB pipe costs a context switch per 64 KiB: ask for more
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        self._decoder = w.Decoder()
        self._numberer = w.Numberer()
        # anonymous memory, not a zero-filled bytearray: a page is resident only
        # once a read wrote it, so an idle box's connection costs the host
        # kilobytes, not 4 MiB (a thousand idle boxes: 4 GiB)
        self._rbuf = mmap.mmap(-1, _READ_SIZE)
        self._rview = memoryview(self._rbuf)
        self._out = bytearray()
        self._writing = False
        self._drained = asyncio.Event()
        self._drained.set()
        self._next_id = 1
        self._replies: dict[int, asyncio.Future[dict[str, object]]] = {}
        self._events: dict[int, Callable[[dict[str, object]], None]] = {}
        self._in: dict[tuple[int, int], InStream] = {}
        self._out_streams: dict[tuple[int, int], OutStream] = {}
        self._failure: CorralError | None = None
        self.last_rx = time.monotonic()
        self._failed = asyncio.Event()
        self.hello: asyncio.Future[dict[str, object]] = self._loop.create_future()
        self._loop.add_reader(self._rfd, self._on_readable)

    # -- lifecycle -----------------------------------------------------------------

    @property
    def failure(self) -> CorralError | None:
        return self._failure

    def check_open(self) -> None:
        if self._failure is not None:
            raise self._failure

    def fail(self, error: CorralError) -> None:
        """End the connection: every pending call and stream raises ``error``."""
        if self._failure is not None:
            return
        self._failure = error
        self._failed.set()
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._rfd)
        if self._writing:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_writer(self._wfd)
            self._writing = False
        self._out.clear()
        self._drained.set()
        for fut in [self.hello, *self._replies.values()]:
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # mark retrieved: a caller may be gone
        self._replies.clear()
        for stream in self._in.values():
            stream._end(error)
        for out in self._out_streams.values():
            out._credit_changed.set()
        for handler in list(self._events.values()):
            handler({"__failed__": True})

    async def wait_or_fail(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable``, or raise the connection's failure as soon as it fails."""
        task = asyncio.ensure_future(awaitable)
        failed = asyncio.ensure_future(self._failed.wait())
        try:
            await asyncio.wait({task, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            failed.cancel()
            if not task.done():
                task.cancel()
        if task.done():
            return task.result()
        task.cancel()
        assert self._failure is not None
        raise self._failure

    # -- sending -------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        if self._failure is not None:
            return
        self._numberer.queue(self._out, frame)
        self._flush()

    def send_data(self, ident: int, channel: int, data: memoryview) -> None:
        """A DATA frame, copied once, straight into the output buffer."""
        if self._failure is not None:
            return
        self._numberer.queue_data(self._out, ident, channel, data)
        self._flush()

    def _flush(self) -> None:
        while self._out:
            try:
                n = os.write(self._wfd, self._out)
            except BlockingIOError:
                break
            except OSError:  # EPIPE: the agent is gone; the reader will see EOF
                self._out.clear()
                break
            del self._out[:n]
        want = bool(self._out)
        if want != self._writing:
            if want:
                self._loop.add_writer(self._wfd, self._flush)
            else:
                self._loop.remove_writer(self._wfd)
            self._writing = want
        if len(self._out) <= _OUT_HIGH_WATER:
            self._drained.set()
        else:
            self._drained.clear()

    async def drain(self) -> None:
        if not self._drained.is_set():
            await self.wait_or_fail(self._drained.wait())
        self.check_open()

    def new_id(self) -> int:
        ident = self._next_id
        self._next_id += 1
        return ident

    async def call(self, body: dict[str, object], ident: int | None = None) -> dict[str, object]:
        """Send a CALL and wait for its REPLY; an ``error`` reply raises OSError."""
        self.check_open()
        ident = self.new_id() if ident is None else ident
        frame = w.encode_json(w.CALL, ident, body)  # may refuse: before anything is registered
        fut: asyncio.Future[dict[str, object]] = self._loop.create_future()
        self._replies[ident] = fut
        self.send(frame)
        try:
            reply = await fut
        finally:
            self._replies.pop(ident, None)
        raise_for_error(reply)
        return reply

    def open_in(self, ident: int, channel: int) -> InStream:
        stream = InStream(self, ident, channel)
        self._in[(ident, channel)] = stream
        if self._failure is not None:
            stream._end(self._failure)
        return stream

    def open_out(self, ident: int, channel: int) -> OutStream:
        stream = OutStream(self, ident, channel)
        self._out_streams[(ident, channel)] = stream
        return stream

    def close_out(self, ident: int, channel: int) -> None:
        self._out_streams.pop((ident, channel), None)

    def on_event(self, ident: int, handler: Callable[[dict[str, object]], None]) -> None:
        self._events[ident] = handler

    def forget(self, ident: int, *, keep: frozenset[int] = frozenset()) -> None:
        """Let go of a call; incoming channels in ``keep`` stay until their EOF."""
        self._events.pop(ident, None)
        for channel in w.CHANNELS:
            if channel not in keep:
                self._in.pop((ident, channel), None)
            self._out_streams.pop((ident, channel), None)

    # -- receiving -----------------------------------------------------------------

    def busy(self) -> bool:
        """Whether anything waits on the agent (a reply, an event, a stream)."""
        return bool(self._replies or self._events or self._in)

    def _on_readable(self) -> None:
        self.last_rx = time.monotonic()
        try:
            # into one reused buffer: the decoder copies each payload out once
            n = os.readv(self._rfd, [self._rbuf])
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(SandboxBroken(f"the box's channel failed: {exc.strerror}"))
            return
        if not n:
            self.fail(SandboxBroken("the box's agent exited"))
            return
        try:
            for kind, ident, channel, payload in self._decoder.feed(self._rview[:n]):
                if self._failure is not None:
                    return
                self._dispatch(kind, ident, channel, payload)
        except (w.ProtocolError, CorralError) as exc:
            self.fail(SandboxBroken(f"the box's agent broke the protocol: {exc}"))
        except Exception as exc:  # anything the agent's bytes provoke ends the connection
            self.fail(SandboxBroken(f"the box's agent sent what cannot be handled: {exc!r}"))

    def _dispatch(self, kind: int, ident: int, channel: int, payload: bytes) -> None:
        if kind == w.HELLO:
            if not self.hello.done():
                self.hello.set_result(w.decode_json(payload))
        elif kind == w.REPLY:
            fut = self._replies.get(ident)
            if fut is not None and not fut.done():
                fut.set_result(w.decode_json(payload))
        elif kind == w.EVENT:
            handler = self._events.get(ident)
            if handler is not None:
                handler(w.decode_json(payload))
        elif kind == w.DATA:
            stream = self._in.get((ident, channel))
            if stream is not None:
                stream._feed(payload)
            elif ident >= self._next_id:
                raise w.ProtocolError(f"data for a stream never opened ({ident}/{channel})")
            # else: late data for a stream the host let go of (closed, cancelled)
        elif kind == w.EOF:
            stream = self._in.pop((ident, channel), None)
            if stream is not None:
                stream._end()
            out = self._out_streams.get((ident, channel))
            if out is not None:
                out._peer_closed()
        elif kind == w.CREDIT:
            (amount,) = w.CREDIT_BODY.unpack(payload)
            out = self._out_streams.get((ident, channel))
            if out is not None:
                out._grant(amount)
        elif kind == w.ABORT:
            # the agent saw our frames out of step (one went missing or was
            # forged): nothing pending can be answered any more
            reason = str(w.decode_json(payload).get("reason"))[:500]
            self.fail(SandboxBroken(f"the box's agent ended the connection: {reason}"))
        else:
            raise w.ProtocolError(f"unexpected frame type {kind} from the agent")

    def close(self, error: CorralError | None = None) -> None:
        self.fail(error or SandboxClosed("the sandbox was closed"))


def raise_for_error(reply: dict[str, object]) -> None:
    error = reply.get("error")
    if error is None:
        return
    if not isinstance(error, dict):
        raise SandboxError("the agent sent a malformed error")
    code = error.get("errno")
    message = error.get("message")
    if not isinstance(code, int) or not 0 < code < 4096 or not isinstance(message, str):
        raise SandboxError("the agent sent a malformed error")
    raise OSError(code, message[:1000])


def field(body: dict[str, object], name: str, kind: type[T]) -> T:
    """``body[name]`` if it has the expected type, else the agent is broken."""
    value = body.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise SandboxBroken(f"the agent sent a malformed {name!r}")
    return value
