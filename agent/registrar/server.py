"""Serving the registrar over HTTPS with uvicorn (TLS 1.2 or newer)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl

import uvicorn

from agent.registrar.app import create_app
from agent.registrar.config import host_port
from agent.registrar.home import RegistrarHome
from agent.supervision.notify import SystemdNotifier, watchdog_interval
from agent.supervision.supervisor import Supervisor

log = logging.getLogger(__name__)


def serve(home: RegistrarHome, log_level: str = "info") -> None:
    config, service, lifecycle = home.open_service()
    host, port = host_port(config.listen)
    app = create_app(service, lifecycle, config.max_body_bytes, config.max_in_flight)
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
    url = f"https://{shown}:{port}"
    server = _SupervisedServer(server_config)
    server.supervisor = Supervisor(SystemdNotifier(), watchdog_interval(os.environ, os.getpid()),
                            ready=lambda: server.started,
                            headline=lambda: f"serving {url}" if server.started
                            else f"starting: binding {url}",
                            hung=lambda: None)
    try:
        server.run()
    finally:
        service.store.close()


class _SupervisedServer(uvicorn.Server):
    """uvicorn's server, telling systemd READY=1 once it listens, pinging the watchdog
    from its event loop and STOPPING=1 when it shuts down (uvicorn re-raises SIGTERM
    after serving, so that has to happen inside its shutdown)."""

    supervisor: Supervisor

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._stop = asyncio.Event()
        self._pings = asyncio.create_task(self.supervisor.run(self._stop))
        await super().startup(sockets)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.supervisor.stopping()
        self._stop.set()
        await self._pings
        await super().shutdown(sockets)
