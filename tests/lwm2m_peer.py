"""lwm2m-node-lib (Telefonica, npm; installed by `make peers`) as the gateway's peers: its
LwM2M client as a sensor, through a DTLS-PSK relay, and its LwM2M server as the fleet's
upstream server, behind a DTLS relay with certificates.

lwm2m-node-lib speaks plain CoAP only. The gateway takes LwM2M only over a sensor's
own credential, so the sensor's relay plays the sensor's secure radio: it holds one
DTLS-PSK session (Mbed TLS, the sensor's credential) to the broker, and passes
datagrams between it and the client on loopback, both ways. The server's relay is the
DTLS front a fleet's server has: the gateway's certificate is verified there. The
LwM2M semantics are all the Node library's own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import select
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import aiocoap
from aiocoap import Code, Message
from aiocoap import resource as coap_resource

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


class _NodePeer:
    """A Node script of tests/peers: JSON events on stdout, commands on stdin."""

    def __init__(self, script: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            ["node", str(PEERS / script), *args], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=PEERS)
        self._script = script
        self._lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []  # every line it printed, in order
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.seen.append(line)
            self._lines.put(line)
        self._lines.put("")  # it ended

    def next_event(self, timeout: float = 30.0) -> dict[str, Any]:
        line = self._lines.get(timeout=timeout)
        if not line:
            assert self.proc.stderr is not None
            raise RuntimeError(f"{self._script} ended: {self.proc.stderr.read()}")
        return json.loads(line)

    def wait_for(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        """The next event of this kind (others before it are passed over)."""
        while True:
            got = self.next_event(timeout)
            if got.get("event") == event:
                return got

    def send(self, what: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()

    def command(self, what: str) -> dict[str, Any]:
        self.send(what)
        return self.next_event()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


class NodeLwm2mClient(_NodePeer):
    """tests/peers/lwm2m_client.js: registers on start; `update`, `deregister`."""

    def __init__(self, port: int, endpoint: str, lifetime: int = 300) -> None:
        super().__init__("lwm2m_client.js", "127.0.0.1", str(port), endpoint, str(lifetime))


class NodeLwm2mServer(_NodePeer):
    """tests/peers/lwm2m_server.js on 127.0.0.1:`port`: `read EP PATH`, `observe EP PATH`,
    `write EP PATH VALUE`, `list`; registrations, updates and de-registrations are
    events."""

    def __init__(self, port: int) -> None:
        super().__init__("lwm2m_server.js", str(port))
        self.port = port
        assert self.next_event().get("event") == "listening"

    def request(self, command: str) -> dict[str, Any]:
        """The command's result (events the server reports meanwhile are passed over)."""
        self.send(command)
        return self.wait_for(command.split()[0])


class DtlsCertRelay:
    """An LwM2M server's DTLS front, as a fleet's would run it: DTLS 1.2 with a server
    certificate on 127.0.0.1, requiring a client certificate under `client_ca`; what a
    session carries goes to the plain server at `server_port` and back. One plain socket
    per client identity (certificate subject), so a client that handshakes again with a
    new certificate of the same subject keeps its address at the server. Each session
    is recorded: (client address, certificate serial, subject)."""

    def __init__(self, server_port: int, cert: Path, key: Path, client_ca: str,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding
        from mbedtls import pk, tls
        from mbedtls import x509 as mx509

        anchors = [mx509.CRT.from_DER(c.public_bytes(Encoding.DER))
                   for c in x509.load_pem_x509_certificates(client_ca.encode())]
        conf = tls.DTLSConfiguration(
            certificate_chain=((mx509.CRT.from_PEM(cert.read_text()),),
                               pk.ECC.from_PEM(key.read_text())),
            trust_store=tls.TrustStore(anchors), validate_certificates=True,
            lowest_supported_version=tls.DTLSVersion.DTLSv1_2)
        self._tls, self._context = tls, tls.ServerContext(conf)
        self._server = ("127.0.0.1", server_port)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((host, port))
        self.port = int(self._sock.getsockname()[1])
        self._buffers: dict[tuple[str, int], Any] = {}
        self._subject_of: dict[tuple[str, int], str] = {}
        self._plain: dict[str, socket.socket] = {}  # subject -> its socket to the server
        self._latest: dict[str, tuple[str, int]] = {}  # subject -> its newest session
        self._asked: dict[int, tuple[str, int]] = {}  # message ID -> who sent the request
        self._asked_token: dict[bytes, tuple[str, int]] = {}  # token -> the same
        self.sessions: list[tuple[tuple[str, int], int, str]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from cryptography import x509

        tls = self._tls
        while not self._stop.is_set():
            sockets = [self._sock, *self._plain.values()]
            ready, _, _ = select.select(sockets, [], [], 0.1)
            for sock in ready:
                if sock is not self._sock:
                    self._from_server(sock)
                    continue
                data, address = self._sock.recvfrom(65535)
                buffer = self._buffers.get(address)
                if buffer is None:
                    buffer = self._buffers[address] = self._context.wrap_buffers()
                    buffer.setcookieparam(repr(address).encode())
                try:
                    buffer.receive_from_network(data)
                    if buffer._handshake_state is not tls.HandshakeStep.HANDSHAKE_OVER:
                        while buffer._handshake_state is not \
                                tls.HandshakeStep.HANDSHAKE_OVER:
                            try:
                                buffer.do_handshake()
                            except tls.WantWriteError:
                                self._flush(buffer, address)
                            except tls.WantReadError:
                                break
                        self._flush(buffer, address)
                        if buffer._handshake_state is tls.HandshakeStep.HANDSHAKE_OVER:
                            cert = x509.load_der_x509_certificate(
                                buffer.getpeercert(binary_form=True))
                            subject = cert.subject.rfc4514_string()
                            self._subject_of[address] = subject
                            self._latest[subject] = address
                            self.sessions.append((address, cert.serial_number, subject))
                        continue
                    while True:
                        try:
                            plain = buffer.read(65535)
                        except tls.WantReadError:
                            break
                        if not plain:
                            break
                        self._to_server(address, plain)
                except tls.HelloVerifyRequest:
                    self._flush(buffer, address)
                    del self._buffers[address]
                except Exception as e:  # an alert, a bad certificate: the session is over
                    self._flush(buffer, address)
                    self.failures.append(str(e))
                    self._buffers.pop(address, None)

    def _flush(self, buffer: Any, address: tuple[str, int]) -> None:
        while True:
            data = buffer.peek_outgoing(65535)
            if not data:
                return
            self._sock.sendto(data, address)
            buffer.consume_outgoing(len(data))

    def _to_server(self, address: tuple[str, int], data: bytes) -> None:
        subject = self._subject_of[address]
        plain = self._plain.get(subject)
        if plain is None:
            plain = self._plain[subject] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            plain.bind(("127.0.0.1", 0))
        message = Message.decode(data)
        # The gateway's requests go to the server; its answers to whoever sent the request
        # they answer (lwm2m-node-lib asks from a port of its own): a response, or an
        # Observe notification, by its token; an empty ACK or RST by its message ID.
        if message.code.is_request():
            to = self._server
        elif message.code == Code.EMPTY:
            to = self._asked.get(message.mid, self._server)
        else:
            to = self._asked_token.get(message.token, self._server)
        plain.sendto(data, to)

    def _from_server(self, plain: socket.socket) -> None:
        data, source = plain.recvfrom(65535)
        subject = next(s for s, p in self._plain.items() if p is plain)
        message = Message.decode(data)
        if message.code.is_request():
            self._asked[message.mid] = self._asked_token[message.token] = source
        address = self._latest.get(subject)
        buffer = self._buffers.get(address) if address else None
        if buffer is None:
            return
        try:
            buffer.write(data)
        except Exception as e:
            self.failures.append(str(e))
            return
        self._flush(buffer, address)

    def close(self) -> None:
        """Stops, telling each client so (close_notify), as a server going down does."""
        self._stop.set()
        self._thread.join(2)
        for address, buffer in self._buffers.items():
            if buffer._handshake_state is self._tls.HandshakeStep.HANDSHAKE_OVER:
                with contextlib.suppress(Exception):
                    buffer.shutdown()
                    self._flush(buffer, address)
        self._sock.close()
        for plain in self._plain.values():
            plain.close()


class RegistrationsResource(coap_resource.Resource):
    """An upstream LwM2M server's /rd made of aiocoap, as far as a gateway needs it: takes
    Register (2.01, /rd/1) and Updates (2.04; 4.04 before a Register), keeps where they
    came from and the last object list (aiocoap assembles a Block1 payload), and counts
    them."""

    def __init__(self) -> None:
        super().__init__()
        self.remote: Any = None
        self.payload = b""
        self.registers = self.updates = 0
        self.registered = asyncio.Event()
        self.changed = asyncio.Event()

    def heard(self, request: Message) -> None:
        self.remote = request.remote
        if request.payload:
            self.payload = request.payload
        self.changed.set()

    async def render_post(self, request: Message) -> Message:
        self.heard(request)
        self.registers += 1
        self.registered.set()
        answer = Message(code=Code.CREATED)
        answer.opt.location_path = ("rd", "1")
        return answer


class _Update(coap_resource.Resource):
    def __init__(self, rd: RegistrationsResource) -> None:
        super().__init__()
        self._rd = rd

    async def render_post(self, request: Message) -> Message:
        if not self._rd.registers:  # this server (restarted?) knows no registration
            return Message(code=Code.NOT_FOUND)
        self._rd.heard(request)
        self._rd.updates += 1
        return Message(code=Code.CHANGED)


async def aiocoap_lwm2m_server(port: int) -> tuple[aiocoap.Context, RegistrationsResource]:
    """A plain-CoAP server on 127.0.0.1:`port` with /rd (put a DtlsCertRelay in front)."""
    rd = RegistrationsResource()
    site = coap_resource.Site()
    site.add_resource(["rd"], rd)
    site.add_resource(["rd", "1"], _Update(rd))
    context = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", port), transports=["udp6"])
    return context, rd
