"""A relying party for rotation tests and benchmarks: a loopback HTTPS server that
requires client certificates from the registrar's CA, and a client load that hits
it continuously with whatever TLS credentials the agent holds right now."""

from __future__ import annotations

import datetime
import http.client
import http.server
import ipaddress
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.rotation.credentials import CredentialHolder

REQUESTS_PER_CONNECTION = 5  # a few on each connection: connections outlive rotations


def server_identity(directory: Path) -> tuple[Path, Path, str]:
    """A throwaway CA and a 127.0.0.1 server certificate; returns cert, key, CA PEM."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relying party test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=1))
          .not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path, ca.public_bytes(serialization.Encoding.PEM).decode()


class MtlsServer:
    """Answers GET / with the serial of the client certificate it was shown."""

    def __init__(self, directory: Path, client_ca: Path) -> None:
        cert, key, self.ca_pem = server_identity(directory)
        self.client_serials: set[str] = set()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_cert_chain(cert, key)
        serials = self.client_serials

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                peer = self.connection.getpeercert()  # type: ignore[attr-defined]
                serial = str(peer.get("serialNumber", "")).lower().lstrip("0")
                serials.add(serial)
                body = serial.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> MtlsServer:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class ClientLoad:
    """Threads that keep requesting with the holder's current credentials."""

    holder: CredentialHolder
    server: MtlsServer
    threads: int = 2
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _run(self) -> None:
        while not self._stop.is_set():
            creds = self.holder.current()
            if creds is None:
                self._fail("no current TLS credentials")
                continue
            conn = http.client.HTTPSConnection(
                "127.0.0.1", self.server.port, timeout=10,
                context=creds.ssl_context("client", self.server.ca_pem))
            try:
                for _ in range(REQUESTS_PER_CONNECTION):
                    conn.request("GET", "/")
                    response = conn.getresponse()
                    body = response.read().decode()
                    if response.status != 200 or body != creds.serial.lstrip("0"):
                        self._fail(f"HTTP {response.status}, body {body!r}")
                    else:
                        with self._lock:
                            self.ok += 1
            except (OSError, http.client.HTTPException) as e:
                self._fail(f"{type(e).__name__}: {e}")
            finally:
                conn.close()

    def _fail(self, why: str) -> None:
        with self._lock:
            self.failures.append(why)

    def __enter__(self) -> ClientLoad:
        for _ in range(self.threads):
            worker = threading.Thread(target=self._run, daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(15)
