"""devidctl: the field engineer's view of a gateway's identity agent.

Exit codes: 0 OK, 1 WARN, 2 FAIL (for renew/decommission: the action failed),
3 cannot reach the daemon, 64 usage error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from agent import __version__
from agent.access import command_line, explain, os_error_text
from agent.audit import AGENT_AUDIT_LOG, AuditLog
from agent.cli import bundle
from agent.cli.events import cmd_events, event_verbs
from agent.cli.identity import add_verbs as identity_verbs
from agent.cli.identity import cmd_consumers, cmd_credentials
from agent.cli.policy import add_verbs as policy_verbs
from agent.cli.policy import cmd_policy
from agent.cli.render import (
    Style,
    render_audit,
    render_bundle,
    render_certificates,
    render_check,
    render_decommission,
    render_error,
    render_renew,
    render_status,
)
from agent.cli.sensors import add_broker_socket, broker_status, cmd_sensors
from agent.cli.sensors import add_verbs as sensor_verbs
from agent.config import (
    AgentConfig,
    PathsSection,
    control_socket_of,
    key_for_path,
    load_config,
)
from agent.control import client
from agent.control.protocol import RENEW_WAIT_MAX
from agent.diagnostics.broker import check_broker
from agent.diagnostics.certificates import certificates_document, certificates_pem
from agent.diagnostics.local import local_gateway_facts
from agent.diagnostics.suite import CHECK_NAMES, check_document, only, with_results
from agent.enroll.state import EnrollmentStore
from agent.errors import ConfigError, DaemonNotRunning, DevidError, PermissionDenied, StateError

DEFAULT_CONFIG = Path("/etc/devid-agent/agent.toml")
CONFIG_ENV = "DEVIDCTL_CONFIG"
EXIT_BY_STATE = {"OK": 0, "WARN": 1, "FAIL": 2}
EXIT_NO_DAEMON = 3
EXIT_USAGE = 64


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="devidctl", description="Inspect and diagnose devid-agent.",
                     epilog="exit codes: 0 OK, 1 WARN, 2 FAIL, 3 daemon unreachable, 64 usage")
    default = Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
    parser.add_argument("--config", type=Path, default=default,
                        help=f"agent configuration file (default: ${CONFIG_ENV}, else "
                             f"{DEFAULT_CONFIG})")
    parser.add_argument("--version", action="version", version=f"devidctl {__version__}")
    # --config is also accepted after the verb (`devidctl status --config FILE`).
    after_verb = _Parser(add_help=False)
    after_verb.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                            help="agent configuration file")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def verb(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[after_verb], **kwargs)

    status = verb("status", help="the agent's state, TPM, EK and identity key; devid-broker's "
                             "when it runs here")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    add_broker_socket(status)
    check = verb("check", help="diagnostics with a hint for each problem "
                           "(runs locally when the daemon is down)")
    add_broker_socket(check)
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.add_argument("--only", metavar="NAME", action="append", choices=CHECK_NAMES,
                       help="show only this check (repeatable); the exit status follows "
                            "the checks shown")
    check.add_argument("--verbose", "-v", action="store_true",
                       help="also show what checks that were not run found")
    renew = verb("renew", help="renew the certificates now (re-attesting)")
    renew.add_argument("--wait", action="store_true",
                       help="wait for the outcome and report it (exit 2 if it failed)")
    renew.add_argument("--timeout", type=_seconds, default=RENEW_WAIT_MAX, metavar="SECONDS",
                       help=f"with --wait, give up waiting after this long (default and "
                            f"most {RENEW_WAIT_MAX:.0f})")
    renew.add_argument("--json", action="store_true", help="print one JSON object")
    decom = verb("decommission", help="retire this gateway: tell the registrar, "
                           "then destroy its identity state and TPM keys")
    decom.add_argument("--yes", action="store_true", help="do it (required: this cannot be "
                       "undone)")
    decom.add_argument("--force", action="store_true", help="wipe locally even if the "
                       "registrar cannot be told")
    decom.add_argument("--json", action="store_true", help="print one JSON object")
    audit = verb("audit", help="the agent's hash-chained audit log")
    audit.add_argument("--limit", type=_positive, default=50, help="show the last N "
                       "records (default 50)")
    audit.add_argument("--json", action="store_true", help="print one JSON object")
    cert = verb("cert", help="the gateway's identity and TLS certificates")
    cert.add_argument("action", choices=("show",), help="show: subject, serial, validity, "
                      "fingerprint and chain of each")
    cert.add_argument("--pem", action="store_true", help="print the PEM chains instead "
                      "(identity, then TLS), for openssl or a relying party")
    cert.add_argument("--json", action="store_true", help="print one JSON object (with PEM)")
    identity_verbs(verb)
    sensor_verbs(verb)
    policy_verbs(verb)
    event_verbs(verb)
    support = verb("support-bundle", help="write a tarball for remote diagnosis: "
                             "status, checks, journal, redacted config, versions")
    support.add_argument("-o", "--output", type=Path, metavar="FILE",
                         help="where to write it (default "
                              "./devid-support-HOST-TIME.tar.gz)")
    support.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value <= RENEW_WAIT_MAX:
        raise argparse.ArgumentTypeError(f"expected 1 to {RENEW_WAIT_MAX:.0f} seconds, "
                                         f"got {text}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") \
            from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# Where `check` hints point: the installed copy, else the source tree's.
DOCS_PLACES = (Path("/usr/share/doc/devid-agent/operations.md"),
               Path("/usr/share/doc/devid-agent/operations.md.gz"),
               Path(__file__).resolve().parents[2] / "docs" / "operations.md")


def terminal_style() -> Style:
    """Colour only for a terminal, and never with NO_COLOR set (https://no-color.org)."""
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR") and \
        os.environ.get("TERM") != "dumb"
    docs = next((p for p in DOCS_PLACES if p.exists()), Path("docs/operations.md"))
    return Style(colour=colour, docs=str(docs))


def _emit(doc: dict[str, Any], as_json: bool, render: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True) if as_json else render(doc))


def _fail(err: DevidError, as_json: bool, code: int) -> int:
    doc = {"state": "FAIL", "error": err.to_dict()}
    if as_json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(render_error(err.to_dict()), file=sys.stderr)
    return code


def _call(config: AgentConfig, args: argparse.Namespace, method: str,
          params: dict[str, Any] | None = None,
          timeout: float = client.DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    return client.call(config.paths.control_socket, method, params, timeout,
                       command=args.command_line)


def cmd_status(config: AgentConfig, args: argparse.Namespace) -> int:
    as_json = args.json
    try:
        doc = _call(config, args, "status")
    except DevidError as e:
        return _fail(e, as_json, EXIT_NO_DAEMON)
    broker = broker_status(args)
    if broker is not None:
        doc["devid_broker"] = broker
        worse = max(EXIT_BY_STATE.get(str(doc.get("state")), 2),
                    EXIT_BY_STATE.get(str(broker.get("state")), 2))
        doc["state"] = next(k for k, v in EXIT_BY_STATE.items() if v == worse)
    _emit(doc, as_json, lambda d: render_status(d, terminal_style()))
    return EXIT_BY_STATE.get(str(doc.get("state")), 2)


Look = Callable[[DevidError], dict[str, Any]]


def _ask_or_look(config: AgentConfig, args: argparse.Namespace, method: str, look: Look,
                 local_when: tuple[type[DevidError], ...], params: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """The daemon's answer; when it is out of reach (`local_when`), `look` at the state
    directory and the TPM ourselves."""
    try:
        return _call(config, args, method, params)
    except local_when as e:
        return look(e)


def _check_document(config: AgentConfig, args: argparse.Namespace,
                    local_when: tuple[type[DevidError], ...] = (DaemonNotRunning,)
                    ) -> dict[str, Any]:
    # The daemon holds the TPM when it runs; when it does not, look ourselves.
    return _ask_or_look(config, args, "check", lambda e: check_document(
        local_gateway_facts(config, args.command_line, e.message)), local_when)


def cmd_check(config: AgentConfig, args: argparse.Namespace) -> int:
    as_json = args.json
    try:
        doc = _check_document(config, args)
    except DevidError as e:
        return _fail(e, as_json, EXIT_NO_DAEMON)
    broker = broker_status(args)
    if broker is not None:
        error = broker.get("error")
        doc = with_results(doc, check_broker(None if error else broker,
                                             error and error.get("message")))
    if args.only:
        doc = only(doc, args.only)
    _emit(doc, as_json, lambda d: render_check(d, terminal_style(), args.verbose))
    return EXIT_BY_STATE.get(str(doc.get("state")), 2)


def _follow_renewal(config: AgentConfig, done: threading.Event) -> None:
    """Print each renewal step as the daemon reports it (its status, polled), until
    `done`: on a real TPM and a distant registrar a renewal takes seconds."""
    shown: str | None = None
    while not done.wait(0.5):
        try:
            step = (client.call(config.paths.control_socket, "status", timeout=5.0)
                    .get("rotation") or {}).get("step")
        except DevidError:
            return
        if step and step != shown:
            print(f"  ... {step}", file=sys.stderr, flush=True)
            shown = step


def cmd_renew(config: AgentConfig, args: argparse.Namespace) -> int:
    timeout = args.timeout + 10 if args.wait else client.DEFAULT_TIMEOUT_S
    done = threading.Event()
    if args.wait and not args.json:
        print(f"renewing (re-attesting with the TPM and the registrar; waiting up to "
              f"{args.timeout:g}s)...", file=sys.stderr, flush=True)
        threading.Thread(target=_follow_renewal, args=(config, done), daemon=True).start()
    try:
        doc = _call(config, args, "renew", {"wait": args.wait, "timeout": args.timeout},
                    timeout=timeout)
    except (DaemonNotRunning, PermissionDenied) as e:  # the daemon is out of our reach
        return _fail(e, args.json, EXIT_NO_DAEMON)
    except DevidError as e:
        return _fail(e, args.json, EXIT_BY_STATE["FAIL"])
    finally:
        done.set()
    _emit(doc, args.json, render_renew)
    outcome = doc.get("outcome")
    return 0 if outcome is None or outcome.get("result") == "renewed" else EXIT_BY_STATE["FAIL"]


def cmd_decommission(config: AgentConfig, args: argparse.Namespace) -> int:
    if not args.yes:
        print("devidctl: decommissioning destroys this gateway's identity and TPM keys and "
              "tells the registrar to revoke it; it cannot be undone. Add --yes to proceed.",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        doc = _call(config, args, "decommission", {"force": args.force}, timeout=120.0)
    except (DaemonNotRunning, PermissionDenied) as e:  # the daemon is out of our reach
        return _fail(e, args.json, EXIT_NO_DAEMON)
    except DevidError as e:
        return _fail(e, args.json, EXIT_BY_STATE["FAIL"])
    _emit(doc, args.json, render_decommission)
    return 0


def _audit_document(config: AgentConfig, args: argparse.Namespace, limit: int,
                    local_when: tuple[type[DevidError], ...] = (DaemonNotRunning,)
                    ) -> dict[str, Any]:
    # The log is a file: read it directly when the daemon is down (needs access to the
    # state directory).
    return _ask_or_look(config, args, "audit", lambda _: AuditLog(
        config.paths.state_dir / AGENT_AUDIT_LOG).report(limit), local_when, {"limit": limit})


def cmd_audit(config: AgentConfig, args: argparse.Namespace) -> int:
    try:
        doc = _audit_document(config, args, args.limit)
    except DevidError as e:
        return _fail(e, args.json, EXIT_NO_DAEMON)
    _emit(doc, args.json, render_audit)
    return 0 if doc.get("intact") else EXIT_BY_STATE["FAIL"]


def _certificates_document(config: AgentConfig, args: argparse.Namespace,
                           local_when: tuple[type[DevidError], ...] = (DaemonNotRunning,)
                           ) -> dict[str, Any]:
    # The certificates are in the state directory.
    return _ask_or_look(config, args, "certificates", lambda _: certificates_document(
        EnrollmentStore(config.paths.state_dir).load(), datetime.datetime.now(datetime.UTC)),
        local_when)


def cmd_cert(config: AgentConfig, args: argparse.Namespace) -> int:
    try:
        doc = _certificates_document(config, args)
    except DevidError as e:
        return _fail(e, args.json, EXIT_NO_DAEMON)
    if args.pem and not args.json:
        if not doc.get("enrolled"):
            return _fail(StateError("not enrolled yet: there is no certificate",
                                    "see `devidctl status`"), False, EXIT_BY_STATE["FAIL"])
        print(certificates_pem(doc), end="")
        return 0
    _emit(doc, args.json, render_certificates)
    return 0 if doc.get("enrolled") else EXIT_BY_STATE["WARN"]


def _daemon_config(config: AgentConfig, args: argparse.Namespace) -> AgentConfig | None:
    """The configuration the running daemon loaded, by the absolute path it advertises
    (our --config may be relative to another directory, or broken since)."""
    try:
        loaded = _call(config, args, "status").get("agent", {}).get("config")
        return load_config(Path(loaded), others_may_read=True, command=args.command_line) \
            if loaded else None
    except DevidError:
        return None


def cmd_support_bundle(config: AgentConfig, args: argparse.Namespace,
                       config_error: ConfigError | None) -> int:
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    path = args.output or Path(f"{bundle.default_name(now)}.tar.gz")
    if config_error is not None:
        config = _daemon_config(config, args) or config
    # Out of the daemon's reach (stopped, or not ours to ask): collect what we can see.
    local = (DaemonNotRunning, PermissionDenied)
    collected = bundle.collect(config, bundle.Sources(
        status=lambda: _call(config, args, "status"),
        check=lambda: _check_document(config, args, local),
        audit=lambda: _audit_document(config, args, bundle.AUDIT_RECORDS, local),
        certificates=lambda: _certificates_document(config, args, local)))
    if config_error is not None:
        collected.add("config-error.json", config_error.to_dict)
    try:
        bundle.write_bundle(collected, path, now)
    except OSError as e:
        return _fail(DevidError(f"cannot write {path}: {e.strerror}",
                                "choose another place with -o FILE"), args.json,
                     EXIT_BY_STATE["FAIL"])
    doc = {"path": str(path.resolve()), "files": sorted(collected.files),
           "not_collected": collected.problems}
    if collected.problems and os.geteuid() != 0:
        doc["hint"] = f"`sudo {args.command_line}` collects what this user may not read"
    _emit(doc, args.json, render_bundle)
    # Written, but incomplete: say so to scripts too (the list is in the output).
    return EXIT_BY_STATE["WARN"] if collected.problems else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = command_line("devidctl", argv)
    # A consumer's and devid-broker's verbs: agent.toml is not needed (nor readable).
    if args.command == "credentials":
        return cmd_credentials(args, _fail)
    if args.command == "sensors":
        return cmd_sensors(args, _fail)
    if args.command == "policy":
        return cmd_policy(args, _fail)
    if args.command == "events":  # the agent's socket only: agent.toml need not validate
        return cmd_events(control_socket_of(args.config), args, _fail)
    config_error: ConfigError | None = None
    try:
        # Files only the agent's user may read are the agent's to judge, not ours.
        config = load_config(args.config, others_may_read=True, command=args.command_line)
    except ConfigError as e:
        # The daemon may still run on the configuration it loaded before the file broke:
        # reach it at the socket the file names (read leniently) or the default one.
        fallback = AgentConfig(paths=PathsSection(
            control_socket=control_socket_of(args.config))).model_copy(
                update={"source": args.config})
        if args.command != "support-bundle" and not _daemon_answers(fallback):
            return _fail(e, args.json, EXIT_BY_STATE["FAIL"])
        # A broken configuration is exactly what a support bundle should carry.
        config, config_error = fallback, e
    commands = {"status": lambda: cmd_status(config, args),
                "check": lambda: cmd_check(config, args),
                "renew": lambda: cmd_renew(config, args),
                "decommission": lambda: cmd_decommission(config, args),
                "audit": lambda: cmd_audit(config, args),
                "cert": lambda: cmd_cert(config, args),
                "consumers": lambda: cmd_consumers(
                    args, lambda method, params=None: _call(config, args, method, params),
                    _fail),
                "support-bundle": lambda: cmd_support_bundle(config, args, config_error)}
    try:
        code = commands[args.command]()
        if config_error is not None and args.command != "support-bundle":
            print(f"devidctl: the daemon runs on the configuration it loaded earlier; "
                  f"{config_error.message}\n  hint: fix the file, then `systemctl reload "
                  "devid-agent`", file=sys.stderr)
            if args.command in ("status", "check"):
                code = max(code, EXIT_BY_STATE["WARN"])
        return code
    except PermissionError as e:
        return _fail(explain(e, key_for_path(config, e.filename or ""), args.command_line),
                     args.json, EXIT_BY_STATE["FAIL"])
    except OSError as e:
        return _fail(DevidError(os_error_text(e)), args.json, EXIT_BY_STATE["FAIL"])


def _daemon_answers(config: AgentConfig) -> bool:
    try:
        client.call(config.paths.control_socket, "status", timeout=5.0)
    except DevidError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
