"""A real ``corral serve`` subprocess on 127.0.0.1, for the server, client and benchmark tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

CORRAL = [sys.executable, "-m", "corral._cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``corral serve`` in its own data directory (reachable by the boxes' uids)."""

    def __init__(self, data_dir: Path | None = None, *extra: str) -> None:
        if data_dir is None:
            parent = Path(tempfile.mkdtemp(prefix="corral-test-serve-"))
            parent.chmod(0o755)
            data_dir = parent / "data"
            data_dir.mkdir(mode=0o711)
        self.data_dir = data_dir
        self.extra = extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"server-{self.port}.log"

    def key(self, name: str = "test", *options: str) -> str:
        """A new API key through ``corral keys create`` (its last line)."""
        out = subprocess.run(
            [*CORRAL, "keys", "create", "--name", name, "--data-dir", str(self.data_dir), *options],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip().splitlines()[-1]

    def start(self) -> ServerProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *CORRAL,
                    "serve",
                    "--port",
                    str(self.port),
                    "--data-dir",
                    str(self.data_dir),
                    "--log-level",
                    "warning",
                    *self.extra,
                ],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"corral serve exited: {self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("corral serve did not come up")

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self.proc = None
        return code

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def cleanup(self) -> None:
        if self.proc is not None:
            self.stop()
        shutil.rmtree(self.data_dir.parent, ignore_errors=True)


@contextmanager
def serving(*extra: str) -> Iterator[ServerProcess]:
    """A started server in a fresh data directory, removed afterwards."""
    proc = ServerProcess(None, *extra)
    proc.start()
    try:
        yield proc
    finally:
        proc.cleanup()
