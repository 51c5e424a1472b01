"""A background command's output, replayed to any number of followers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

from corral._sandbox import CommandHandle
from corral._serial import b64

from . import _internals


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
        buffers: Mapping[Any, bytearray] = _internals.buffers(handle)
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
