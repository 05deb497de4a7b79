"""Events out to a SIEM: every journaled event (agent/events.py) also as RFC 5424 syslog
over TLS (RFC 5425), or as JSON lines over TLS, to a collector.

- `format.py` (pure): an event as an RFC 5424 message with structured data, framed by
  octet counting (RFC 5425 4.3), or as one JSON line.
- `forwarder.py` (edge): a logging handler that queues events (bounded: when the
  collector is away the oldest are dropped and counted, the daemon never waits) and a
  task that sends them over TLS, reconnecting with backoff.
"""
