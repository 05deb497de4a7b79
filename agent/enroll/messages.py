"""The enrollment messages: schemas, encoding and strict decoding. Pure.

Binary fields are standard base64 (with padding); anything else in them is
refused, never skipped. Decoding failures become a `malformed-request`
problem naming the field, e.g. `ak_public: not valid base64`. The same models
produce the JSON Schemas in docs/openapi.json.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    WithJsonSchema,
)

from agent.codec import ErrorFactory, b64encode, decode_json_object, format_location
from agent.enroll.problems import problem
from agent.errors import Problem

API_PREFIX = "/v1"
# Bytes after decoding; TPM structures and certificates are far smaller. A multiple of 3,
# so that the schema's maxLength of base64 says exactly the same (no padding slack).
MAX_BINARY = 12288
assert MAX_BINARY % 3 == 0
MAX_CHAIN = 8
MAX_BODY = 64 * 1024


def _malformed(message: str) -> Problem:
    return problem("malformed-request", message)


def _decode_b64(value: object) -> bytes:
    # From JSON a binary field is always a str; bytes come from code building a message.
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not valid base64") from None
    else:
        raise ValueError(f"expected a base64 string, got {type(value).__name__}")
    if not data:
        raise ValueError("must not be empty")
    if len(data) > MAX_BINARY:
        raise ValueError(f"longer than {MAX_BINARY} bytes")
    return data


Binary = Annotated[
    bytes,
    BeforeValidator(_decode_b64),
    PlainSerializer(b64encode, return_type=str),
    # What _decode_b64 takes, said in the schema too (schemathesis checks that the two
    # agree): padded standard base64 of at least one byte.
    WithJsonSchema({"type": "string", "contentEncoding": "base64", "minLength": 4,
                    "maxLength": MAX_BINARY // 3 * 4,
                    "pattern": "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|"
                               "[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)$"}),
]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# What a device says about itself (its DMI data or agent.toml), in the spirit of a UDI
# pair: DI = manufacturer and model, PI = serial number and firmware version. Printable
# text only; the registrar records it as device-asserted and puts it in the certificate.
PlatformText = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\x20-\x7e]+$")]


class Platform(_Message):
    manufacturer: PlatformText | None = None
    model: PlatformText | None = None
    serial: PlatformText | None = None
    version: PlatformText | None = Field(default=None, description="firmware version")

    def signed_bytes(self) -> bytes:
        """The platform as the identity key signs it in a renewal: fields in a fixed order,
        each length-prefixed (an absent field is empty)."""
        out = bytearray()
        for value in (self.manufacturer, self.model, self.serial, self.version):
            raw = (value or "").encode("ascii")
            out += len(raw).to_bytes(2, "big") + raw
        return bytes(out)


class StartRequest(_Message):
    """Round trip 1, agent to registrar: who I am (EK) and which key will attest (AK)."""

    ek_certificate: Binary = Field(description="EK certificate, DER")
    ek_chain: list[Binary] = Field(default_factory=list, max_length=MAX_CHAIN,
                                   description="intermediate CA certificates from the TPM's "
                                               "EK-chain NV indices, DER")
    ek_public: Binary = Field(description="EK public area, marshalled TPM2B_PUBLIC")
    ak_public: Binary = Field(description="AK public area, marshalled TPM2B_PUBLIC")
    token: Annotated[str, Field(min_length=16, max_length=256)] | None = Field(
        default=None, description="one-time enrollment token, when the registrar requires one")


class PcrSelection(_Message):
    bank: Literal["sha256"] = "sha256"
    pcrs: list[Annotated[int, Field(ge=0, le=23)]] = Field(max_length=24)


class Challenge(_Message):
    """Round trip 1, registrar to agent: a credential only this TPM can activate, and a nonce."""

    challenge_id: str = Field(max_length=64)
    device_id: str = Field(max_length=128, description="stable ID derived from the EK")
    credential_blob: Binary = Field(description="TPM2B_ID_OBJECT from MakeCredential")
    encrypted_secret: Binary = Field(description="TPM2B_ENCRYPTED_SECRET from MakeCredential")
    nonce: Binary = Field(description="fresh single-use nonce for quote and certify")
    expires_at: str = Field(max_length=40, description="RFC 3339 time after which the "
                                                       "challenge is refused")
    pcr_selection: PcrSelection


class Evidence(_Message):
    attest: Binary = Field(description="marshalled TPMS_ATTEST, as signed")
    signature: Binary = Field(description="marshalled TPMT_SIGNATURE by the AK")


class CompleteRequest(_Message):
    """Round trip 2, agent to registrar: the proofs, and a CSR signed inside the TPM."""

    proof: Binary = Field(description="HMAC-SHA256 keyed with the activated secret "
                                      "(see docs/protocol.md)")
    quote: Evidence
    pcr_values: list[Binary] = Field(max_length=24, description="sha256 values of the selected "
                                                                "PCRs, ascending PCR order")
    certify: Evidence
    identity_public: Binary = Field(description="identity key public area, TPM2B_PUBLIC")
    csr: Binary = Field(description="PKCS#10 request, DER, signed by the identity key")
    platform: Platform | None = Field(default=None, description="the device's own word on "
                                      "its make, model, serial and firmware (device-asserted)")


class Issued(_Message):
    """Round trip 2, registrar to agent: the identity certificate."""

    device_id: str = Field(max_length=128)
    certificate_chain: str = Field(max_length=64 * 1024,
                                   description="PEM: the device certificate, then the issuing "
                                               "CA certificate")
    serial: str = Field(max_length=64, description="certificate serial number, hex")
    not_after: str = Field(max_length=40)


# --- an enrolled device's signed requests: renewal and decommissioning -------------------

DEVICE_ID_FIELD = Field(min_length=1, max_length=128, description="the device ID from "
                                                                   "enrollment")
Purpose = Literal["renew", "decommission"]


class DeviceChallengeRequest(_Message):
    """Ask for a nonce to sign a renewal or decommissioning request with."""

    device_id: str = DEVICE_ID_FIELD
    purpose: Purpose


class DeviceChallenge(_Message):
    challenge_id: str = Field(max_length=64)
    device_id: str = Field(max_length=128)
    purpose: Purpose
    nonce: Binary = Field(description="fresh single-use nonce: quote qualifying data and "
                                      "part of the signed request")
    expires_at: str = Field(max_length=40)
    pcr_selection: PcrSelection


class RenewRequest(_Message):
    """A re-attested renewal: a fresh quote, a CSR for a new TLS key, signed by the
    identity key (see docs/protocol.md for the signing input)."""

    ak_public: Binary = Field(description="the AK public area from enrollment, TPM2B_PUBLIC")
    quote: Evidence
    pcr_values: list[Binary] = Field(max_length=24)
    tls_csr: Binary = Field(description="PKCS#10 request for the new TLS key, DER")
    signature: Binary = Field(description="ECDSA-SHA256 by the identity key, DER")
    platform: Platform | None = Field(default=None, description="as at enrollment, now "
                                      "(firmware changes); covered by the signature")


class Renewed(_Message):
    device_id: str = Field(max_length=128)
    identity_chain: str = Field(max_length=64 * 1024, description="PEM: the renewed identity "
                                                                  "certificate, issuing CA")
    tls_chain: str = Field(max_length=64 * 1024, description="PEM: the TLS certificate, "
                                                             "issuing CA")
    identity_serial: str = Field(max_length=64)
    tls_serial: str = Field(max_length=64)
    not_after: str = Field(max_length=40)


class DecommissionRequest(_Message):
    signature: Binary = Field(description="ECDSA-SHA256 by the identity key, DER")


class Decommissioned(_Message):
    device_id: str = Field(max_length=128)
    status: Literal["decommissioned"] = "decommissioned"
    revoked_serials: list[str] = Field(default_factory=list, max_length=1024)


M = TypeVar("M", bound=_Message)


def describe_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "required field missing"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{format_location(err['loc']) or 'body'}: {msg}")
    return "; ".join(parts)


def decode(model: type[M], body: bytes, error: ErrorFactory = _malformed) -> M:
    """Parse a message body, or raise (by default a malformed-request Problem) saying what
    and where. The agent passes ProtocolError for the registrar's responses."""
    if len(body) > MAX_BODY:
        raise problem("body-too-large", f"body is {len(body)} bytes; the limit is {MAX_BODY}")
    doc = decode_json_object(body, "body", error)
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        raise error(describe_validation_error(e)) from None


def encode(message: _Message) -> dict[str, Any]:
    return message.model_dump(mode="json", exclude_none=True)
