"""Serving the registrar over HTTPS with uvicorn (TLS 1.2 or newer)."""

from __future__ import annotations

import logging
import ssl

import uvicorn

from agent.registrar.app import create_app
from agent.registrar.config import host_port
from agent.registrar.home import RegistrarHome

log = logging.getLogger(__name__)


def serve(home: RegistrarHome, log_level: str = "info") -> None:
    config, service, lifecycle = home.open_service()
    host, port = host_port(config.listen)
    app = create_app(service, lifecycle, config.max_body_bytes)
    ca = service.ca
    server_config = uvicorn.Config(
        app, host=host, port=port, ssl_certfile=str(ca.server_cert_path),
        ssl_keyfile=str(ca.server_key_path), log_level=log_level, access_log=False,
        lifespan="off", server_header=False, timeout_keep_alive=15,
        timeout_graceful_shutdown=5,
        log_config=None)
    server_config.load()
    assert server_config.ssl is not None
    server_config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
    shown = f"[{host}]" if ":" in host else host
    print(f"devid-registrar serving https://{shown}:{port}", flush=True)
    print(f"clients pin this CA: {ca.root_path}", flush=True)
    try:
        uvicorn.Server(server_config).run()
    finally:
        service.store.close()
