"""`devidctl cert show`: the gateway's identity and TLS certificates with their chains. Pure.

Certificates are public: the document carries their PEM so that an engineer can
hand them to `openssl x509` or a relying party. Keys never appear here.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent.enroll.state import StoredEnrollment
from agent.pki.certinfo import summarize


def _subject_alt_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(name.value) for name in san if isinstance(name, x509.UniformResourceIdentifier
                                                          | x509.DNSName)]


def _chain(chain: Sequence[x509.Certificate], now: datetime.datetime) -> dict[str, Any]:
    leaf = chain[0]
    return {**summarize(leaf, now), "subject_alt_names": _subject_alt_names(leaf),
            "chain": [c.subject.rfc4514_string() for c in chain],
            "pem": "".join(c.public_bytes(Encoding.PEM).decode() for c in chain)}


def certificates_document(stored: StoredEnrollment | None, now: datetime.datetime
                          ) -> dict[str, Any]:
    if stored is None:
        return {"enrolled": False, "identity": None, "tls": None,
                "at": now.isoformat(timespec="seconds")}
    return {"enrolled": True, "device_id": stored.device_id, "lifecycle": stored.lifecycle,
            "identity": _chain(stored.chain, now),
            "tls": _chain(stored.tls.chain, now) if stored.tls else None,
            "at": now.isoformat(timespec="seconds")}


def certificates_pem(doc: dict[str, Any]) -> str:
    """The identity chain, then the TLS chain, in PEM; "" when not enrolled."""
    return "".join(str(part["pem"]) for part in (doc.get("identity"), doc.get("tls")) if part)


def without_pem(doc: dict[str, Any]) -> dict[str, Any]:
    """The document with the summaries only (the PEM goes into its own file)."""
    return {key: {k: v for k, v in value.items() if k != "pem"} if isinstance(value, dict)
            else value for key, value in doc.items()}
