"""devid-registrar: the reference enrollment service and certificate authority.

- config: registrar.toml
- ca: the CA (root, issuing, server certificate) and device certificate profile
- pcrpolicy: judging quoted PCR values against the policy (pure)
- store: SQLite (WAL) for devices, challenges and tokens
- service: the enrollment decisions, with store, CA, audit log and clock injected
- app: the HTTP edge (Starlette), problem+json mapping, body limits
- server: TLS serving with uvicorn
- cli: the `devid-registrar` command
"""
