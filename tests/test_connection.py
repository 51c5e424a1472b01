"""The host end of the wire against a hostile agent: real pipes, forged frames."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral import SandboxBroken
from corral._box import _wire as w
from corral._connection import Connection
from corral.testing import FakeAgent


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


# -- frames that go missing: the real agent, and a relay that drops some --------------------

AGENT = Path(w.__file__).with_name("_agent.py")


class Relay:
    """The real agent as a host process and, between it and the host's
    Connection, a relay that forwards whole frames but drops the ones named in
    ``drop``: what a thief reading the channel did (issue 11, item 1)."""

    def __init__(self, workspace: Path) -> None:
        loop = asyncio.get_running_loop()
        self.from_host_r, self.host_w = os.pipe()
        to_agent_r, self.to_agent_w = os.pipe()
        self.from_agent_r, agent_w = os.pipe()
        self.host_r, self.to_host_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-E", "-s", "-S", str(AGENT), str(workspace), "0"],
            env={"CORRAL_CHANNEL_FDS": f"{to_agent_r},{agent_w}"},
            pass_fds=(to_agent_r, agent_w),
        )
        os.close(to_agent_r)
        os.close(agent_w)
        # frame numbers (per direction, from 0) that never arrive
        self.drop: dict[str, set[int]] = {"to_agent": set(), "to_host": set()}
        self.frames: dict[str, list[bytes]] = {"to_agent": [], "to_host": []}
        self._bufs = {"to_agent": bytearray(), "to_host": bytearray()}
        loop.add_reader(self.from_host_r, self._pump, "to_agent", self.from_host_r, self.to_agent_w)
        loop.add_reader(self.from_agent_r, self._pump, "to_host", self.from_agent_r, self.to_host_w)

    def _pump(self, way: str, src: int, dst: int) -> None:
        data = os.read(src, 1 << 20)
        if not data:
            asyncio.get_running_loop().remove_reader(src)
            os.close(dst)
            return
        buf = self._bufs[way]
        buf += data
        while len(buf) >= w.HEADER.size:
            end = w.HEADER.size + int.from_bytes(buf[:4], "big")
            if len(buf) < end:
                break
            frame = bytes(buf[:end])
            del buf[:end]
            if len(self.frames[way]) not in self.drop[way]:
                os.write(dst, frame)
            self.frames[way].append(frame)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for fd in (self.from_host_r, self.from_agent_r):
            loop.remove_reader(fd)
        self.proc.kill()
        self.proc.wait()
        for fd in (self.from_host_r, self.host_w, self.to_agent_w, self.from_agent_r, self.host_r):
            os.close(fd)
        with contextlib.suppress(OSError):
            os.close(self.to_host_w)


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[Relay]:
    r = Relay(tmp_path)
    yield r
    r.close()


async def test_a_call_whose_frame_was_taken_fails_at_the_next_frame(relay: Relay) -> None:
    """The stolen CALL's reply can never come: the agent sees the next frame
    out of step, says so (ABORT) and stops; every pending call fails with
    SandboxBroken at once, not at the box's lifetime."""
    conn = Connection(relay.host_r, relay.host_w)
    await asyncio.wait_for(conn.hello, 10)
    await asyncio.wait_for(conn.call({"op": "ping"}), 10)  # host frame 0 arrives
    relay.drop["to_agent"].add(1)
    lost = asyncio.ensure_future(conn.call({"op": "stat", "path": "."}))  # frame 1: taken
    await asyncio.sleep(0.2)
    assert not lost.done()  # nothing could tell yet
    nxt = asyncio.ensure_future(conn.call({"op": "ping"}))  # frame 2 shows the gap
    for call in (lost, nxt):
        with pytest.raises(SandboxBroken, match="frame 2 arrived where frame 1 was due"):
            await asyncio.wait_for(call, 5)
    assert relay.proc.wait(timeout=5) == 0  # the agent stopped
    conn.close()


async def test_a_reply_taken_on_its_way_to_the_host_fails_at_the_next_frame(
    relay: Relay,
) -> None:
    conn = Connection(relay.host_r, relay.host_w)
    await asyncio.wait_for(conn.hello, 10)  # agent frame 0
    relay.drop["to_host"].add(1)  # the reply to the first call
    lost = asyncio.ensure_future(conn.call({"op": "ping"}))
    await asyncio.sleep(0.2)
    with pytest.raises(SandboxBroken, match="frame 2 arrived where frame 1 was due"):
        await asyncio.wait_for(conn.call({"op": "ping"}), 5)
    with pytest.raises(SandboxBroken, match="lost or gained frames"):
        await asyncio.wait_for(lost, 5)
    conn.close()


async def test_a_forged_frame_in_step_with_nothing_is_refused(agent: FakeAgent) -> None:
    """A frame written into the channel by a third party carries a number the
    receiver does not expect (here: a second frame 0)."""
    conn = Connection(agent.reader, agent.writer)
    await agent.say(w.encode_json(w.HELLO, 0, {"version": w.VERSION}))
    call = await pending_call(conn)
    await agent.say(w.encode_json(w.REPLY, 1, {}), numbered=False)  # seq 0 again
    with pytest.raises(SandboxBroken, match="frame 0 arrived where frame 1 was due"):
        await asyncio.wait_for(call, 2)
    conn.close()


async def test_bytes_missing_mid_stream_fail_at_the_next_header(agent: FakeAgent) -> None:
    """A few bytes taken out of a frame leave the stream out of step; the
    garbage header is refused at once, before any payload it claims is awaited."""
    conn = Connection(agent.reader, agent.writer)
    call = await pending_call(conn)
    frame = bytearray()
    agent.numberer.queue(frame, w.encode(w.DATA, 9, w.STDOUT, b"\0" * 64))
    await agent.say(bytes(frame[6:]), numbered=False)  # the first 6 bytes went missing
    with pytest.raises(SandboxBroken):
        await asyncio.wait_for(call, 2)
    conn.close()
