"""The `check` report: facts from the TPM plus the local files and clock, judged."""

from __future__ import annotations

from typing import Any

from agent.config import AgentConfig
from agent.diagnostics.checks import CheckResult, run_checks, worst
from agent.diagnostics.facts import TpmFacts, collect_clock_facts, collect_path_facts
from agent.diagnostics.status import HEADLINE


def check_report(tpm: TpmFacts, config: AgentConfig, expected_uid: int | None,
                 extra: tuple[CheckResult, ...] = (),
                 registrar_offset: float | None = None) -> dict[str, Any]:
    """`registrar_offset`: the registrar's clock minus ours, as just measured."""
    results = [*extra, *run_checks(tpm, collect_path_facts(config.paths.state_dir),
                                   collect_clock_facts(registrar_offset), expected_uid,
                                   roots_configured=bool(config.trust.ek_roots),
                                   skew=config.rotation.clock_skew)]
    doc: dict[str, Any] = {"state": HEADLINE[worst(results)],
                           "results": [r.to_dict() for r in results]}
    if tpm.occupancy is not None:  # for scripts and the support bundle
        doc["tpm_resources"] = tpm.occupancy.to_dict()
    return doc
