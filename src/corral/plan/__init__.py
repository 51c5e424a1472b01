"""Planners: pure functions from a Policy section to an immutable tuple of operations.

Only the backend touches the kernel; everything here is data, testable without
root against the golden files in ``tests/golden``. ``make_plans(policy,
facts)`` runs them all for one box and decides what this host degrades or
refuses, from ``HostFacts`` the backend gathered (never by probing the host).
"""

from corral.plan._facts import HostFacts
from corral.plan._plans import Plans, make_plans

__all__ = ["HostFacts", "Plans", "make_plans"]
