"""Directory watches, envd's ``WatchDir`` stream and its polled watchers
(``CreateWatcher``, ``GetWatcherEvents``, ``RemoveWatcher``), over listings
of the box's directory.

corral reaches a box's files through its agent, which has no inotify; so a
watch compares successive listings (every ``POLL_S`` while streaming; at each
``GetWatcherEvents`` for a polled watcher). What that shows, by name relative
to the watched directory: ``EVENT_TYPE_CREATE`` for a new entry,
``EVENT_TYPE_REMOVE`` for a gone one, ``EVENT_TYPE_WRITE`` when a file's size
or modification time changed, ``EVENT_TYPE_CHMOD`` when only its mode did. A
rename is a remove and a create (envd's ``RENAME`` needs the kernel's
cookie); changes that undo themselves between two listings are not seen.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from corral.server._live import Live
from corral.server._service import Service

from . import _connect as c

POLL_S = 0.2
MAX_ENTRIES = 10_000  # a watched tree larger than this is refused, not half-watched
MAX_WATCHERS = 16  # polled watchers per sandbox
_DEPTH = 32

Listing = dict[str, tuple[str, int, float, int]]  # name -> (type, size, mtime, mode)


async def listing(live: Live, path: str, recursive: bool) -> Listing:
    """The entries under the box directory ``path``, by name relative to it."""
    files = live.sandbox.files
    info = await files.stat(path)
    if info.type != "dir":
        raise c.ConnectError("invalid_argument", f"path: {path!r} is not a directory")
    found: Listing = {}
    pending = [(path, 1)]
    while pending:
        directory, depth = pending.pop()
        for entry in await files.list(directory):
            full = posixpath.join(directory, entry.name)
            found[posixpath.relpath(full, path)] = (entry.type, entry.size, entry.mtime, entry.mode)
            if len(found) > MAX_ENTRIES:
                raise c.ConnectError(
                    "resource_exhausted", f"path: more than {MAX_ENTRIES} entries to watch"
                )
            if recursive and entry.type == "dir" and depth < _DEPTH:
                pending.append((full, depth + 1))
    return found


def changes(old: Listing, new: Listing) -> list[dict[str, Any]]:
    """envd's ``FilesystemEvent``s from one listing to the next."""
    events = [{"name": n, "type": "EVENT_TYPE_REMOVE"} for n in sorted(old.keys() - new.keys())]
    for name in sorted(new):
        before, now = old.get(name), new[name]
        if before is None or before[0] != now[0]:
            if before is not None:
                events.append({"name": name, "type": "EVENT_TYPE_REMOVE"})
            events.append({"name": name, "type": "EVENT_TYPE_CREATE"})
        elif now[0] != "dir" and before[1:3] != now[1:3]:
            events.append({"name": name, "type": "EVENT_TYPE_WRITE"})
        elif before[3] != now[3]:
            events.append({"name": name, "type": "EVENT_TYPE_CHMOD"})
    return events


async def _read(service: Service, live: Live, path: str, recursive: bool) -> Listing:
    async with service.using(live.key, live.id) as used:
        return await listing(used, path, recursive)


async def stream(
    service: Service, live: Live, path: str, recursive: bool
) -> AsyncIterator[dict[str, Any]]:
    """``WatchDir``'s messages: ``start`` once the first listing is taken, then
    each change; it ends with the sandbox (an error) or the client."""
    last = await _read(service, live, path, recursive)
    yield {"start": {}}
    while True:
        await asyncio.sleep(POLL_S)
        now = await _read(service, live, path, recursive)
        for event in changes(last, now):
            yield {"filesystem": event}
        last = now


@dataclass
class Watcher:
    sandbox_id: str
    path: str
    recursive: bool
    last: Listing = field(default_factory=dict)


_WATCHERS: dict[str, Watcher] = {}


async def create(service: Service, live: Live, path: str, recursive: bool) -> str:
    for watcher_id, watcher in list(_WATCHERS.items()):  # those of ended sandboxes go
        if watcher.sandbox_id not in service.live:
            del _WATCHERS[watcher_id]
    if sum(w.sandbox_id == live.id for w in _WATCHERS.values()) >= MAX_WATCHERS:
        raise c.ConnectError(
            "resource_exhausted", f"at most {MAX_WATCHERS} watchers per sandbox: remove one"
        )
    watcher = Watcher(live.id, path, recursive, await listing(live, path, recursive))
    watcher_id = os.urandom(8).hex()
    _WATCHERS[watcher_id] = watcher
    return watcher_id


def _get(live: Live, watcher_id: object) -> Watcher:
    watcher = _WATCHERS.get(watcher_id) if isinstance(watcher_id, str) else None
    if watcher is None or watcher.sandbox_id != live.id:
        raise c.ConnectError("not_found", f"watcher {watcher_id!r} not found")
    return watcher


async def events(live: Live, watcher_id: object) -> list[dict[str, Any]]:
    """The changes since the watcher's previous listing."""
    watcher = _get(live, watcher_id)
    now = await listing(live, watcher.path, watcher.recursive)
    found, watcher.last = changes(watcher.last, now), now
    return found


def remove(live: Live, watcher_id: object) -> None:
    _get(live, watcher_id)
    del _WATCHERS[str(watcher_id)]
