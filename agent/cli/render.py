"""Text rendering of status and check documents for a terminal. Pure."""

from __future__ import annotations

from typing import Any


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:d}h {m:02d}m {s:02d}s"


def _date(iso: object) -> str:
    return str(iso)[:19].replace("T", " ")


def _ek_lines(ek: dict[str, Any] | None) -> list[str]:
    if ek is None:
        return ["  EK cert    none"]
    verdict = "verified" if ek.get("verified") else "NOT VERIFIED"
    lines = [
        f"  EK cert    {ek.get('type')} at NV {ek.get('nv_index')}",
        f"             subject  {ek.get('subject')}",
        f"             issuer   {ek.get('issuer')}",
        f"             valid    {_date(ek.get('not_before'))} .. {_date(ek.get('not_after'))}",
        f"             chain    {verdict}: {ek.get('verification')}",
    ]
    if ek.get("chain"):
        lines.append(f"                      {' <- '.join(ek['chain'])}")
    return lines


def render_status(doc: dict[str, Any]) -> str:
    agent, tpm, ident = doc.get("agent", {}), doc.get("tpm", {}), doc.get("identity", {})
    lines = [f"devid-agent: {doc.get('state')}"]
    lines += [f"  ! {r}" for r in doc.get("reasons", [])]
    lines.append(f"  agent      {agent.get('version')}, up {_duration(agent.get('uptime_s', 0))}"
                 f" (pid {agent.get('pid')})")
    if tpm.get("reachable"):
        lines.append(f"  TPM        {tpm.get('manufacturer')} ({tpm.get('vendor_string')}), "
                     f"firmware {tpm.get('firmware_version')}, {tpm.get('spec_version')}")
        lines.append(f"             via {tpm.get('tcti')}")
        shown = tpm.get("ek_certificate")
        lines += _ek_lines(shown)
        others = [c["type"] for c in tpm.get("ek_certificates", [])
                  if shown is None or c["type"] != shown["type"]]
        if others:
            lines.append(f"             also present: {', '.join(others)}")
        if tpm.get("ek_error"):
            lines.append(f"             error: {tpm['ek_error']['message']}")
    else:
        err = tpm.get("error") or {}
        lines.append(f"  TPM        UNREACHABLE via {tpm.get('tcti')}: {err.get('message')}")
        if err.get("hint"):
            lines.append(f"             hint: {err['hint']}")
    if ident.get("public_key_sha256"):
        lines.append(f"  identity   ECDSA P-256 key, resident: "
                     f"{'yes' if ident.get('key_resident') else 'NO'}")
        lines.append(f"             TPM name           {ident.get('tpm_name')}")
        lines.append(f"             public key SHA-256 {ident.get('public_key_sha256')}")
    else:
        err = ident.get("error") or {}
        lines.append(f"  identity   unavailable: {err.get('message', 'TPM not reachable')}")
    lines += _enrollment_lines(doc.get("enrollment") or {}, doc.get("certificate"))
    return "\n".join(lines)


def _enrollment_lines(enr: dict[str, Any], cert: dict[str, Any] | None) -> list[str]:
    state = enr.get("state", "not_configured")
    if state == "not_configured":
        return ["  enrollment not configured ([enrollment] url)"]
    lines = [f"  enrollment {state} with {enr.get('registrar')}"]
    if enr.get("device_id"):
        lines.append(f"             device ID  {enr['device_id']}")
    err = enr.get("last_error")
    if err and state != "enrolled":
        lines.append(f"             last error {err.get('type')}: {err.get('message')}")
        if err.get("hint"):
            lines.append(f"             hint: {err['hint']}")
        if enr.get("next_attempt"):
            lines.append(f"             next attempt {_date(enr['next_attempt'])} "
                         f"(attempt {enr.get('attempts', 0) + 1})")
    if cert:
        lines += [
            f"  certificate {cert.get('subject')}",
            f"             serial   {cert.get('serial')}",
            f"             issuer   {cert.get('issuer')}",
            f"             valid    {_date(cert.get('not_before'))} .. "
            f"{_date(cert.get('not_after'))}"
            + ("" if cert.get("valid_now") else "  (NOT VALID NOW)"),
        ]
        if cert.get("key_matches_tpm") is False:
            lines.append("             key      NOT this TPM's identity key")
    return lines


def render_check(doc: dict[str, Any]) -> str:
    lines = [f"devid-agent check: {doc.get('state')}"]
    for r in doc.get("results", []):
        lines.append(f"  {r['level'].upper():4}  {r['name']:15} {r['summary']}")
        if r.get("hint") and r["level"] != "pass":
            lines.append(f"        {'':15} hint: {r['hint']}")
    return "\n".join(lines)


def render_error(err: dict[str, str]) -> str:
    text = f"devidctl: {err.get('message')}"
    if err.get("hint"):
        text += f"\n  hint: {err['hint']}"
    return text
