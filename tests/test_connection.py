"""The host end of the wire against a hostile agent: real pipes, forged frames."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator

import pytest

from corral import SandboxBroken
from corral import _wire as w
from corral._connection import Connection


class FakeAgent:
    """The other end of two real pipes, speaking whatever the test makes it say."""

    def __init__(self) -> None:
        self.to_host_r, self.to_host_w = os.pipe()
        self.from_host_r, self.from_host_w = os.pipe()
        self.reader = self.to_host_r  # the host's ends
        self.writer = self.from_host_w
        self.numberer = w.Numberer()

    async def say(self, frame: bytes, *, numbered: bool = True) -> None:
        """Send one frame, numbered in turn (``numbered=False``: exactly as given)."""
        out = bytearray()
        if numbered:
            self.numberer.queue(out, frame)
        else:
            out += frame
        # from a worker thread: a frame larger than the pipe must not block the
        # event loop that the host end reads it with
        view = memoryview(out)
        while view:
            view = view[await asyncio.to_thread(os.write, self.to_host_w, view) :]

    def close(self) -> None:
        for fd in (self.to_host_w, self.from_host_r, self.to_host_r, self.from_host_w):
            os.close(fd)


@pytest.fixture
async def agent() -> AsyncIterator[FakeAgent]:
    fake = FakeAgent()
    yield fake
    fake.close()


async def pending_call(conn: Connection) -> asyncio.Future[dict[str, object]]:
    task = asyncio.ensure_future(conn.call({"op": "stat", "path": "x"}))
    await asyncio.sleep(0.01)
    return task


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (struct.pack(">IBIBI", w.MAX_PAYLOAD + 1, w.DATA, 1, 1, 0), "exceeds"),
        (struct.pack(">IBIBI", 0, 99, 1, 1, 0), "unknown frame type"),
        (struct.pack(">IBIBI", 0, w.DATA, 1, 7, 0), "unknown channel"),
        (w.encode(w.REPLY, 1, 0, b"not json"), "malformed control message"),
        (w.encode(w.REPLY, 1, 0, b"[1, 2]"), "must be a JSON object"),
        (w.encode(w.CREDIT, 1, 1, b"\x00"), "malformed CREDIT"),
        (w.encode(w.DATA, 12345, 1, b"unsolicited"), "stream never opened"),
        (w.encode(w.CALL, 1, 0, b"{}"), "unexpected frame type"),
    ],
)
async def test_a_forged_frame_breaks_the_connection_and_fails_pending_calls(
    agent: FakeAgent, frame: bytes, reason: str
) -> None:
    conn = Connection(agent.reader, agent.writer)
    call = await pending_call(conn)
    await agent.say(frame)
    with pytest.raises(SandboxBroken, match=reason):
        await asyncio.wait_for(call, 2)
    with pytest.raises(SandboxBroken):
        conn.check_open()
    conn.close()


async def test_data_beyond_the_granted_window_is_refused(agent: FakeAgent) -> None:
    conn = Connection(agent.reader, agent.writer)
    stream = conn.open_in(7, w.STDOUT)
    chunk = b"x" * w.DATA_CHUNK
    for _ in range(w.WINDOW // w.DATA_CHUNK):
        await agent.say(w.encode(w.DATA, 7, w.STDOUT, chunk))
    await agent.say(w.encode(w.DATA, 7, w.STDOUT, b"one byte too many"))
    await asyncio.sleep(0.05)
    assert isinstance(conn.failure, SandboxBroken)
    assert "overran its window" in str(conn.failure)
    # what arrived within the window was buffered; then the stream ends in the failure
    received = 0

    async def drain() -> None:
        nonlocal received
        while data := await stream.read():
            received += len(data)

    with pytest.raises(SandboxBroken):
        await drain()
    assert received == w.WINDOW
    conn.close()


async def test_agent_exit_fails_everything_at_once(agent: FakeAgent) -> None:
    conn = Connection(agent.reader, agent.writer)
    call = await pending_call(conn)
    stream = conn.open_in(3, w.STDERR)
    os.close(agent.to_host_w)
    agent.to_host_w = os.open("/dev/null", os.O_WRONLY)  # keep close() simple
    with pytest.raises(SandboxBroken, match="agent exited"):
        await asyncio.wait_for(call, 2)
    with pytest.raises(SandboxBroken):
        await asyncio.wait_for(stream.read(), 2)
    conn.close()


async def test_a_malformed_error_reply_is_not_trusted(agent: FakeAgent) -> None:
    conn = Connection(agent.reader, agent.writer)
    call = await pending_call(conn)
    await agent.say(w.encode_json(w.REPLY, 1, {"error": {"errno": -5, "message": "x"}}))
    with pytest.raises(Exception, match="malformed error"):
        await asyncio.wait_for(call, 2)
    call = await pending_call(conn)
    await agent.say(w.encode_json(w.REPLY, 2, {"error": {"errno": 2, "message": "gone"}}))
    with pytest.raises(FileNotFoundError, match="gone"):
        await asyncio.wait_for(call, 2)
    conn.close()


async def test_late_data_for_a_stream_the_host_let_go_of_is_dropped(agent: FakeAgent) -> None:
    conn = Connection(agent.reader, agent.writer)
    ident = conn.new_id()
    conn.open_in(ident, w.CONTENT)
    conn.forget(ident)  # e.g. a FileReader closed early
    await agent.say(w.encode(w.DATA, ident, w.CONTENT, b"still in flight"))
    await agent.say(w.encode(w.EOF, ident, w.CONTENT))
    await asyncio.sleep(0.05)
    assert conn.failure is None
    conn.close()


async def test_deeply_nested_json_ends_the_connection_cleanly(agent: FakeAgent) -> None:
    conn = Connection(agent.reader, agent.writer)
    call = await pending_call(conn)
    await agent.say(w.encode(w.REPLY, 1, 0, b"[" * 100_000))
    with pytest.raises(SandboxBroken, match="malformed control message"):
        await asyncio.wait_for(call, 2)
    conn.close()


async def test_a_malformed_event_ends_the_connection(agent: FakeAgent) -> None:
    conn = Connection(agent.reader, agent.writer)
    call = await pending_call(conn)

    def handler(body: dict[str, object]) -> None:
        raise ValueError(f"cannot use {body}")

    conn.on_event(1, handler)
    await agent.say(w.encode_json(w.EVENT, 1, {"exit": "x"}))
    with pytest.raises(SandboxBroken, match="cannot be handled"):
        await asyncio.wait_for(call, 2)
    conn.close()
