"""docker: the rendered ``run`` command line as an Engine API ``create`` call.

Docker's CLI cannot add a masked path (podman's ``--security-opt mask=``
can); its Engine API can (``HostConfig.MaskedPaths``, API 1.30+). So a docker
box is created through the API, from the very flags ``_argv.render_run``
rendered (one renderer for both engines), with corral's masks added, and its
stdio attached by ``docker start --attach``. Stdlib HTTP over the daemon's
unix socket: the one request needs no client library.

Threat stopped by the added mask: ``/proc/key-users`` lists which host uids
hold keys and how many (docker masks only ``/proc/keys``).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

from corral._errors import HostToolMissing, SandboxError

# docker's own defaults (its oci/defaults.go, 20.10), which a MaskedPaths given
# to the API replaces, plus corral's
MASKED_PATHS = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/key-users",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
)
_DEFAULT_SOCKET = "/var/run/docker.sock"
_ULIMITS = ("core", "stack", "nofile", "fsize", "cpu", "as", "nproc")


def socket_path(env: Mapping[str, str]) -> str | None:
    """The daemon's unix socket from ``DOCKER_HOST`` (docker's default when
    unset); None for any other endpoint (tcp, ssh: the CLI's ``run`` then)."""
    host = env.get("DOCKER_HOST")
    if not host:
        return _DEFAULT_SOCKET
    url = urlsplit(host)
    return url.path if url.scheme == "unix" and url.path else None


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def create_body(run_args: Sequence[str], env: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    """The container's name and the ``POST /containers/create`` body for the
    ``run`` arguments ``run_args`` (``_argv.render_run``'s, after ``run``);
    ``--env=NAME`` takes its value from ``env`` as the CLI would.

    Raises ``ValueError`` for a flag this translation does not know (a flag
    added to ``render_run`` must be added here too)."""
    config: dict[str, Any] = {"Labels": {}, "Env": []}
    host: dict[str, Any] = {
        "Binds": [],
        "Tmpfs": {},
        "Ulimits": [],
        "SecurityOpt": [],
        "MaskedPaths": list(MASKED_PATHS),
    }
    name = ""
    args = list(run_args)
    split = args.index("--")
    flags, rest = args[:split], args[split + 1 :]
    for flag in flags:
        key, _, value = flag.partition("=")
        match key:
            case "--name":
                name = value
            case "--label":
                k, _, v = value.partition("=")
                config["Labels"][k] = v
            case "--cidfile" | "--pull":
                pass  # written by the caller; create never pulls
            case "--cgroup-parent":
                host["CgroupParent"] = value
            case "--network":
                host["NetworkMode"] = value
            case "--ipc":
                host["IpcMode"] = value
            case "--hostname":
                config["Hostname"] = value
            case "--read-only":
                host["ReadonlyRootfs"] = True
            case "--cap-drop":
                host["CapDrop"] = [value]
            case "--security-opt":
                if value.startswith("seccomp="):
                    # the CLI sends the profile itself, not its path
                    with open(value.removeprefix("seccomp="), encoding="utf-8") as f:
                        value = "seccomp=" + f.read()
                host["SecurityOpt"].append(value)
            case "--user":
                config["User"] = value
            case "--stop-timeout":
                config["StopTimeout"] = int(value)
            case "--log-driver":
                host["LogConfig"] = {"Type": value, "Config": {}}
            case "--memory":
                host["Memory"] = int(value)
            case "--memory-swap":
                host["MemorySwap"] = int(value)
            case "--cpus":
                host["NanoCpus"] = round(float(value) * 1e9)
            case "--pids-limit":
                host["PidsLimit"] = int(value)
            case "--ulimit":
                which, _, limits = value.partition("=")
                soft, _, hard = limits.partition(":")
                if which not in _ULIMITS:
                    raise ValueError(f"unknown ulimit {which!r}")
                host["Ulimits"].append({"Name": which, "Soft": int(soft), "Hard": int(hard)})
            case "--interactive":
                config.update(OpenStdin=True, StdinOnce=True, AttachStdin=True)
            case "--volume":
                host["Binds"].append(value)
            case "--tmpfs":
                path, _, opts = value.partition(":")
                host["Tmpfs"][path] = opts
            case "--shm-size":
                host["ShmSize"] = int(value)
            case "--runtime":
                host["Runtime"] = value
            case "--workdir":
                config["WorkingDir"] = value
            case "--env":
                if "=" in value:
                    config["Env"].append(value)
                elif value in env:
                    config["Env"].append(f"{value}={env[value]}")
            case _:
                raise ValueError(f"no Engine API translation for {flag!r}")
    if not name or not rest:
        raise ValueError("the run arguments name no container or image")
    config.update(AttachStdout=True, AttachStderr=True, Image=rest[0], Cmd=rest[1:])
    config["HostConfig"] = host
    return name, config


def create(sock_path: str, name: str, body: Mapping[str, Any], timeout: float = 60.0) -> str:
    """``POST /containers/create?name=NAME``; the new container's id.

    ``HostToolMissing`` if the daemon does not answer, ``SandboxError`` with
    its message if it refuses."""
    conn = _UnixConnection(sock_path, timeout)
    try:
        try:
            conn.request(
                "POST",
                f"/containers/create?name={quote(name)}",
                body=json.dumps(body),
                headers={"Content-Type": "application/json"},
            )
            reply = conn.getresponse()
            data = reply.read()
        except OSError as exc:
            raise HostToolMissing(
                "docker", f"start dockerd (or point DOCKER_HOST at a running one) ({exc})"
            ) from exc
    finally:
        conn.close()
    try:
        answer = json.loads(data or b"{}")
    except ValueError:
        answer = {}
    if reply.status != 201 or not isinstance(answer, dict) or "Id" not in answer:
        message = answer.get("message") if isinstance(answer, dict) else None
        raise SandboxError(
            f"docker could not create the container: {message or data[:300]!r} "
            f"(HTTP {reply.status})"
        )
    return str(answer["Id"])


def write_cidfile(path: str, cid: str) -> None:
    """The container id where ``run --cidfile`` would have put it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(cid)
