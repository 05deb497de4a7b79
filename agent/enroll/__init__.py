"""Enrollment: the protocol between devid-agent and devid-registrar (see docs/protocol.md).

- problems: the stable problem types both sides use
- messages: the JSON messages, their schemas and strict decoding
- evidence: pure checks of TPM evidence (public areas, quotes, certify, signatures)
- client: the agent's side of the two round trips, with the TPM and HTTP injected
- http: the requests-based transport to the registrar
- state: the enrollment result as stored on the gateway
"""
