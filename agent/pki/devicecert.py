"""Checking a device certificate chain the registrar returned. Pure.

Used after enrollment (identity certificate) and after every renewal
(identity and TLS certificates): the chain parses, the leaf names the device
in its SAN, certifies the key we expect, and chains to the pinned registrar
CA at a time the local clock can vouch for (tolerating `skew` seconds of lag).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509 import verification as v

from agent.errors import ProtocolError
from agent.pki.certinfo import is_validity_error, plain_verification_error, spki_der


@dataclass(frozen=True)
class Validity:
    not_before: datetime.datetime
    not_after: datetime.datetime

    @property
    def lifetime(self) -> datetime.timedelta:
        return self.not_after - self.not_before

    def remaining(self, now: datetime.datetime) -> datetime.timedelta:
        return self.not_after - now


def verification_time(validity: Validity, now: datetime.datetime,
                      skew: float) -> datetime.datetime | None:
    """The time to verify a just-issued certificate at: now, or notBefore when the
    local clock lags by no more than `skew`. None when it lags by more."""
    if now >= validity.not_before:
        return now
    if validity.not_before - now <= datetime.timedelta(seconds=skew):
        return validity.not_before
    return None


def validity_of(cert: x509.Certificate) -> Validity:
    return Validity(cert.not_valid_before_utc, cert.not_valid_after_utc)


def parse_chain(pem: str, what: str) -> tuple[x509.Certificate, ...]:
    try:
        chain = tuple(x509.load_pem_x509_certificates(pem.encode()))
    except ValueError:
        raise ProtocolError(f"the issued {what} chain is not PEM certificates") from None
    return chain


def device_ids(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def check_device_chain(chain: Sequence[x509.Certificate], what: str, device_id: str,
                       public_der: bytes, pinned_ca: Sequence[x509.Certificate],
                       now: datetime.datetime, skew: float = 0.0) -> None:
    leaf = chain[0]
    if spki_der(leaf) != public_der:
        raise ProtocolError(f"the issued {what} certificate is not for the expected key")
    if device_id not in device_ids(leaf):
        raise ProtocolError(f"the issued {what} certificate does not name {device_id} in "
                            "its SAN")
    at = verification_time(validity_of(leaf), now, skew)
    if at is None:
        lag = (leaf.not_valid_before_utc - now).total_seconds()
        raise ProtocolError(
            f"the issued {what} certificate is not valid until "
            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%SZ}: the local clock is {lag:.0f}s "
            f"behind the registrar's, more than the tolerated {skew:.0f}s",
            "fix the gateway's time synchronization (NTP); the certificate is kept")
    verify_chain(chain, pinned_ca, what, at)


def verify_chain(chain: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate],
                 what: str, now: datetime.datetime) -> None:
    """The chain verifies to the pinned registrar CA (RFC 5280, clientAuth)."""
    verifier = (v.PolicyBuilder().store(v.Store(list(anchors))).time(now)
                .build_client_verifier())
    try:
        verifier.verify(chain[0], list(chain[1:]))
    except v.VerificationError as e:
        if is_validity_error(e):
            raise ProtocolError(
                f"the issued {what} certificate is not valid at {now:%Y-%m-%d %H:%M:%SZ} "
                f"({plain_verification_error(e)}): this gateway's clock is probably wrong",
                "fix the gateway's time synchronization (NTP), then `devidctl check`") \
                from None
        raise ProtocolError(f"the issued {what} certificate does not chain to the pinned "
                            f"registrar CA: {plain_verification_error(e)}") from None
