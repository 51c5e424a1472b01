"""A containerd of the tests' own: socket, root and state under a temp dir, the
CRI plugin off (nothing listens but its unix socket); stopped by its pid."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator


@contextlib.contextmanager
def own_containerd() -> Iterator[str | None]:
    """The socket path of a fresh containerd, or None if containerd cannot run here."""
    containerd = shutil.which("containerd")
    if containerd is None or os.geteuid() != 0:
        yield None
        return
    root = tempfile.mkdtemp(prefix="corral-containerd-")
    sock = os.path.join(root, "containerd.sock")
    with open(os.path.join(root, "config.toml"), "w") as f:
        f.write(
            "version = 2\n"
            f'root = "{root}/root"\nstate = "{root}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{sock}"\n'
        )
    log = open(os.path.join(root, "log"), "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [containerd, "--config", os.path.join(root, "config.toml")],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        yield sock if os.path.exists(sock) else None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        subprocess.run(["umount", "-R", "-l", f"{root}/root"], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)
