"""Everything that runs inside the box: stdlib only (the kernel driver: the
runtime's Python), shipped as data and copied into every box at ``AGENT_DIR``.

``_agent.py`` (the box's first program), ``_wire.py`` (the frame format; the
host imports it too), ``_kernel_driver.py`` (run_code's kernels). Nothing here
imports corral: in the box these files sit side by side under ``AGENT_DIR``
and nothing else of corral is there.
"""

from __future__ import annotations

import functools
from importlib import resources

from corral.plan._mounts import File

AGENT_DIR = "/run/corral"
# (file in this package, name in the box)
_SHIPPED = (
    ("_agent.py", "agent.py"),
    ("_wire.py", "_wire.py"),
    ("_kernel_driver.py", "kernel_driver.py"),
)


@functools.cache
def box_files() -> tuple[File, ...]:
    """The in-box files as read-only mounts under ``AGENT_DIR`` (read once per process)."""
    here = resources.files(__name__)
    return tuple(
        File(f"{AGENT_DIR}/{box_name}", (here / name).read_bytes(), 0o444)
        for name, box_name in _SHIPPED
    )
