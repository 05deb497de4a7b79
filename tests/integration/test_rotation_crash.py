"""Crash safety: SIGKILL at every step of a rotation, again and again.

The agent is started with DEVID_FAILPOINTS naming one point (agent/faults.py) and
asked to renew; it kills itself there. After each kill the state on disk must be a
complete set, old or new, never mixed or missing: the identity certificate is for
the TPM's identity key, and the sealed TLS key unseals (with the real TPM) to the
TLS certificate's key. The next start, with the next point armed, must restore it
and present it again before it is killed once more.
"""

from __future__ import annotations

import contextlib
import json

import pytest
from stack import AgentProcess, enrollment_toml, rotation_toml

from agent.control import client
from agent.enroll.state import EnrollmentStore
from agent.errors import DevidError
from agent.pki.certinfo import spki_der
from agent.rotation.client import RENEWAL_STEPS
from agent.rotation.tlskey import key_from_secret
from agent.tpm.custody import TpmCustody

# Every point a rotation passes, in order, and whether the new state is on disk there.
POINTS = [*((f"rotation.{step}", False) for step in RENEWAL_STEPS),
          ("write.enrollment.json.before_rename", False),
          ("write.enrollment.json.after_rename", True),
          ("rotation.saved", True),
          ("rotation.published", True),
          ("write.audit.log.head.before_rename", True),
          ("rotation.done", True)]
RUNS_PER_POINT = 5  # 12 points x 5 = 60 kills
GROUPS = 4


def _check_state(tpm, state_dir, generation_before: int, saved: bool) -> int:
    stored = EnrollmentStore(state_dir).load()
    assert stored is not None and stored.tls is not None
    assert stored.generation == generation_before + (1 if saved else 0)
    with TpmCustody.open(tpm.tcti, state_dir, readonly=True) as custody:
        assert spki_der(stored.certificate) == custody.identity_key().public_key_der
        key = key_from_secret(custody.unseal(stored.tls.sealed_key))
    assert spki_der(key.public_key()) == spki_der(stored.tls.certificate)
    return stored.generation


@pytest.mark.parametrize("group", range(GROUPS))
def test_sigkill_at_every_rotation_step_leaves_a_complete_set(group, tpm, registrar_factory,
                                                              agent_factory, tmp_path):
    points = POINTS[group::GROUPS]
    # 60 forced renewals in a few minutes, on purpose: the registrar's rate limit is off.
    registrar = registrar_factory([tpm.vendor_ca], settings={"cert_lifetime": '"1h"',
                                                             "renewal_window": '"0s"'})
    agent = agent_factory(tpm, extra=enrollment_toml(registrar, registrar.token())
                          + rotation_toml())
    agent.wait_enrollment("enrolled")
    assert agent.stop() == 0
    state_dir = agent.config.parent / "state"
    generation = EnrollmentStore(state_dir).load().generation

    kills = 0
    for _ in range(RUNS_PER_POINT):
        for point, saved in points:
            crashing = AgentProcess(agent.config, env={"DEVID_FAILPOINTS": point})
            crashing.start()
            # It restored the set the previous kill left and presents it again.
            crashing.wait_status("TLS restored", lambda d: (d.get("tls_certificate") or {})
                                 .get("presented") is True, timeout=20)
            # ... and removed any temp file the kill left mid-write.
            assert not [p.name for p in state_dir.iterdir() if p.name.endswith(".tmp")]
            with contextlib.suppress(DevidError):  # it may die before it answers
                client.call(crashing.socket, "renew", {}, timeout=10)
            code = crashing.proc.wait(30)
            assert code == -9, f"{point}: exit {code}\n{crashing.log_path.read_text()[-2000:]}"
            assert f"failpoint {point}: SIGKILL" in crashing.log_path.read_text()
            kills += 1
            generation = _check_state(tpm, state_dir, generation, saved)

    # Unarmed, it carries on: restores, renews, and its audit chain is intact.
    agent.start()
    agent.wait_enrollment("enrolled")
    code, doc = agent.ctl_json("renew", "--wait")
    assert code == 0, doc
    _, audit = agent.ctl_json("audit", "--limit", "1000")
    assert audit["intact"], audit["problem"]
    assert kills == RUNS_PER_POINT * len(points)
    assert json.loads((state_dir / "enrollment.json").read_text())["generation"] > generation
