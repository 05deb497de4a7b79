"""devid-agent: the daemon's entry point (argument parsing, start-up, signals)."""

from __future__ import annotations

import argparse
import asyncio
import grp
import logging
import signal
import sys
from pathlib import Path

from agent import __version__, logsetup
from agent.config import AgentConfig, load_config
from agent.control.server import ControlServer
from agent.daemon.service import AgentService
from agent.errors import ConfigError, DevidError
from agent.fsutil import ensure_private_dir, remove_stale_temp_files
from agent.pki.ekchain import load_trust_store

log = logging.getLogger("agent.daemon")

DEFAULT_CONFIG = Path("/etc/devid-agent/agent.toml")
EXIT_CONFIG = 78  # sysexits EX_CONFIG: systemd can be told not to restart on it
EXIT_STARTUP = 1


async def run(config: AgentConfig) -> int:
    trust = load_trust_store(config.trust.ek_roots)
    ensure_private_dir(config.paths.state_dir)
    for directory in (config.paths.state_dir, config.paths.state_dir / "tpm"):
        for name in remove_stale_temp_files(directory):
            log.info("removed %s, left by an interrupted write", directory / name)
    service = AgentService(config, trust)
    service.enrollment.load()
    gid = grp.getgrnam(config.control.group).gr_gid if config.control.group else None
    server = ControlServer(config.paths.control_socket,
                           {"status": service.status, "check": service.check,
                            "renew": service.renew, "decommission": service.decommission,
                            "audit": service.audit_log}, gid)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("devid-agent %s started (config %s)", __version__, config.source)
    tasks = [asyncio.create_task(service.maintain_tpm(stop)),
             asyncio.create_task(service.maintain_identity(stop))]
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        await server.close()
        stop.set()
        await asyncio.gather(*tasks)
        await service.close()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devid-agent",
                                     description="TPM-backed device identity agent")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help=f"configuration file (default {DEFAULT_CONFIG})")
    parser.add_argument("--version", action="version", version=f"devid-agent {__version__}")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"devid-agent: configuration error: {e.message}", file=sys.stderr)
        return EXIT_CONFIG
    logsetup.configure(config.log.level, "devid-agent")
    try:
        return asyncio.run(run(config))
    except ConfigError as e:
        log.error("configuration error: %s", e.message)
        return EXIT_CONFIG
    except DevidError as e:
        log.error("cannot start: %s", e)
        return EXIT_STARTUP
    except OSError as e:
        log.error("cannot start: %s", e)
        return EXIT_STARTUP


if __name__ == "__main__":
    sys.exit(main())
