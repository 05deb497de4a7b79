"""The gateway's identity for other programs: a client of the agent's identity API.

    from agent.consumer import IdentityClient

    client = IdentityClient()                 # /run/devid-agent/identity.sock
    creds = client.credentials()              # CredentialSet: certificate, chain, key, bundle
    ctx = creds.ssl_context("client")         # mTLS to the fleet back end
    for update in client.watch():             # every rotation, and withdrawal
        ...
    key = client.secret("db")                 # 32 bytes, sealed to the TPM by the agent
    token = client.jwt({"iss": ..., "aud": ...})  # ES256, signed by the TPM identity key

docs/identity-api.md describes the protocol for other languages.
"""

from agent.consumer.client import DEFAULT_SOCKET, IdentityClient, Signed, Withdrawn
from agent.identityapi.credentialset import CredentialSet

__all__ = ["DEFAULT_SOCKET", "CredentialSet", "IdentityClient", "Signed", "Withdrawn"]
