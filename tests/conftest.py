"""Shared fixtures: fresh simulated TPMs and agent processes, all on loopback."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stack import (
    AgentProcess,
    RegistrarProcess,
    SimulatedTpm,
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
