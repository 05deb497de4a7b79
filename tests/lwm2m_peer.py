"""lwm2m-node-lib's LwM2M client (Telefonica, npm; installed by `make peers`) as a sensor
of the gateway, through a DTLS-PSK relay.

lwm2m-node-lib speaks plain CoAP only. The gateway takes LwM2M only over a sensor's
own credential, so the relay plays the sensor's secure radio: it holds one DTLS-PSK
session (Mbed TLS, the sensor's credential) to the broker, and passes datagrams between
it and the client on loopback, both ways. The LwM2M semantics are all the Node
library's own."""

from __future__ import annotations

import json
import queue
import select
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

from aiocoap import Code, Message

PEERS = Path(__file__).resolve().parent / "peers"


class DtlsRelay:
    """Plain CoAP on 127.0.0.1:`port` <-> one DTLS-PSK session to the broker."""

    def __init__(self, broker_port: int, identity: str, key: bytes) -> None:
        from mbedtls import tls

        conf = tls.DTLSConfiguration(pre_shared_key=(identity, key),
                                     ciphers=["TLS-PSK-WITH-AES-128-CCM-8"],
                                     lowest_supported_version=tls.DTLSVersion.DTLSv1_2,
                                     validate_certificates=False)
        self._secure = tls.ClientContext(conf).wrap_socket(
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM), server_hostname=None)
        self._secure.settimeout(10)
        self._secure.connect(("127.0.0.1", broker_port))
        self._secure.do_handshake()
        self._plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._plain.bind(("127.0.0.1", 0))
        self.port = int(self._plain.getsockname()[1])
        self._client: tuple[str, int] | None = None  # the last request's source
        self._listener: tuple[str, int] | None = None  # where the client serves (its /rd port)
        self._asked: dict[int, tuple[str, int]] = {}  # message ID -> who sent that request
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._plain, self._secure], [], [], 0.1)
            if self._plain in ready:
                data, self._client = self._plain.recvfrom(65535)
                message = Message.decode(data)
                if message.code.is_request():
                    self._asked[message.mid] = self._client
                    # lwm2m-node-lib serves the gateway's requests on its Register's port
                    if message.code == Code.POST and message.opt.uri_path in (("rd",),
                                                                              ("bs",)):
                        self._listener = self._client
                self._secure.send(data)
            if self._secure in ready:
                try:
                    data = self._secure.recv(65535)
                except Exception:  # an alert, a timeout: the session is over
                    return
                message = Message.decode(data)
                # The gateway's own requests go to the client's listener; answers (and
                # empty ACKs) to whoever sent the request they answer.
                to = self._listener if message.code.is_request() else \
                    self._asked.get(message.mid, self._client)
                if to is not None:
                    self._plain.sendto(data, to)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._plain.close()
        self._secure.close()


class NodeLwm2mClient:
    """tests/peers/lwm2m_client.js: registers on start; `update`, `deregister`."""

    def __init__(self, port: int, endpoint: str, lifetime: int = 300) -> None:
        self.proc = subprocess.Popen(
            ["node", str(PEERS / "lwm2m_client.js"), "127.0.0.1", str(port), endpoint,
             str(lifetime)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, cwd=PEERS)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put("")  # it ended

    def next_event(self, timeout: float = 30.0) -> dict[str, Any]:
        line = self._lines.get(timeout=timeout)
        if not line:
            assert self.proc.stderr is not None
            raise RuntimeError(f"lwm2m_client.js ended: {self.proc.stderr.read()}")
        return json.loads(line)

    def command(self, what: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self.next_event()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
