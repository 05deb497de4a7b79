"""What the registrar's services share: their parts, refusal auditing, and issuing.

EnrollmentService (first contact) and LifecycleService (renewal,
decommissioning, revocation) both hold the same injected parts: config, CA,
store, audit log, trust store, clock and RNG. Issuing a device certificate
is one code path for both, so every certificate lands in the certificates
table that the CRL is built from.
"""

from __future__ import annotations

import datetime
import logging
import secrets
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.audit import AuditLog
from agent.clock import Clock, utcnow
from agent.enroll.messages import PcrSelection, Platform
from agent.errors import Problem
from agent.pki.ekchain import TrustStore
from agent.registrar.ca import CertificateAuthority, DeviceProfile, ek_hw_serial
from agent.registrar.config import RegistrarConfig
from agent.registrar.dbaudit import DatabaseAuditLog
from agent.registrar.store import IssuedCertificate, Store

log = logging.getLogger("agent.registrar")

MAX_AUDIT_DETAIL = 500
NONCE_BYTES = 32


def platform_json(platform: Platform | None) -> str | None:
    """The device-asserted platform as the device record and the audit log keep it."""
    return None if platform is None else platform.model_dump_json(exclude_none=True)


class RegistrarParts:
    def __init__(self, config: RegistrarConfig, ca: CertificateAuthority, store: Store,
                 audit: AuditLog | DatabaseAuditLog, trust: TrustStore | None = None,
                 clock: Clock = utcnow,
                 random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> None:
        self.config = config
        self.ca = ca
        self.store = store
        self.audit = audit
        self.trust = trust
        self._clock = clock
        self._random = random_bytes

    def _refused(self, event: str, stage: str, p: Problem, peer: str, **fields: Any) -> None:
        self.audit.append(event, stage=stage, problem=p.code,
                          detail=p.message[:MAX_AUDIT_DETAIL], peer=peer, **fields)
        log.info("refused %s from %s: %s: %s", stage, peer, p.code, p.message)

    def _pcr_selection(self) -> PcrSelection:
        return PcrSelection(pcrs=sorted(set(self.config.pcr_policy.pcrs)))

    @staticmethod
    def _profile(ek_certificate_der: bytes, platform: Platform | None) -> DeviceProfile:
        """The certificate profile's extras: the TPM named by its EK certificate (already
        verified), and what the device says about itself."""
        ek = x509.load_der_x509_certificate(ek_certificate_der)
        return DeviceProfile(hw_serial=ek_hw_serial(ek), platform=platform)

    def _new_challenge_id(self) -> str:
        return self._random(16).hex()

    def _issue(self, device_id: str, key: ec.EllipticCurvePublicKey, kind: str,
               now: datetime.datetime,
               profile: DeviceProfile) -> tuple[x509.Certificate, IssuedCertificate]:
        lifetime = datetime.timedelta(seconds=self.config.cert_lifetime)
        cert = self.ca.issue_device(device_id, key, lifetime, now, kind, profile,
                                    self.config.publication())
        record = IssuedCertificate(serial=f"{cert.serial_number:x}", device_id=device_id,
                                   kind=kind, issued_at=now.timestamp(),
                                   not_after=cert.not_valid_after_utc.timestamp())
        return cert, record
