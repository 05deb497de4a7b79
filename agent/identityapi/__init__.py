"""The local identity API: the gateway's identity for other programs on it
(docs/identity-api.md). protocol, consumers, ratelimit, credentialset and the
pure parts of sinks are sans-IO; api.py decides, server.py is the socket shell."""
