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


def test_the_api_protocols_are_exported_and_paired() -> None:
    """corral.abc lists every Protocol it defines, and each async one has its
    generated sync twin with the same members (scripts/gen_sync.py)."""
    from typing import Protocol

    import corral.abc

    assert corral.abc.__all__ == sorted(corral.abc.__all__)
    defined = {
        name
        for name, value in vars(corral.abc).items()
        if isinstance(value, type) and Protocol in value.__mro__ and value is not Protocol
    }
    assert defined == set(corral.abc.__all__)
    dunders = {"__aenter__": "__enter__", "__aexit__": "__exit__", "__aiter__": "__iter__"}
    for name in defined:
        if not name.startswith("Async"):
            continue
        twin = getattr(corral.abc, name.removeprefix("Async"))
        members = {
            dunders.get(m, m)
            for m in vars(getattr(corral.abc, name))
            if not m.startswith("_") or m in dunders
        }
        assert members <= set(dir(twin)), (name, members - set(dir(twin)))
    assert corral.AsyncSandboxAPI is corral.abc.AsyncSandboxAPI
    assert corral.SandboxAPI is corral.abc.SandboxAPI


def test_the_sync_facade_is_generated_and_current() -> None:
    """_sync.py and abc.py's sync Protocols are what scripts/gen_sync.py makes
    of the async Protocols: a hand edit, or an async change without a rerun, fails."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "gen_sync.py"
    done = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_implementations_name_parameters_as_the_protocols_do() -> None:
    """mypy checks that local and remote classes implement the Protocols, but
    not the names of positional parameters (``rename(src=..., dst=...)`` must
    work on every surface): those are compared here, against the Protocol."""
    import inspect

    import corral.abc
    from corral import _client as remote
    from corral import _sandbox as local

    implementations = {
        corral.abc.AsyncSandboxAPI: (local.AsyncSandbox, remote.RemoteSandbox),
        corral.abc.AsyncCommandsAPI: (local.Commands, remote.RemoteCommands),
        corral.abc.AsyncFilesAPI: (local.Files, remote.RemoteFiles),
        corral.abc.AsyncPtyAPI: (local.Pty, remote.RemotePty),
        corral.abc.AsyncNetworkAPI: (local.Network, remote.RemoteNetwork),
        corral.abc.AsyncCommandHandleAPI: (local.CommandHandle, remote.RemoteCommandHandle),
        corral.abc.AsyncPtyHandleAPI: (local.PtyHandle, remote.RemotePtyHandle),
        corral.abc.AsyncFileReaderAPI: (local.FileReader, remote.RemoteFileReader),
    }
    assert set(implementations) == {
        getattr(corral.abc, n) for n in corral.abc.__all__ if n.startswith("Async")
    }
    for protocol, classes in implementations.items():
        for name, member in vars(protocol).items():
            if not inspect.isfunction(member) or (
                name.startswith("_") and name not in ("__aenter__", "__aexit__", "__aiter__")
            ):
                continue
            want = [p.name for p in inspect.signature(member).parameters.values()]
            for cls in classes:
                got = [p.name for p in inspect.signature(getattr(cls, name)).parameters.values()]
                assert got == want, f"{cls.__name__}.{name}{got} != {protocol.__name__}{want}"
