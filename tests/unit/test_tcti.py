"""TCTI strings are checked when the configuration loads, and hints fit each TCTI."""

from __future__ import annotations

import pytest

from agent.tpm.tcti import behind_resource_manager, parse_tcti


@pytest.mark.parametrize("text", [
    "device:/dev/tpmrm0", "device:/dev/tpm0", "device:", "swtpm:host=127.0.0.1,port=2321",
    "swtpm:", "swtpm", "mssim:host=localhost", "tabrmd:bus_name=com.intel.tss2.Tabrmd",
    "tabrmd:bus_type=session", "libtpms:/var/lib/x.state",
])
def test_good_tctis_parse(text):
    assert parse_tcti(text).name == text.partition(":")[0]


@pytest.mark.parametrize(("text", "message"), [
    ("usb:/dev/x", "unknown TCTI 'usb'"),
    ("swtpm:host=127.0.0.1,prot=49122", "swtpm: unknown option 'prot' in "
     "'host=127.0.0.1,prot=49122' (known: host, port)"),
    ("swtpm:port=0", "swtpm: port '0' is not a TCP port"),
    ("swtpm:port=http", "swtpm: port 'http' is not a TCP port"),
    ("mssim:host", "mssim: option 'host' needs a value"),
    ("swtpm:port=1,port=2", "swtpm: option 'port' given twice"),
    ("tabrmd:bus_type=bus", "tabrmd: bus_type 'bus' must be one of system, session"),
    ("device:tpmrm0", "device: 'tpmrm0' is not a device path"),
])
def test_bad_tctis_say_what_is_wrong(text, message):
    with pytest.raises(ValueError) as exc:
        parse_tcti(text)
    assert message in str(exc.value)


def test_hints_fit_the_tcti():
    swtpm = parse_tcti("swtpm:host=127.0.0.1,port=49122").unreachable_hint()
    assert "swtpm is running and listening on 127.0.0.1:49122" in swtpm and "tss" not in swtpm
    device = parse_tcti("device:/dev/tpm0").unreachable_hint()
    assert "/dev/tpm0" in device and "tss" in device
    assert "tpm2-abrmd" in parse_tcti("tabrmd:").unreachable_hint()


def test_resource_managers():
    assert behind_resource_manager("device:") and behind_resource_manager("tabrmd")
    assert behind_resource_manager("device:/dev/tpmrm0")
    assert behind_resource_manager("tabrmd:bus_type=system")
    assert not behind_resource_manager("swtpm:host=127.0.0.1,port=2321")
    assert not behind_resource_manager("device:/dev/tpm0")
    assert not behind_resource_manager("nonsense:")
