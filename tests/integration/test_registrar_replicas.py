"""Two devid-registrar replicas on one PostgreSQL database serve one fleet.

Twenty gateways (twenty swtpms and agents), half pointed at each replica,
enroll and renew at once while one replica is killed (SIGKILL) mid-flight and
started again. Nothing is lost or done twice: every gateway ends enrolled with
the certificate the database records, each token is spent once by one device,
each challenge answered once, and the audit log both replicas append to (a table
of the database) is one intact chain.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal

import psycopg
from postgres import registrar_toml

from tests.stack import enrollment_toml, rotation_toml

GATEWAYS = 20


def test_twenty_gateways_enroll_and_renew_across_two_replicas_one_killed_midway(
        tpm_factory, registrar_factory, agent_factory, postgres):
    tpms = [tpm_factory() for _ in range(GATEWAYS)]
    database = registrar_toml(postgres)
    first = registrar_factory([t.vendor_ca for t in tpms], extra_toml=database,
                              settings={"cert_lifetime": '"1h"'})
    second = first.replica().start()
    replicas = [first, second]
    tokens = [first.token() for _ in range(GATEWAYS)]

    agents = [agent_factory(tpm, name=f"gw{i}", wait=False,
                            extra=enrollment_toml(replicas[i % 2], tokens[i]) + rotation_toml())
              for i, tpm in enumerate(tpms)]
    # Kill the first replica while the gateways are at it, and bring it back.
    for agent in agents[:6]:
        agent.wait_ready(timeout=60)
    assert first.proc is not None
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    first.start()

    enrolled = {}
    for agent in agents:
        doc = agent.wait_enrollment("enrolled", timeout=180)
        enrolled[doc["enrollment"]["device_id"]] = agent
    assert len(enrolled) == GATEWAYS
    # The kill was felt: gateways of the first replica failed an attempt and retried.
    assert any("enrollment attempt 1 failed" in a.log_path.read_text() for a in agents[::2])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda a: a.ctl_json("renew", "--wait"), agents))
    assert all(code == 0 for code, _ in results), [d for c, d in results if c]

    # The database: each device once, with the serial its gateway holds; each token
    # spent by exactly one device; no challenge completed twice.
    url = database.split('"')[1]
    with psycopg.connect(url) as conn:
        devices = dict(conn.execute("SELECT device_id, cert_serial FROM devices").fetchall())
        used = conn.execute("SELECT used_by FROM tokens WHERE used_at IS NOT NULL").fetchall()
        completed = conn.execute("SELECT count(*), count(DISTINCT id) FROM challenges "
                                 "WHERE state = 'completed'").fetchone()
        renewed = conn.execute("SELECT count(*), count(DISTINCT id) FROM device_challenges "
                               "WHERE state = 'completed'").fetchone()
        audit = [json.loads(r) for (r,) in conn.execute(
            "SELECT record FROM registrar_audit ORDER BY seq").fetchall()]
    assert set(devices) == set(enrolled)
    for device_id, agent in enrolled.items():
        stored = json.loads((agent.config.parent / "state" / "enrollment.json").read_text())
        assert stored["serial"] == devices[device_id]
    assert sorted(u for (u,) in used) == sorted(enrolled)
    assert completed[0] == completed[1] == GATEWAYS
    assert renewed[0] == renewed[1] >= 2 * GATEWAYS  # the first TLS certificate, then ours

    issued = [r["challenge"] for r in audit if r["event"] == "certificate-issued"]
    assert len(issued) == len(set(issued)) == GATEWAYS
    verify = first.cli("audit", "verify", "--dir", str(first.directory), check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    for replica in replicas:
        assert "Traceback" not in replica.log_path.read_text()
