"""What the TPM says about itself (TPM2_GetCapability fixed properties). Pure."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# TPM 2.0 Part 2, 6.13 (TPM_PT): fixed properties, not all exported by tpm2-pytss.
PT_REVISION = 0x102
PT_MANUFACTURER = 0x105
PT_VENDOR_STRINGS = (0x106, 0x107, 0x108, 0x109)
PT_FIRMWARE_VERSION_1 = 0x10B
PT_FIRMWARE_VERSION_2 = 0x10C
PT_HR_TRANSIENT_MIN = 0x10E

# TCG vendor IDs (TCG Vendor ID Registry) for friendlier display.
KNOWN_VENDORS = {
    "AMD": "AMD", "ATML": "Atmel", "BRCM": "Broadcom", "CSCO": "Cisco", "FLYS": "Flyslice",
    "GOOG": "Google", "HPE": "HPE", "HISI": "Huawei", "IBM": "IBM (software TPM)",
    "IFX": "Infineon", "INTC": "Intel", "LEN": "Lenovo", "MSFT": "Microsoft",
    "NSM": "National Semiconductor", "NTZ": "Nationz", "NTC": "Nuvoton", "QCOM": "Qualcomm",
    "ROCC": "Fuzhou Rockchip", "SMSC": "SMSC", "STM": "STMicroelectronics",
    "SMSN": "Samsung", "SNS": "Sinosun", "TXN": "Texas Instruments", "WEC": "Winbond",
}


def _fourcc(value: int) -> str:
    return value.to_bytes(4, "big").replace(b"\x00", b"").decode("ascii", "replace").strip()


@dataclass(frozen=True)
class TpmInfo:
    manufacturer_id: str
    manufacturer: str
    vendor_string: str
    firmware_version: str
    spec_version: str
    max_transient_objects: int

    @classmethod
    def from_properties(cls, props: dict[int, int]) -> TpmInfo:
        mid = _fourcc(props.get(PT_MANUFACTURER, 0))
        raw_vendor = b"".join(props.get(p, 0).to_bytes(4, "big") for p in PT_VENDOR_STRINGS)
        vendor = raw_vendor.replace(b"\x00", b"").decode("ascii", "replace")
        fw1 = props.get(PT_FIRMWARE_VERSION_1, 0)
        fw2 = props.get(PT_FIRMWARE_VERSION_2, 0)
        revision = props.get(PT_REVISION, 0)
        return cls(
            manufacturer_id=mid,
            manufacturer=KNOWN_VENDORS.get(mid, mid or "unknown"),
            vendor_string=" ".join(vendor.split()),
            # Vendors encode major.minor in FIRMWARE_VERSION_1; keep the raw words too.
            firmware_version=f"{fw1 >> 16}.{fw1 & 0xFFFF} (raw 0x{fw1:08x} 0x{fw2:08x})",
            spec_version=f"2.0 rev {revision // 100}.{revision % 100:02d}",
            max_transient_objects=props.get(PT_HR_TRANSIENT_MIN, 0),
        )

    def to_dict(self) -> dict[str, object]:
        return asdict(self)
