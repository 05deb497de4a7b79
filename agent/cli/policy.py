"""devidctl's policy verbs: `policy check [FILE]` (here, no broker needed) and
`policy explain SENSOR METHOD PATH` (the broker's decision and the rule behind it)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.broker.config import PolicySection
from agent.broker.policy import load_policy_file
from agent.cli.sensors import add_broker_socket, broker_call, exit_code
from agent.errors import DevidError, SensorError

Verb = Callable[..., argparse.ArgumentParser]
Fail = Callable[[DevidError, bool, int], int]


def add_verbs(verb: Verb) -> None:
    policy = verb("policy", help="devid-broker's policy: check a file, explain a decision")
    policy.add_argument("action", choices=("check", "explain"))
    policy.add_argument("args", nargs="*", metavar="ARG",
                        help="check: [FILE] (default the broker's); explain: SENSOR METHOD PATH")
    policy.add_argument("--size", type=int, default=0, help="explain: payload bytes")
    policy.add_argument("--format", type=int, dest="content_format",
                        help="explain: CoAP Content-Format number")
    add_broker_socket(policy)
    policy.add_argument("--json", action="store_true", help="print one JSON object")


def _render_check(doc: dict[str, Any]) -> str:
    lines = [f"{doc['file']}: OK, {len(doc['profiles'])} profile(s)"]
    lines += [f"  {name}: {rules} rule(s)" for name, rules in doc["profiles"].items()]
    if doc["insecure_profiles"]:
        lines.append(f"  WARNING plain CoAP allowed for: {', '.join(doc['insecure_profiles'])}")
    if not doc["exists"]:
        lines.append("  (no such file: nothing is granted)")
    return "\n".join(lines)


def _render_explain(doc: dict[str, Any]) -> str:
    verdict = "ALLOW" if doc["allowed"] else "DENY"
    lines = [f"{verdict}  {doc['sensor']} ({doc['profile']}) {doc['method']} {doc['path']}",
             f"  {doc['reason']}"]
    if doc.get("upstream"):
        lines.append(f"  upstream {doc['upstream']}" + ("  (spooled when down)"
                                                          if doc.get("spool") else ""))
    lines.append(f"  ({doc['note']})")
    return "\n".join(lines)


def cmd_policy(args: argparse.Namespace, fail: Fail) -> int:
    try:
        if args.action == "check":
            if len(args.args) > 1:
                raise SensorError("policy check takes at most one FILE")
            path = Path(args.args[0]) if args.args else PolicySection().file
            policy = load_policy_file(path)
            doc = {"file": str(path), "exists": path.exists(),
                   "profiles": {n: len(p.rules) for n, p in policy.profiles.items()},
                   "insecure_profiles": policy.insecure_profiles()}
            render = _render_check
        else:
            if len(args.args) != 3:
                raise SensorError("policy explain: give SENSOR METHOD PATH")
            sensor, method, path_text = args.args
            doc = broker_call(args, "policy-explain", {
                "sensor": sensor, "method": method, "path": path_text, "size": args.size,
                "format": args.content_format})
            render = _render_explain
    except DevidError as e:
        return fail(e, args.json, exit_code(e))
    print(json.dumps(doc, indent=2, sort_keys=True) if args.json else render(doc))
    return 0 if args.action == "check" or doc["allowed"] else 1
