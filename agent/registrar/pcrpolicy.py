"""Judging quoted PCR values against the registrar's policy. Pure."""

from __future__ import annotations

from collections.abc import Sequence

from agent.enroll.problems import problem
from agent.registrar.config import PcrPolicyConfig


def values_as_toml(pcrs: Sequence[int], values: Sequence[bytes]) -> str:
    inner = ", ".join(f'"{p}" = "{v.hex()}"' for p, v in zip(pcrs, values, strict=True))
    return f"values = {{ {inner} }}"


def judge_pcrs(policy: PcrPolicyConfig, values: Sequence[bytes]) -> str:
    """The name of the allowed set the values match ('permissive' in that mode).

    Raises a pcr-policy-violation Problem that names the PCRs differing from the
    closest allowed set and shows the quoted values ready to paste into the policy.
    """
    pcrs = sorted(set(policy.pcrs))
    quoted = {str(p): v.hex() for p, v in zip(pcrs, values, strict=True)}
    for allowed in policy.allowed:
        if allowed.values == quoted:
            return allowed.name
    if policy.mode == "permissive":
        return "permissive"
    if policy.allowed:
        closest = min(policy.allowed,
                      key=lambda a: sum(a.values[k] != quoted[k] for k in quoted))
        differ = [int(k) for k in quoted if closest.values[k] != quoted[k]]
        why = f"PCRs {differ} differ from the closest allowed set {closest.name!r}"
    else:
        why = "the policy has no allowed sets"
    raise problem("pcr-policy-violation",
                  f"quoted sha256 PCRs {pcrs} are not allowed: {why}; quoted "
                  f"{values_as_toml(pcrs, values)}")
