"""Shared fixtures: fresh simulated TPMs and agent processes, all on loopback."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from coap_upstream import CoapUpstreamProcess
from mtls import server_identity
from stack import (
    DEMO_POLICY,
    AgentProcess,
    BrokerProcess,
    RegistrarProcess,
    SimulatedTpm,
    consumer_toml,
    enrollment_toml,
    free_port,
    rotation_toml,
    start_tpm,
    write_agent_config,
)


@pytest.fixture
def tpm_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], SimulatedTpm]]:
    """Make fresh, manufactured swtpm instances; all are stopped after the test."""
    made: list[SimulatedTpm] = []

    def make() -> SimulatedTpm:
        tpm = start_tpm(tmp_path_factory.mktemp("swtpm"))
        made.append(tpm)
        return tpm

    yield make
    for tpm in made:
        tpm.stop()


@pytest.fixture
def tpm(tpm_factory: Callable[[], SimulatedTpm]) -> SimulatedTpm:
    return tpm_factory()


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start devid-agent processes against a given TPM; stopped after the test."""
    started: list[AgentProcess] = []

    def make(tpm: SimulatedTpm, ek_roots: list[Path] | None = None, extra: str = "",
             name: str = "agent", wait: bool = True,
             control_socket: Path | None = None, env: dict[str, str] | None = None,
             state_dir: str = "state", identity_api: str = "") -> AgentProcess:
        roots = [tpm.vendor_ca] if ek_roots is None else ek_roots
        config = write_agent_config(tmp_path / name / "agent.toml", tpm.tcti, roots, extra,
                                    control_socket, state_dir, identity_api)
        agent = AgentProcess(config, control_socket, env)
        started.append(agent)
        return agent.start(wait=wait)

    yield make
    for agent in started:
        agent.stop()


@pytest.fixture
def registrar_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., RegistrarProcess]]:
    """Initialise and serve devid-registrar instances on loopback; stopped after the test."""
    made: list[RegistrarProcess] = []

    def make(ek_roots: list[Path], start: bool = True, **kwargs: object) -> RegistrarProcess:
        registrar = RegistrarProcess(tmp_path_factory.mktemp("registrar") / "reg", ek_roots,
                                     **kwargs)  # type: ignore[arg-type]
        made.append(registrar)
        return registrar.start() if start else registrar.init()

    yield make
    for registrar in made:
        registrar.stop()


@dataclass
class BrokerStack:
    """An enrolled agent, a CoAP-over-TLS upstream that requires the gateway's client
    certificate, and devid-broker between sensors and that upstream."""

    broker: BrokerProcess
    upstream: CoapUpstreamProcess
    sensors: list[Any] = field(default_factory=list)  # closed after the test
    registrar_ca: Path | None = None  # what client certificates chain to
    server_tls: tuple[Path, Path] | None = None  # a 127.0.0.1 server cert and key

    def add(self, name: str, *args: str) -> dict[str, Any]:
        code, added = self.broker.ctl_json("add", name, "--profile", "temperature", *args)
        assert code == 0, added
        return added["sensors"][0]

    def status(self) -> dict[str, Any]:
        from agent.control import client

        return client.call(self.broker.socket, "status")

    def totals(self) -> dict[str, int]:
        return self.status()["traffic"]["totals"]


@pytest.fixture
def registrar_settings() -> dict[str, str]:
    """The gateway registrar's settings; a test overrides them by parametrizing this name."""
    return {}


@pytest.fixture
def gateway_agent(tpm: SimulatedTpm, registrar_factory: Callable[..., RegistrarProcess],
                  agent_factory: Callable[..., AgentProcess],
                  registrar_settings: dict[str, str]) -> tuple[AgentProcess, RegistrarProcess]:
    """An enrolled agent that declares the broker (this user) a consumer of its identity."""
    registrar = registrar_factory([tpm.vendor_ca], settings=registrar_settings)
    agent = agent_factory(tpm, extra=enrollment_toml(registrar, registrar.token())
                          + rotation_toml() + consumer_toml("broker"))
    agent.wait_enrollment("enrolled")
    return agent, registrar


@pytest.fixture
def broker_stack_factory(gateway_agent: tuple[AgentProcess, RegistrarProcess], tmp_path: Path
                         ) -> Iterator[Callable[..., BrokerStack]]:
    """make(extra_toml, policy, plain, listen): the broker with the CoAP upstream `cloud` and
    whatever more `extra_toml` configures (the upstream's CA is at
    tmp_path/"upstream-ca.pem"); `plain` adds a plain-CoAP listener, `listen` keys of
    [listen], `host` the listeners' address ("::" for both IPv6 and IPv4)."""
    agent, registrar = gateway_agent
    made: list[BrokerStack] = []
    cert, key, ca_pem = server_identity(tmp_path / "upstream-tls")
    (tmp_path / "upstream-ca.pem").write_text(ca_pem)

    def make(extra: str = "", policy: str = DEMO_POLICY, plain: bool = False,
             listen: str = "", host: str = "127.0.0.1") -> BrokerStack:
        upstream = CoapUpstreamProcess(tmp_path / "upstream", free_port(), cert, key,
                                       registrar.ca).start()
        broker = BrokerProcess(
            tmp_path / "broker", agent.config.parent / "run" / "identity.sock",
            f'[upstreams.cloud]\nurl = "coaps+tcp://127.0.0.1:{upstream.port}"\n'
            f'bundle = "{tmp_path / "upstream-ca.pem"}"\n' + extra, plain, listen, host)
        # Stopped after the test even if the broker does not come up.
        made.append(BrokerStack(broker, upstream, registrar_ca=registrar.ca,
                                server_tls=(cert, key)))
        broker.policy.write_text(policy)
        broker.start().wait_serving()
        return made[-1]

    yield make
    for stack in made:
        try:
            for sensor in stack.sensors:
                sensor.close()
        finally:  # a sensor that fails to close must not leave the processes running
            stack.broker.stop()
            stack.upstream.stop()


@pytest.fixture
def broker_stack(broker_stack_factory: Callable[..., BrokerStack]) -> BrokerStack:
    return broker_stack_factory()


@pytest.fixture(scope="session")
def postgres() -> Iterator[object]:
    """One real PostgreSQL server per test worker (tests/postgres.py); tests make their own
    databases in it."""
    from postgres import PostgresServer

    server = PostgresServer().start()
    yield server
    server.stop()
