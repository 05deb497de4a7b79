"""Programs nobody here wrote, using the gateway's identity through a file sink:
Debian's mosquitto as an MQTT bridge into an mTLS mosquitto, and curl against an mTLS
HTTPS server, while the agent rotates 5-second certificates under them."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mtls import MtlsServer, server_identity
from stack import AgentProcess, enrollment_toml, free_port

MOSQUITTO = Path("/usr/sbin/mosquitto")
pytestmark = pytest.mark.skipif(not MOSQUITTO.exists() or shutil.which("mosquitto_pub") is None
                                or shutil.which("curl") is None,
                                reason="needs mosquitto, mosquitto-clients and curl "
                                       "(make apt installs them)")
ROTATIONS = 20


@pytest.fixture
def public() -> Iterator[Path]:
    """A tmpfs directory every uid may enter (mosquitto drops to its own user)."""
    root = Path("/dev/shm") / f"devid-real-{uuid.uuid4().hex[:12]}"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    yield root
    pid = root / "bridge.pid"
    if pid.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid.read_text()), signal.SIGTERM)
    subprocess.run(["rm", "-rf", str(root)], check=False)


def _enrolled(tpm, registrar_factory, agent_factory, public: Path, consumer: str,
              lifetime: str) -> tuple[object, AgentProcess]:
    registrar = registrar_factory([tpm.vendor_ca],
                                  settings={"cert_lifetime": json.dumps(lifetime)})
    agent = agent_factory(
        tpm, extra=enrollment_toml(registrar, registrar.token())
        + '\n[rotation]\nretry_initial = "1s"\nretry_max = "2s"\n' + consumer,
        identity_api=f'socket = "{public}/identity.sock"\nsink_root = "{public}/tls"\n')
    agent.wait_enrollment("enrolled")
    return registrar, agent


def _sink_serial(agent: AgentProcess) -> str | None:
    consumer = agent.status()["identity_api"]["consumers"][0]
    last = consumer.get("last") or {}
    return last.get("detail", "").removeprefix("serial ") if last.get("via") == "sink" else None


def test_a_mosquitto_bridge_follows_20_rotations_without_losing_a_message(
        tpm, registrar_factory, agent_factory, public):
    mosquitto_user = pwd.getpwnam("mosquitto")
    up_tls, up_plain, local = free_port(), free_port(), free_port()
    data = public / "bridge-data"
    data.mkdir()
    os.chown(data, mosquitto_user.pw_uid, mosquitto_user.pw_gid)
    for name in ("up.log", "bridge.log", "bridge.pid"):
        (public / name).touch()
        os.chown(public / name, mosquitto_user.pw_uid, mosquitto_user.pw_gid)

    # The restart script is the consumer's reload command: mosquitto 2.0 neither re-reads
    # a bridge's certificate nor reconnects on SIGHUP (eclipse-mosquitto issue 2411).
    bridge_conf, restart = public / "bridge.conf", public / "restart-bridge.sh"
    restart.write_text(
        "#!/bin/sh\n"
        f"pid=$(cat {public}/bridge.pid 2>/dev/null)\n"
        'if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then\n'
        '  while kill -0 "$pid" 2>/dev/null; do sleep 0.02; done\n'
        "fi\n"
        f"exec {MOSQUITTO} -d -c {bridge_conf}\n")
    restart.chmod(0o755)
    registrar, agent = _enrolled(
        tpm, registrar_factory, agent_factory, public,
        f'\n[[consumers]]\nname = "mqtt-bridge"\nuser = "mosquitto"\ngroup = "mosquitto"\n'
        f'grants = ["credentials"]\nsink = true\nsink_mode = "0640"\n'
        f'reload = "{restart}"\n', lifetime="5s")

    # The fleet's broker: client certificates from the registrar's CA only.
    _, _, upstream_ca = server_identity(public / "upstream")
    (public / "upstream-ca.pem").write_text(upstream_ca)
    shutil.copy(registrar.ca, public / "registrar-ca.pem")  # type: ignore[attr-defined]
    for path in (public / "upstream").iterdir():
        path.chmod(0o644)  # a throwaway test key, read by mosquitto after it drops root
    (public / "upstream").chmod(0o755)
    up_conf = public / "up.conf"
    up_conf.write_text(
        f"user mosquitto\nper_listener_settings false\nallow_anonymous true\n"
        f"log_dest file {public}/up.log\nlog_type all\n"
        f"listener {up_tls} 127.0.0.1\ncafile {public}/registrar-ca.pem\n"
        f"certfile {public}/upstream/server.pem\nkeyfile {public}/upstream/server.key\n"
        "require_certificate true\nuse_identity_as_username true\n"
        f"listener {up_plain} 127.0.0.1\n")
    bridge_conf.write_text(
        f"user mosquitto\npid_file {public}/bridge.pid\nallow_anonymous true\n"
        f"persistence true\npersistence_location {data}/\n"
        f"log_dest file {public}/bridge.log\nlog_type all\n"
        f"listener {local} 127.0.0.1\n"
        f"connection upstream\naddress 127.0.0.1:{up_tls}\ntopic devid/# out 1\n"
        "cleansession false\nclientid gateway-bridge\nrestart_timeout 1\n"
        f"bridge_cafile {public}/upstream-ca.pem\n"
        f"bridge_certfile {public}/tls/mqtt-bridge/fullchain.pem\n"
        f"bridge_keyfile {public}/tls/mqtt-bridge/key.pem\n")
    upstream = subprocess.Popen([str(MOSQUITTO), "-c", str(up_conf)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subscriber = None
    try:
        time.sleep(0.5)
        subscriber = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(up_plain), "-q", "1",
             "-t", "devid/#", "-i", "fleet-subscriber", "-c"],
            stdout=subprocess.PIPE, text=True)
        # The agent's first sink write ran the reload command, which started the bridge.
        start_generation = agent.status()["rotation"]["generation"]
        published: list[str] = []
        stop = threading.Event()

        def publish() -> None:
            n = 0
            while not stop.is_set():
                message = f"reading-{n}"
                for _ in range(200):  # the bridge restarts at each rotation: retry
                    if subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(local),
                                       "-q", "1", "-t", "devid/sensor", "-m", message],
                                      capture_output=True, timeout=10).returncode == 0:
                        published.append(message)
                        break
                    time.sleep(0.05)
                n += 1
                time.sleep(0.05)

        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()
        agent.wait_generation(start_generation + ROTATIONS, timeout=ROTATIONS * 6 + 30)
        stop.set()
        publisher.join(30)
        assert len(published) > ROTATIONS * 5

        received: set[str] = set()
        assert subscriber.stdout is not None
        os.set_blocking(subscriber.stdout.fileno(), False)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not set(published) <= received:
            line = subscriber.stdout.readline()
            if line:
                received.add(line.strip())
            else:
                time.sleep(0.05)
        missing = sorted(set(published) - received, key=lambda m: int(m.split("-")[1]))
        assert not missing, f"{len(missing)} of {len(published)} lost, e.g. {missing[:5]}"

        # It reconnected with the new certificates: the upstream accepted fresh handshakes
        # throughout, and 5-second certificates leave no old one valid for long. (A
        # rotation that lands while the previous restart is still connecting supersedes
        # it, so there may be a few fewer connections than rotations on a busy machine.)
        connects = (public / "up.log").read_text().count("as gateway-bridge")
        assert connects >= ROTATIONS * 3 // 4, connects
        assert _sink_serial(agent) == agent.status()["tls_certificate"]["serial"]
    finally:
        if subscriber is not None:
            subscriber.terminate()
            subscriber.wait(10)
        upstream.terminate()
        upstream.wait(10)


def test_curl_uses_the_sink_against_an_mtls_server(tpm, registrar_factory, agent_factory,
                                                   public):
    registrar, agent = _enrolled(
        tpm, registrar_factory, agent_factory, public,
        f'\n[[consumers]]\nname = "curl"\nuser = {os.getuid()}\ngrants = ["credentials"]\n'
        "sink = true\n", lifetime="1h")
    sink = public / "tls" / "curl"
    with MtlsServer(public / "https", registrar.ca) as server:  # type: ignore[attr-defined]
        (public / "https-ca.pem").write_text(server.ca_pem)

        def curl() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["curl", "--silent", "--show-error", "--cert", str(sink / "fullchain.pem"),
                 "--key", str(sink / "key.pem"), "--cacert", str(public / "https-ca.pem"),
                 f"https://127.0.0.1:{server.port}/"], capture_output=True, text=True,
                timeout=30)

        for _ in range(2):
            serial = agent.status()["tls_certificate"]["serial"]
            agent.wait_status("sink current",
                              lambda d, serial=serial: _sink_serial(agent) == serial)
            out = curl()
            assert out.returncode == 0, out.stderr
            assert out.stdout == serial.lstrip("0")
            assert agent.ctl("renew", "--wait").returncode == 0
        # Without the key (another user's view) curl cannot authenticate.
        denied = subprocess.run(["setpriv", "--reuid", "65533", "--regid", "65533",
                                 "--clear-groups", "cat", str(sink / "key.pem")],
                                capture_output=True)
        assert denied.returncode != 0
