"""No gap in service: 50 rotations of 5-second certificates while a relying party that
requires client certificates is hit continuously with the agent's current credentials.

The agent runs in this process (AgentService, as the daemon runs it, on a real swtpm and
a real registrar over HTTPS), because its TLS key exists only in its memory: this is how
an in-process consumer such as the broker gets it."""

from __future__ import annotations

import asyncio
import json

from inprocess import agent_in_process
from mtls import ClientLoad, MtlsServer
from stack import enrollment_toml, rotation_toml, write_agent_config

from agent.config import load_config

ROTATIONS = 50


async def _run_agent_and_rotate(config, server: MtlsServer) -> tuple[list, ClientLoad]:
    async with agent_in_process(config) as service:
        outcomes = []
        with ClientLoad(service.holder, server) as load:
            await asyncio.sleep(0.5)
            for _ in range(ROTATIONS):
                outcome = await service.rotation.kick()
                outcomes.append(outcome)
                # Next rotation once the relying party has been shown this one's certificate
                # (bounded: a credential never picked up fails the test below).
                for _ in range(100):
                    if outcome.tls_serial.lstrip("0") in server.client_serials:
                        break
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
        return outcomes, load


def test_fifty_rotations_without_a_failed_request(tpm, registrar_factory, tmp_path):
    # 50 renewals forced back to back, on purpose: the registrar's rate limit is off.
    registrar = registrar_factory([tpm.vendor_ca], settings={"cert_lifetime": '"5s"',
                                                             "renewal_window": '"0s"'})
    path = write_agent_config(tmp_path / "agent" / "agent.toml", tpm.tcti, [tpm.vendor_ca],
                              enrollment_toml(registrar, registrar.token()) + rotation_toml())
    config = load_config(path)
    with MtlsServer(tmp_path / "relying-party", registrar.ca) as server:
        outcomes, load = asyncio.run(_run_agent_and_rotate(config, server))

    assert [o.result for o in outcomes] == ["renewed"] * ROTATIONS
    assert load.failures == []
    assert load.ok > ROTATIONS  # served all through, not just between rotations
    # The relying party was shown every rotated certificate: new connections pick them up.
    kicked = {o.tls_serial.lstrip("0") for o in outcomes}
    assert kicked <= server.client_serials

    audit = [json.loads(line) for line in
             (tmp_path / "agent" / "state" / "audit.log").read_text().splitlines()]
    rotated = [r["tls_serial"] for r in audit if r["event"] == "rotated"]
    assert {o.tls_serial for o in outcomes} <= set(rotated)
    assert len(rotated) >= ROTATIONS
