"""`devidctl check` lines for devid-broker, judged from its status document. Pure.

devidctl asks the broker's control socket when the broker is on this gateway
(its socket exists). The answer becomes four lines: the broker and its
listeners, the policy, the upstreams (with the gateway's credentials and the
spool), and its LwM2M sensors. A socket that exists but does not answer means the broker is
down or stuck: that is a failure.
"""

from __future__ import annotations

from typing import Any

from agent.diagnostics.checks import CheckResult, Level

BROKER_CHECKS = ("broker", "broker-policy", "broker-upstreams", "broker-lwm2m")
LISTENERS = ("oscore", "dtls", "plain")  # their status sections, in this order


def _listeners(doc: dict[str, Any]) -> list[str]:
    return [f"{name} {doc[name]['address']}" for name in LISTENERS
            if isinstance(doc.get(name), dict) and doc[name].get("listening")]


def _check_process(doc: dict[str, Any]) -> CheckResult:
    listening = _listeners(doc)
    counts = (doc.get("sensors") or {}).get("counts") or {}
    sensors = ", ".join(f"{n} {status}" for status, n in counts.items() if n) or "no sensors"
    version = (doc.get("broker") or {}).get("version", "?")
    if not listening:
        return CheckResult("broker", Level.WARN, f"devid-broker {version} runs with no "
                           f"listener ({sensors})", "set [listen] oscore or dtls in "
                           "/etc/devid-broker/broker.toml, then restart devid-broker")
    return CheckResult("broker", Level.PASS, f"devid-broker {version}: {sensors}; listening "
                       f"on {', '.join(listening)}")


def _check_policy(doc: dict[str, Any]) -> CheckResult:
    policy = doc.get("policy") or {}
    error = policy.get("error")
    if error:
        return CheckResult("broker-policy", Level.FAIL, f"{policy.get('file')} was refused: "
                           f"{error.get('message')}; the policy loaded before stays in force",
                           "`devidctl policy check` names the line and key; fix it, then "
                           "`systemctl reload devid-broker`")
    insecure = policy.get("insecure_profiles") or []
    if insecure:
        return CheckResult("broker-policy", Level.WARN, f"profile(s) {', '.join(insecure)} "
                           "accept plain CoAP, without OSCORE or DTLS",
                           "anyone on the sensors' network can speak for such a sensor: "
                           "move them to OSCORE or DTLS-PSK and drop `insecure = true`")
    profiles = policy.get("profiles") or {}
    if not profiles:
        where = "does not exist" if not policy.get("exists") else "has no profiles"
        return CheckResult("broker-policy", Level.WARN, f"{policy.get('file')} {where}: "
                           "nothing is granted to any sensor", "write the policy "
                           "(docs/broker.md, 'Policy') and `systemctl reload devid-broker`")
    rules = sum(profiles.values())
    return CheckResult("broker-policy", Level.PASS, f"{len(profiles)} profile(s), {rules} "
                       f"rule(s) from {policy.get('file')}")


def _check_upstreams(doc: dict[str, Any]) -> CheckResult:
    upstreams = doc.get("upstreams") or {}
    if not upstreams:
        return CheckResult("broker-upstreams", Level.WARN, "no upstream configured: allowed "
                           "traffic has nowhere to go", "add an [upstreams.NAME] section to "
                           "/etc/devid-broker/broker.toml (docs/broker.md)")
    credentials = doc.get("gateway_credentials") or {}
    if credentials.get("withdrawn") or not credentials.get("serial"):
        why = credentials.get("withdrawn") or credentials.get("error") or "not received yet"
        return CheckResult("broker-upstreams", Level.FAIL, f"the broker has no TLS credentials "
                           f"from the agent ({why}): nothing can be forwarded",
                           "see `devidctl status`; declare the broker with the grant "
                           "\"credentials\" under [[consumers]] in agent.toml")
    failing = {name: u.get("last_error") for name, u in upstreams.items()
               if u.get("last_error")}
    spool = doc.get("spool") or {}
    waiting = int(spool.get("messages") or 0)
    kept = f"; {waiting} message(s) wait in the spool" if waiting else ""
    if failing:
        shown = "; ".join(f"{name}: {error}" for name, error in failing.items())
        return CheckResult("broker-upstreams", Level.WARN, f"last request failed on {shown}"
                           f"{kept}", "check the upstream and the network; sensors get 5.02 "
                           "(or are spooled) until it answers again")
    names = ", ".join(f"{name} ({u.get('url')})" for name, u in upstreams.items())
    if waiting:
        return CheckResult("broker-upstreams", Level.WARN, f"{names}{kept}",
                           "the spool drains as the upstreams take it")
    return CheckResult("broker-upstreams", Level.PASS, f"{names}; certificate serial "
                       f"{credentials.get('serial')}")


def _check_lwm2m(doc: dict[str, Any]) -> CheckResult:
    lwm2m = doc.get("lwm2m") or {}
    bootstrap = doc.get("lwm2m_bootstrap") or {}
    firmware = doc.get("firmware") or {}
    registered, offline = int(lwm2m.get("registered") or 0), int(lwm2m.get("offline") or 0)
    summary = f"{registered} LwM2M sensor(s) registered"
    problems = []
    if offline:
        problems.append(f"{offline} offline (no Update within their lifetime)")
    if bootstrap.get("failed"):
        problems.append(f"{bootstrap['failed']} bootstrap(s) failed")
    if firmware.get("failed"):
        problems.append(f"{firmware['failed']} firmware update(s) failed")
    upstream = doc.get("lwm2m_upstream")
    if isinstance(upstream, dict):
        if upstream.get("state") == "registered":
            summary += f"; registered upstream at {upstream.get('url')} as " \
                       f"{upstream.get('endpoint')}"
        else:
            problems.append(f"not registered with the LwM2M server {upstream.get('url')} "
                            f"({upstream.get('state')})")
    if problems:
        return CheckResult("broker-lwm2m", Level.WARN, f"{summary}; {'; '.join(problems)} "
                           "since devid-broker started", "`devidctl sensors show NAME` says "
                           "which and why; `journalctl -u devid-broker` has the events "
                           "(lwm2m-upstream-failed: why the server was not reached)")
    return CheckResult("broker-lwm2m", Level.PASS, f"{summary}; "
                       f"{int(bootstrap.get('finished') or 0)} bootstrapped, "
                       f"{int(firmware.get('updated') or 0)} firmware update(s) since start")


def check_broker(doc: dict[str, Any] | None, unreachable: str | None = None
                 ) -> list[CheckResult]:
    if doc is None:
        return [CheckResult("broker", Level.FAIL, f"devid-broker does not answer: "
                            f"{unreachable or 'no status'}",
                            "`systemctl status devid-broker`; `journalctl -u devid-broker`")]
    return [_check_process(doc), _check_policy(doc), _check_upstreams(doc), _check_lwm2m(doc)]
