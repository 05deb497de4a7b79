"""Serving the registrar over HTTPS with uvicorn (TLS 1.2 or newer)."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import resource
import socket
import ssl

import uvicorn

from agent.registrar.app import create_app
from agent.registrar.config import host_port
from agent.registrar.edge import ConnectionGuard, guarded_protocol, quiet_accept_errors
from agent.registrar.home import RegistrarHome
from agent.supervision.notify import SystemdNotifier, watchdog_interval
from agent.supervision.supervisor import Supervisor

log = logging.getLogger(__name__)


def serve(home: RegistrarHome, log_level: str = "info", listen: str | None = None) -> None:
    """`listen` overrides registrar.toml's: a second replica on the same host and
    directory serves on a port of its own."""
    config, service, lifecycle = home.open_service()
    host, port = host_port(listen or config.listen)
    app = create_app(service, lifecycle, config.max_body_bytes, config.max_in_flight)
    ca = service.ca
    raise_descriptor_limit(config.max_connections)
    quiet_accept_errors(logging.getLogger("asyncio"))
    guard = ConnectionGuard(config.max_connections, config.request_timeout)
    server_config = uvicorn.Config(
        app, host=host, port=port, ssl_certfile=str(ca.server_cert_path),
        ssl_keyfile=str(ca.server_key_path), log_level=log_level, access_log=False,
        lifespan="off", server_header=False, timeout_keep_alive=15,
        timeout_graceful_shutdown=5, http=guarded_protocol(guard),
        backlog=min(2048, config.max_connections * 2), log_config=None)
    server_config.load()
    assert server_config.ssl is not None
    server_config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
    shown = f"[{host}]" if ":" in host else host
    print(f"devid-registrar serving https://{shown}:{port}", flush=True)
    print(f"clients pin this CA: {ca.root_path}", flush=True)
    url = f"https://{shown}:{port}"
    server = _SupervisedServer(server_config)
    server.handshake_timeout = config.handshake_timeout
    server.supervisor = Supervisor(SystemdNotifier(), watchdog_interval(os.environ, os.getpid()),
                            ready=lambda: server.started,
                            headline=lambda: f"serving {url}" if server.started
                            else f"starting: binding {url}",
                            hung=lambda: None)
    try:
        server.run()
    finally:
        service.store.close()


def raise_descriptor_limit(max_connections: int) -> None:
    """Lift the soft descriptor limit to the hard one (systemd: LimitNOFILE), and say so if
    it cannot hold max_connections with room for handshakes, the database and logs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if wanted < max_connections * 2 + 64:
        log.warning("the descriptor limit (%d) is low for max_connections = %d: raise "
                    "LimitNOFILE or lower max_connections", wanted, max_connections)


class _SupervisedServer(uvicorn.Server):
    """uvicorn's server, telling systemd READY=1 once it listens, pinging the watchdog
    from its event loop and STOPPING=1 when it shuts down (uvicorn re-raises SIGTERM
    after serving, so that has to happen inside its shutdown)."""

    supervisor: Supervisor
    handshake_timeout: float = 10.0

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._stop = asyncio.Event()
        self._pings = asyncio.create_task(self.supervisor.run(self._stop))
        # uvicorn does not pass ssl_handshake_timeout (asyncio's default is 60 s, during
        # which a client that never says hello holds a descriptor): add it to the one
        # create_server call it makes.
        loop = asyncio.get_running_loop()
        loop.create_server = functools.partial(  # type: ignore[method-assign]
            loop.create_server, ssl_handshake_timeout=self.handshake_timeout)
        try:
            await super().startup(sockets)
        finally:
            del loop.create_server  # the instance attribute: the method shows again

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.supervisor.stopping()
        self._stop.set()
        await self._pings
        await super().shutdown(sockets)
