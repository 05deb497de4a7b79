"""Sessions and objects a killed agent leaves in a TPM without a resource manager (swtpm,
/dev/tpm0) are flushed at the next start, whatever their handle range; `devidctl check`
shows how full the TPM is.

swtpm has 3 loaded-session slots: an agent killed inside a policy session more often than
that used to leave the TPM answering "out of memory for session contexts" for good."""

from __future__ import annotations

from stack import enrollment_toml, rotation_toml
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_SE
from tpm2_pytss.types import TPMT_SYM_DEF

from agent.tpm.handles import STALE_HANDLE_LISTS

KILLS = 4  # one more than swtpm's loaded-session slots
SIGKILL_EXIT = -9


def _esapi(tcti: str) -> ESAPI:
    return ESAPI(tcti)


def _left_in_tpm(tcti: str) -> dict[str, list[int]]:
    """Handles in the TPM by list (a fresh connection: only what others left)."""
    left: dict[str, list[int]] = {}
    with _esapi(tcti) as tpm:
        for kind, first in STALE_HANDLE_LISTS:
            _, data = tpm.get_capability(TPM2_CAP.HANDLES, first, 64)  # keep `data` alive
            left[kind] = [int(h) for h in data.data.handles]
    return left


def _kill_inside(agent_factory, tpm, extra: str, point: str, times: int) -> None:
    for _ in range(times):
        agent = agent_factory(tpm, extra=extra, wait=False,
                              env={"DEVID_FAILPOINTS": point})
        assert agent.proc.wait(timeout=60) == SIGKILL_EXIT, agent.log_path.read_text()
        assert f"failpoint {point}: SIGKILL" in agent.log_path.read_text()


def test_sessions_of_killed_agents_are_flushed_and_counted(tpm, registrar_factory,
                                                          agent_factory):
    registrar = registrar_factory([tpm.vendor_ca], settings={"renewal_window": '"0s"'})
    token = registrar.token()
    assert token
    extra = enrollment_toml(registrar, token) + rotation_toml()

    # Killed inside credential activation (a policy session, the EK and the AK loaded).
    _kill_inside(agent_factory, tpm, extra, "custody.activate_credential.session", KILLS)
    left = _left_in_tpm(tpm.tcti)
    assert left["loaded session"], left  # the bug's precondition: the TPM kept them

    agent = agent_factory(tpm, extra=extra)
    generation = agent.wait_enrollment("enrolled", timeout=60)["rotation"]["generation"]
    log = agent.log_path.read_text()
    assert "loaded session" in log and "left in the TPM by a process that did not exit " \
        "cleanly" in log, log
    agent.stop()

    # Killed inside unsealing the TLS key at start (a policy session and the sealed item).
    _kill_inside(agent_factory, tpm, extra, "custody.unseal.session", KILLS)
    agent = agent_factory(tpm, extra=extra)
    status = agent.wait_status("TLS credentials presented", lambda doc: bool(
        (doc.get("tls_certificate") or {}).get("presented")), timeout=60)
    # Unsealed, not replaced by a renewal: the sealed key came back.
    assert status["rotation"]["restore_error"] is None, status
    assert status["rotation"]["generation"] == generation, status
    assert "key-restore-failed" not in agent.log_path.read_text()
    code, renewed = agent.ctl_json("renew", "--wait")
    assert code == 0 and renewed["outcome"]["result"] == "renewed", renewed

    # The check counts what is in the TPM: the agent's own storage key, nothing else.
    code, check = agent.ctl_json("check")
    assert code in (0, 1), check
    resources = check["tpm_resources"]
    assert resources["loaded_sessions"] == 0 and resources["saved_sessions"] == 0, resources
    assert resources["transient_objects"] == 1, resources  # the SRK the agent keeps loaded
    tpm_line = next(r for r in check["results"] if r["name"] == "tpm")
    assert tpm_line["level"] == "pass" and "0 sessions loaded" in tpm_line["summary"]
    agent.stop()
    assert _left_in_tpm(tpm.tcti) == {kind: [] for kind, _ in STALE_HANDLE_LISTS}


def test_check_warns_when_the_tpm_has_no_session_slot_left(tpm, agent_factory):
    # Another client (not behind a resource manager) fills the loaded-session slots and
    # goes away without flushing; the running agent's check says so and what to do.
    agent = agent_factory(tpm)
    agent.stop()
    with _esapi(tpm.tcti) as other:
        sym = TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL)
        for _ in range(3):
            other.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.HMAC, sym,
                                     TPM2_ALG.SHA256)
    code, check = agent.ctl_json("check")  # daemon down: the check runs locally
    assert code == 2, check  # FAIL: the daemon is not running
    tpm_line = next(r for r in check["results"] if r["name"] == "tpm")
    assert tpm_line["level"] == "warn", tpm_line
    assert "no room for another loaded session (3 loaded)" in tpm_line["summary"], tpm_line
    assert "restart devid-agent" in tpm_line["hint"], tpm_line
    assert check["tpm_resources"]["loaded_sessions"] == 3
    # And the agent's next start clears them.
    agent.start()
    code, check = agent.ctl_json("check")
    assert code in (0, 1), check  # 1: the clock is not NTP-synchronised here
    assert check["tpm_resources"]["loaded_sessions"] == 0, check
