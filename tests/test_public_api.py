"""The public surface is deliberate: __all__ is sorted, complete and importable."""

from __future__ import annotations

import corral


def test_all_is_sorted_and_importable() -> None:
    assert corral.__all__ == sorted(corral.__all__)
    for name in corral.__all__:
        assert hasattr(corral, name), name


def test_every_public_name_is_exported() -> None:
    public = {
        name
        for name, value in vars(corral).items()
        if not name.startswith("_") and not getattr(value, "__name__", "").startswith("corral.")
    }
    assert public <= set(corral.__all__), public - set(corral.__all__)


def test_one_exception_tree() -> None:
    for name in (
        "PolicyError",
        "UnsupportedPolicy",
        "HostToolMissing",
        "SandboxError",
        "SandboxBroken",
        "SandboxClosed",
    ):
        assert issubclass(getattr(corral, name), corral.CorralError)
    assert issubclass(corral.SandboxBroken, corral.SandboxError)
