"""Backends: what starts and ends boxes. One seam, many implementations.

``Backend`` and ``Box`` are the Protocols every backend implements;
``BoxSpec`` is what a box is started from (the ``Policy`` is its only
isolation input), ``BoxExit`` and ``Usage`` what it reports, ``Check`` a line
of ``corral doctor``. ``get_backend(name)`` finds a backend: ``"bwrap"``
(``corral.backends.bwrap``, bubblewrap on Linux) is built in; others register
in the entry-point group ``corral.backends``. ``corral.testing.check_backend``
is the conformance suite a backend must pass.

    backend = get_backend("bwrap")
    degraded = backend.check(policy)            # or UnsupportedPolicy; starts nothing
    box = await backend.launch(BoxSpec(("true",), policy))
    status = await box.wait()
    await box.aclose()
"""

from corral.backends._base import (
    Backend,
    Box,
    BoxExit,
    BoxFile,
    BoxNetwork,
    BoxSpec,
    Check,
    Usage,
)
from corral.backends._registry import (
    DEFAULT_BACKEND,
    ENTRY_POINT_GROUP,
    available_backends,
    get_backend,
    resolve_backend,
)

__all__ = [
    "DEFAULT_BACKEND",
    "ENTRY_POINT_GROUP",
    "Backend",
    "Box",
    "BoxExit",
    "BoxFile",
    "BoxNetwork",
    "BoxSpec",
    "Check",
    "Usage",
    "available_backends",
    "get_backend",
    "resolve_backend",
]
