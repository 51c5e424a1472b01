"""Planners: pure functions from a Policy section to an immutable tuple of operations.

Only the backend touches the kernel; everything here is data, testable without
root against the golden files in ``tests/golden``.
"""
