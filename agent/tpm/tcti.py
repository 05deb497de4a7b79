"""TCTI strings: checked when the configuration loads, and hints that fit them. Pure.

tpm2-tss reads the text after the colon only when it connects, and a typo there
("swtpm:host=127.0.0.1,prot=2321") made the daemon retry forever instead of
refusing the configuration. Here each TCTI's options are known:

    device:PATH                      a TPM character device (default /dev/tpmrm0)
    swtpm:host=H,port=P              swtpm's TCP server (default localhost:2321)
    mssim:host=H,port=P              the Microsoft simulator's (same options)
    tabrmd:bus_name=N,bus_type=T     the tpm2-abrmd resource manager over D-Bus
    libtpms:STATEFILE                libtpms in-process
"""

from __future__ import annotations

from dataclasses import dataclass

KNOWN_TCTIS = ("device", "swtpm", "mssim", "tabrmd", "libtpms")
_OPTIONS = {"swtpm": ("host", "port"), "mssim": ("host", "port"),
            "tabrmd": ("bus_name", "bus_type")}
_BUS_TYPES = ("system", "session")


@dataclass(frozen=True)
class Tcti:
    name: str
    conf: str
    options: dict[str, str]

    @property
    def device(self) -> str:
        return self.conf or "/dev/tpmrm0"

    @property
    def resource_managed(self) -> bool:
        """Whether a resource manager flushes a dead client's handles."""
        return (self.name == "device" and self.device.startswith("/dev/tpmrm")) or \
            self.name == "tabrmd"

    def unreachable_hint(self) -> str:
        """What to check when this TCTI cannot reach the TPM."""
        if self.name == "device":
            return (f"check that {self.device} exists (TPM enabled in firmware, a tpm_tis or "
                    f"tpm_crb driver: `dmesg | grep -i tpm`) and that the agent's user may "
                    f"open it (`ls -l {self.device}`; usually group tss)")
        if self.name in ("swtpm", "mssim"):
            where = f"{self.options.get('host', 'localhost')}:{self.options.get('port', '2321')}"
            return (f"check that {self.name} is running and listening on {where} "
                    f"(the TCTI's port is the TPM command port, not the control port)")
        if self.name == "tabrmd":
            return ("check that tpm2-abrmd is running (`systemctl status tpm2-abrmd`) and "
                    "that the agent may use its D-Bus name")
        return "check the libtpms state file and that libtss2-tcti-libtpms is installed"


def parse_tcti(text: str) -> Tcti:
    """The TCTI in `text`; ValueError saying what is wrong and where."""
    name, _, conf = text.partition(":")
    if name not in KNOWN_TCTIS:
        raise ValueError(f"unknown TCTI {name!r}; use one of {', '.join(KNOWN_TCTIS)} "
                         "(e.g. 'device:/dev/tpmrm0' or 'swtpm:host=127.0.0.1,port=2321')")
    if name == "device":
        if conf and not conf.startswith("/dev/"):
            raise ValueError(f"device: {conf!r} is not a device path (e.g. /dev/tpmrm0)")
        return Tcti(name, conf, {})
    if name == "libtpms":
        return Tcti(name, conf, {})
    known = _OPTIONS[name]
    options: dict[str, str] = {}
    for item in filter(None, conf.split(",")):
        key, eq, value = item.partition("=")
        if key not in known:
            raise ValueError(f"{name}: unknown option {key!r} in {conf!r} "
                             f"(known: {', '.join(known)})")
        if not eq or not value:
            raise ValueError(f"{name}: option {key!r} needs a value ({key}=...)")
        if key in options:
            raise ValueError(f"{name}: option {key!r} given twice")
        options[key] = value
    port = options.get("port")
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{name}: port {port!r} is not a TCP port (1-65535)")
    bus_type = options.get("bus_type")
    if bus_type is not None and bus_type not in _BUS_TYPES:
        raise ValueError(f"{name}: bus_type {bus_type!r} must be one of {', '.join(_BUS_TYPES)}")
    return Tcti(name, conf, options)


def behind_resource_manager(text: str) -> bool:
    """Whether a resource manager flushes a dead client's handles for us (False for a
    TCTI string that does not parse: nothing can be assumed of it)."""
    try:
        return parse_tcti(text).resource_managed
    except ValueError:
        return False
