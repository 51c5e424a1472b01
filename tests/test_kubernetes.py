"""The kubernetes backend's pure parts, without a cluster: the Pod and
NetworkPolicy it renders from a Policy (golden files), what it refuses (naming
the field), the exec status it reads, and the in-box launcher, run here as
the Pod runs it (``python3 -I -S -c``) with the same bytes on its stdin.

The backend against a real cluster: tests/test_kubernetes_cluster.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from corral import Policy
from corral._errors import UnsupportedPolicy
from corral._policy import Bind
from corral._runtime import BOX_PATH
from corral.backends import available_backends
from corral.backends.kubernetes import ClusterFacts, PodInputs, facts_from_env
from corral.backends.kubernetes._exec import launcher_command, launcher_payload, parse_status
from corral.backends.kubernetes._render import check, render_network_policy, render_pod

FACTS = ClusterFacts(image="corral-box:test")
INPUTS = PodInputs(
    name="corral-0123456789ab", box_id="0123456789ab", owner="host.42.4242", one_shot=False
)


def _dump(obj: object) -> str:
    return json.dumps(obj, indent=2) + "\n"


@pytest.mark.parametrize("preset", ["default", "strict", "dev"])
def test_pod_golden(preset: str, golden: Callable[[str, str], None]) -> None:
    golden(f"k8s_pod_{preset}.json", _dump(render_pod(Policy.preset(preset), FACTS, INPUTS)))


def test_pod_one_shot_with_runtime_class_and_own_seccomp(
    golden: Callable[[str, str], None],
) -> None:
    facts = ClusterFacts(
        image="corral-box:test",
        runtime_class="gvisor",
        seccomp_localhost="corral",
        network_policy_enforced=True,
        request_ratio=0.25,
    )
    inputs = PodInputs(
        name="corral-0123456789ab",
        box_id="0123456789ab",
        owner="host.42.4242",
        one_shot=True,
        owner_refs=({"apiVersion": "v1", "kind": "Pod", "name": "corral-server", "uid": "u-1"},),
    )
    golden("k8s_pod_one_shot.json", _dump(render_pod(Policy.preset("default"), facts, inputs)))


def test_network_policy_golden(golden: Callable[[str, str], None]) -> None:
    golden("k8s_network_policy.json", _dump(render_network_policy(INPUTS)))


def test_pod_isolation_fields() -> None:
    """The lines SECURITY.md promises, read back from the manifest itself."""
    policy = Policy.preset("default")
    pod = render_pod(policy, FACTS, INPUTS)
    spec = pod["spec"]
    (container,) = spec["containers"]
    ctx = container["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["runAsUser"] == policy.identity.uid
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["privileged"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    assert not (spec["hostNetwork"])
    assert not (spec["hostPID"])
    assert not (spec["hostIPC"])
    assert all("hostPath" not in v for v in spec["volumes"])
    limits = container["resources"]["limits"]
    assert limits == {
        "memory": str(policy.limits.memory_bytes),
        "cpu": "1000m",
        "ephemeral-storage": str(policy.limits.disk_bytes),
    }
    assert container["resources"]["requests"] == limits  # Guaranteed QoS by default
    assert "activeDeadlineSeconds" not in spec  # a sandbox's lifetime can be extended
    one_shot = render_pod(policy, FACTS, PodInputs("p", "b", "o", one_shot=True))["spec"]
    assert one_shot["activeDeadlineSeconds"] == 60 + 30
    tmp = next(v for v in spec["volumes"] if v["name"] == "tmp")
    assert tmp["emptyDir"] == {"medium": "Memory", "sizeLimit": str(policy.filesystem.tmp_bytes)}


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        (
            Policy.preset("default").with_filesystem(read_only=(Bind("/usr/share", "/mnt/x"),)),
            "filesystem.read_only[0].source",
        ),
        (
            Policy.preset("default").with_filesystem(writable=(Bind("/srv/data", "/data"),)),
            "filesystem.writable[0].source",
        ),
        (Policy.preset("default").with_network(mode="open"), "network.mode"),
        (
            Policy.preset("default").with_network(mode="allowlist", allow=("pypi.org",)),
            "network.mode",
        ),
    ],
)
def test_refusals_name_the_field(policy: Policy, field: str) -> None:
    with pytest.raises(UnsupportedPolicy) as info:
        check(policy, FACTS)
    assert info.value.field == field
    with pytest.raises(UnsupportedPolicy):
        render_pod(policy, FACTS, INPUTS)


def test_the_code_runtime_bind_is_the_images() -> None:
    """The runtime bind every Sandbox adds is satisfied by the image, not refused."""
    policy = Policy.preset("default").with_filesystem(read_only=(Bind("/srv/rt", BOX_PATH),))
    assert check(policy, FACTS) == check(Policy.preset("default"), FACTS)


def test_degraded_notes_follow_the_declared_cluster() -> None:
    notes = check(Policy.preset("default"), FACTS)
    assert any(n.startswith("network:") for n in notes)
    assert any(n.startswith("syscalls:") for n in notes)
    assert any(n.startswith("limits.pids:") for n in notes)
    declared = ClusterFacts("i", seccomp_localhost="corral", network_policy_enforced=True)
    assert [n.split(":")[0] for n in check(Policy.preset("default"), declared)] == ["limits.pids"]


def test_facts_from_env_names_the_bad_variable() -> None:
    assert facts_from_env({}).image == "corral-box:latest"
    facts = facts_from_env(
        {"CORRAL_K8S_NETWORK_POLICY": "enforced", "CORRAL_K8S_REQUEST_RATIO": "0.1"}
    )
    assert facts.network_policy_enforced
    assert facts.request_ratio == 0.1
    with pytest.raises(ValueError, match="CORRAL_K8S_REQUEST_RATIO"):
        facts_from_env({"CORRAL_K8S_REQUEST_RATIO": "2"})
    with pytest.raises(ValueError, match="CORRAL_K8S_NETWORK_POLICY"):
        facts_from_env({"CORRAL_K8S_NETWORK_POLICY": "maybe"})


def test_registered() -> None:
    assert "kubernetes" in available_backends()


def test_exec_status() -> None:
    assert parse_status(b'{"metadata":{},"status":"Success"}').exit_code == 0
    failed = json.dumps(
        {
            "status": "Failure",
            "message": "command terminated with non-zero exit code: exit status 3",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": "3"}]},
        }
    ).encode()
    assert parse_status(failed).exit_code == 3
    broken = parse_status(b'{"status":"Failure","message":"container not found"}')
    assert broken.exit_code is None
    assert "container not found" in broken.message
    assert parse_status(b"not json").exit_code is None


# -- the launcher, as the Pod runs it ---------------------------------------------------


def _launch(
    argv: list[str],
    tmp_path: Path,
    *,
    stdin: bytes | None = None,
    files: tuple[tuple[str, int, bytes], ...] = (),
    channel: bool = False,
    trailing: bytes = b"",
    rlimits: tuple[tuple[str, int | None, int | None], ...] = (),
) -> subprocess.CompletedProcess[bytes]:
    header = {
        "argv": argv,
        "env": [["PATH", "/usr/bin:/bin"], ["MARK", "k8s"]],
        "cwd": str(tmp_path),
        "rlimits": [list(r) for r in rlimits],
        "files": [(p, m, len(c)) for p, m, c in files],
        "stdin": len(stdin) if stdin is not None else None,
        "channel": channel,
    }
    payload = launcher_payload(header, [c for _, _, c in files], stdin) + trailing
    command = [sys.executable if not os.path.exists("/usr/bin/python3") else "/usr/bin/python3"]
    return subprocess.run(
        [*command, *launcher_command()[1:]],
        input=payload,
        capture_output=True,
        timeout=30,
        check=False,
    )


def test_launcher_feeds_stdin_and_ends_it(tmp_path: Path) -> None:
    """The command gets exactly the stdin bytes, then end of file, though the
    stream itself stays open (bytes after them never reach the command)."""
    data = os.urandom(300_000)
    out = _launch(["cat"], tmp_path, stdin=data, trailing=b"NOT FOR THE COMMAND")
    assert out.returncode == 0, out.stderr
    assert out.stdout == data


def test_launcher_env_cwd_files_rlimits(tmp_path: Path) -> None:
    agent = tmp_path / "agent" / "a.py"
    out = _launch(
        [
            "/bin/sh",
            "-c",
            'echo "$MARK $(pwd) $(ulimit -n) $(cat agent/a.py)"; stat -c %a agent/a.py',
        ],
        tmp_path,
        files=((str(agent), 0o444, b"print(1)"),),
        rlimits=(("RLIMIT_NOFILE", 77, 77),),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode() == f"k8s {tmp_path} 77 print(1)\n444\n"


def test_launcher_reports_a_signal_as_a_shell_does(tmp_path: Path) -> None:
    out = _launch(["/bin/sh", "-c", "kill -9 $$"], tmp_path)
    assert out.returncode == 128 + signal.SIGKILL
    assert _launch(["/bin/sh", "-c", "exit 3"], tmp_path).returncode == 3


def test_launcher_says_a_command_is_missing(tmp_path: Path) -> None:
    out = _launch(["no-such-command-here"], tmp_path)
    assert out.returncode == 127
    assert out.stderr == b"corral: no-such-command-here: command not found in the box\n"


def test_launcher_channel_moves_the_stream_to_fds_3_and_4(tmp_path: Path) -> None:
    """channel: what follows the payload on stdin reaches fd 3; fd 4 is the
    exec's stdout; fds 0 and 1 are /dev/null; the env names the fds."""
    code = (
        "import os\n"
        "os.write(4, os.read(3, 5) + os.environ['CORRAL_CHANNEL_FDS'].encode())\n"
        "print('to /dev/null')\n"
        "assert os.read(0, 1) == b''\n"
    )
    out = _launch(["/usr/bin/python3", "-c", code], tmp_path, channel=True, trailing=b"hello")
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"hello3,4"


def test_node_seccomp_profiles_are_corrals_rules() -> None:
    """The Localhost profiles are the engines' rendering of corral's own rules."""
    from corral.backends.engine._seccomp import render as render_profile
    from corral.backends.kubernetes import node_seccomp_profiles
    from corral.plan._seccomp import plan_seccomp

    profiles = node_seccomp_profiles()
    assert set(profiles) == {"default.json", "strict.json"}
    strict = Policy.preset("strict")
    assert profiles["strict.json"] == render_profile(plan_seccomp(strict.syscalls))
    facts = ClusterFacts("i", seccomp_localhost="corral")
    pod = render_pod(strict, facts, INPUTS)
    assert pod["spec"]["securityContext"]["seccompProfile"] == {
        "type": "Localhost",
        "localhostProfile": "corral/strict.json",
    }


def test_serve_namespace_is_for_the_kubernetes_backend() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "corral", "serve", "--namespace", "sandboxes"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")},
    )
    assert out.returncode == 2, out
    assert "--namespace is for --backend kubernetes" in out.stderr
