"""Constrained sensors the broker serves: who they are, their credentials, their state.

model.py (what a sensor is), credentials.py (minting and the wire forms of
OSCORE and DTLS-PSK credentials), atrest.py (AES-GCM sealing under the data
key the agent keeps in the TPM), keycheck.py (refusing weak, short or shared
factory keys) and importing.py are pure; store.py is the SQLite edge.
"""
