"""devid-agent: the daemon's entry point (argument parsing, start-up, signals)."""

from __future__ import annotations

import argparse
import asyncio
import grp
import logging
import os
import signal
import sys
from pathlib import Path

from agent import __version__, events, logsetup
from agent.access import command_line, current_user, explain, os_error_text
from agent.aio import first_of
from agent.config import AgentConfig, key_for_path, load_config
from agent.control.server import ControlServer
from agent.daemon.service import AgentService
from agent.daemon.siemout import SiemSubsystem
from agent.daemon.subsystem import Subsystem
from agent.errors import ConfigError, DevidError
from agent.fsutil import ensure_private_dir, remove_stale_temp_files
from agent.identityapi.api import IdentityApi
from agent.identityapi.consumers import read_unit_of_pid
from agent.identityapi.service import IdentityApiSubsystem
from agent.pki.ekchain import load_trust_store
from agent.siem.forwarder import EventTap
from agent.supervision.notify import SystemdNotifier, watchdog_interval
from agent.supervision.supervisor import Supervisor

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
    service.subsystems.append(identity_api(config, service))
    tap = EventTap()  # the recent events, for `devidctl events`, and the SIEM's
    if config.siem is not None:
        service.subsystems.append(SiemSubsystem(config.siem, tap, service.holder,
                                                lambda: service.enrollment.pinned))
    gid = grp.getgrnam(config.control.group).gr_gid if config.control.group else None
    handlers = {"status": service.status, "check": service.check,
                "renew": service.renew, "decommission": service.decommission,
                "audit": service.audit_log, "certificates": service.certificates,
                "events": tap.control}
    for subsystem in service.subsystems:
        handlers.update(subsystem.handlers())
    server = ControlServer(config.paths.control_socket, handlers, gid)
    await server.start()
    started: list[Subsystem] = []
    supervisor = Supervisor(SystemdNotifier(), watchdog_interval(os.environ, os.getpid()),
                            service.is_ready, service.headline, service.hung)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads = Reloader(service, supervisor)
    loop.add_signal_handler(signal.SIGHUP, reloads.request)
    tap.attach(logging.getLogger("agent"))
    events.emit(log, "started", "devid-agent %s started (config %s)", __version__,
                config.source, version=__version__)
    tasks = [asyncio.create_task(service.maintain_tpm(stop)),
             asyncio.create_task(service.maintain_identity(stop)),
             asyncio.create_task(supervisor.run(stop)),
             asyncio.create_task(reloads.run(stop))]
    try:
        for subsystem in service.subsystems:
            await subsystem.start()
            started.append(subsystem)
            tasks.append(asyncio.create_task(subsystem.run(stop)))
        await stop.wait()
        log.info("shutting down")
        supervisor.stopping()
    finally:
        for subsystem in reversed(started):
            await subsystem.close()
        await server.close()
        stop.set()
        await asyncio.gather(*tasks)
        await service.close()
        tap.detach(logging.getLogger("agent"))
    events.emit(log, "stopped", "devid-agent stopped")
    return 0


def identity_api(config: AgentConfig, service: AgentService) -> IdentityApiSubsystem:
    """The local identity API (docs/identity-api.md), fed by the agent's credentials,
    TPM and audit log."""
    enrollment = service.enrollment
    api = IdentityApi(
        config, service.holder, service.with_custody, service.audit,
        trust_bundle=lambda: enrollment.pinned,
        identity_chain=lambda: enrollment.stored.chain if enrollment.stored else (),
        generation=lambda: enrollment.stored.generation if enrollment.stored else 0,
        read_unit=read_unit_of_pid)
    return IdentityApiSubsystem(config, api)


class Reloader:
    """SIGHUP: re-read the configuration file and apply it; one reload at a time."""

    def __init__(self, service: AgentService, supervisor: Supervisor) -> None:
        self._service = service
        self._supervisor = supervisor
        self._pending = asyncio.Event()

    def request(self) -> None:
        self._pending.set()

    async def run(self, stop: asyncio.Event) -> None:
        while True:
            await first_of(stop, self._pending)
            if stop.is_set():
                return
            self._pending.clear()
            await self.reload()

    async def reload(self) -> None:
        service = self._service
        source = service.config.source
        self._supervisor.reloading()
        try:
            if source is None:
                raise ConfigError("the agent was started without a configuration file")
            loaded = await asyncio.to_thread(load_config, source)
            plan = await service.reconfigure(loaded)
        except DevidError as e:
            service.reload_error = e
            events.emit(log, "reload-failed", "configuration reload failed, keeping the "
                        "previous configuration: %s", e.message)
        else:
            events.emit(log, "reloaded", "configuration reloaded from %s: %s", source,
                        plan.describe(), applied=" ".join(plan.applied) or None,
                        needs_restart=" ".join(plan.needs_restart) or None)
        finally:
            # systemd waits for READY=1 after RELOADING=1, whatever happened.
            self._supervisor.reloaded()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devid-agent",
                                     description="TPM-backed device identity agent")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help=f"configuration file (default {DEFAULT_CONFIG})")
    parser.add_argument("--version", action="version", version=f"devid-agent {__version__}")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, command=command_line("devid-agent", argv))
    except ConfigError as e:
        print(f"devid-agent: configuration error: {e}", file=sys.stderr)
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
    except PermissionError as e:
        key = key_for_path(config, e.filename or "")
        denied = explain(e, key)
        user = current_user()
        log.error("cannot start: %s (hint: the agent runs as %s, which needs this path; run it "
                  "as the user that owns its files, or give them to %s: under systemd "
                  "StateDirectory= and RuntimeDirectory= do that)", denied.message, user, user)
        return EXIT_STARTUP
    except OSError as e:
        log.error("cannot start: %s", os_error_text(e, key_for_path(config, e.filename or "")))
        return EXIT_STARTUP


if __name__ == "__main__":
    sys.exit(main())
