"""devid-broker: the sensor half of the gateway, in its own process and unit.

It never touches the TPM: the gateway's credentials and its data key come
from the agent's identity API, as a declared consumer (docs/broker.md).
config.py (TOML), datakey.py (the sealed data key, fetched once at start),
registry.py (the sensor registry as a subsystem: control methods, audit,
journal), main.py (the composition root). Listeners, policy and upstreams
follow (issue 12).
"""
