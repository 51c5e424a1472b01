"""The host <-> agent wire format: framed, multiplexed, binary-safe, versioned.

This module is also copied into every box next to the agent, so it uses the
standard library only and imports nothing from corral.

A frame is a 14-byte header and a payload::

    length:u32  type:u8  id:u32  channel:u8  seq:u32  payload[length]

* ``id`` names a call (a command, a file transfer, a request); ``channel``
  names one byte stream of it (stdin, stdout, stderr, file content).
* Control payloads (HELLO, CALL, REPLY, EVENT) are small JSON objects; bulk
  data (DATA) is raw bytes, never base64.
* Flow control is per stream, like HTTP/2: a sender may have at most the
  receiver's window of DATA in flight; the receiver returns CREDIT as it
  consumes. A flood of output therefore stalls the process that writes it
  inside the box, never the host's memory.
* Both ends validate every header: a payload above ``MAX_PAYLOAD`` or an
  unknown type is a protocol violation that ends the connection.
* ``seq`` numbers the frames of each direction from 0 (modulo 2**32). The
  receiver checks it on every header: a frame that went missing, a forged one
  or a stream that lost bytes (out of step) is seen at the next header, and the
  connection ends then, instead of a call waiting forever for a reply that
  was never going to come. The channel is private to the agent (no other
  process in the box holds it); this is the second lock. A peer that detects
  this sends ABORT with the reason, then stops.
"""

from __future__ import annotations

import json
import struct

VERSION = 2
HEADER = struct.Struct(">IBIBI")
SEQ = struct.Struct(">I")
SEQ_OFFSET = 10  # where seq sits in the header
MAX_PAYLOAD = 1 << 20  # the largest frame either side accepts
MAX_CONTROL = 1 << 20  # the largest JSON control payload (a long directory listing)
DATA_CHUNK = 512 << 10  # the largest DATA payload a sender produces
WINDOW = 4 << 20  # credit per stream, in bytes: what one stream may have in flight

# frame types
HELLO, CALL, REPLY, DATA, EOF, CREDIT, EVENT, ABORT = 1, 2, 3, 4, 5, 6, 7, 8
TYPES = frozenset((HELLO, CALL, REPLY, DATA, EOF, CREDIT, EVENT, ABORT))
CONTROL = frozenset((HELLO, CALL, REPLY, EVENT, ABORT))

# channels
STDIN, STDOUT, STDERR, CONTENT = 0, 1, 2, 3
CHANNELS = frozenset((STDIN, STDOUT, STDERR, CONTENT))

CREDIT_BODY = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer broke the protocol; the connection cannot be trusted any more."""


def encode(kind: int, ident: int, channel: int, payload: bytes = b"") -> bytes:
    """One frame with seq 0: a ``Numberer`` stamps the real one as it queues it."""
    return HEADER.pack(len(payload), kind, ident, channel, 0) + payload


def encode_json(kind: int, ident: int, body: dict[str, object]) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    if len(payload) > MAX_CONTROL:
        raise ValueError(f"control message of {len(payload)} bytes is too large")
    return encode(kind, ident, 0, payload)


def encode_credit(ident: int, channel: int, amount: int) -> bytes:
    return encode(CREDIT, ident, channel, CREDIT_BODY.pack(amount))


class Numberer:
    """Queues frames into an output buffer, numbering them in the order they will go out."""

    def __init__(self) -> None:
        self.next = 0

    def queue(self, out: bytearray, frame: bytes) -> None:
        """Append one whole frame (from ``encode``) to ``out`` with the next number."""
        start = len(out)
        out += frame
        SEQ.pack_into(out, start + SEQ_OFFSET, self.next)
        self.next = (self.next + 1) & 0xFFFF_FFFF

    def queue_data(
        self, out: bytearray, ident: int, channel: int, data: bytes | bytearray | memoryview
    ) -> None:
        """Append a DATA frame, its payload copied once, straight into ``out``."""
        out += HEADER.pack(len(data), DATA, ident, channel, self.next)
        out += data
        self.next = (self.next + 1) & 0xFFFF_FFFF


def check_header(length: int, kind: int, channel: int) -> None:
    if kind not in TYPES:
        raise ProtocolError(f"unknown frame type {kind}")
    if channel not in CHANNELS:
        raise ProtocolError(f"unknown channel {channel}")
    limit = MAX_CONTROL if kind in CONTROL else MAX_PAYLOAD
    if length > limit:
        raise ProtocolError(f"frame of {length} bytes exceeds {limit}")
    if kind == CREDIT and length != CREDIT_BODY.size:
        raise ProtocolError("malformed CREDIT frame")


def decode_json(payload: bytes) -> dict[str, object]:
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"malformed control message: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("a control message must be a JSON object")
    return body


class Decoder:
    """Turns a byte stream into frames; bounded: holds at most one unfinished frame.

    Each payload is copied exactly once, out of the caller's read buffer (which
    the caller may therefore reuse); a frame split across reads is assembled
    alone, without copying the rest of the read. Each header is checked (type,
    channel, length, seq) as soon as it is complete, before its payload is
    awaited: a stream out of step fails at once, not after a garbage length.
    """

    def __init__(self) -> None:
        self._pending = bytearray()
        self._pending_checked = False  # the pending frame's header passed the checks
        self._seq = 0

    def _check(self, length: int, kind: int, channel: int, seq: int) -> None:
        check_header(length, kind, channel)
        # out of step: a frame was taken out of the channel, put into it, or
        # bytes went missing (the header read here is then garbage)
        if seq != self._seq:
            raise ProtocolError(
                f"frame {seq} arrived where frame {self._seq} was due: "
                "the channel lost or gained frames"
            )
        self._seq = (seq + 1) & 0xFFFF_FFFF

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[int, int, int, bytes]]:
        view = memoryview(data).cast("B")
        frames: list[tuple[int, int, int, bytes]] = []
        offset = 0
        pending = self._pending
        if pending:
            if len(pending) < HEADER.size:
                take = min(HEADER.size - len(pending), len(view))
                pending += view[:take]
                offset = take
                if len(pending) < HEADER.size:
                    return frames
            length, kind, ident, channel, seq = HEADER.unpack_from(pending)
            if not self._pending_checked:
                self._check(length, kind, channel, seq)
                self._pending_checked = True
            take = min(HEADER.size + length - len(pending), len(view) - offset)
            pending += view[offset : offset + take]
            offset += take
            if len(pending) < HEADER.size + length:
                return frames
            frames.append((kind, ident, channel, bytes(pending[HEADER.size :])))
            self._pending = pending = bytearray()
            self._pending_checked = False
        size = len(view)
        while size - offset >= HEADER.size:
            length, kind, ident, channel, seq = HEADER.unpack_from(view, offset)
            self._check(length, kind, channel, seq)
            end = offset + HEADER.size + length
            if size < end:
                self._pending_checked = True
                break
            frames.append((kind, ident, channel, bytes(view[offset + HEADER.size : end])))
            offset = end
        if offset < size:
            self._pending = bytearray(view[offset:])
        return frames
