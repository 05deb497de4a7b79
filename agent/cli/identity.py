"""devidctl's identity-API verbs: `credentials fetch|watch` (as a consumer, over the
identity socket) and `consumers list|purge` (as an operator, over the control socket)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.cli.render import render_consumers, render_credentials
from agent.config import identity_socket_of
from agent.consumer import CredentialSet, IdentityClient, Withdrawn
from agent.errors import DaemonNotRunning, DevidError
from agent.identityapi.sinks import FileSink, check_volatile

Verb = Callable[..., argparse.ArgumentParser]
Fail = Callable[[DevidError, bool, int], int]
EXIT_FAIL, EXIT_NO_DAEMON = 2, 3


def add_verbs(verb: Verb) -> None:
    creds = verb("credentials", help="the gateway's TLS credentials as this user's consumer "
                                     "gets them from the identity API")
    creds.add_argument("action", choices=("fetch", "watch"),
                       help="fetch: once; watch: now and at every rotation or withdrawal")
    creds.add_argument("--out", type=Path, metavar="DIR",
                       help="write cert.pem, chain.pem, fullchain.pem, key.pem and bundle.pem "
                            "there (a directory on tmpfs, swapped atomically)")
    creds.add_argument("--count", type=int, metavar="N",
                       help="watch: stop after N updates")
    creds.add_argument("--socket", type=Path, metavar="PATH",
                       help="the identity API socket (default: [identity_api] socket)")
    creds.add_argument("--json", action="store_true",
                       help="print JSON (one object per update when watching); the private "
                            "key is only ever written to --out")
    consumers = verb("consumers", help="the programs declared to use the gateway's identity")
    consumers.add_argument("action", choices=("list", "purge"),
                           help="list: who is declared and what each last received; purge "
                                "NAME: destroy the sealed secrets of a removed consumer")
    consumers.add_argument("name", nargs="?", help="purge: the consumer's name")
    consumers.add_argument("--json", action="store_true", help="print one JSON object")


def _show(update: CredentialSet | Withdrawn, as_json: bool, out: Path | None) -> None:
    # --out is this user's own directory: no one else gets an ACL entry.
    sink = FileSink(out.parent, out.name, os.geteuid(), None, False) if out else None
    if isinstance(update, Withdrawn):
        doc: dict[str, Any] = {"event": "withdrawn", "reason": update.reason}
        if sink is not None and sink.remove():
            doc["removed"] = str(out)
    else:
        doc = {"event": "credentials", **update.summary()}
        files = update.files()
        if sink is not None:
            sink.write(files, update.serial)
            doc["written"] = str(out)
        if as_json:
            doc.update({k.replace(".pem", "_pem"): files[k].decode()
                        for k in ("cert.pem", "chain.pem", "bundle.pem")})
    print(json.dumps(doc, sort_keys=True) if as_json else render_credentials(doc), flush=True)


def cmd_credentials(args: argparse.Namespace, fail: Fail) -> int:
    """As a consumer: agent.toml is the agent's (often unreadable to consumers); only the
    socket is taken from it, leniently."""
    client = IdentityClient(args.socket or identity_socket_of(args.config))
    try:
        if args.out is not None:
            check_volatile(args.out.absolute().parent, what="--out")
        if args.action == "fetch":
            _show(client.credentials(), args.json, args.out)
            return 0
        if args.count is not None and args.count < 1:
            raise DevidError(f"--count: expected a positive number, got {args.count}")
        for shown, update in enumerate(client.watch(), start=1):
            _show(update, args.json, args.out)
            if args.count is not None and shown >= args.count:
                break
        return 0
    except DaemonNotRunning as e:
        return fail(e, args.json, EXIT_NO_DAEMON)
    except DevidError as e:
        return fail(e, args.json, EXIT_FAIL)
    except KeyboardInterrupt:
        return 0


def cmd_consumers(args: argparse.Namespace, call: Callable[..., dict[str, Any]],
                  fail: Fail) -> int:
    try:
        if args.action == "list":
            if args.name:
                raise DevidError("consumers list takes no name")
            doc = call("consumers")
        else:
            if not args.name:
                raise DevidError("consumers purge: which consumer? (devidctl consumers purge "
                                 "NAME)")
            doc = call("consumers-purge", {"name": args.name})
    except DaemonNotRunning as e:
        return fail(e, args.json, EXIT_NO_DAEMON)
    except DevidError as e:
        return fail(e, args.json, EXIT_FAIL)
    print(json.dumps(doc, indent=2, sort_keys=True) if args.json else render_consumers(doc))
    return 0

