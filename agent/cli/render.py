"""Text rendering of status and check documents for a terminal. Pure.

Times are shown relative to the document's own time (the daemon's, in the
registrar's clock when it knows it) with the absolute UTC time beside them:
"in 14h 47m, 2026-11-23 19:59Z". Colour is the caller's choice (`Style`).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from agent.clock import human_duration, isoformat_utc
from agent.diagnostics.broker import LISTENERS
from agent.rotation.registrarclock import describe_offset


@dataclass(frozen=True)
class Style:
    """ANSI colour for a terminal that wants it (not NO_COLOR, not a pipe)."""

    colour: bool = False
    docs: str = "docs/operations.md"  # where the check sections live on this machine

    def paint(self, text: str, level: str) -> str:
        code = {"pass": "32", "ok": "32", "warn": "33", "fail": "31;1",
                "skip": "2"}.get(level.lower())
        return f"\033[{code}m{text}\033[0m" if self.colour and code else text


PLAIN = Style()


def _parse(iso: object) -> datetime.datetime | None:
    try:
        when = datetime.datetime.fromisoformat(str(iso))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)


def _when(iso: object, now: datetime.datetime | None) -> str:
    """'in 14h 47m, 2026-11-23 19:59Z' or '3m 2s ago, 2026-11-23 05:12Z'."""
    when = _parse(iso)
    if when is None:
        return str(iso)
    stamp = when.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%MZ")
    if now is None:
        return stamp
    delta = (when - now).total_seconds()
    if abs(delta) < 1:
        relative = "now"
    else:
        relative = f"in {human_duration(delta)}" if delta > 0 else \
            f"{human_duration(-delta)} ago"
    return f"{relative}, {stamp}"


def _doc_now(doc: dict[str, Any]) -> datetime.datetime | None:
    return _parse(doc["at"]) if doc.get("at") else None


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


def render_status(doc: dict[str, Any], style: Style = PLAIN) -> str:
    agent, tpm, ident = doc.get("agent", {}), doc.get("tpm", {}), doc.get("identity", {})
    now = _doc_now(doc)
    lines = [f"devid-agent: {style.paint(str(doc.get('state')), str(doc.get('state')))}"]
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
    lines += _enrollment_lines(doc.get("enrollment") or {}, doc.get("certificate"), now)
    lines += _rotation_lines(doc.get("rotation"), doc.get("tls_certificate"), now)
    lines += _consumer_lines(doc.get("identity_api"))
    lines += _siem_lines(doc.get("siem"), "  siem      ")
    lines += _broker_lines(doc.get("devid_broker"))
    return "\n".join(lines)


def _siem_lines(siem: dict[str, Any] | None, lead: str) -> list[str]:
    """The SIEM sender's state, in the agent's and in the broker's part."""
    if not isinstance(siem, dict):
        return []
    state = "connected" if siem.get("connected") else \
        f"NOT CONNECTED ({siem.get('error') or 'connecting'})"
    return [f"{lead} {siem.get('url')}: {state}; {siem.get('sent', 0)} sent, "
            f"{siem.get('queued', 0)} queued, {siem.get('dropped', 0)} dropped"]


def _broker_lines(broker: dict[str, Any] | None) -> list[str]:
    """devid-broker's part of `devidctl status`, when the broker is on this gateway."""
    if not broker:
        return []
    if broker.get("error"):
        return [f"  broker     NOT ANSWERING at {broker.get('socket')}: "
                f"{broker['error'].get('message')}"]
    totals = (broker.get("traffic") or {}).get("totals") or {}
    refused = sum(v for k, v in totals.items() if k.startswith("refused."))
    lines = [f"  broker     {broker.get('state')}: {broker.get('headline')}"]
    for name in LISTENERS:
        listener = broker.get(name)
        if isinstance(listener, dict):
            state = "listening" if listener.get("listening") else "NOT LISTENING"
            extra = {"oscore": f", {listener.get('contexts', 0)} contexts",
                     "dtls": f", {listener.get('sessions', 0)} sessions",
                     "plain": ", INSECURE: sensors known by address only"}[name]
            lines.append(f"             {name:7s} {listener.get('address')} {state}{extra}")
    spool = broker.get("spool") or {}
    lines.append(f"             traffic {totals.get('forwarded', 0)} forwarded, "
                 f"{totals.get('refused.denied', 0)} denied, {refused} refused in all, "
                 f"{totals.get('spooled', 0)} spooled ({spool.get('messages', 0)} waiting), "
                 f"{totals.get('malformed', 0)} malformed dropped")
    lwm2m, bootstrap = broker.get("lwm2m"), broker.get("lwm2m_bootstrap") or {}
    if isinstance(lwm2m, dict):
        lines.append(f"             lwm2m   {lwm2m.get('registered', 0)} registered, "
                     f"{lwm2m.get('offline', 0)} offline, "
                     f"{(lwm2m.get('totals') or {}).get('deprovisioned', 0)} deprovisioned; "
                     f"{bootstrap.get('finished', 0)} bootstrapped, "
                     f"{bootstrap.get('failed', 0)} bootstraps failed")
    gateway = broker.get("lwm2m_upstream")
    if isinstance(gateway, dict):
        lines.append(f"             lwm2m-up {gateway.get('url')}: {gateway.get('state')}"
                     + (f" as {gateway.get('endpoint')}, {gateway.get('sensors', 0)} sensors "
                        f"under /25" if gateway.get("state") == "registered" else ""))
    lines += _siem_lines(broker.get("siem"), "             siem   ")
    for name, upstream in (broker.get("upstreams") or {}).items():
        error = upstream.get("last_error")
        lines.append(f"             {name:7s} {upstream.get('url')}: "
                     f"{'last request failed: ' + error if error else 'ok'}")
    return lines


def _consumer_lines(api: dict[str, Any] | None) -> list[str]:
    if not api:
        return []
    consumers = api.get("consumers") or []
    watching = sum(c.get("watchers", 0) for c in consumers)
    troubled = [f"{c['name']}: {c['sink_error']}" for c in consumers if c.get("sink_error")]
    lines = [f"  consumers  {len(consumers)} declared, {watching} watching "
             f"(devidctl consumers list)"]
    lines += [f"             sink error {t}" for t in troubled]
    return lines


def _enrollment_lines(enr: dict[str, Any], cert: dict[str, Any] | None,
                      now: datetime.datetime | None) -> list[str]:
    state = enr.get("state", "not_configured")
    if state == "not_configured":
        return ["  enrollment not configured ([enrollment] url)"]
    lines = [f"  enrollment {state} with {enr.get('registrar')}"]
    if enr.get("device_id"):
        lines.append(f"             device ID  {enr['device_id']}")
    if enr.get("revoked_reason"):
        lines.append(f"             revoked    {enr['revoked_reason']}")
    if enr.get("decommissioned_at"):
        lines.append(f"             decommissioned {_when(enr['decommissioned_at'], now)}")
    err = enr.get("last_error")
    if err and state not in ("enrolled", "revoked"):
        lines.append(f"             last error {err.get('type')}: {err.get('message')}")
        if err.get("hint"):
            lines.append(f"             hint: {err['hint']}")
        if enr.get("next_attempt"):
            lines.append(f"             next attempt {_when(enr['next_attempt'], now)} "
                         f"(attempt {enr.get('attempts', 0) + 1})")
    if cert:
        lines += _certificate_lines("certificate", cert, now)
        if cert.get("key_matches_tpm") is False:
            lines.append("             key      NOT this TPM's identity key")
    return lines


def _certificate_lines(label: str, cert: dict[str, Any],
                       now: datetime.datetime | None) -> list[str]:
    lines = [
        f"  {label:10} {cert.get('subject')}",
        f"             serial   {cert.get('serial')}",
        f"             issuer   {cert.get('issuer')}",
        f"             from     {_when(cert.get('not_before'), now)}",
        f"             until    {_when(cert.get('not_after'), now)}"
        + ("" if cert.get("valid_now") else "  (NOT VALID NOW)"),
    ]
    if cert.get("renew_at"):
        lines.append(f"             renews   {_when(cert['renew_at'], now)}")
    return lines


def _rotation_lines(rot: dict[str, Any] | None, tls: dict[str, Any] | None,
                    now: datetime.datetime | None) -> list[str]:
    if not rot or (rot.get("state") in (None, "stopped") and not tls):
        return []
    lines: list[str] = []
    if tls:
        lines += _certificate_lines("TLS cert", tls, now)
        lines.append(f"             key      software P-256, sealed to the TPM; "
                     f"{'presented' if tls.get('presented') else 'NOT presented'}")
    step = f" (now: {rot['step']})" if rot.get("step") else ""
    lines.append(f"  rotation   {rot.get('state')}{step}, {rot.get('generation', 0)} renewal(s) "
                 "since enrollment")
    last = rot.get("last")
    if last:
        took = f" (took {last['duration_ms']:.0f} ms)" if last.get("duration_ms") else ""
        lines.append(f"             last     {last.get('result')} "
                     f"{_when(last.get('time'), now)}{took}")
        err = last.get("error")
        if err:
            lines.append(f"             error    {err.get('type')}: {err.get('message')}")
            if err.get("hint"):
                lines.append(f"             hint: {err['hint']}")
        for hook in last.get("hooks") or []:
            if not hook.get("ok"):
                lines.append(f"             hook     {hook['command']}: {hook['detail']}")
    if rot.get("next_attempt"):
        lines.append(f"             retry    {_when(rot['next_attempt'], now)} "
                     f"({rot.get('failures')} failure(s) in a row)")
    if rot.get("restore_error"):
        lines.append(f"             restore  {rot['restore_error'].get('message')}")
    if rot.get("held_until"):
        lines.append(f"             held     until {_when(rot['held_until'], now)}: "
                     f"{rot.get('hold_reason')}")
    offset = rot.get("registrar_clock_offset_s")
    if offset is not None and abs(offset) >= 2:
        lines.append(f"             clock    {describe_offset(offset)} ({offset:+.0f}s); "
                     "renewals are planned in the registrar's time")
    return lines


def render_certificates(doc: dict[str, Any]) -> str:
    if not doc.get("enrolled"):
        return "not enrolled yet: no certificates (see `devidctl status`)"
    now = _doc_now(doc)
    lines = [f"device {doc.get('device_id')} ({doc.get('lifecycle')})"]
    for label, key in (("identity", "identity"), ("TLS cert", "tls")):
        cert = doc.get(key)
        if cert is None:
            lines.append(f"  {label:10} none yet")
            continue
        lines += _certificate_lines(label, cert, now)
        lines.append(f"             SHA-256  {cert.get('sha256')}")
        if cert.get("subject_alt_names"):
            lines.append(f"             names    {', '.join(cert['subject_alt_names'])}")
        lines.append(f"             chain    {' <- '.join(cert.get('chain', []))}")
    lines.append("(`devidctl cert show --pem` prints the chains in PEM)")
    return "\n".join(lines)


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


def render_check(doc: dict[str, Any], style: Style = PLAIN, verbose: bool = False) -> str:
    state = str(doc.get("state"))
    lines = [f"devid-agent check: {style.paint(state, state)}"
             + (f" ({doc['summary']})" if doc.get("summary") else "")]
    results = doc.get("results", [])
    width = max([15, *(len(str(r.get("name"))) for r in results)])
    for r in results:
        checked = r.get("checked", True)
        label = r["level"].upper() if checked else "SKIP"
        lines.append(f"  {style.paint(f'{label:4}', label)}  {r['name']:{width}} "
                     f"{r['summary']}")
        if verbose and r.get("detail"):
            lines.append(f"        {'':{width}} found: {r['detail']}")
        if r.get("hint") and r["level"] != "pass":
            lines.append(f"        {'':{width}} hint: {r['hint']}")
        if checked and r.get("docs") and r["level"] != "pass":
            section = str(r["docs"]).partition("#")[2]
            lines.append(f"        {'':{width}} docs: {style.docs}#{section}")
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
    if doc["not_collected"]:
        lines.append(f"  incomplete: {len(doc['not_collected'])} part(s) missing (exit 1)"
                     + (f"; {doc['hint']}" if doc.get("hint") else ""))
    return "\n".join(lines)


def render_credentials(doc: dict[str, Any]) -> str:
    """One update from `credentials fetch|watch` (never the key)."""
    if doc.get("event") == "withdrawn":
        line = f"withdrawn: {doc.get('reason')}"
        return line + (f"\n  removed  {doc['removed']}" if doc.get("removed") else "")
    lines = [f"credentials for {doc.get('device_id')} (generation {doc.get('generation')})",
             f"  serial   {doc.get('serial')}",
             f"  subject  {doc.get('subject')}",
             f"  valid    {_date(doc.get('not_before'))} to {_date(doc.get('not_after'))}",
             f"  chain    {doc.get('chain_certificates')} intermediate(s), bundle "
             f"{doc.get('bundle_certificates')} certificate(s)"]
    if doc.get("written"):
        lines.append(f"  written  {doc['written']}/{{cert,chain,fullchain,key,bundle}}.pem")
    return "\n".join(lines)


def render_consumers(doc: dict[str, Any]) -> str:
    if "destroyed" in doc:
        names = ", ".join(doc["destroyed"]) or "none"
        return f"consumer {doc.get('consumer')}: destroyed sealed secrets: {names}"
    consumers = doc.get("consumers") or []
    lines = [f"identity API  {doc.get('socket')}  ({len(consumers)} consumer(s) declared, "
             f"{doc.get('connections', 0)} connection(s) open)"]
    for c in consumers:
        who = f"user {c.get('user')}" + (f", group {c['group']}" if c.get("group") else "") \
            + (f", unit {c['unit']}" if c.get("unit") else "")
        last = c.get("last")
        got = f"{last['what']} via {last['via']} {_date(last['at'])}" + \
            (f" ({last['detail']})" if last.get("detail") else "") if last else "nothing yet"
        lines += [f"{c.get('name')}", f"  who      {who}",
                  f"  grants   {', '.join(c.get('grants') or [])}",
                  f"  last     {got}"]
        if c.get("sink"):
            lines.append(f"  sink     {c['sink']}" + (f"  ERROR {c['sink_error']}"
                                                       if c.get("sink_error") else ""))
        if c.get("secrets"):
            lines.append(f"  secrets  {', '.join(c['secrets'])}")
        if c.get("watchers") or c.get("refused"):
            lines.append(f"  watching {c.get('watchers', 0)}, refused {c.get('refused', 0)}")
    orphans = doc.get("undeclared_with_secrets") or []
    if orphans:
        lines.append(f"secrets of consumers no longer declared: {', '.join(orphans)} "
                     "(devidctl consumers purge NAME destroys them)")
    return "\n".join(lines)


def render_sensor(doc: dict[str, Any]) -> str:
    """One sensor; with a newly minted credential, that too (shown this once)."""
    if "added" in doc:
        return (f"{doc['added']} sensors added ({doc['first']} ... {doc['last']}); their "
                f"credentials are in {doc['file']} (mode 0600): hand it to the installer "
                "and delete it")
    attrs = ", ".join(f"{k}={v}" for k, v in sorted((doc.get("attributes") or {}).items()))
    lines = [f"{doc.get('name')}  {doc.get('status')}"
             + (f" ({doc['status_reason']})" if doc.get("status_reason") else ""),
             f"  id          {doc.get('id')}",
             f"  profile     {doc.get('profile')}" + (f"  [{attrs}]" if attrs else ""),
             f"  transport   {doc.get('transport')}, identifier {doc.get('kid')}",
             f"  created     {_date(doc.get('created_at'))}, last seen "
             f"{_date(doc.get('last_seen')) if doc.get('last_seen') else 'never'}",
             f"  traffic     {doc.get('messages', 0)} messages, {doc.get('denials', 0)} denied, "
             f"{doc.get('auth_failures', 0)} failed authentication"]
    lwm2m = doc.get("lwm2m")
    if lwm2m and lwm2m.get("state") == "registered":
        objects = " ".join(f"/{o}" + (f"/{{{','.join(map(str, i))}}}" if i else "")
                           for o, i in lwm2m.get("objects", {}).items())
        lines += [f"  lwm2m       registered as {lwm2m.get('endpoint')} at "
                  f"{lwm2m.get('location')}: LwM2M {lwm2m.get('lwm2m')}, binding "
                  f"{lwm2m.get('binding')}{', queue mode' if lwm2m.get('queue') else ''}, "
                  f"lifetime {lwm2m.get('lifetime')} s, last update "
                  f"{_date(_iso(lwm2m.get('updated_at')))}",
                  f"  objects     {objects or '(none)'}"]
        gateway = lwm2m.get("gateway") or {}
        if gateway:
            lines.append(f"  upstream    /25/{gateway.get('instance')}, prefix "
                         f"/{gateway.get('prefix')}")
    elif lwm2m and lwm2m.get("state") == "offline":
        lines.append(f"  lwm2m       offline since {_date(_iso(lwm2m.get('last_update')))}: "
                     f"missed {lwm2m.get('missed_lifetimes')} lifetimes of "
                     f"{lwm2m.get('lifetime')} s")
    firmware = (lwm2m or {}).get("firmware")
    if firmware:
        how = {"updated": f"updated to {firmware.get('version')}",
               "failed": f"update FAILED while {firmware.get('failed_while')}: "
                         f"{firmware.get('reason')}"}.get(firmware.get("state"),
                                                         f"update {firmware.get('state')}")
        lines.append(f"  firmware    {how} (started {_date(firmware.get('started_at'))})")
    watch = doc.get("watch")
    if watch:
        if "messages" in watch:
            state = "learned" if watch.get("learned") else "learning"
            lines.append(f"  watch       {state} from {watch.get('messages')} messages: one "
                         f"every {watch.get('interval_s')} s, "
                         f"{watch.get('payload_bytes')} bytes")
        for finding in watch.get("findings") or []:
            lines.append(f"    finding   {_date(_iso(finding.get('at')))} "
                         f"{finding.get('kind')} (score {finding.get('score')}): "
                         f"{finding.get('evidence')}; expected {finding.get('baseline')}")
    credential = doc.get("credential")
    if credential:
        lines.append("  credential  (shown once: the broker keeps it sealed and never shows "
                     "it again)")
        lines += [f"    {key:<13} {value}" for key, value in credential.items()
                  if key != "transport"]
    return "\n".join(lines)


def _iso(epoch: Any) -> str | None:
    return isoformat_utc(float(epoch)) if isinstance(epoch, int | float) else None


def render_lwm2m(doc: dict[str, Any]) -> str:
    """The answer to `sensors read|write|execute|discover`."""
    head = f"{doc.get('sensor')} {doc.get('operation')} {doc.get('path')}: {doc.get('code')}"
    if doc.get("error"):
        return f"{head} {doc['error']}"
    lines = [head]
    for value in doc.get("values", []):
        lines.append(f"  {value['path']:<18} {value['value']!s:<24} ({value['as']})")
    for number, notification in enumerate(doc.get("notifications", [])):
        lines.append(f"  {'answer' if number == 0 else f'notification {number}'}: "
                     f"{notification['code']}")
        for value in notification.get("values", []):
            lines.append(f"    {value['path']:<18} {value['value']!s:<24} ({value['as']})")
    for link in doc.get("links", []):
        params = ";".join(k if v is None else f"{k}={v}" for k, v in link["params"].items())
        lines.append(f"  <{link['target']}>" + (f";{params}" if params else ""))
    return "\n".join(lines)


def render_sensors(doc: dict[str, Any]) -> str:
    sensors = doc.get("sensors") or []
    if any("credential" in s for s in sensors):
        return "\n".join(render_sensor(s) for s in sensors)
    counts = doc.get("counts")
    lines = [f"{'NAME':<24} {'STATUS':<12} {'PROFILE':<14} {'TRANSPORT':<9} LAST SEEN"]
    lines += [f"{s['name']:<24} {s['status']:<12} {s['profile']:<14} {s['transport']:<9} "
              f"{_date(s['last_seen']) if s.get('last_seen') else 'never'}" for s in sensors]
    if counts:
        lines.append(", ".join(f"{n} {status}" for status, n in counts.items()))
    return "\n".join(lines)
