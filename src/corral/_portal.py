"""The portal: one event loop in a daemon thread, where the sync facade's work runs.

``_sync.py`` (generated) hands each coroutine of the async API to this loop and
waits for its result, so a box's machinery (output flow, process exits, the
lifetime timer) keeps running between sync calls, as it does in async code.

Why not anyio's ``BlockingPortal``: corral's core has no dependencies, the
portal here lives for the whole process (every sync sandbox shares it, and a
sandbox may outlive the ``with`` that made it), and a caller interrupted while
it waits (Ctrl-C) must cancel the work on the loop, so a command does not run
on unseen; a blocking portal is scoped to a context manager and leaves the
work running when its caller is interrupted.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


class _Portal:
    """One event loop in a daemon thread, shared by every sync sandbox."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def loop(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._loop.is_closed():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="corral-portal", daemon=True
                )
                thread.start()
                cls._loop = loop
            return cls._loop


def call(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the portal and wait for its result (or exception)."""
    loop = _Portal.loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        coro.close()
        raise RuntimeError("a sync sandbox method was called from the portal's own loop")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result()
    except BaseException:
        # Ctrl-C (or any exception) in the caller's thread: cancel the work on
        # the portal too, so a command does not run on unseen
        future.cancel()
        raise


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


def iterate(events: AsyncIterator[T]) -> Generator[T, None, None]:
    """An async iterator, item by item through the portal; closing the
    generator (or leaving its loop) closes the async one (``aclose``)."""
    try:
        while True:
            try:
                yield call(_await(anext(events)))
            except StopAsyncIteration:
                return
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            call(aclose())
