"""Which handles a dead process leaves that may be flushed, and how full the TPM is."""

from __future__ import annotations

import pytest

from agent.diagnostics.checks import Level, check_tpm
from agent.diagnostics.facts import TpmFacts
from agent.tpm.handles import (
    PT_HR_ACTIVE,
    PT_HR_ACTIVE_AVAIL,
    PT_HR_LOADED,
    PT_HR_LOADED_AVAIL,
    PT_HR_TRANSIENT_AVAIL,
    TpmOccupancy,
    describe_flushed,
    flushable,
)
from agent.tpm.info import TpmInfo

INFO = TpmInfo("IBM", "IBM (software TPM)", "SW TPM", "1.2", "2.0 rev 1.64", 3)


@pytest.mark.parametrize(("handle", "expected"), [
    (0x80000000, True),   # transient object
    (0x80FFFFFF, True),
    (0x02000001, True),   # HMAC session
    (0x03000000, True),   # policy session, listed among the loaded ones
    (0x81000001, False),  # persistent key: never
    (0x01C0000A, False),  # NV index (an EK certificate)
    (0x40000001, False),  # owner hierarchy
])
def test_only_sessions_and_transient_objects_are_flushable(handle, expected):
    assert flushable(handle) is expected


def test_flushed_counts_in_words():
    assert describe_flushed({}) == "nothing"
    assert describe_flushed({"loaded session": 0}) == "nothing"
    assert describe_flushed({"saved session": 1, "loaded session": 3,
                             "transient object": 2}) == \
        "2 transient objects, 3 loaded sessions, 1 saved session"


def _occupancy(loaded=0, loaded_free=3, active=0, active_free=64, transient=1,
               transient_free=2) -> TpmOccupancy:
    props = {PT_HR_LOADED: loaded, PT_HR_LOADED_AVAIL: loaded_free, PT_HR_ACTIVE: active,
             PT_HR_ACTIVE_AVAIL: active_free, PT_HR_TRANSIENT_AVAIL: transient_free}
    return TpmOccupancy.from_properties(props, transient)


def test_occupancy_from_the_tpm_properties():
    occupancy = _occupancy(loaded=2, loaded_free=1, active=5, active_free=59)
    assert (occupancy.loaded_sessions, occupancy.saved_sessions) == (2, 3)  # active = both
    assert occupancy.describe() == ("2 sessions loaded (1 free), 3 saved (59 free), "
                                    "1 transient object (2 free)")
    assert occupancy.shortages() == []
    assert occupancy.to_dict()["sessions_free"] == 59
    assert TpmOccupancy.from_properties({}, 0).saved_sessions == 0  # properties missing


def test_shortages_say_what_the_next_operation_would_lack():
    assert _occupancy(loaded=3, loaded_free=0, active=3).shortages() == [
        "no room for another loaded session (3 loaded)"]
    assert _occupancy(loaded=1, active=64, active_free=0).shortages() == [
        "no room for another session (1 loaded, 63 saved)"]
    assert _occupancy(transient=2, transient_free=1).shortages() == [
        "room for 1 more transient object (2 loaded), the agent needs 2"]


def test_check_tpm_reports_the_counts_and_warns_near_the_limits():
    ok = check_tpm(TpmFacts("swtpm:port=1", info=INFO, occupancy=_occupancy()))
    assert ok.level == Level.PASS
    assert ok.summary.endswith("in use: 0 sessions loaded (3 free), 0 saved (64 free), "
                               "1 transient object (2 free)")
    full = _occupancy(loaded=3, loaded_free=0, active=3)
    direct = check_tpm(TpmFacts("device:/dev/tpm0", info=INFO, occupancy=full))
    assert direct.level == Level.WARN
    assert "no room for another loaded session" in direct.summary
    assert "restart devid-agent" in direct.hint
    managed = check_tpm(TpmFacts("device:/dev/tpmrm0", info=INFO, occupancy=full))
    assert "another program" in managed.hint and "lsof /dev/tpmrm0" in managed.hint
    unknown = check_tpm(TpmFacts("swtpm:port=1", info=INFO))
    assert unknown.level == Level.PASS and "in use" not in unknown.summary
