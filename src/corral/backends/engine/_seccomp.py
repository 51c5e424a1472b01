"""corral's seccomp plan rendered to the container engines' JSON profile.

One source: the rules are ``corral.plan._seccomp``'s (the ones the bwrap
backend compiles to BPF through libseccomp); this module only changes their
form into the profile format docker and podman both read (``--security-opt
seccomp=FILE``), which runc hands to libseccomp. Pure; golden-tested.

Each corral rule becomes one entry: a syscall name, ``SCMP_ACT_ERRNO`` with
the rule's errno (``errnoRet``), and its argument tests ANDed, as in the plan.
``masked_eq`` is libseccomp's ``SCMP_CMP_MASKED_EQ`` (``value`` the mask,
``valueTwo`` the datum): the 32-bit tests that stop CVE-2019-10063's high-bit
bypass survive the translation. Only x86_64 is listed: runc makes a call from
another ABI (i386 ``int 0x80``) fail instead of matching x86_64 numbers.
"""

from __future__ import annotations

import json
from typing import Any

from corral.plan._seccomp import ArgCmp, SeccompPlan

_OPS = {
    "eq": "SCMP_CMP_EQ",
    "ne": "SCMP_CMP_NE",
    "ge": "SCMP_CMP_GE",
    "masked_eq": "SCMP_CMP_MASKED_EQ",
}


def _arg(arg: ArgCmp) -> dict[str, Any]:
    if arg.op == "masked_eq":
        return {"index": arg.index, "value": arg.mask, "valueTwo": arg.value, "op": _OPS[arg.op]}
    return {"index": arg.index, "value": arg.value, "valueTwo": 0, "op": _OPS[arg.op]}


def engine_profile(plan: SeccompPlan) -> dict[str, Any]:
    """``plan`` as a docker/podman seccomp profile (a JSON-ready dict)."""
    assert plan.default == "allow"  # the plan is a deny list on an allow default
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [
            {
                "names": [rule.syscall],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": rule.errno,
                "args": [_arg(arg) for arg in rule.args],
                "comment": rule.threat,
            }
            for rule in plan.rules
        ],
    }


def render(plan: SeccompPlan) -> str:
    """The profile as the engines read it (stable: the golden file's form)."""
    return json.dumps(engine_profile(plan), indent=1, sort_keys=True) + "\n"
