"""What ships beside the code stays in step with it: bash completion, man pages,
the operations guide (one section per check) and the Debian package files."""

from __future__ import annotations

import re
from pathlib import Path

from agent.cli.main import build_parser
from agent.diagnostics.suite import CHECK_NAMES

ROOT = Path(__file__).resolve().parents[2]
CHECKS = CHECK_NAMES  # the suite's own list: each needs a section and a CLI name


def _verbs() -> dict[str, set[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return {name: {o for a in verb._actions for o in a.option_strings}
            for name, verb in sub.choices.items()}


def test_bash_completion_knows_every_verb_and_option():
    text = (ROOT / "docs" / "completion" / "devidctl").read_text()
    verbs = re.search(r'local verbs="([^"]+)"', text).group(1).split()
    assert sorted(verbs) == sorted(_verbs())
    for verb, options in _verbs().items():
        line = re.search(rf'^\s*{re.escape(verb)}\) opts="([^"]+)"', text, re.M)
        assert line, verb
        words = set(line.group(1).split())  # options, and a verb's actions (cert show)
        assert {w for w in words if w.startswith("-")} == options - {"-h"}, verb


def test_devidctl_man_page_documents_verbs_and_exit_codes():
    text = (ROOT / "docs" / "man" / "devidctl.1").read_text().replace("\\-", "-")
    for verb in _verbs():
        assert re.search(rf"^\.(TP\n)?\.?B[R]? {re.escape(verb)}\b", text, re.M) or \
            f".B {verb}" in text or f".BR {verb}" in text, verb
    for code in ("0", "1", "2", "3", "64"):
        assert f".B {code}\n" in text, code


def test_operations_guide_has_a_section_per_check():
    text = (ROOT / "docs" / "operations.md").read_text()
    for name in CHECKS:
        assert f"\n### {name}\n" in text, name


def test_check_names_are_the_ones_documented():
    found = set()
    for path in (ROOT / "agent" / "diagnostics").glob("*.py"):
        source = path.read_text()
        found |= set(re.findall(r'CheckResult\("([a-z0-9-]+)"', source))
        found |= set(re.findall(r'name = "([a-z0-9-]+)"', source))
    assert found == set(CHECKS)


def test_package_installs_what_the_docs_promise():
    install = (ROOT / "debian" / "devid-agent.install").read_text()
    for source in ("systemd/devid-agent.service", "systemd/devid-registrar.service",
                   "systemd/devid-broker.service", "docs/agent.toml", "docs/broker.toml",
                   "docs/completion/devidctl"):
        assert source in install and (ROOT / source).exists(), source
    manpages = (ROOT / "debian" / "devid-agent.manpages").read_text().split()
    assert sorted(Path(m).stem for m in manpages) == ["devid-agent", "devid-broker",
                                                      "devid-registrar", "devidctl"]
    assert all((ROOT / m).exists() for m in manpages)
    for doc in (ROOT / "debian" / "devid-agent.docs").read_text().split():
        assert (ROOT / doc).exists(), doc
