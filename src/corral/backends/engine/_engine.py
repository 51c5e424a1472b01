"""One container engine reached through its CLI: where it is, whether it answers.

The CLI, not an API client: ``ENGINE run -i`` gives corral real pipes for the
box's stdio and the agent's channel (the Docker SDK would hand back a hijacked
socket to demultiplex), podman needs no daemon this way, and both CLIs take
the same ``run`` flags, so one renderer serves both. (docker's boxes are
created through its Engine API from those flags, for a mask its CLI cannot
add, and attached by its CLI: see ``_dockerapi``.)
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import subprocess

from corral._errors import HostToolMissing, SandboxError, UnsupportedPolicy
from corral._policy import Policy
from corral.backends.engine import _argv, _image
from corral.backends.gvisor._runsc import find_runsc
from corral.plan._mounts import Symlink

# runsc's flags under an engine: the gvisor backend's platform, no network of
# runsc's own (the sentry's empty netstack), the profile enforced by the sentry
_RUNSC_FLAGS = ("--platform=ptrace", "--network=none", "--oci-seccomp")

_FIX = {
    "docker": (
        "install it with: sudo apt-get install docker.io, start dockerd (or point "
        "DOCKER_HOST at a running one)"
    ),
    "podman": "install it with: sudo apt-get install podman runc",
}


class Engine:
    """``docker`` or ``podman``, as found on this host."""

    def __init__(self, kind: _argv.EngineKind, runtime: _argv.Runtime = "runc") -> None:
        self.kind: _argv.EngineKind = kind
        # "runsc": the engine runs boxes on gVisor (podman: runsc as its OCI
        # runtime; docker: a runtime named runsc registered in dockerd)
        self.runtime: _argv.Runtime = runtime
        # per endpoint (DOCKER_HOST may change between calls): answered, images imported
        self._ready: set[str | None] = set()
        self._images: set[tuple[str | None, str]] = set()
        _, hard = resource.getrlimit(resource.RLIMIT_NPROC)
        limit = hard if hard != resource.RLIM_INFINITY else 1 << 22
        # no more processes than pids exist (podman's runc refuses a higher
        # RLIMIT_NPROC here: its conmon runs with a lower hard limit)
        try:
            with open("/proc/sys/kernel/pid_max") as f:
                limit = min(limit, int(f.read()))
        except (OSError, ValueError):
            pass
        self.default_nproc = min(limit, 1 << 22)
        self.init_path = "/usr/bin/tini"  # Debian's tini (docker.io depends on it), under /usr
        # on an image root no host /usr is bound: the static tini, bound alone
        self.image_init_source = "/usr/bin/tini-static"
        self.image_init_path = "/run/corral-init"

    @property
    def binary(self) -> str:
        path = shutil.which(self.kind)
        if path is None:
            raise HostToolMissing(self.kind, _FIX[self.kind])
        return path

    @property
    def command(self) -> list[str]:
        """The CLI and its global options."""
        if self.kind == "podman":
            # runc: crun refuses hybrid cgroup hosts; cgroupfs and a file event
            # log: no systemd or journald needed
            if self.runtime == "runsc":
                runtime = [
                    f"--runtime={find_runsc().path}",
                    # the gvisor backend's flags: ptrace, the sentry's empty
                    # netstack (runsc refuses the root netns otherwise), the
                    # profile's rules enforced by the sentry
                    *(f"--runtime-flag={flag.removeprefix('--')}" for flag in _RUNSC_FLAGS),
                ]
            else:
                runtime = [f"--runtime={shutil.which('runc') or 'runc'}"]
            return [
                self.binary,
                *runtime,
                "--cgroup-manager=cgroupfs",
                "--events-backend=file",
            ]
        return [self.binary]

    def env(self) -> dict[str, str]:
        """The CLI's own environment: only what it reads (``_argv.CLI_ENV``)."""
        env = {k: os.environ[k] for k in _argv.CLI_ENV if k in os.environ}
        env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        return env

    def refuse_unsupported(self, policy: Policy) -> None:
        """``UnsupportedPolicy`` for what this backend cannot enforce (starts nothing)."""
        if policy.network.mode != "none":
            raise UnsupportedPolicy(
                "network.mode",
                f"the {self.kind} backend runs boxes with --network none only; corral's "
                "allowlist proxy and open mode need the bwrap backend",
            )

    def probe(self) -> str:
        """The engine's server version; ``HostToolMissing`` with the fix if it does not answer."""
        try:
            out = subprocess.run(
                [*self.command, "version", "--format={{.Server.Version}}"],
                capture_output=True,
                env=self.env(),
                timeout=20,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HostToolMissing(self.kind, f"{_FIX[self.kind]} ({exc})") from exc
        if out.returncode != 0:
            why = out.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no answer"]
            raise HostToolMissing(self.kind, f"{_FIX[self.kind]} ({why[0]})")
        if self.kind == "podman" and self.runtime == "runc" and shutil.which("runc") is None:
            raise HostToolMissing("runc", "install it with: sudo apt-get install runc")
        if self.runtime == "runsc":
            find_runsc()
            if self.kind == "docker":
                self._require_docker_runsc()
        return out.stdout.decode().strip()

    def _require_docker_runsc(self) -> None:
        """``HostToolMissing`` unless dockerd has a runtime named runsc."""
        out = subprocess.run(
            [*self.command, "info", "--format={{json .Runtimes}}"],
            capture_output=True,
            env=self.env(),
            timeout=20,
            check=False,
        )
        if b'"runsc"' not in out.stdout:
            args = ", ".join(f'"{flag}"' for flag in _RUNSC_FLAGS)
            raise HostToolMissing(
                "the runsc runtime in dockerd",
                "register it in /etc/docker/daemon.json and restart dockerd: "
                f'{{"runtimes": {{"runsc": {{"path": "{find_runsc().path}", '
                f'"runtimeArgs": [{args}]}}}}}}',
            )

    async def ready(self) -> None:
        endpoint = os.environ.get("DOCKER_HOST")
        if endpoint not in self._ready:
            await asyncio.to_thread(self.probe)
            self._ready.add(endpoint)

    async def base_image(self, symlinks: tuple[Symlink, ...], workspace: str) -> str:
        """The tag of the base image for this layout, imported once (``_image``)."""
        tar = _image.base_tar(symlinks, workspace)
        tag = _image.image_tag(tar)
        key = (os.environ.get("DOCKER_HOST"), tag)
        if key not in self._images:
            await asyncio.to_thread(self._import, tag, tar)
            self._images.add(key)
        return tag

    async def user_image(self, ref: str) -> str:
        """``ref`` if the engine holds that image (checked once per endpoint);
        ``HostToolMissing`` naming it, and how to make it, if not. Never pulls."""
        key = (os.environ.get("DOCKER_HOST"), ref)
        if key not in self._images:
            await asyncio.to_thread(self._require_image, ref)
            self._images.add(key)
        return ref

    def _require_image(self, ref: str) -> None:
        have = subprocess.run(
            [*self.command, "image", "inspect", "--format={{.Id}}", ref],
            capture_output=True,
            env=self.env(),
            check=False,
        )
        if have.returncode == 0:
            return
        if ref.startswith("localhost/corral-default"):
            how = f"build and load it with: corral image build --into {self.kind}"
        else:
            how = (
                f"build it with: corral image build --from Dockerfile --tag {ref} "
                f"--engine {self.kind} (or {self.kind} load it); corral never pulls images"
            )
        raise HostToolMissing(f"the image {ref!r} in {self.kind}", how)

    def _import(self, tag: str, tar: bytes) -> None:
        have = subprocess.run(
            [*self.command, "image", "inspect", "--format={{.Id}}", tag],
            capture_output=True,
            env=self.env(),
            check=False,
        )
        if have.returncode == 0:
            return
        made = subprocess.run(
            [*self.command, "import", "-", tag],
            input=tar,
            capture_output=True,
            env=self.env(),
            check=False,
        )
        if made.returncode != 0:
            raise SandboxError(
                f"{self.kind} import of the base image failed: "
                f"{made.stderr.decode(errors='replace').strip()}"
            )
