"""devid-broker: the entry point and composition root.

Start-up: configuration, then the data key from the agent's identity API
(waiting, and saying so, while the agent is not up), then the sensor
registry, the policy, the upstreams (with the gateway's TLS credentials from
the identity API), the listeners and the control socket; READY=1 once the
listeners are bound. Parts each bring a status section (some a task, some
control methods); this module only wires them.
"""

from __future__ import annotations

import argparse
import asyncio
import grp
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from agent import __version__, events, logsetup
from agent.access import command_line
from agent.audit import AGENT_AUDIT_LOG, AuditLog
from agent.broker import dtls, oscore
from agent.broker.bootstrap import Lwm2mBootstrap
from agent.broker.coapserver import sweep_deduplication
from agent.broker.collector import Collector
from agent.broker.config import DEFAULT_CONFIG, BrokerConfig, load_broker_config
from agent.broker.datakey import fetch_data_key
from agent.broker.dtls import DtlsListener
from agent.broker.edhoc import EdhocSessions
from agent.broker.eventsout import make_siem
from agent.broker.firmware import FirmwareUpdates
from agent.broker.gateway import Gateway
from agent.broker.lwm2m import Lwm2mServer
from agent.broker.lwm2mstore import Lwm2mStore
from agent.broker.lwm2mupstream import make_lwm2m_upstream
from agent.broker.oscore import OscoreListener, SensorContexts
from agent.broker.plain import PlainIdentities, PlainListener
from agent.broker.policy import PolicyHolder
from agent.broker.registry import SensorRegistry
from agent.broker.spool import Spool, SpoolStore
from agent.broker.traffic import Traffic
from agent.broker.upstreams import Upstreams, make_upstreams
from agent.broker.watching import Watching
from agent.consumer import IdentityClient
from agent.control.server import ControlServer
from agent.errors import ConfigError, DevidError
from agent.fsutil import ensure_private_dir
from agent.policy.decide import Rates
from agent.sensors.atrest import RecordCipher
from agent.sensors.store import SensorStore
from agent.siem.forwarder import EventTap
from agent.supervision.notify import SystemdNotifier, watchdog_interval
from agent.supervision.supervisor import Supervisor

log = logging.getLogger("agent.broker")
EXIT_CONFIG, EXIT_STARTUP = 78, 1
REGISTRY_FILE = "sensors.db"
SPOOL_FILE = "spool.db"
LWM2M_FILE = "lwm2m.db"
FINISH_TIMEOUT = 3.0
MAX_REQUEST = 32 << 20  # `sensors import` sends the file: 100,000 sensors fit


class Part(Protocol):
    name: str

    def status_section(self) -> dict[str, Any]: ...


class Broker:
    """What the broker is right now, for STATUS= and `devidctl broker status`."""

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.registry: SensorRegistry | None = None
        self.policy: PolicyHolder | None = None
        self.parts: list[Part] = []
        self.waiting = "starting"
        self.ready = False  # listeners bound, control socket up

    def headline(self) -> str:
        if self.registry is None:
            return self.waiting
        counts = self.registry.store.counts()
        return f"{counts['active']} sensors active, {counts['quarantined']} quarantined, " \
               f"{counts['revoked']} revoked"

    async def status(self, _params: dict[str, Any]) -> dict[str, Any]:
        doc: dict[str, Any] = {"state": "OK" if self.registry else "WARN",
                               "headline": self.headline(),
                               "broker": {"version": __version__, "pid": os.getpid(),
                                          "config": str(self.config.source)}}
        for part in self.parts:
            doc[part.name] = part.status_section()
        if self.policy is not None and self.policy.error is not None:
            doc["state"] = "WARN"
        return doc


async def run(config: BrokerConfig) -> int:
    state_dir = config.paths.state_dir
    ensure_private_dir(state_dir)
    broker = Broker(config)
    tap = EventTap()  # every event from here on: `devidctl events`, and the SIEM
    tap.attach(logging.getLogger("agent"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP reloads the policy; before it is loaded there is nothing to reload (and the
    # default action would kill the broker).
    loop.add_signal_handler(signal.SIGHUP, lambda: broker.policy and broker.policy.load())
    supervisor = Supervisor(SystemdNotifier(), watchdog_interval(os.environ, os.getpid()),
                            lambda: broker.ready, broker.headline,
                            lambda: None)
    watchdog = asyncio.create_task(supervisor.run(stop))
    server: ControlServer | None = None
    tasks: list[asyncio.Task[None]] = []
    finishing: list[asyncio.Task[None]] = []  # tasks that end by themselves at stop
    listeners: list[OscoreListener | DtlsListener | PlainListener] = []
    upstreams: Upstreams | None = None
    traffic: Traffic | None = None
    spool: Spool | None = None
    lwm2m: Lwm2mServer | None = None
    try:
        def waiting(reason: str) -> None:
            if reason != broker.waiting:
                log.info("%s", reason)
            broker.waiting = reason

        client = IdentityClient(config.identity.socket)
        try:
            key = await fetch_data_key(client, config.identity.data_key,
                                       config.identity.retry, stop, waiting)
        except DevidError as e:
            events.emit(log, "broker-data-key-refused", "the agent refused the data key %r: %s",
                        config.identity.data_key, e, problem=e.code)
            return EXIT_STARTUP
        if key is None:
            return 0
        store = await asyncio.to_thread(SensorStore, state_dir / REGISTRY_FILE,
                                        RecordCipher(key))
        del key  # the cipher holds what it derived; nothing else keeps the key
        audit = AuditLog(state_dir / AGENT_AUDIT_LOG)
        traffic = Traffic(store, audit)
        tasks.append(asyncio.create_task(traffic.run(stop)))
        broker.registry = SensorRegistry(store, audit, traffic.flush)
        broker.policy = PolicyHolder(config.policy.file, store)
        broker.policy.load()
        broker.parts += [broker.registry, broker.policy]
        upstreams = make_upstreams(config, client)
        if upstreams.credentials is not None:
            tasks.append(asyncio.create_task(upstreams.credentials.run(stop)))
            broker.parts.append(upstreams.credentials)
        siem = make_siem(config, upstreams.credentials)
        if siem is not None:
            tap.sender = siem
            tasks.append(asyncio.create_task(siem.run(stop)))
            broker.parts.append(siem)
        await upstreams.start()
        contexts = SensorContexts(store, traffic, EdhocSessions(
            store, traffic, config.listen.edhoc_lifetime) if config.listen.oscore else None)
        spool = Spool(SpoolStore(state_dir / SPOOL_FILE, config.spool.max_messages,
                                 config.spool.max_bytes), upstreams.by_name,
                      config.spool.retry_after)
        tasks.append(asyncio.create_task(spool.run(stop)))
        policy = broker.policy
        listen = config.listen
        identities = PlainIdentities(store, lambda: policy.policy)
        # A request's sensor, asked of each listener kind that runs.
        identify = [oscore.identify, dtls.identify] + \
            ([identities.identify] if listen.plain else [])
        lwm2m = Lwm2mServer(await asyncio.to_thread(Lwm2mStore, state_dir / LWM2M_FILE),
                            policy, broker.registry, traffic, audit)
        tasks.append(asyncio.create_task(lwm2m.run(stop)))
        broker.registry.details["lwm2m"] = lwm2m.registration_of
        broker.registry.summaries["firmware_version"] = lwm2m.firmware_version
        watching = Watching(broker.registry, policy, audit)
        traffic.observers.append(watching)
        tasks.append(asyncio.create_task(watching.run(stop)))
        broker.registry.details["watch"] = watching.details_of
        firmware = FirmwareUpdates(lwm2m, audit)
        bootstrap = Lwm2mBootstrap(broker.registry, policy, lwm2m.downlink, traffic, audit)
        gateway = Gateway(identify, policy, upstreams.by_name, traffic, Rates(time.monotonic),
                          spool, local={"rd": lwm2m, "bs": bootstrap})
        if listen.oscore:
            listeners.append(OscoreListener(listen.oscore, contexts, gateway, traffic))
        if listen.dtls:
            datagram = DtlsListener(listen.dtls, store, traffic, gateway,
                                    listen.dtls_max_sessions, listen.dtls_idle_timeout)
            listeners.append(datagram)
            tasks.append(asyncio.create_task(datagram.run(stop)))
        if listen.plain:
            listeners.append(PlainListener(listen.plain, identities, gateway))
        for listener in listeners:
            await listener.start()
        lwm2m.downlink.listeners = {listener.name: listener for listener in listeners}
        tasks.append(asyncio.create_task(sweep_deduplication(
            lambda: [listener.context for listener in listeners], stop)))
        collector = Collector()
        tasks.append(asyncio.create_task(collector.run()))
        broker.parts += [*listeners, upstreams, spool, traffic, lwm2m, bootstrap, firmware,
                         watching, collector]
        lwm2m_upstream = make_lwm2m_upstream(config, upstreams.credentials, lwm2m, audit)
        if lwm2m_upstream is not None:
            # It de-registers from its server at stop: given a moment for that below.
            finishing.append(asyncio.create_task(lwm2m_upstream.run(stop)))
            broker.parts.append(lwm2m_upstream)
        followers = [contexts.refresh, lwm2m.refresh, watching.refresh] + [
            ls.refresh for ls in listeners if isinstance(ls, DtlsListener | PlainListener)]
        tasks.append(asyncio.create_task(follow_registry(broker.registry, followers)))
        gid = grp.getgrnam(config.control.group).gr_gid if config.control.group else None
        server = ControlServer(config.paths.control_socket,
                               {"status": broker.status, "events": tap.control,
                                **broker.registry.handlers(),
                                **broker.policy.handlers(), **lwm2m.handlers(),
                                **firmware.handlers()}, gid,
                               max_request=MAX_REQUEST, program="devid-broker")
        await server.start()
        broker.ready = True
        events.emit(log, "broker-started", "devid-broker %s started: %s", __version__,
                    broker.headline(), version=__version__)
        await stop.wait()
        supervisor.stopping()
        return 0
    finally:
        stop.set()
        if finishing:
            await asyncio.wait(finishing, timeout=FINISH_TIMEOUT)
            tasks += finishing
        if server is not None:
            await server.close()
        for listener in listeners:
            await listener.close()
        if upstreams is not None:
            await upstreams.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if traffic is not None:
            await traffic.flush()
        if lwm2m is not None:
            await lwm2m.flush()
            lwm2m.store.close()
        if spool is not None:
            spool.store.close()
        await watchdog
        if broker.registry is not None:
            broker.registry.store.close()
            events.emit(log, "broker-stopped", "devid-broker stopped")
        tap.detach(logging.getLogger("agent"))


async def follow_registry(registry: SensorRegistry, followers: list[Callable[[], None]]
                          ) -> None:
    """Every registry change reaches the listeners at once (quarantine within 1 s)."""
    while True:
        await registry.changed.wait()
        registry.changed.clear()
        for follow in followers:
            follow()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devid-broker",
                                     description="brokers constrained sensors' traffic "
                                                 "under the gateway's identity")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help=f"configuration file (default {DEFAULT_CONFIG})")
    parser.add_argument("--version", action="version", version=f"devid-broker {__version__}")
    args = parser.parse_args(argv)
    try:
        config = load_broker_config(args.config, command_line("devid-broker", argv))
    except ConfigError as e:
        print(f"devid-broker: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    logsetup.configure(config.log.level, "devid-broker")
    try:
        return asyncio.run(run(config))
    except DevidError as e:
        log.error("cannot start: %s", e)
        return EXIT_STARTUP
    except OSError as e:
        log.error("cannot start: %s", e.strerror or e)
        return EXIT_STARTUP


if __name__ == "__main__":
    sys.exit(main())
