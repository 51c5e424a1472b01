"""A dockerd of the tests' own: its socket, data root and exec root under a
temp dir, no iptables, no bridge (boxes run with --network none); stopped by
its pid. Sets DOCKER_HOST while it runs, so the docker backend finds it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator


@contextlib.contextmanager
def own_dockerd() -> Iterator[str | None]:
    """The DOCKER_HOST of a fresh dockerd, or None if dockerd cannot run here."""
    dockerd = shutil.which("dockerd")
    if dockerd is None or os.geteuid() != 0:
        yield None
        return
    root = tempfile.mkdtemp(prefix="corral-dockerd-")
    sock = os.path.join(root, "docker.sock")
    # gVisor as a second runtime (the docker backend's runtime="runsc"), with
    # the gvisor backend's flags; the daemon's default stays runc
    config = os.path.join(root, "daemon.json")
    runsc = shutil.which("runsc")
    with open(config, "w") as f:
        runtimes = {
            "runsc": {
                "path": runsc,
                "runtimeArgs": ["--platform=ptrace", "--network=none", "--oci-seccomp"],
            }
        }
        json.dump({"runtimes": runtimes} if runsc else {}, f)
    log = open(os.path.join(root, "log"), "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            dockerd,
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            f"--host=unix://{sock}",
            f"--data-root={root}/data",
            f"--exec-root={root}/exec",
            f"--pidfile={root}/docker.pid",
            f"--config-file={config}",
        ],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
    )
    old = os.environ.get("DOCKER_HOST")
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.environ["DOCKER_HOST"] = f"unix://{sock}"
        yield os.environ["DOCKER_HOST"] if os.path.exists(sock) else None
    finally:
        if old is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = old
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        subprocess.run(["umount", "-R", "-l", f"{root}/data"], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)
