"""What the network layer tells the rest of corral: one ``NetworkEvent`` per
decision, and the ``Approval`` callback that decides an unlisted host.

Pure data, no I/O: the API (``corral.abc``, results, the server's JSON) imports
these without pulling in the proxy.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

# Decides an unlisted host: (host, port) -> bool, or an awaitable of one.
Approval = Callable[[str, int], "bool | Awaitable[bool]"]


@dataclass(frozen=True, slots=True)
class NetworkEvent:
    """One decision of the proxy."""

    time: float
    host: str
    port: int
    address: str | None
    allowed: bool
    rule: str
    reason: str
    bytes_up: int = 0
    bytes_down: int = 0
    duration_s: float = 0.0


def printable(text: str) -> str:
    """For messages and events: no control characters, bounded."""
    return "".join(c if c.isprintable() else "?" for c in text[:253])
