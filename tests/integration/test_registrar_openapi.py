"""The registrar's API against its own description, by a tool nobody here wrote:
schemathesis runs all its checks from docs/openapi.json against a live registrar on
loopback (bounded and deterministic, so a failure reproduces), and finds nothing. Then
the two answers it once found wrong, asked directly: a method a resource does not take
gets 405 with an Allow header and its own problem type."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


def test_schemathesis_finds_nothing_against_a_live_registrar(tpm, registrar_factory,
                                                             tmp_path):
    registrar = registrar_factory([tpm.vendor_ca])
    run = subprocess.run(
        [str(SCHEMATHESIS), "--config-file", str(ROOT / "tests" / "schemathesis" /
                                                   "schemathesis.toml"),
         "run", str(ROOT / "docs" / "openapi.json"), "--url", registrar.url,
         "--tls-verify", str(registrar.ca), "--checks", "all", "--max-examples", "30",
         "--generation-deterministic", "--no-color"],
        capture_output=True, text=True, timeout=600,
        cwd=tmp_path)  # its cache (.schemathesis/) goes there, not into the source tree
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failure" not in run.stdout.split("SUMMARY")[-1]


def test_a_method_the_resource_does_not_take_gets_405_with_allow(tpm, registrar_factory):
    registrar = registrar_factory([tpm.vendor_ca])
    answer = requests.delete(f"{registrar.url}/v1/health", verify=str(registrar.ca),
                             timeout=10)
    assert answer.status_code == 405 and answer.headers["Allow"] in ("GET", "GET, HEAD")  # sorted
    problem = answer.json()
    assert problem["type"].endswith(":method-not-allowed") and problem["status"] == 405
    empty = requests.post(f"{registrar.url}/v1/enrollments", verify=str(registrar.ca),
                          json={"ek_certificate": "", "ek_public": "", "ak_public": ""},
                          timeout=10)
    # The schema says minLength 4 for these now, so this is a schema violation: 400.
    assert empty.status_code == 400 and "must not be empty" in empty.json()["detail"]
