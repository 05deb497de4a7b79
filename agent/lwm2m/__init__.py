"""LwM2M (OMA LwM2M 1.1/1.2) for the sensors behind the gateway. Pure cores only.

linkformat.py parses CoRE link format (RFC 6690) strictly and with bounds;
registration.py is the Registration interface's state: who is registered,
with which objects, until when, and which sensors missed their lifetime.
The broker's edge (agent/broker/lwm2m.py) feeds them requests and time.
"""
