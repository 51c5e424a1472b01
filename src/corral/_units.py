"""Human-friendly sizes and durations, accepted only at the edges (CLI, policy files)."""

from __future__ import annotations

import argparse
import math
import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_size(value: str | int) -> int:
    """Return bytes for ``512M``, ``1.5G``, ``64KiB`` or a plain integer.

    Suffixes are binary (K = 1024): memory and disk limits are quoted that way
    by the kernel and by every container tool users know.
    """
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512M, not a boolean")
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a size (examples: 4096, 512K, 256M, 2G)")
    number, unit, _ = match.groups()
    return int(float(number) * _SIZE_FACTORS[unit.lower()])


def parse_duration(value: str | float) -> float:
    """Return seconds for ``10``, ``1.5s``, ``250ms``, ``2m`` or ``1h``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 10s, not a boolean")
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION_RE.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a duration (examples: 10, 1.5s, 250ms, 2m)")
    number, unit = match.groups()
    return float(number) * _DURATION_FACTORS[(unit or "s").lower()]


def parse_timeout(value: str | float | None) -> float | None:
    """Seconds for a limit: a duration (``parse_duration``) that is finite and
    above 0, or ``None`` for no limit, spelt ``none`` (any case) in text."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    seconds = parse_duration(value)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{value!r}: a time limit must be more than 0 (or none)")
    return seconds


def timeout_arg(value: str) -> float | None:
    """``parse_timeout`` as an argparse ``type=``: every command line that takes
    a time limit (``corral run``, ``corral mcp``, ``python -m corral._mcp``) parses it here."""
    try:
        return parse_timeout(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def format_size(n: int) -> str:
    """The shortest exact binary spelling of ``n`` bytes (``536870912`` -> ``512M``)."""
    for suffix, factor in (("P", 1 << 50), ("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{suffix}"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)
