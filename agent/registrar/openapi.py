"""The OpenAPI 3.1 description of the registrar's HTTP API, generated from the code.

Schemas come from the pydantic message models and the problem catalogue, so
the document cannot drift from what the registrar accepts. docs/openapi.json
is this module's output; a unit test keeps them equal:

    python -m agent.registrar.openapi > docs/openapi.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic.json_schema import models_json_schema

from agent import __version__
from agent.enroll.messages import (
    API_PREFIX,
    Challenge,
    CompleteRequest,
    Decommissioned,
    DecommissionRequest,
    DeviceChallenge,
    DeviceChallengeRequest,
    Issued,
    Renewed,
    RenewRequest,
    StartRequest,
)
from agent.enroll.problems import PROBLEM_CONTENT_TYPE, PROBLEM_TYPES, PROBLEM_URN_PREFIX
from agent.registrar.config import CA_ISSUERS_PATH, CRL_PATH


def _problem_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "RFC 9457 problem details; `type` is stable per failure.",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string",
                     "enum": [PROBLEM_URN_PREFIX + code for code in PROBLEM_TYPES]},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string", "description": "what exactly was wrong, and where"},
            "hint": {"type": "string", "description": "what the engineer can do"},
            "instance": {"type": "string"},
        },
    }


def _problems(*codes: str) -> dict[str, Any]:
    by_status: dict[int, list[str]] = {}
    for code in codes:
        by_status.setdefault(PROBLEM_TYPES[code].status, []).append(code)
    return {
        str(status): {
            "description": ", ".join(names),
            "content": {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for status, names in sorted(by_status.items())
    }


def _json_body(name: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}


# Every POST: registrar-busy is also the answer beyond max_in_flight.
COMMON = ("malformed-request", "unsupported-media-type", "body-too-large", "internal-error",
          "registrar-busy")
DEVICE_REQUEST = ("challenge-unknown", "challenge-expired", "challenge-used", "device-unknown",
                  "device-revoked", "device-decommissioned", "request-signature-invalid")
CHALLENGE_PARAMETER = {"name": "challenge_id", "in": "path", "required": True,
                       "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}


def build() -> dict[str, Any]:
    _, defs = models_json_schema(
        [(m, "validation") for m in (StartRequest, Challenge, CompleteRequest, Issued,
                                     DeviceChallengeRequest, DeviceChallenge, RenewRequest,
                                     Renewed, DecommissionRequest, Decommissioned)],
        ref_template="#/components/schemas/{model}")
    schemas = {**defs["$defs"], "Problem": _problem_schema()}
    return {
        "openapi": "3.1.0",
        "info": {"title": "devid-registrar API", "version": __version__,
                 "description": "Attestation-backed enrollment, re-attested renewal, "
                                "decommissioning and the CRL of devid-agent gateways. "
                                "See docs/protocol.md for the protocol and the checks."},
        "paths": {
            f"{API_PREFIX}/health": {"get": {
                "summary": "Liveness; also used by `devidctl check` to test TLS pinning",
                "responses": {"200": {"description": "serving", "content": {
                    "application/json": {"schema": {"type": "object"}}}}}}},
            f"{API_PREFIX}/enrollments": {"post": {
                "summary": "Round trip 1: present the EK and AK, receive a challenge",
                "requestBody": {"required": True, **_json_body("StartRequest")},
                "responses": {
                    "201": {"description": "challenge issued", **_json_body("Challenge")},
                    **_problems(*COMMON, "token-required", "token-invalid", "token-used",
                                "ek-untrusted", "ek-mismatch", "ak-invalid", "device-revoked"),
                }}},
            f"{API_PREFIX}/enrollments/{{challenge_id}}/complete": {"post": {
                "summary": "Round trip 2: prove activation, quote, certify; receive the "
                           "certificate",
                "parameters": [{"name": "challenge_id", "in": "path", "required": True,
                                "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}],
                "requestBody": {"required": True, **_json_body("CompleteRequest")},
                "responses": {
                    "200": {"description": "certificate issued", **_json_body("Issued")},
                    **_problems(*COMMON, "challenge-unknown", "challenge-expired",
                                "challenge-used", "activation-failed", "nonce-mismatch",
                                "evidence-invalid", "signature-invalid",
                                "pcr-policy-violation", "identity-key-invalid",
                                "csr-key-mismatch", "csr-invalid", "token-used",
                                "device-revoked"),
                }}},
            f"{API_PREFIX}/challenges": {"post": {
                "summary": "An enrolled device asks for a nonce to sign a renewal or "
                           "decommissioning request with",
                "requestBody": {"required": True, **_json_body("DeviceChallengeRequest")},
                "responses": {
                    "201": {"description": "nonce issued", **_json_body("DeviceChallenge")},
                    **_problems(*COMMON, "device-unknown", "device-revoked",
                                "device-decommissioned"),
                }}},
            f"{API_PREFIX}/challenges/{{challenge_id}}/renew": {"post": {
                "summary": "Re-attested renewal: fresh quote, CSR for a new TLS key, signed "
                           "by the identity key; receive both certificates",
                "parameters": [CHALLENGE_PARAMETER],
                "requestBody": {"required": True, **_json_body("RenewRequest")},
                "responses": {
                    "200": {"description": "identity and TLS certificates issued",
                            **_json_body("Renewed")},
                    **_problems(*COMMON, *DEVICE_REQUEST, "renewal-too-early", "ak-invalid",
                                "ak-unknown", "nonce-mismatch", "evidence-invalid",
                                "signature-invalid", "pcr-policy-violation", "csr-invalid"),
                }}},
            f"{API_PREFIX}/challenges/{{challenge_id}}/decommission": {"post": {
                "summary": "The device retires itself (signed by the identity key); its "
                           "certificates go on the CRL",
                "parameters": [CHALLENGE_PARAMETER],
                "requestBody": {"required": True, **_json_body("DecommissionRequest")},
                "responses": {
                    "200": {"description": "decommissioned", **_json_body("Decommissioned")},
                    **_problems(*COMMON, *DEVICE_REQUEST),
                }}},
            CA_ISSUERS_PATH: {"get": {
                "summary": "The issuing CA's certificate, which every device certificate's "
                           "Authority Information Access (caIssuers) names",
                "responses": {"200": {"description": "DER X.509 certificate", "content": {
                    "application/pkix-cert": {"schema": {"type": "string",
                                                         "contentEncoding": "binary"}}}}}}},
            CRL_PATH: {"get": {
                "summary": "The CRL of the issuing CA: revoked device certificates that "
                           "have not expired yet",
                "responses": {"200": {"description": "DER X.509 CRL", "content": {
                    "application/pkix-crl": {"schema": {"type": "string",
                                                        "contentEncoding": "binary"}}}}}}},
        },
        "components": {"schemas": schemas},
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
