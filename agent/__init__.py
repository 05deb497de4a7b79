"""devid-agent: TPM-backed device identity for Linux IoT gateways."""

__version__ = "0.1.0"
