"""TPM custody against real swtpm instances (no resource manager: the strictest case)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import struct
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key
from tpm2_pytss.constants import TPM2_CAP, TPM2_HT
from tpm2_pytss.types import TPMS_ATTEST

from agent.diagnostics.facts import endorsement_facts
from agent.errors import KeyBlobMismatch, PcrPolicyMismatch, TpmUnreachable
from agent.pki.ekchain import load_trust_store
from agent.secret import SecretBytes
from agent.tpm.custody import TpmCustody

TPM_GENERATED = 0xFF544347


@pytest.fixture
def custody(tpm, tmp_path):
    with TpmCustody.open(tpm.tcti, tmp_path / "state") as c:
        yield c


def test_ek_certificate_chains_to_vendor_root_through_nv_intermediate(tpm, custody):
    trust = load_trust_store([tpm.vendor_ca])  # the root only: the intermediate is in NV
    eks = endorsement_facts(custody, trust)
    assert {ek.kind for ek in eks} == {"EK-HIGH-ECC384", "EK-RSA2048"}
    for ek in eks:
        assert ek.verdict.verified, ek.verdict.reason
        assert len(ek.verdict.chain) == 3


def test_ek_from_untrusted_vendor_is_reported_unverified(tpm_factory, tmp_path):
    ours, other = tpm_factory(), tpm_factory()
    with TpmCustody.open(ours.tcti, tmp_path / "state") as c:
        eks = endorsement_facts(c, load_trust_store([other.vendor_ca]))
    assert eks and not any(ek.verdict.verified for ek in eks)
    assert "does not chain to a trusted TPM vendor root" in eks[0].verdict.reason


def test_sign_produces_ecdsa_signature_verifiable_with_identity_key(custody):
    key = load_der_public_key(custody.identity_key().public_key_der)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    sig = custody.sign(b"message from the gateway")
    key.verify(sig.der, b"message from the gateway", ec.ECDSA(hashes.SHA256()))


def test_identity_key_is_resident_and_ak_restricted(custody):
    ident = custody.identity_key()
    assert ident.resident
    ak = custody.attestation_key()
    assert ak.resident
    from tpm2_pytss.constants import TPMA_OBJECT
    assert ak.public.publicArea.objectAttributes & TPMA_OBJECT.RESTRICTED
    assert not ident.public.publicArea.objectAttributes & TPMA_OBJECT.RESTRICTED


def test_quote_and_certify_carry_nonce_and_verify_with_ak(custody):
    ak = load_der_public_key(custody.attestation_key().public_key_der)
    nonce = os.urandom(32)
    for att in (custody.quote(nonce, [0, 16]), custody.certify_identity(nonce)):
        parsed, _ = TPMS_ATTEST.unmarshal(att.attest)
        assert parsed.magic == TPM_GENERATED
        assert bytes(parsed.extraData) == nonce
        ak.verify(att.signature.der, att.attest, ec.ECDSA(hashes.SHA256()))
    certified, _ = TPMS_ATTEST.unmarshal(custody.certify_identity(nonce).attest)
    assert bytes(certified.attested.certify.name) == custody.identity_key().name


def test_seal_unseal_roundtrip(custody):
    secret = SecretBytes(os.urandom(32))
    blob = custody.seal(secret, [16])
    assert custody.unseal(blob) == secret
    assert "secret" in repr(custody.unseal(blob)) and secret.reveal().hex() not in repr(secret)


def test_unseal_refused_after_pcr_extend(custody):
    blob = custody.seal(SecretBytes(b"operational secret"), [16, 23])
    custody.extend_pcr(23, b"platform state changed")
    with pytest.raises(PcrPolicyMismatch) as exc:
        custody.unseal(blob)
    assert "sha256:23" in exc.value.message and "sha256:16" not in exc.value.message
    assert exc.value.hint


def test_restart_reuses_the_same_keys(tpm, tmp_path):
    state = tmp_path / "state"
    with TpmCustody.open(tpm.tcti, state) as first:
        ident, ak = first.identity_key().name, first.attestation_key().name
        blob = first.seal(SecretBytes(b"kept across restarts"), [16])
    with TpmCustody.open(tpm.tcti, state) as second:
        assert second.identity_key().name == ident
        assert second.attestation_key().name == ak
        assert second.unseal(blob).reveal() == b"kept across restarts"
    for f in (state / "tpm").iterdir():
        assert f.stat().st_mode & 0o777 == 0o600, f


def _transient_handles(custody: TpmCustody) -> list[int]:
    _, data = custody._esapi.get_capability(TPM2_CAP.HANDLES, TPM2_HT.TRANSIENT << 24, 64)
    return list(data.data.handles)


def test_thousand_signs_on_bare_swtpm_leak_no_handles(custody):
    before = _transient_handles(custody)
    assert len(before) == 1  # only the SRK stays loaded
    for i in range(1000):
        custody.sign(i.to_bytes(4, "big"))
    custody.seal(SecretBytes(b"x"), [16])
    custody.quote(b"n", [0])
    custody.certify_identity(b"n")
    assert _transient_handles(custody) == before
    _, sessions = custody._esapi.get_capability(TPM2_CAP.HANDLES, TPM2_HT.LOADED_SESSION << 24, 64)
    assert list(sessions.data.handles) == []


def test_state_from_another_tpm_is_refused(tpm_factory, tmp_path):
    a, b = tpm_factory(), tpm_factory()
    with TpmCustody.open(a.tcti, tmp_path / "a"):
        pass
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    with pytest.raises(KeyBlobMismatch) as exc:
        TpmCustody.open(b.tcti, tmp_path / "b")
    assert "re-provisioned" in exc.value.hint


def test_unreachable_tpm_is_a_typed_error_with_hint(tpm, tmp_path):
    tcti = tpm.tcti
    tpm.stop()
    with pytest.raises(TpmUnreachable) as exc:
        TpmCustody.open(tcti, tmp_path / "state")
    # The hint fits the TCTI: swtpm and its port, not /dev/tpmrm0 and group tss.
    port = tcti.rsplit("=", 1)[1]
    assert "swtpm is running" in exc.value.hint and port in exc.value.hint
    assert "/dev/tpmrm0" not in exc.value.hint and "tss" not in exc.value.hint


# --- a bus sniffer sees nothing ------------------------------------------------


class _RecordingProxy:
    """Loopback TCP proxy for swtpm's command and control ports, recording all bytes."""

    def __init__(self, upstream_port: int) -> None:
        self.captured = bytearray()
        self.listeners = []
        self._lock = threading.Lock()
        for attempt in range(50):
            port = 30000 + (os.getpid() * 7 + attempt * 2) % 30000 // 2 * 2
            try:
                pair = [self._listen(port), self._listen(port + 1)]
            except OSError:
                continue
            self.port = port
            self.listeners = pair
            break
        else:
            raise RuntimeError("no free port pair for the proxy")
        for i, lst in enumerate(self.listeners):
            threading.Thread(target=self._accept, args=(lst, upstream_port + i),
                             daemon=True).start()

    @staticmethod
    def _listen(port: int) -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        return s

    def _accept(self, lst: socket.socket, upstream: int) -> None:
        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", upstream))
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
                return
            with self._lock:
                self.captured += data
            dst.sendall(data)

    def close(self) -> None:
        for s in self.listeners:
            s.close()


def test_seal_and_unseal_traffic_is_encrypted_on_the_bus(tpm, tmp_path):
    upstream = int(tpm.tcti.rsplit("=", 1)[1])
    proxy = _RecordingProxy(upstream)
    secret = b"TOP-SECRET-" + os.urandom(16).hex().encode()
    try:
        with TpmCustody.open(f"swtpm:host=127.0.0.1,port={proxy.port}", tmp_path / "s") as c:
            blob = c.seal(SecretBytes(secret), [16])
            assert c.unseal(blob).reveal() == secret
    finally:
        proxy.close()
    assert len(proxy.captured) > 1000  # the traffic really went through the proxy
    assert secret not in proxy.captured
    assert hashlib.sha256(secret).digest() not in proxy.captured
    assert struct.pack(">H", len(secret)) + secret[:8] not in proxy.captured


def test_sealed_blob_on_disk_does_not_contain_the_secret(custody, tmp_path):
    secret = b"on-disk-secret-" + os.urandom(8).hex().encode()
    blob = custody.seal(SecretBytes(secret), [16])
    path = Path(tmp_path / "sealed.json")
    path.write_bytes(blob.to_json())
    assert secret not in path.read_bytes()


def test_garbage_credentials_are_refused_without_leaking_handles(custody):
    from tpm2_pytss.types import TPM2B_NAME
    from tpm2_pytss.utils import make_credential

    from agent.errors import ProtocolError, TpmError

    ek = custody.endorsement_keys(1)[0]
    ak = custody.attestation_key()
    blob, secret = (bytes(x.marshal()) for x in make_credential(ek.public, b"S" * 32,
                                                                  TPM2B_NAME(ak.name)))
    before = _transient_handles(custody)
    for bad_blob, bad_secret, error in (
        (blob[:-3], secret, ProtocolError),  # truncated TPM2B_ID_OBJECT
        (blob, secret + b"\0", ProtocolError),  # trailing bytes
        (b"\xff" * 10, secret, ProtocolError),  # garbage
        (blob[:10] + bytes([blob[10] ^ 1]) + blob[11:], secret, TpmError),  # HMAC fails
    ):
        with pytest.raises(error):
            custody.activate_credential(ek, bad_blob, bad_secret)
    assert _transient_handles(custody) == before
    assert custody.activate_credential(ek, blob, secret).reveal() == b"S" * 32
