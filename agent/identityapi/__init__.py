"""The local identity API: the gateway's identity for other programs on it
(docs/identity-api.md). protocol, consumers, credentialset and the
pure parts of sinks are sans-IO; api.py answers requests, distribution.py
pushes updates to watches and file sinks, ledger.py records who got what,
server.py is the socket shell and service.py the daemon subsystem."""
