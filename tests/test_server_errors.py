"""The one exception table (``corral._errors.WIRE``), both directions, through a real server.

For every row, a route of the real app on 127.0.0.1 raises the row's
exception; the reply must carry the row's status and code (and no host
path), and the remote client must raise the class the row promises, both
for a plain reply and for an error ending an NDJSON stream.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import APIRouter

from corral import (
    AsyncClient,
    CorralError,
    HostToolMissing,
    PathOutsideWorkspace,
    PolicyError,
    RemoteError,
    SandboxBroken,
    SandboxClosed,
    SandboxError,
    UnsupportedPolicy,
)
from corral._errors import WIRE, InvalidRequest, Wire
from corral.server._app import create_app
from corral.server._http import ndjson
from corral.server._service import Service, ServiceConfig
from corral.server._store import Store

from .server_helpers import free_port

HOST_PATH = "/var/lib/corral/server/workspaces/0123abcd/secret.txt"

# what each row's exception arrives as at the client: written out here, not
# derived from the table, so a change of the table shows as a failing row
ARRIVES: dict[tuple[type[Exception], int | None], type[Exception]] = {
    (PolicyError, None): PolicyError,
    (UnsupportedPolicy, None): UnsupportedPolicy,
    (PathOutsideWorkspace, None): PathOutsideWorkspace,
    (HostToolMissing, None): HostToolMissing,
    (SandboxBroken, None): SandboxBroken,
    (SandboxClosed, None): SandboxBroken,  # ended underneath the remote caller
    (SandboxError, None): SandboxError,
    (FileNotFoundError, errno.ENOENT): FileNotFoundError,
    (IsADirectoryError, errno.EISDIR): IsADirectoryError,
    (NotADirectoryError, errno.ENOTDIR): NotADirectoryError,
    (FileExistsError, errno.EEXIST): FileExistsError,
    (PermissionError, errno.EACCES): PermissionError,
    (PermissionError, errno.EPERM): PermissionError,
    (OSError, errno.ENXIO): PermissionError,
    (OSError, errno.ENOTEMPTY): OSError,
    (OSError, errno.ENOSPC): OSError,
    (OSError, errno.EFBIG): InvalidRequest,
    (OSError, errno.ENAMETOOLONG): InvalidRequest,
    (OSError, errno.ELOOP): InvalidRequest,
    (OSError, errno.EINVAL): InvalidRequest,
    (ValueError, None): InvalidRequest,
    (CorralError, None): CorralError,
}


def _raise(row: Wire) -> Exception:
    """An instance of the row's exception whose text names a host path."""
    if row.errno is not None:
        return OSError(row.errno, os.strerror(row.errno), HOST_PATH)
    if row.raised in (PolicyError, UnsupportedPolicy):
        return row.raised("limits.memory_bytes", f"not at {HOST_PATH}")
    if row.raised is HostToolMissing:
        return HostToolMissing("bwrap", f"install bubblewrap (looked in {HOST_PATH})")
    return row.raised(f"it broke at {HOST_PATH}")


def _app_with_raising_routes(data_dir: Path) -> Any:
    app = create_app(Service(Store("sqlite://"), ServiceConfig(data_dir=data_dir)))
    router = APIRouter()

    @router.get("/test/raise/{index}")
    async def plain(index: int) -> None:
        raise _raise(WIRE[index])

    @router.get("/test/stream/{index}")
    async def stream(index: int) -> Any:
        async def events() -> AsyncIterator[dict[str, Any]]:
            yield {"type": "stdout", "text": "first"}
            raise _raise(WIRE[index])

        return ndjson(events())

    app.include_router(router)
    return app


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    app = _app_with_raising_routes(tmp_path_factory.mktemp("data"))
    # lifespan off: the service (its reaper, the sweep) is not needed to answer
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        assert thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_every_row_is_tested() -> None:
    assert {(row.raised, row.errno) for row in WIRE} == set(ARRIVES)


@pytest.mark.parametrize("index", range(len(WIRE)), ids=lambda i: f"{WIRE[i].code}-{i}")
def test_the_server_answers_each_row_and_the_client_raises_its_class(url: str, index: int) -> None:
    row = WIRE[index]
    reply = httpx.get(f"{url}/test/raise/{index}")
    assert reply.status_code == row.status
    error = reply.json()["error"]
    assert error["code"] == row.code
    # infrastructure messages are scrubbed, OS errors carry strerror only; the
    # caller's own values (a policy, a path it sent) come back as they were
    hidden = row.scrub or row.errno is not None
    assert (HOST_PATH not in reply.text) is hidden
    if row.raised is PolicyError:
        assert error["field"] == "limits.memory_bytes"

    expected = ARRIVES[(row.raised, row.errno)]

    async def call(path: str) -> BaseException:
        async with AsyncClient(url, api_key="crl_unused") as client:
            try:
                if path.startswith("/test/stream"):
                    async for _ in client._events("GET", path):
                        pass
                else:
                    await client._json("GET", path)
            except Exception as exc:
                return exc
        raise AssertionError("no exception")

    for path in (f"/test/raise/{index}", f"/test/stream/{index}"):
        raised = asyncio.run(call(path))
        assert type(raised) is expected, (path, raised)
        assert (HOST_PATH not in str(raised)) is hidden
        if isinstance(raised, OSError):  # the errno of the code (EPERM arrives as EACCES)
            assert raised.errno == next(r.errno for r in WIRE if r.code == row.code)
        if expected is PolicyError:
            assert isinstance(raised, PolicyError)
            assert raised.field == "limits.memory_bytes"
        if expected is HostToolMissing:
            assert isinstance(raised, HostToolMissing)
            assert raised.tool == "bwrap"
        if not isinstance(raised, RemoteError):
            # httpx's idiom: the mapped class, from what the server answered
            assert isinstance(raised.__cause__, RemoteError)
            assert raised.__cause__.code == row.code


def test_a_sandbox_error_arrives_as_sandbox_error_not_remote_error(url: str) -> None:
    index = next(i for i, row in enumerate(WIRE) if row.raised is SandboxError)

    async def call() -> None:
        async with AsyncClient(url, api_key="crl_unused") as client:
            await client._json("GET", f"/test/raise/{index}")

    with pytest.raises(SandboxError, match="it broke at <host path>") as caught:
        asyncio.run(call())
    assert not isinstance(caught.value, RemoteError)
