"""The agent's TPM command budget, counted by a proxy in front of swtpm (tests/tpmcount.py):
real TPMs take 25-190 ms a command, so the count is what a gateway pays. Targets from
docs/operations.md ("TPM budget"); bench/tpm_ops.py prints the same counts."""

from __future__ import annotations

from tpmcount import measure_phases


def test_enrollment_renewal_and_status_stay_within_the_tpm_budget(tmp_path):
    counts = measure_phases(tmp_path)
    total = {phase: sum(c.values()) for phase, c in counts.items()}
    assert total["enrollment"] <= 30, counts["enrollment"]
    assert total["renewal"] <= 12, counts["renewal"]
    assert total["first TLS certificate"] <= 12, counts["first TLS certificate"]
    # Status asks the TPM whether it is there, once, and proves nothing else per call.
    assert counts["status"] == {"GetCapability": 1}
    # Every renewal does the same few heavy commands: one quote, one signature, one seal.
    for phase in ("renewal", "first TLS certificate"):
        assert (counts[phase]["Quote"], counts[phase]["Sign"], counts[phase]["Create"]) == \
            (1, 1, 1), counts[phase]
    # Enrolled, a start re-derives only the SRK: the EKs' public areas are remembered.
    assert counts["start (enrolled)"]["CreatePrimary"] == 1, counts["start (enrolled)"]


def test_a_persistent_srk_is_made_once_and_then_costs_no_create_primary(tmp_path):
    counts = measure_phases(tmp_path, "srk_handle = 0x81000002")
    assert counts["first start (keys made)"]["EvictControl"] == 1
    assert counts["start (enrolled)"]["CreatePrimary"] == 0, counts["start (enrolled)"]
    assert counts["stop"]["FlushContext"] == 0  # a persistent SRK stays; nothing to flush
    assert sum(counts["renewal"].values()) <= 12
