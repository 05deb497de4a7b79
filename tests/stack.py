"""The embedded default stack on one machine: swtpm + devid-registrar + devid-agent.

One piece of code serves the integration tests and `make demo`, so the demo
shows exactly what the tests exercise.

    python tests/stack.py demo --dir .demo        # bring up, show status and check
    python tests/stack.py demo --dir .demo --down # stop what a kept demo left running
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from aiocoap.util import hostportjoin

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "swtpm"))

import harness  # noqa: E402  (swtpm/harness.py, stdlib only)
from coap_upstream import CoapUpstreamProcess  # noqa: E402
from dtls_sensor import CLIENTS, coap_client, libcoap_psk  # noqa: E402
from mtls import server_identity  # noqa: E402
from oscore_sensor import OscoreSensor  # noqa: E402
from processes import terminate  # noqa: E402

BIN = Path(sys.executable).parent


@dataclass
class SimulatedTpm:
    state_dir: Path
    tcti: str

    @property
    def vendor_ca(self) -> Path:
        return self.state_dir / "vendor-ca.pem"

    def stop(self) -> None:
        harness.stop(self.state_dir)


def start_tpm(state_dir: Path) -> SimulatedTpm:
    return SimulatedTpm(state_dir, harness.start(state_dir))


def write_agent_config(path: Path, tcti: str, ek_roots: list[Path], extra: str = "",
                       control_socket: Path | None = None, state_dir: str = "state",
                       identity_api: str = "") -> Path:
    """An agent.toml for a test agent; its sockets beside it (never the system's in /run).
    `identity_api`: more lines for [identity_api]."""
    roots = ", ".join(json.dumps(str(r)) for r in ek_roots)
    sock = json.dumps(str(control_socket or "run/control.sock"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "[tpm]\n"
        f"tcti = {json.dumps(tcti)}\n\n"
        "[paths]\n"
        f"state_dir = {json.dumps(state_dir)}\n"
        f"control_socket = {sock}\n\n"
        "[identity_api]\n"
        + ("" if "socket =" in identity_api else 'socket = "run/identity.sock"\n')
        + identity_api + "\n"
        "[trust]\n"
        f"ek_roots = [{roots}]\n" + extra
    )
    return path


SWTPM_FRESH_PCRS = {i: "00" * 32 for i in range(8)}  # sha256 PCRs 0-7 after TPM2_Startup


# Debian's libfaketime: moves a process's wall clock only, monotonic time untouched,
# as with a bad RTC or a wrong NTP server.
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")


def faked_clock(offset: str) -> dict[str, str]:
    """Environment for a child whose wall clock is `offset` off ("+3d", "-16s")."""
    return {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": offset,
            "FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_NO_CACHE": "1"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_udp_port() -> int:
    """A UDP port for a listener: below the kernel's ephemeral range (so that no client
    socket of a test running alongside takes it before the listener binds it) and free
    for a dual-stack "[::]" bind, which also covers 127.0.0.1 and ::1."""
    for _ in range(100):
        port = random.randint(20000, 32000)
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                s.bind(("::", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free UDP port between 20000 and 32000")


def allowed_pcrs_toml(name: str, values: dict[int, str]) -> str:
    inner = ", ".join(f'"{p}" = "{v}"' for p, v in sorted(values.items()))
    return f'\n[[pcr_policy.allowed]]\nname = "{name}"\nvalues = {{ {inner} }}\n'


class RegistrarProcess:
    """devid-registrar initialised in `directory` and served on a loopback port."""

    def __init__(self, directory: Path, ek_roots: list[Path],
                 allowed: dict[int, str] | None = None, settings: dict[str, str] | None = None,
                 permissive: bool = False, init_args: list[str] | None = None,
                 extra_toml: str = "") -> None:
        self.directory = directory
        self.init_args = init_args or []
        self.extra_toml = extra_toml
        self.listen_override: str | None = None
        self.ek_roots = ek_roots
        self.allowed = SWTPM_FRESH_PCRS if allowed is None else allowed
        self.settings = settings or {}
        self.permissive = permissive
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = directory.parent / f"{directory.name}.log"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.directory / "ca" / "root.pem"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(BIN / "devid-registrar"), *args], capture_output=True,
                              text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"devid-registrar {' '.join(args)}: {proc.stderr}")
        return proc

    def init(self) -> RegistrarProcess:
        self.port = free_port()
        roots = [a for r in self.ek_roots for a in ("--ek-root", str(r))]
        self.cli("init", "--dir", str(self.directory), "--listen", f"127.0.0.1:{self.port}",
                 "--server-name", "127.0.0.1", *roots, *self.init_args)
        config = self.directory / "registrar.toml"
        text = config.read_text()
        for key, value in self.settings.items():
            # A key the file only shows commented out (no default to write) is set there.
            text, found = re.subn(rf"(?m)^(# )?{key} = .*$", f"{key} = {value}", text)
            if not found:
                raise KeyError(f"registrar.toml has no line for {key}")
        if self.permissive:
            text = text.replace('mode = "enforce"', 'mode = "permissive"')
        if self.allowed:
            text += allowed_pcrs_toml("swtpm fresh", self.allowed)
        config.write_text(text + self.extra_toml)
        return self

    def replica(self) -> RegistrarProcess:
        """Another `serve` on the same directory (and database), on a port of its own."""
        other = RegistrarProcess(self.directory, self.ek_roots)
        other.port = free_port()
        other.listen_override = f"127.0.0.1:{other.port}"
        other.log_path = self.directory.parent / f"{self.directory.name}-{other.port}.log"
        return other

    def start(self, timeout: float = 20.0, env: dict[str, str] | None = None
              ) -> RegistrarProcess:
        if not (self.directory / "registrar.toml").exists():
            self.init()
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        listen = ["--listen", self.listen_override] if self.listen_override else []
        self.proc = subprocess.Popen([str(BIN / "devid-registrar"), "serve", "--dir",
                                      str(self.directory), *listen], stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL,
                                     env={**os.environ, **env} if env else None)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"devid-registrar exited with {self.proc.returncode}:\n"
                                   + self.log_path.read_text())
            try:
                requests.get(f"{self.url}/v1/health", verify=str(self.ca), timeout=2)
                return self
            except requests.RequestException:
                time.sleep(0.1)
        raise TimeoutError(f"devid-registrar not serving after {timeout}s:\n"
                           + self.log_path.read_text())

    def token(self, ttl: str = "1h") -> str:
        return self.cli("token", "create", "--dir", str(self.directory), "--ttl",
                        ttl).stdout.strip()

    def devices(self) -> list[dict[str, object]]:
        out = self.cli("devices", "list", "--dir", str(self.directory), "--json").stdout
        return json.loads(out)  # type: ignore[no-any-return]

    def audit(self) -> list[dict[str, object]]:
        """The audit records: the file, or the table replicas on PostgreSQL share."""
        import tomllib

        config = tomllib.loads((self.directory / "registrar.toml").read_text())
        url = config.get("database", {}).get("url")
        if url:
            import psycopg

            with psycopg.connect(url) as conn:
                return [json.loads(r) for (r,) in conn.execute(
                    "SELECT record FROM registrar_audit ORDER BY seq").fetchall()]
        path = self.directory / "audit.log"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def stop(self) -> None:
        terminate(self.proc)


def enrollment_toml(registrar: RegistrarProcess, token: str | None) -> str:
    """The agent's [enrollment] section for `registrar`, with fast retries for tests."""
    text = (f"\n[enrollment]\nurl = {json.dumps(registrar.url)}\n"
            f"ca = {json.dumps(str(registrar.ca))}\n"
            'retry_initial = "1s"\nretry_max = "4s"\n')
    if token:
        text += f"token = {json.dumps(token)}\n"
    return text


def consumer_toml(name: str, grants: tuple[str, ...] = ("secrets", "credentials")) -> str:
    """This user declared a consumer of the agent's identity API (docs/identity-api.md):
    on a gateway devid-broker runs as a user of its own; here it runs as ours."""
    listed = ", ".join(f'"{g}"' for g in grants)
    return f'\n[[consumers]]\nname = "{name}"\nuser = {os.getuid()}\ngrants = [{listed}]\n'


@contextlib.contextmanager
def enrolled_gateway(directory: Path) -> Iterator[tuple[AgentProcess, RegistrarProcess]]:
    """swtpm, a registrar and an agent enrolled with it that declares this user the
    consumer `broker`: what a broker needs underneath (benchmarks use it)."""
    tpm = start_tpm(directory / "tpm")
    registrar = RegistrarProcess(directory / "registrar", [tpm.vendor_ca]).start()
    config = write_agent_config(directory / "agent" / "agent.toml", tpm.tcti, [tpm.vendor_ca],
                                enrollment_toml(registrar, registrar.token()) + rotation_toml()
                                + consumer_toml("broker"))
    agent = AgentProcess(config).start()
    try:
        agent.wait_enrollment("enrolled", timeout=60)
        yield agent, registrar
    finally:
        agent.stop()
        registrar.stop()
        tpm.stop()


def rotation_toml(retry_max: str = "2s", hooks: list[str] | None = None) -> str:
    """The agent's [rotation] section with fast retries for tests."""
    return (f'\n[rotation]\nretry_initial = "1s"\nretry_max = "{retry_max}"\n'
            f"reload_hooks = {json.dumps(hooks or [])}\n")


class AgentProcess:
    """devid-agent running as a child process, with its log captured to a file."""

    def __init__(self, config: Path, control_socket: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.config = config
        self.env = env
        self.log_path = config.parent / "agent.log"
        self.socket = control_socket or config.parent / "run" / "control.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True, timeout: float = 20.0) -> AgentProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [str(BIN / "devid-agent"), "--config", str(self.config)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env} if self.env else None,
        )
        log.close()
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until the control socket answers and the TPM is connected (or `timeout`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"devid-agent exited with {self.proc.returncode}:\n"
                                   + self.log_path.read_text())
            if self.socket.exists():
                doc = self.status()
                if doc.get("tpm", {}).get("reachable"):
                    return
            time.sleep(0.1)
        raise TimeoutError(f"devid-agent not ready after {timeout}s:\n" + self.log_path.read_text())

    def wait_status(self, what: str, predicate: Callable[[dict[str, Any]], bool],
                    timeout: float = 30.0) -> dict[str, Any]:
        """Poll status until `predicate(doc)`; returns the status document."""
        deadline = time.monotonic() + timeout
        doc: dict[str, Any] = {}
        while time.monotonic() < deadline:
            doc = self.status()
            if doc and predicate(doc):
                return doc
            time.sleep(0.1)
        raise TimeoutError(f"not {what} after {timeout}s: {json.dumps(doc, indent=1)}\n"
                           + self.log_path.read_text())

    def status(self) -> dict[str, Any]:
        """The status document straight from the control socket (cheaper than spawning
        devidctl, for polling); {} while the daemon does not answer."""
        from agent.control import client
        from agent.errors import DevidError

        try:
            return client.call(self.socket, "status", timeout=10)
        except DevidError:
            return {}

    def wait_enrollment(self, state: str = "enrolled", timeout: float = 30.0) -> dict[str, Any]:
        """Until enrollment.state is `state`; "enrolled" also waits for the first TLS
        certificate (the renewal that follows enrollment at once)."""
        def reached(doc: dict[str, Any]) -> bool:
            if (doc.get("enrollment") or {}).get("state") != state:
                return False
            return state != "enrolled" or bool((doc.get("tls_certificate") or {}).get(
                "presented"))
        return self.wait_status(f"enrollment {state}", reached, timeout)

    def wait_generation(self, generation: int, timeout: float = 30.0) -> dict[str, Any]:
        """Until at least `generation` renewals have completed since enrollment."""
        return self.wait_status(f"renewed {generation} times", lambda d: (d.get("rotation") or {})
                                .get("generation", 0) >= generation, timeout)

    def ctl_command(self) -> list[str]:
        return [str(BIN / "devidctl"), "--config", str(self.config)]

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.ctl_command(), *args], capture_output=True, text=True,
                              timeout=60)

    def ctl_json(self, *args: str) -> tuple[int, dict[str, Any]]:
        proc = self.ctl(*args, "--json")
        return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class BrokerProcess:
    """devid-broker as a child process: its config, state and sockets in `directory`."""

    def __init__(self, directory: Path, identity_socket: Path, extra: str = "",
                 plain: bool = False, listen: str = "", host: str = "127.0.0.1") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.socket = directory / "run" / "control.sock"
        self.config = directory / "broker.toml"
        self.oscore_port, self.dtls_port = free_udp_port(), free_udp_port()
        self.plain_port = free_udp_port() if plain else None
        self.config.write_text(
            f'[paths]\nstate_dir = "state"\ncontrol_socket = "run/control.sock"\n'
            f'[identity]\nsocket = {json.dumps(str(identity_socket))}\nretry = "1s"\n'
            '[policy]\nfile = "policy.toml"\n'
            f'[listen]\noscore = "{hostportjoin(host, self.oscore_port)}"\n'
            f'dtls = "{hostportjoin(host, self.dtls_port)}"\n'
            + (f'plain = "{hostportjoin(host, self.plain_port)}"\n' if plain else "")
            + listen + extra)
        self.policy = directory / "policy.toml"
        self.log = directory / "broker.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> BrokerProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([str(BIN / "devid-broker"), "--config",
                                          str(self.config)], stdout=log, stderr=log)
        return self

    def wait_serving(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"devid-broker exited {self.proc.returncode}:\n"
                                   + self.log.read_text())
            # Answering, not merely there: a SIGKILLed broker leaves its socket file behind.
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(self.socket))
                return
            time.sleep(0.1)
        raise TimeoutError(self.log.read_text())

    def ctl(self, *args: str, verb: str = "sensors") -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "devidctl"), verb, *args, "--broker-socket",
                               str(self.socket)], capture_output=True, text=True, timeout=120)

    def ctl_json(self, *args: str) -> tuple[int, dict]:
        out = self.ctl(*args, "--json")
        return out.returncode, json.loads(out.stdout) if out.stdout.strip() else {}

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(15)


# --- make demo ------------------------------------------------------------------


DEMO_POLICY = """
[profiles.temperature]
[[profiles.temperature.rules]]
name = "telemetry"
methods = ["POST"]
path = "/telemetry"
upstream = "sensors/{sensor}/telemetry"
max_payload = 64
content_formats = [0, 60, 112]
"""


# The demo's LwM2M sensors: they may register, and the operator may read the Device object.
DEMO_LWM2M = """
[profiles.meter]
[profiles.meter.lwm2m]
[[profiles.meter.lwm2m.grants]]
operations = ["read", "observe"]
paths = ["/3/0", "/3303/0/5700"]
[[profiles.meter.lwm2m.grants]]
who = ["upstream"]
operations = ["read"]
paths = ["/3303/0/5700"]
"""


class DemoLwm2mServer:
    """The fleet's LwM2M server of the demo: lwm2m-node-lib's, behind a DTLS front that
    requires the gateway's certificate (the front runs in the demo's own process)."""

    def __init__(self, directory: Path, client_ca: Path) -> None:
        from lwm2m_peer import DtlsCertRelay, NodeLwm2mServer

        cert, key, ca_pem = server_identity(directory / "tls")
        self.ca = directory / "ca.pem"
        self.ca.write_text(ca_pem)
        self.server = NodeLwm2mServer(free_udp_port())
        self.front = DtlsCertRelay(self.server.port, cert, key, client_ca.read_text())

    def toml(self) -> str:
        return (f'[lwm2m_upstream]\nurl = "coaps://127.0.0.1:{self.front.port}"\n'
                f'bundle = "{self.ca}"\nendpoint = "demo-gateway"\n')

    def stop(self) -> None:
        self.front.close()
        self.server.close()


def _demo_lwm2m(directory: Path, broker: BrokerProcess,
                lwm2m_server: DemoLwm2mServer | None = None) -> None:
    from lwm2m_sensor import oscore_client

    _banner("devidctl sensors add m-1 --profile meter: an LwM2M sensor")
    _, added = broker.ctl_json("add", "m-1", "--profile", "meter")
    client = oscore_client(directory / "sensor-m-1", added["sensors"][0]["credential"],
                           broker.oscore_port)
    try:
        _banner("the sensor (an aiocoap LwM2M client) registers: POST /rd over OSCORE")
        print(f"m-1 Register -> {client.register('m-1')}")
        _banner("devidctl sensors read m-1 /3/0 (LwM2M Read, from the gateway to the sensor "
                "over its own OSCORE context)")
        print(broker.ctl("read", "m-1", "/3/0").stdout, end="")
        _banner("devidctl sensors observe m-1 /3303/0/5700 --count 3")
        print(broker.ctl("observe", "m-1", "/3303/0/5700", "--count", "3").stdout, end="")
        _banner("devidctl sensors show m-1")
        print(broker.ctl("show", "m-1").stdout, end="")
        if lwm2m_server is not None:
            server = lwm2m_server.server
            _banner("the fleet's LwM2M server (lwm2m-node-lib) reads m-1 through the "
                    "gateway: /m-1/3303/0/5700, routed by the LwM2M Gateway object (/25)")
            registered = server.wait_for("registration")
            print(f"the gateway registered as {registered['endpoint']} (LwM2M "
                  f"{registered['version']}) over DTLS with its certificate")
            update = server.wait_for("update")
            print(f"its Update when m-1 came: {update['payload']}")
            read = server.request("read demo-gateway /m-1/3303/0/5700")
            print(f"server Read /m-1/3303/0/5700 -> {read['value'] or read['error']}")
            read = server.request("read demo-gateway /m-1/3/0/0")
            print(f"server Read /m-1/3/0/0 -> {read['value'] or read['error']} (the "
                  "profile grants the upstream /3303/0/5700 only)")
    finally:
        client.close()


def _banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def _demo_upstream(directory: Path, client_ca: Path) -> CoapUpstreamProcess:
    cert, key, ca_pem = server_identity(directory / "tls")
    (directory / "ca.pem").write_text(ca_pem)
    return CoapUpstreamProcess(directory, free_port(), cert, key, client_ca).start()


def _demo_sensor(directory: Path, credential: dict[str, str], port: int,
                 readings: tuple[tuple[str, float], ...]) -> None:
    import cbor2

    sensor = OscoreSensor(directory, credential, port)
    how = "EDHOC, then OSCORE" if credential["transport"] == "edhoc" else "OSCORE"
    try:
        for path, reading in readings:
            answer = sensor.request("POST", path, cbor2.dumps({"t": reading}), 60)
            print(f"POST {path} {{t: {reading}}} ({how}) -> {answer.code} "
                  f"{answer.payload.decode(errors='replace')}")
    finally:
        sensor.close()


def demo(directory: Path, keep: bool) -> int:
    directory = directory.resolve()
    if directory.exists():
        down(directory)
        shutil.rmtree(directory)  # each demo starts from a factory-fresh TPM and registrar
    _banner(f"starting a simulated TPM (swtpm) in {directory / 'tpm'}")
    tpm = start_tpm(directory / "tpm")
    print(f"TCTI: {tpm.tcti}\nvendor CA: {tpm.vendor_ca}")
    _banner("devid-registrar init + serve (CA, policy: swtpm's fresh PCRs 0-7)")
    registrar = RegistrarProcess(directory / "registrar", [tpm.vendor_ca]).start()
    print(f"serving {registrar.url}; CA pinned by the agent: {registrar.ca}")
    _banner("devid-registrar token create")
    token = registrar.token("15m")
    print("one-time enrollment token created (not shown)")
    # The demo's own user is a consumer of the identity API (docs/identity-api.md). On a
    # gateway devid-broker is a consumer of its own (user devid-broker); here it runs as
    # the demo's user, so it is this consumer too.
    consumer = consumer_toml("demo", ("credentials", "sign", "secrets"))
    config = write_agent_config(directory / "agent" / "agent.toml", tpm.tcti, [tpm.vendor_ca],
                                enrollment_toml(registrar, token) + consumer)
    _banner(f"starting devid-agent --config {config}")
    agent = AgentProcess(config).start()
    broker: BrokerProcess | None = None
    upstream: CoapUpstreamProcess | None = None
    lwm2m_server: DemoLwm2mServer | None = None
    status = check = 2
    try:
        _banner("waiting for attestation-backed enrollment")
        agent.wait_enrollment("enrolled", timeout=60)
        _banner("devidctl status")
        proc = agent.ctl("status")
        print(proc.stdout or proc.stderr, end="")
        status = proc.returncode
        _banner("devidctl check")
        proc = agent.ctl("check")
        print(proc.stdout or proc.stderr, end="")
        check = proc.returncode
        _banner("devidctl credentials fetch (as consumer demo-shell, over the identity API)")
        proc = agent.ctl("credentials", "fetch")
        print(proc.stdout or proc.stderr, end="")
        _banner("a CoAP-over-TLS upstream (RFC 8323) that requires the registrar CA's "
                "client certificates")
        upstream = _demo_upstream(directory / "upstream", registrar.ca)
        print(f"coaps+tcp://127.0.0.1:{upstream.port}, recording to {upstream.record}")
        _banner("devid-broker: its data key and the gateway's TLS credentials from the "
                "identity API, its sensor registry, OSCORE and DTLS-PSK listeners")
        _banner("the fleet's LwM2M server (lwm2m-node-lib) behind a DTLS front that "
                "requires the registrar CA's client certificates")
        lwm2m_server = DemoLwm2mServer(directory / "lwm2m-server", registrar.ca)
        print(f"coaps://127.0.0.1:{lwm2m_server.front.port}")
        broker = BrokerProcess(directory / "broker", config.parent / "run" / "identity.sock",
                               f'[upstreams.cloud]\nurl = "coaps+tcp://127.0.0.1:'
                               f'{upstream.port}"\nbundle = "{upstream.directory / "ca.pem"}"\n'
                               + lwm2m_server.toml())
        broker.policy.write_text(DEMO_POLICY + DEMO_LWM2M)
        broker.start().wait_serving()
        print(f"OSCORE on udp 127.0.0.1:{broker.oscore_port}, DTLS-PSK on udp "
              f"127.0.0.1:{broker.dtls_port}")
        _banner("devidctl sensors add t-1 --profile temperature --attr site=demo --json")
        _, added = broker.ctl_json("add", "t-1", "--profile", "temperature", "--attr",
                                   "site=demo")
        sensor = added["sensors"][0]
        print(f"{sensor['name']} {sensor['id']}: OSCORE Sender ID {sensor['kid']}, its own "
              "master secret and salt (printed once, not shown here)")
        _banner("devidctl policy explain t-1 POST /telemetry --size 12 --format 60")
        print(broker.ctl("explain", "t-1", "POST", "/telemetry", "--size", "12", "--format",
                         "60", verb="policy").stdout, end="")
        _banner("the sensor (aiocoap's OSCORE client) sends telemetry through the gateway")
        _demo_sensor(directory / "sensor", sensor["credential"], broker.oscore_port,
                     (("/telemetry", 21.5), ("/telemetry", 21.7), ("/config", 0)))
        for entry in upstream.received():
            print(f"upstream received {entry['method']} {entry['path']} asserting sensor "
                  f"{entry['sensor'][0]}, over TLS with client certificate serial "
                  f"{entry['client']['serial']}")
        _banner("devidctl sensors add e-1 --profile temperature --transport edhoc")
        _, added = broker.ctl_json("add", "e-1", "--profile", "temperature", "--transport",
                                   "edhoc")
        print(f"e-1: EDHOC key ID {added['sensors'][0]['kid']}, its own P-256 key and the "
              "gateway's EDHOC credential (printed once, not shown here)")
        _banner("the sensor (aiocoap's EDHOC initiator, lakers) runs EDHOC, then sends over "
                "the fresh OSCORE context")
        _demo_sensor(directory / "sensor-e-1", added["sensors"][0]["credential"],
                     broker.oscore_port, (("/telemetry", 19.5),))
        entry = upstream.received()[-1]
        print(f"upstream received {entry['method']} {entry['path']} asserting sensor "
              f"{entry['sensor'][0]}")
        _banner("devidctl sensors add d-1 --profile temperature --transport dtls-psk")
        _, added = broker.ctl_json("add", "d-1", "--profile", "temperature", "--transport",
                                   "dtls-psk")
        identity, key = libcoap_psk(broker, "d-1", added["sensors"][0]["credential"])
        print(f"d-1: PSK identity {identity}, its own 16-byte key (not shown here)")
        _banner("libcoap's coap-client-openssl and coap-client-gnutls send telemetry over "
                "DTLS-PSK")
        for tool in CLIENTS:
            reply = coap_client(tool, identity, key, broker.dtls_port, "/telemetry", "21.9")
            print(f"{tool} POST /telemetry 21.9 (DTLS-PSK) -> {reply.text}")
        entry = upstream.received()[-1]
        print(f"upstream received {entry['method']} {entry['path']} asserting sensor "
              f"{entry['sensor'][0]}")
        _demo_lwm2m(directory, broker, lwm2m_server)
        _banner("devidctl sensors list")
        print(broker.ctl("list").stdout, end="")
        _banner("devidctl status and check, now with devid-broker's part")
        proc = agent.ctl("status", "--broker-socket", str(broker.socket))
        print(proc.stdout or proc.stderr, end="")
        status = proc.returncode
        proc = agent.ctl("check", "--broker-socket", str(broker.socket))
        print(proc.stdout or proc.stderr, end="")
        check = proc.returncode
        _banner("devidctl consumers list")
        print(agent.ctl("consumers", "list").stdout, end="")
        _banner("devid-registrar devices list")
        print(registrar.cli("devices", "list", "--dir", str(registrar.directory)).stdout, end="")
        _banner("devid-registrar audit verify")
        print(registrar.cli("audit", "verify", "--dir", str(registrar.directory)).stdout, end="")
    finally:
        if keep:
            _banner(f"left running; try: .venv/bin/devidctl --config {config} status; "
                    "stop with make demo-down")
            pids = [p.proc.pid for p in (agent, registrar, broker, upstream) if p and p.proc]
            (directory / "pids").write_text("".join(f"{pid}\n" for pid in pids))
            if lwm2m_server is not None:  # its DTLS front lives in this process
                print("the LwM2M server ends with the demo: the broker will say it is "
                      "unreachable (devidctl check: broker-lwm2m)")
                lwm2m_server.stop()
        else:
            _banner("stopping the broker, the agent, the registrar and swtpm (DEMO_KEEP=1 "
                    "keeps them)")
            if broker is not None:
                broker.stop()  # it de-registers from the LwM2M server first
            if lwm2m_server is not None:
                lwm2m_server.stop()
            if upstream is not None:
                upstream.stop()
            agent.stop()
            registrar.stop()
            tpm.stop()
    print(f"\nstatus exit code {status}, check exit code {check} (0 OK, 1 WARN, 2 FAIL)")
    return 0 if status == 0 and check <= 1 else 1


def down(directory: Path) -> int:
    pid_file = directory / "pids"
    if pid_file.exists():
        for pid in pid_file.read_text().split():
            # Only the demo's own processes: their command lines name its directory.
            if pid.isdigit() and harness.pid_runs(int(pid), str(directory.resolve())):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGTERM)
            else:
                print(f"not stopping pid {pid}: no longer a process of this demo")
        pid_file.unlink()
    harness.stop(directory / "tpm")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="the local devid-agent stack")
    parser.add_argument("action", choices=["demo"])
    parser.add_argument("--dir", type=Path, default=REPO / ".demo")
    parser.add_argument("--down", action="store_true")
    args = parser.parse_args()
    if args.down:
        return down(args.dir)
    return demo(args.dir, keep=os.environ.get("DEMO_KEEP") == "1")


if __name__ == "__main__":
    sys.exit(main())
