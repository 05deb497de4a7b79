"""Text rendering of status and check documents for a terminal. Pure."""

from __future__ import annotations

from typing import Any

from agent.rotation.registrarclock import describe_offset


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
    lines += _rotation_lines(doc.get("rotation"), doc.get("tls_certificate"))
    return "\n".join(lines)


def _enrollment_lines(enr: dict[str, Any], cert: dict[str, Any] | None) -> list[str]:
    state = enr.get("state", "not_configured")
    if state == "not_configured":
        return ["  enrollment not configured ([enrollment] url)"]
    lines = [f"  enrollment {state} with {enr.get('registrar')}"]
    if enr.get("device_id"):
        lines.append(f"             device ID  {enr['device_id']}")
    if enr.get("revoked_reason"):
        lines.append(f"             revoked    {enr['revoked_reason']}")
    if enr.get("decommissioned_at"):
        lines.append(f"             decommissioned at {_date(enr['decommissioned_at'])}")
    err = enr.get("last_error")
    if err and state not in ("enrolled", "revoked"):
        lines.append(f"             last error {err.get('type')}: {err.get('message')}")
        if err.get("hint"):
            lines.append(f"             hint: {err['hint']}")
        if enr.get("next_attempt"):
            lines.append(f"             next attempt {_date(enr['next_attempt'])} "
                         f"(attempt {enr.get('attempts', 0) + 1})")
    if cert:
        lines += _certificate_lines("certificate", cert)
        if cert.get("key_matches_tpm") is False:
            lines.append("             key      NOT this TPM's identity key")
    return lines


def _certificate_lines(label: str, cert: dict[str, Any]) -> list[str]:
    lines = [
        f"  {label:10} {cert.get('subject')}",
        f"             serial   {cert.get('serial')}",
        f"             issuer   {cert.get('issuer')}",
        f"             valid    {_date(cert.get('not_before'))} .. "
        f"{_date(cert.get('not_after'))}"
        + ("" if cert.get("valid_now") else "  (NOT VALID NOW)"),
    ]
    if cert.get("renew_at"):
        lines.append(f"             renew at {_date(cert['renew_at'])}")
    return lines


def _rotation_lines(rot: dict[str, Any] | None, tls: dict[str, Any] | None) -> list[str]:
    if not rot or (rot.get("state") in (None, "stopped") and not tls):
        return []
    lines: list[str] = []
    if tls:
        lines += _certificate_lines("TLS cert", tls)
        lines.append(f"             key      software P-256, sealed to the TPM; "
                     f"{'presented' if tls.get('presented') else 'NOT presented'}")
    lines.append(f"  rotation   {rot.get('state')}, {rot.get('generation', 0)} renewal(s) "
                 "since enrollment")
    last = rot.get("last")
    if last:
        took = f" in {last['duration_ms']:.0f} ms" if last.get("duration_ms") else ""
        lines.append(f"             last     {_date(last.get('time'))} {last.get('result')}"
                     f"{took}")
        err = last.get("error")
        if err:
            lines.append(f"             error    {err.get('type')}: {err.get('message')}")
            if err.get("hint"):
                lines.append(f"             hint: {err['hint']}")
        for hook in last.get("hooks") or []:
            if not hook.get("ok"):
                lines.append(f"             hook     {hook['command']}: {hook['detail']}")
    if rot.get("next_attempt"):
        lines.append(f"             retry at {_date(rot['next_attempt'])} "
                     f"({rot.get('failures')} failure(s) in a row)")
    if rot.get("restore_error"):
        lines.append(f"             restore  {rot['restore_error'].get('message')}")
    if rot.get("held_until"):
        lines.append(f"             held     until {_date(rot['held_until'])}: "
                     f"{rot.get('hold_reason')}")
    offset = rot.get("registrar_clock_offset_s")
    if offset is not None and abs(offset) >= 2:
        lines.append(f"             clock    {describe_offset(offset)} ({offset:+.0f}s); "
                     "renewals are planned in the registrar's time")
    return lines


def render_renew(doc: dict[str, Any]) -> str:
    outcome = doc.get("outcome")
    if outcome is None:
        return "renewal requested; see `devidctl status` for the outcome"
    if outcome.get("result") == "renewed":
        return (f"renewed in {outcome.get('duration_ms', 0):.0f} ms: TLS certificate "
                f"{outcome.get('tls_serial')}")
    err = outcome.get("error") or {}
    return render_error(err | {"message": f"renewal {outcome.get('result')}: "
                                          f"{err.get('type')}: {err.get('message')}"})


def render_decommission(doc: dict[str, Any]) -> str:
    told = "registrar notified" if doc.get("registrar_notified") else \
        f"registrar NOT notified ({doc.get('note')})"
    return (f"decommissioned {doc.get('device_id')}: {told}; destroyed "
            f"{', '.join(doc.get('destroyed', []))}")


def render_audit(doc: dict[str, Any]) -> str:
    lines = []
    for r in doc.get("records", []):
        extra = {k: v for k, v in r.items() if k not in ("seq", "time", "event", "prev", "hash")}
        fields = " ".join(f"{k}={v}" for k, v in extra.items() if v is not None)
        lines.append(f"{r.get('seq'):>5}  {_date(r.get('time'))}  {r.get('event'):18} {fields}")
    verdict = (f"chain intact: {doc.get('count')} records" if doc.get("intact")
               else f"chain BROKEN after {doc.get('count')} good records: {doc.get('problem')}")
    lines.append(f"{doc.get('path')}: {verdict}")
    return "\n".join(lines)


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


def render_bundle(doc: dict[str, Any]) -> str:
    lines = [f"support bundle written: {doc['path']}",
             f"  contains {', '.join(doc['files'])}"]
    lines += [f"  not collected: {name}: {why}" for name, why in doc["not_collected"].items()]
    return "\n".join(lines)
