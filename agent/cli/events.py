"""`devidctl events`: the recent security events of devid-agent and devid-broker, merged in
time order, from each daemon's control socket (the same events as the journal's and the
SIEM's). `--follow` goes on printing new ones; `--json` prints one JSON object per line.
A daemon that is not on this gateway (no socket) is left out; one that does not answer
is named on stderr."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.cli.sensors import add_broker_socket, broker_socket
from agent.clock import isoformat_utc
from agent.control import client
from agent.errors import DaemonNotRunning, DevidError

POLL = 1.0
_LEVELS = {2: "CRIT", 3: "ERR", 4: "WARN", 5: "NOTICE", 6: "INFO", 7: "DEBUG"}


def event_verbs(verb: Callable[..., argparse.ArgumentParser]) -> None:
    events = verb("events", help="recent security events of the agent and devid-broker, "
                                 "in time order")
    events.add_argument("--follow", "-f", action="store_true",
                        help="go on printing new events until interrupted")
    events.add_argument("--limit", type=int, default=50, metavar="N",
                        help="show the last N events (default 50, at most 1000)")
    events.add_argument("--json", action="store_true",
                        help="one JSON object per line, with the daemon as `source`")
    add_broker_socket(events)


def render_event(event: dict[str, Any]) -> str:
    fields = " ".join(f"{k}={v}" for k, v in sorted(event.get("fields", {}).items())
                      if k in ("sensor", "finding", "action", "refusal", "change"))
    when = isoformat_utc(float(event["time"])).replace("T", " ")[:19]
    level = _LEVELS.get(int(event.get("severity", 6)), "INFO")
    return f"{when} {event['source']:<12} {level:<5} {event['event']:<22} " \
           f"{event['message']}" + (f"  [{fields}]" if fields else "")


def cmd_events(agent_socket: Path, args: argparse.Namespace,
               fail: Callable[[DevidError, bool, int], int]) -> int:
    if not 1 <= args.limit <= 1000:
        return fail(DevidError(f"--limit {args.limit}: expected 1 to 1000"), args.json, 64)
    sources = {"devid-agent": agent_socket, "devid-broker": broker_socket(args)}
    cursors: dict[str, int] = {}
    first: list[dict[str, Any]] = []
    problems: list[str] = []
    for name, socket in sources.items():
        try:
            got = _ask(socket, 0, args.limit, args.command_line)
        except DaemonNotRunning:
            continue  # not on this gateway, or not running: its events are not here
        except DevidError as e:
            problems.append(f"{name}: {e.message}")
            continue
        cursors[name] = int(got["last"])
        first += [{**e, "source": name} for e in got["events"]]
    for problem in problems:
        print(f"devidctl events: {problem}", file=sys.stderr)
    if not cursors:
        return fail(DaemonNotRunning("neither devid-agent nor devid-broker answered",
                                     "is either running? (systemctl status devid-agent "
                                     "devid-broker)"), args.json, 3)
    _print(sorted(first, key=lambda e: (e["time"], e["seq"]))[-args.limit:], args.json)
    try:
        while args.follow:
            time.sleep(POLL)
            new: list[dict[str, Any]] = []
            for name, after in list(cursors.items()):
                try:
                    got = _ask(sources[name], after, 1000, args.command_line)
                except DevidError:
                    continue  # restarting: asked again next time
                if int(got["last"]) < after:  # the daemon restarted: its numbers too
                    got = _ask(sources[name], 0, 1000, args.command_line)
                cursors[name] = int(got["last"])
                new += [{**e, "source": name} for e in got["events"]]
            _print(sorted(new, key=lambda e: (e["time"], e["seq"])), args.json)
    except KeyboardInterrupt:
        pass
    return 2 if problems else 0


def _ask(socket: Path, after: int, limit: int, command: str) -> dict[str, Any]:
    return client.call(socket, "events", {"after": after, "limit": limit}, timeout=10.0,
                       command=command)


def _print(events: list[dict[str, Any]], as_json: bool) -> None:
    for event in events:
        print(json.dumps(event, sort_keys=True) if as_json else render_event(event),
              flush=True)
