"""The MCP server, driven by the official MCP client over stdio and streamable HTTP.

Every test starts the real server (``python -m corral._mcp``) in a subprocess
and works in real sandboxes; nothing is patched.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPError
from mcp_types import (
    BlobResourceContents,
    CallToolResult,
    EmbeddedResource,
    ImageContent,
    TextContent,
)

from corral import _runtime

if _runtime.find() is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("CI must build the code runtime first (scripts/bootstrap)")
    pytest.skip("no code runtime: run `corral runtime build`", allow_module_level=True)

SERVER = [sys.executable, "-m", "corral._mcp", "--timeout", "120"]
TOOLS = {
    "open_sandbox",
    "close_sandbox",
    "run_code",
    "run_command",
    "write_file",
    "read_file",
    "list_files",
}
AGENT = b"/run/corral/agent.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- helpers ------------------------------------------------------------------------------


def agents(under: int | None = None) -> set[int]:
    """Host pids of sandbox agents (and the bwrap processes around them), those
    started by the process ``under`` if given: other corral users on this host
    have sandboxes too."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        if AGENT in cmdline and (under is None or under in ancestors(int(entry.name))):
            pids.add(int(entry.name))
    return pids


def ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rpartition(")")[2].split()[1])
        chain.append(pid)
    return chain


def running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"  # a zombie has ended


def stdio_server() -> int:
    """The pid of the stdio server this test process started."""
    mine = str(os.getpid())
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or b"corral._mcp" not in (entry / "cmdline").read_bytes():
                continue
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if stat.rpartition(")")[2].split()[1] == mine:
            found.append(int(entry.name))
    assert len(found) == 1, found
    return found[0]


async def wait_gone(pids: set[int], timeout_s: float = 15.0) -> set[int]:
    """``pids`` still alive after ``timeout_s`` (empty once they have all ended)."""
    deadline = time.monotonic() + timeout_s
    while (alive := {pid for pid in pids if running(pid)}) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return alive


def texts(result: CallToolResult) -> str:
    return "\n".join(b.text for b in result.content if isinstance(b, TextContent))


async def call(client: Client, tool: str, **arguments: Any) -> CallToolResult:
    """A tool call that must succeed."""
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, texts(result)
    return result


async def refused(client: Client, tool: str, **arguments: Any) -> str:
    """A tool call that must come back as a tool error (not a protocol failure); its text."""
    result = await client.call_tool(tool, arguments)
    assert result.is_error, texts(result)
    return texts(result)


def check_png(data: bytes) -> None:
    """A well-formed PNG: signature, an IHDR with a good CRC and a size, an IEND."""
    assert data.startswith(PNG_MAGIC)
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR"
    assert length == 13
    body = data[16 : 16 + length]
    (crc,) = struct.unpack(">I", data[16 + length : 20 + length])
    assert crc == zlib.crc32(kind + body)
    width, height = struct.unpack(">II", body[:8])
    assert width > 0
    assert height > 0
    assert data.endswith(b"IEND\xaeB`\x82")


def stdio_params(*extra: str) -> StdioServerParameters:
    # wide lines: the server's log (rich, on stderr) keeps a message on one line
    return StdioServerParameters(
        command=SERVER[0], args=[*SERVER[1:], *extra], env={"COLUMNS": "300"}
    )


@pytest.fixture
def server_log(tmp_path: Path) -> Path:
    return tmp_path / "server.log"


# -- stdio ----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_lists_the_tools() -> None:
    async with Client(stdio_params()) as client:
        listed = await client.list_tools()
        assert {tool.name for tool in listed.tools} == TOOLS
        for tool in listed.tools:
            assert tool.description, tool.name


@pytest.mark.slow
async def test_run_code_keeps_state_and_returns_plots_and_errors() -> None:
    async with Client(stdio_params()) as client:
        # concurrent first calls share one new sandbox; later ones find it open
        opened = await asyncio.gather(*(call(client, "open_sandbox") for _ in range(3)))
        first = texts(opened[0])
        assert {texts(result) for result in opened} == {first}
        assert texts(await call(client, "open_sandbox")) == first

        await call(client, "run_code", code="x = 41")
        assert texts(await call(client, "run_code", code="x + 1")) == "result:\n42"
        printed = await call(client, "run_code", code="print('hello')")
        assert "hello" in texts(printed)

        plot = await call(
            client,
            "run_code",
            code="import matplotlib.pyplot as plt; plt.plot([1, 2]); plt.show()",
        )
        images = [b for b in plot.content if isinstance(b, ImageContent)]
        assert len(images) == 1
        assert images[0].mime_type == "image/png"
        check_png(base64.b64decode(images[0].data, validate=True))

        # an exception in the code: a tool error with the traceback, not a protocol error
        error = await refused(client, "run_code", code="def f():\n    return 1/0\nf()")
        assert "ZeroDivisionError: division by zero" in error
        assert "Traceback" in error
        assert "1/0" in error
        # ...and the state survives it
        assert texts(await call(client, "run_code", code="x")) == "result:\n41"

        bash = await call(client, "run_code", code="echo $((6 * 7))", language="bash")
        assert "42" in texts(bash)
        bad = await client.call_tool("run_code", {"code": "1", "language": "cobol"})
        assert bad.is_error


@pytest.mark.slow
async def test_commands_and_files() -> None:
    async with Client(stdio_params()) as client:
        done = await call(client, "run_command", command="echo out; echo err >&2; exit 3")
        assert done.structured_content is not None
        assert done.structured_content["exit_code"] == 3
        assert done.structured_content["stdout"] == "out\n"
        assert done.structured_content["stderr"] == "err\n"
        assert "exit code: 3" in texts(done)
        assert "out" in texts(done)
        slow = await call(client, "run_command", command="sleep 30", timeout_s=0.5)
        assert slow.structured_content is not None
        assert slow.structured_content["limit_hit"] == "timeout"
        assert "policy" in await refused(client, "run_command", command="true", timeout_s=1e9)

        await call(client, "write_file", path="notes.txt", content="héllo\nworld\n")
        assert texts(await call(client, "read_file", path="notes.txt")) == "héllo\nworld\n"
        await call(
            client, "run_command", command="mkdir sub && printf '\\000\\001\\377' > sub/b.bin"
        )
        listing = texts(await call(client, "list_files"))
        assert "notes.txt" in listing
        assert "sub/" in listing
        assert "b.bin" in texts(await call(client, "list_files", path="sub"))
        # the shell and the file tools see the same workspace
        assert "héllo" in texts(await call(client, "run_command", command="cat notes.txt"))

        binary = await call(client, "read_file", path="sub/b.bin")
        assert "binary" in texts(binary)
        blobs = [
            b.resource
            for b in binary.content
            if isinstance(b, EmbeddedResource) and isinstance(b.resource, BlobResourceContents)
        ]
        assert len(blobs) == 1
        assert base64.b64decode(blobs[0].blob) == b"\x00\x01\xff"

        for path in ("../../etc/passwd", "/etc/passwd", "sub/../../x"):
            assert "outside the workspace" in await refused(client, "read_file", path=path)
            assert "outside the workspace" in await refused(
                client, "write_file", path=path, content="x"
            )
        assert "outside the workspace" in await refused(client, "list_files", path="..")
        assert "no such file" in await refused(client, "read_file", path="missing.txt")
        # still serving after all those errors
        assert texts(await call(client, "read_file", path="notes.txt")).startswith("héllo")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["auto", "legacy"])  # 2026-07-28 era, and the handshake
async def test_close_sandbox_and_exit_leave_nothing(mode: str, server_log: Path) -> None:
    with server_log.open("w") as errlog:
        async with Client(stdio_client(stdio_params(), errlog=errlog), mode=mode) as client:
            server = stdio_server()
            await call(client, "run_code", code="x = 1")
            first = agents(under=server)
            assert first, "the sandbox's agent is not running"
            closed = texts(await call(client, "close_sandbox"))
            assert "closed" in closed
            assert not await wait_gone(first)
            assert texts(await call(client, "close_sandbox")) == "no sandbox was open"

            # run_code opens a fresh sandbox: the variable is gone
            assert "NameError" in await refused(client, "run_code", code="x")
            sandbox_id = texts(await call(client, "open_sandbox"))
            second = agents(under=server)
            assert second
            assert second.isdisjoint(first)
    # the client closed the pipe: the server closed the sandbox itself and exited
    assert not await wait_gone(second)
    assert not await wait_gone({server})
    assert f"closed sandbox {sandbox_id}" in server_log.read_text()


@pytest.mark.slow
async def test_a_signal_stops_the_server_and_its_sandboxes(server_log: Path) -> None:
    with server_log.open("w") as errlog:
        async with Client(stdio_client(stdio_params(), errlog=errlog)) as client:
            server = stdio_server()
            sandbox_id = texts(await call(client, "open_sandbox"))
            boxes = agents(under=server)
            assert boxes
            os.kill(server, signal.SIGTERM)
            assert not await wait_gone(boxes | {server})
    assert f"closed sandbox {sandbox_id}: the server stopped" in server_log.read_text()


@pytest.mark.slow
async def test_a_sandbox_past_its_lifetime_is_reported_then_replaced() -> None:
    async with Client(stdio_params("--timeout", "8")) as client:
        first = texts(await call(client, "open_sandbox"))
        await call(client, "run_code", code="x = 1")
        await asyncio.sleep(9)
        ended = await refused(client, "run_code", code="x")
        assert "has ended" in ended
        assert "variables are gone" in ended
        # the next call works, in a fresh sandbox
        assert "NameError" in await refused(client, "run_code", code="x")
        assert texts(await call(client, "open_sandbox")) != first


# -- streamable HTTP ------------------------------------------------------------------------


@dataclass
class HttpServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[HttpServer]:
    port = free_port()
    log = tmp_path / "http.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*SERVER, "--http", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "300"},
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        yield HttpServer(f"http://127.0.0.1:{port}/mcp", process, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
async def test_http_sessions_have_their_own_sandboxes(http_server: HttpServer) -> None:
    server = http_server.process.pid
    async with Client(http_server.url) as one:
        # the default client probes the sessionless era first; the server steers it
        # to the handshake, which gives it a session
        assert one.protocol_version != "2026-07-28"
        id_one = texts(await call(one, "open_sandbox"))
        pids_one = agents(under=server)
        assert pids_one
        async with Client(http_server.url) as two:
            id_two = texts(await call(two, "open_sandbox"))
            assert id_two != id_one
            pids_two = agents(under=server) - pids_one
            assert pids_two

            await call(one, "run_code", code="secret = 'one'")
            await call(one, "write_file", path="mine.txt", content="one")
            assert "NameError" in await refused(two, "run_code", code="secret")
            assert "no such file" in await refused(two, "read_file", path="mine.txt")
            assert texts(await call(one, "run_code", code="secret")) == "result:\n'one'"

        # session two ended (the client sent DELETE): its sandbox, and only it, is gone
        assert not await wait_gone(pids_two)
        assert agents(under=server) == pids_one
        assert texts(await call(one, "run_code", code="secret")) == "result:\n'one'"

        # a stopping server closes the sandboxes of the sessions still open
        http_server.process.send_signal(signal.SIGINT)
        assert not await wait_gone(pids_one | {http_server.process.pid}, timeout_s=30)
        http_server.process.wait(timeout=5)  # reaped (it has exited: no wait)
    log = http_server.log.read_text()
    assert f"closed sandbox {id_two}" in log
    assert f"closed sandbox {id_one}" in log


@pytest.mark.slow
async def test_http_refuses_requests_without_a_session(http_server: HttpServer) -> None:
    # the 2026-07-28 era has no sessions over HTTP: nothing could keep two clients'
    # sandboxes apart, so the server refuses it at the protocol level
    async with Client(http_server.url, mode="2026-07-28") as client:
        with pytest.raises(MCPError, match="sandbox per session"):
            await client.call_tool("run_code", {"code": "1"})


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "0"},
    },
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Host": "attacker.example"}, 421),  # DNS rebinding: a name pointed at 127.0.0.1
        ({"Origin": "http://attacker.example"}, 403),  # a web page's fetch
        ({}, 200),
    ],
)
def test_http_refuses_other_hosts_and_origins(
    http_server: HttpServer, headers: dict[str, str], status: int
) -> None:
    url = urlsplit(http_server.url)
    connection = http.client.HTTPConnection(url.netloc, timeout=30)
    try:
        connection.request(
            "POST",
            url.path,
            body=json.dumps(INITIALIZE),
            headers={
                "Content-Type": "application/json",
                "Accept": "application/json, text/event-stream",
                **headers,
            },
        )
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    assert response.status == status


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "example.com"])
def test_http_refuses_a_non_loopback_host(host: str) -> None:
    done = subprocess.run(
        [*SERVER, "--http", "--host", host, "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "loopback" in done.stderr
    assert "authentication" in done.stderr
