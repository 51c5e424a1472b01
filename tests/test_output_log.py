"""The server's background-output log: followers see every byte, in order, once."""

from __future__ import annotations

import asyncio
import random

from corral.server._output import OutputLog


class _Handle:
    """Output buffers as a CommandHandle keeps them (the log reads them in place)."""

    def __init__(self) -> None:
        self.buffers = {"stdout": bytearray(), "stderr": bytearray()}

    def _buffers(self) -> dict[str, bytearray]:
        return self.buffers

    def write(self, log: OutputLog, stream: str, data: bytes) -> None:
        self.buffers[stream] += data  # kept first, then the callback: as _Process does
        log.on_output(stream, len(data))


async def _follow(log: OutputLog, rng: random.Random | None = None) -> list[tuple[str, bytes]]:
    import base64

    out: list[tuple[str, bytes]] = []
    async for event in log.follow():
        for _ in range(rng.randint(0, 3) if rng else 0):  # a consumer that awaits (a socket)
            await asyncio.sleep(0)
        if event["type"] in ("stdout", "stderr"):
            out.append((event["type"], base64.b64decode(event["data"])))
        else:
            out.append((event["type"], b""))
    return out


def _merged(events: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    merged: list[tuple[str, bytes]] = []
    for stream, data in events:
        if merged and merged[-1][0] == stream:
            merged[-1] = (stream, merged[-1][1] + data)
        else:
            merged.append((stream, data))
    return merged


async def test_a_follower_misses_nothing_while_output_grows_under_it() -> None:
    for seed in range(200):
        rng = random.Random(seed)
        handle, log = _Handle(), OutputLog()
        writes = [
            (rng.choice(("stdout", "stderr")), bytes([65 + i % 26]) * rng.randint(1, 5))
            for i in range(rng.randint(1, 30))
        ]
        early = rng.randint(0, len(writes))
        for stream, data in writes[:early]:  # output before the handle was known
            handle.write(log, stream, data)
        log.attach(handle)  # type: ignore[arg-type]
        followers = [asyncio.ensure_future(_follow(log, rng)) for _ in range(2)]
        for stream, data in writes[early:]:
            handle.write(log, stream, data)
            for _ in range(rng.randint(0, 2)):
                await asyncio.sleep(0)
        log.finish("exit", {"result": {}})
        want = _merged([*writes, ("exit", b"")])
        for follower in followers:
            assert _merged(await follower) == want, seed


async def test_a_late_follower_and_a_silent_command() -> None:
    handle, log = _Handle(), OutputLog()
    log.attach(handle)  # type: ignore[arg-type]
    log.finish("exit", {"result": {}})
    assert await _follow(log) == [("exit", b"")]
