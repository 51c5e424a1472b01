"""Finding a backend by name: the built-in ones, then the entry-point group
``corral.backends`` (a third party's package declares
``[project.entry-points."corral.backends"] mine = "pkg.module:MyBackend"``;
the object is a Backend class, called with no arguments, or an instance)."""

from __future__ import annotations

import functools
import importlib

from corral._errors import HostToolMissing
from corral.backends._base import Backend

ENTRY_POINT_GROUP = "corral.backends"
DEFAULT_BACKEND = "bwrap"
_BUILTIN = {
    "bwrap": ("corral.backends.bwrap", "BwrapBackend"),
    "gvisor": ("corral.backends.gvisor", "GvisorBackend"),
    "docker": ("corral.backends.engine", "DockerBackend"),
    "podman": ("corral.backends.engine", "PodmanBackend"),
    "kubernetes": ("corral.backends.kubernetes", "KubernetesBackend"),
}


def available_backends() -> tuple[str, ...]:
    """Names ``get_backend`` accepts here: built-in, then registered, sorted."""
    from importlib.metadata import entry_points  # 10 ms at import: not on the one-shot path

    names = set(_BUILTIN)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return tuple(sorted(names))


@functools.cache
def get_backend(name: str = DEFAULT_BACKEND) -> Backend:
    """The backend called ``name`` (one instance per process).

    Raises ``HostToolMissing`` for a name no built-in or installed backend
    has, and ``TypeError`` for a registered object that is not a Backend."""
    if name in _BUILTIN:
        module, attr = _BUILTIN[name]
        obj: object = getattr(importlib.import_module(module), attr)
    else:
        from importlib.metadata import entry_points  # 10 ms: only when the name is not built in

        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not found:
            raise HostToolMissing(
                f"the backend {name!r}",
                f"backends here: {', '.join(available_backends())}; a third-party backend "
                f"registers in the entry-point group {ENTRY_POINT_GROUP!r}",
            )
        obj = found[0].load()
    backend = obj() if isinstance(obj, type) else obj
    if not isinstance(backend, Backend):
        raise TypeError(f"the backend {name!r} ({obj!r}) does not implement the Backend Protocol")
    return backend


def resolve_backend(backend: str | Backend | None) -> Backend:
    """A Backend from what a caller passed: None (the default), a name, or a Backend."""
    if backend is None:
        return get_backend(DEFAULT_BACKEND)
    if isinstance(backend, str):
        return get_backend(backend)
    return backend
