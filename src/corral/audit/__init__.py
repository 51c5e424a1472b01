"""``corral audit``: prove, on this host and for this policy, that the walls hold.

Every probe is a small program run inside a real box under the policy being
audited; it reports what it observed and the host decides. For abuse probes
the host does not take the box's word at all: it judges from what it measured
itself (cgroup counters, its own clock, the output it received), so a
compromised probe cannot lie its way to a pass.

A probe that does not apply to the policy is reported ``skip`` with the
reason, never dropped. The probes are the conformance suite every backend
must pass.

The package: ``_probe`` (what a probe is, ``Context``, registration),
the probes by concern (``_selftest``, ``_filesystem``, ``_kernel``,
``_network``, ``_processes``, ``_abuse``; imported below in that order, which
is the order of ``PROBES``, of every report and of SECURITY.md's table),
``_runner`` (``run_probes``) and ``_report`` (table, JUnit, Markdown).
"""

from __future__ import annotations

# the probe modules register into PROBES when imported: this order is the report's
# isort: off
from corral.audit import _selftest, _filesystem, _kernel, _network, _processes, _abuse  # noqa: F401

# isort: on
from corral.audit._probe import (
    BOX_PYTHON,
    PRELUDE,
    PROBES,
    Context,
    Outcome,
    Probe,
    ProbeError,
    ProbeReport,
    Verdict,
)
from corral.audit._processes import agent_channel_report, argv_exposure, judge_agent_channel
from corral.audit._report import junit, markdown, summary, table
from corral.audit._runner import run_probes

__all__ = [
    "BOX_PYTHON",
    "PRELUDE",
    "PROBES",
    "Context",
    "Outcome",
    "Probe",
    "ProbeError",
    "ProbeReport",
    "Verdict",
    "agent_channel_report",
    "argv_exposure",
    "judge_agent_channel",
    "junit",
    "markdown",
    "run_probes",
    "summary",
    "table",
]
