"""Debian's mosquitto as the fleet's MQTT broker for tests and the demo: a TLS listener
that requires client certificates from the registrar's CA (the gateway's identity), and a
plain loopback listener for mosquitto_sub, which records what arrives with its MQTT 5
user properties and content type."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from processes import terminate
from stack import free_port


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    properties: str  # mosquitto_sub's %P: "sensor:urn:devid:sensor:..."
    content_type: str
    qos: int


class Mosquitto:
    def __init__(self, directory: Path, cert: Path, key: Path, client_ca: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.tls_port, self.plain_port = free_port(), free_port()
        self.config = directory / "mosquitto.conf"
        self.config.write_text(
            # Started as root, mosquitto would switch to its own user, which cannot read
            # the test's private directories; as any other user this line does nothing.
            "user root\n"
            "per_listener_settings true\n"
            f"listener {self.tls_port} 127.0.0.1\n"
            f"cafile {client_ca}\ncertfile {cert}\nkeyfile {key}\n"
            "require_certificate true\nuse_identity_as_username true\n"
            f"listener {self.plain_port} 127.0.0.1\nallow_anonymous true\n")
        self.log = directory / "mosquitto.log"
        self.received_file = directory / "received.txt"
        self.proc: subprocess.Popen[bytes] | None = None
        self.sub: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def _subscriber_connections(self) -> int:
        return sum(1 for line in self.log.read_text(errors="replace").splitlines()
                   if "New client connected" in line and "test-recorder" in line)

    def start(self, topic: str = "#", timeout: float = 10.0) -> Mosquitto:
        """Start the broker; the subscriber on the first start, and on a restart wait until
        it has connected again (libmosquitto reconnects by itself)."""
        self.log.touch()
        before = self._subscriber_connections()
        self.starts += 1
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["mosquitto", "-c", str(self.config), "-v"],
                                         stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while self.log.read_bytes().count(b" running") < self.starts:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        if self.sub is None:
            with open(self.received_file, "ab") as out:
                self.sub = subprocess.Popen(
                    ["mosquitto_sub", "-V", "mqttv5", "-p", str(self.plain_port), "-q", "1",
                     "-t", topic, "-F", "%t|%x|%P|%C|%q", "-c", "-i", "test-recorder"],
                    stdout=out, stderr=subprocess.STDOUT)
        while self._subscriber_connections() <= before:
            if time.monotonic() > deadline + 10:
                raise RuntimeError(f"mosquitto_sub did not connect:\n{self.log.read_text()}")
            time.sleep(0.05)
        return self

    def received(self) -> list[Received]:
        out = []
        for line in self.received_file.read_text().splitlines():
            topic, payload, props, ctype, qos = line.split("|")
            out.append(Received(topic, bytes.fromhex(payload), props, ctype, int(qos)))
        return out

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(got := self.received()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return got

    def stop(self, subscriber: bool = True) -> None:
        """Stop the broker (and, unless told otherwise, the subscriber, whose persistent
        session then keeps what arrives while it is away)."""
        terminate(self.proc)
        if subscriber:
            terminate(self.sub)
            self.sub = None
