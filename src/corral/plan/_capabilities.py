"""Capabilities: none, in every set, and no way to gain any.

The box's user namespace would otherwise hand its first process a full set of
capabilities over namespaced resources; dropping them all (bounding and
ambient sets included) and setting ``no_new_privs`` means neither the box's
processes nor setuid binaries inside it can raise privileges.
"""

from __future__ import annotations

from dataclasses import dataclass

from corral._policy import IdentityPolicy


@dataclass(frozen=True, slots=True)
class DropAllCapabilities:
    threat: str


@dataclass(frozen=True, slots=True)
class NoNewPrivs:
    threat: str


CapabilityOp = DropAllCapabilities | NoNewPrivs


def plan_capabilities(identity: IdentityPolicy) -> tuple[CapabilityOp, ...]:
    # identity has no capability field on purpose: there is nothing to grant.
    del identity
    return (
        DropAllCapabilities(
            "CAP_SYS_ADMIN and friends in the box's namespaces reach kernel code "
            "(mount, netfilter, bpf) that unprivileged users cannot"
        ),
        NoNewPrivs("a setuid binary or file capability in the box raises privileges"),
    )


def render(ops: tuple[CapabilityOp, ...]) -> str:
    return "".join(f"{type(op).__name__} threat={op.threat}\n" for op in ops)
