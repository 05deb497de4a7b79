"""devidctl: the field engineer's view of a gateway's identity agent.

Exit codes: 0 OK, 1 WARN, 2 FAIL, 3 cannot reach the daemon, 64 usage error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from agent import __version__
from agent.cli.render import render_check, render_error, render_status
from agent.config import AgentConfig, load_config
from agent.control import client
from agent.diagnostics.checks import check_daemon_down
from agent.diagnostics.enrollment import (
    check_enrollment,
    probe_registrar,
    stored_enrollment_facts,
)
from agent.diagnostics.facts import TpmFacts, collect_tpm_facts
from agent.diagnostics.report import check_report
from agent.errors import ConfigError, DaemonNotRunning, DevidError
from agent.pki.ekchain import load_trust_store
from agent.tpm.custody import TpmCustody

DEFAULT_CONFIG = Path("/etc/devid-agent/agent.toml")
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
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help=f"agent configuration file (default {DEFAULT_CONFIG})")
    parser.add_argument("--version", action="version", version=f"devidctl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    status = sub.add_parser("status", help="the agent's state, TPM, EK and identity key")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    check = sub.add_parser("check", help="diagnostics with a hint for each problem "
                           "(runs locally when the daemon is down)")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _emit(doc: dict[str, Any], as_json: bool, render: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True) if as_json else render(doc))


def _fail(err: DevidError, as_json: bool, code: int) -> int:
    doc = {"state": "FAIL", "error": err.to_dict()}
    if as_json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(render_error(err.to_dict()), file=sys.stderr)
    return code


def cmd_status(config: AgentConfig, as_json: bool) -> int:
    try:
        doc = client.call(config.paths.control_socket, "status")
    except DevidError as e:
        return _fail(e, as_json, EXIT_NO_DAEMON)
    _emit(doc, as_json, render_status)
    return EXIT_BY_STATE.get(str(doc.get("state")), 2)


def _local_tpm_facts(config: AgentConfig) -> TpmFacts:
    try:
        trust = load_trust_store(config.trust.ek_roots)
        with TpmCustody.open(config.tpm.tcti, config.paths.state_dir, readonly=True) as custody:
            return collect_tpm_facts(custody, trust)
    except DevidError as e:
        return TpmFacts(tcti=config.tpm.tcti, error=e)


def cmd_check(config: AgentConfig, as_json: bool) -> int:
    try:
        doc = client.call(config.paths.control_socket, "check")
    except DaemonNotRunning as e:
        # The daemon holds the TPM when it runs; when it does not, look ourselves.
        now = datetime.datetime.now(datetime.UTC)
        enrollment = stored_enrollment_facts(config.enrollment, config.paths.state_dir, now)
        doc = check_report(_local_tpm_facts(config), config, expected_uid=None,
                           extra=(check_daemon_down(e.message),
                                  probe_registrar(config.enrollment),
                                  check_enrollment(enrollment, now)))
    except DevidError as e:
        return _fail(e, as_json, EXIT_NO_DAEMON)
    _emit(doc, as_json, render_check)
    return EXIT_BY_STATE.get(str(doc.get("state")), 2)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        return _fail(e, args.json, EXIT_BY_STATE["FAIL"])
    if args.command == "status":
        return cmd_status(config, args.json)
    return cmd_check(config, args.json)


if __name__ == "__main__":
    sys.exit(main())
