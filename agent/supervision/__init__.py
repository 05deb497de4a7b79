"""Talking to the service manager (sd_notify): shared by devid-agent and devid-registrar."""
