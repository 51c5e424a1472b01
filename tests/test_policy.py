from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral import Bind, Limits, Policy, PolicyError
from corral._units import format_size, parse_duration, parse_size


def test_presets_are_policies_with_finite_limits() -> None:
    for name in ("strict", "default", "dev"):
        policy = Policy.preset(name)
        assert policy.name == name
        limits = policy.limits
        for field in ("memory_bytes", "pids", "cpu_time_s", "wall_time_s", "disk_bytes"):
            assert getattr(limits, field) is not None, (name, field)
        assert policy.network.mode == "none"
    strict, dev = Policy.preset("strict").limits, Policy.preset("dev").limits
    assert strict.memory_bytes is not None
    assert dev.memory_bytes is not None
    assert strict.memory_bytes < dev.memory_bytes


def test_unknown_preset_names_the_field() -> None:
    with pytest.raises(PolicyError, match="preset: 'lax' is not a preset"):
        Policy.preset("lax")


def test_policy_is_frozen_and_hashable() -> None:
    policy = Policy.preset("default")
    with pytest.raises(AttributeError):
        policy.name = "x"  # type: ignore[misc]
    assert hash(policy) == hash(Policy.preset("default"))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"memory_bytes": 0}, "limits.memory_bytes: must be > 0"),
        ({"memory_bytes": -5}, "limits.memory_bytes: must be >= 0"),
        ({"memory_bytes": "512M"}, "limits.memory_bytes: must be an integer, not str"),
        ({"pids": True}, "limits.pids: must be an integer, not bool"),
        ({"cpu_cores": float("inf")}, "limits.cpu_cores: must be > 0 and finite"),
        ({"wall_time_s": 0}, "limits.wall_time_s: must be > 0"),
        ({"swap_bytes": 1 << 20}, "limits.swap_bytes: only 0"),
        ({"nonsense": 1}, "limits.nonsense: unknown field"),
    ],
)
def test_invalid_limits_name_the_field(changes: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyError, match=message) as info:
        Policy.preset("default").with_limits(**changes)
    assert info.value.field == message.split(":")[0]


def test_with_limits_returns_a_new_policy() -> None:
    base = Policy.preset("strict")
    changed = base.with_limits(memory_bytes=512 << 20)
    assert changed.limits.memory_bytes == 512 << 20
    assert base.limits.memory_bytes == 256 << 20
    assert changed.limits.pids == base.limits.pids


def test_network_modes_and_rules_are_checked() -> None:
    assert Policy().with_network(mode="open").network.mode == "open"
    with pytest.raises(PolicyError, match="network.allow: rules need mode 'allowlist'"):
        Policy().with_network(mode="open", allow=["pypi.org"])
    with pytest.raises(PolicyError, match="network.mode: 'bridge' is not one of"):
        Policy().with_network(mode="bridge")
    with pytest.raises(PolicyError, match=r"network.allow\[0\]: '\*' alone would allow everything"):
        Policy().with_network(mode="allowlist", allow=["*"])
    with pytest.raises(PolicyError, match=r"network.allow\[1\]: 'a:99999': the port"):
        Policy().with_network(mode="allowlist", allow=["ok.example", "a:99999"])
    with pytest.raises(PolicyError, match=r"network.deny\[0\]: .* CIDR"):
        Policy().with_network(mode="allowlist", deny=["10.0.0.0/99"])
    with pytest.raises(PolicyError, match="network.hosts.x.test: 'nope' is not an IP address"):
        Policy().with_network(mode="allowlist", hosts={"x.test": "nope"})
    with pytest.raises(PolicyError, match="rules need mode 'allowlist'"):
        Policy().with_network(allow=["pypi.org"])
    policy = Policy().with_network(mode="allowlist", allow=["PyPI.org", "*.github.com:443"])
    assert policy.network.allow == ("PyPI.org", "*.github.com:443")


def test_identity_never_root() -> None:
    with pytest.raises(PolicyError, match="identity.uid: must not be 0"):
        Policy().with_identity(uid=0)
    with pytest.raises(PolicyError, match="identity.hostname"):
        Policy().with_identity(hostname="bad name!")


def test_filesystem_paths_are_checked() -> None:
    with pytest.raises(
        PolicyError, match=r"filesystem.read_only\[0\].source: 'rel' must be an absolute"
    ):
        Policy().with_filesystem(read_only=["rel"])
    with pytest.raises(PolicyError, match=r"filesystem.hidden\[1\]: .* must not contain '..'"):
        Policy().with_filesystem(hidden=["/ok", "/a/../b"])
    with pytest.raises(PolicyError, match="filesystem.workspace: '/etc' is a system path"):
        Policy().with_filesystem(workspace="/etc")
    with pytest.raises(
        PolicyError, match=r"filesystem.writable\[0\]: target '/data' is already used"
    ):
        Policy().with_filesystem(read_only=["/srv:/data"], writable=["/var/x:/data"])
    with pytest.raises(PolicyError, match="would shadow a system mount"):
        Policy().with_filesystem(read_only=["/srv:/proc/x"])
    policy = Policy().with_filesystem(read_only=["/srv/data:/data", {"source": "/opt/x"}])
    assert policy.filesystem.read_only == (Bind("/srv/data", "/data"), Bind("/opt/x", "/opt/x"))


def test_tmp_must_fit_in_disk() -> None:
    with pytest.raises(PolicyError, match="filesystem.tmp_bytes: twice it"):
        Policy(limits=Limits(disk_bytes=100 << 20)).with_filesystem(tmp_bytes=60 << 20)
    assert Policy.preset("default").workspace_bytes == (512 - 128) << 20


def test_env_is_explicit_and_validated() -> None:
    policy = Policy.preset("default").with_env({"FOO": "bar"})
    assert dict(policy.env)["FOO"] == "bar"
    assert "HOME" in dict(policy.env)
    with pytest.raises(PolicyError, match="env.A=B: variable names"):
        policy.with_env({"A=B": "x"})
    with pytest.raises(PolicyError, match="env.X: must be a string"):
        policy.with_env({"X": 3})  # type: ignore[dict-item]


TOML = """
extends = "strict"
name = "mine"

[limits]
memory_bytes = "512M"
wall_time_s = "2m"
pids = 32
cpu_time_s = "unlimited"

[filesystem]
read_only = ["/srv/data:/data"]
tmp_bytes = "16M"

[env]
MODE = "test"
"""


def test_from_toml_with_human_units() -> None:
    policy = Policy.from_toml(TOML)
    assert policy.name == "mine"
    assert policy.limits.memory_bytes == 512 << 20
    assert policy.limits.wall_time_s == 120.0
    assert policy.limits.pids == 32
    assert policy.limits.cpu_time_s is None
    assert policy.limits.open_files == Policy.preset("strict").limits.open_files
    assert policy.syscalls.profile == "strict"
    assert policy.filesystem.tmp_bytes == 16 << 20
    assert dict(policy.env)["MODE"] == "test"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[limits]\nmemory_bytes = "lots"', "limits.memory_bytes: 'lots' is not a size"),
        ("[limits]\nmemory_bytes = 0", "limits.memory_bytes: must be > 0"),
        ("[limit]\npids = 3", "limit: unknown field"),
        ("[limits]\npid = 3", "limits.pid: unknown field"),
        ('[network]\nmode = "closed"', "network.mode: 'closed' is not one of"),
        ('[network]\nmode = "allowlist"\nallow = ["*"]', r"network.allow\[0\]"),
        ('[syscalls]\nprofile = "none"', "syscalls.profile: 'none' is not a profile"),
        ("[limits\n", "not valid TOML"),
        ('extends = "nope"', "preset: 'nope' is not a preset"),
        ("limits = 3", "limits: must be a table"),
    ],
)
def test_from_toml_errors_name_the_field(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        Policy.from_toml(text)


def test_json_round_trip(tmp_path: Path) -> None:
    policy = Policy.from_toml(TOML)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(policy.to_dict()))
    assert Policy.load(path) == policy
    toml_path = tmp_path / "p.toml"
    toml_path.write_text(TOML)
    assert Policy.load(toml_path) == policy


def test_load_missing_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy file"):
        Policy.load(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("512K", 512 << 10),
        ("256M", 256 << 20),
        ("2G", 2 << 30),
        ("1.5G", 3 << 29),
        ("64KiB", 64 << 10),
        ("10MB", 10 << 20),
        (7, 7),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_and_duration_reject_garbage() -> None:
    for bad in ("", "M", "12Q", "-1M"):
        with pytest.raises(ValueError, match="is not a size"):
            parse_size(bad)
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration("soon")
    assert parse_duration("250ms") == 0.25
    assert parse_duration("1h") == 3600.0
    assert format_size(512 << 20) == "512M"
    assert format_size(1000) == "1000"


def test_hidden_paths_must_be_inside_a_read_only_bind() -> None:
    with pytest.raises(
        PolicyError, match=r"filesystem.hidden\[0\]: '/workspace/key' must be inside"
    ):
        Policy().with_filesystem(hidden=["/workspace/key"])
    policy = Policy().with_filesystem(read_only=["/srv/data:/data"], hidden=["/data/a/key"])
    assert policy.filesystem.host_path_of("/data/a/key") == "/srv/data/a/key"
    assert policy.filesystem.host_path_of("/datafile") == ""
