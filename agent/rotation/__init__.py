"""Certificate rotation: when to renew (schedule), the renewal exchange (client), the
TLS key (tlskey) and the credentials in use (credentials)."""
