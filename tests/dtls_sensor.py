"""A sensor speaking CoAP over DTLS-PSK through libcoap's own clients (Debian's
libcoap3-bin: coap-client-openssl and coap-client-gnutls), and a hand-made first
ClientHello to see what the listener answers a stranger."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiocoap.util import hostportjoin

CLIENTS = ("coap-client-openssl", "coap-client-gnutls")


@dataclass(frozen=True)
class Reply:
    ok: bool  # a 2.xx: libcoap said nothing, and wrote the payload (if any) to its -o file
    text: str  # the payload, or what libcoap said ("4.03 ...", a DTLS alert)


def coap_client(tool: str, identity: str, key: bytes, port: int, path: str,
                payload: str = "21.5", method: str = "post", content_format: int = 0,
                wait: int = 5, host: str = "127.0.0.1") -> Reply:
    """One request, one DTLS session. libcoap takes the key as a C string (no NUL)."""
    if b"\0" in key:
        raise ValueError("libcoap's -k cannot carry a NUL byte: rekey the sensor")
    with tempfile.TemporaryDirectory() as scratch:
        body = Path(scratch) / "body"
        uri = f"coaps://{hostportjoin(host, port)}{path}"
        args = [tool, "-B", str(wait), "-m", method, "-u", identity, "-k", key, "-o", str(body),
                "-t", str(content_format), "-e", payload, uri]
        proc = subprocess.run([os.fsencode(a) if isinstance(a, str) else a for a in args],
                              capture_output=True, timeout=wait + 15)
        # Error codes go to stderr, DTLS trouble to stdout (libcoap's log).
        said = (proc.stderr + proc.stdout).decode(errors="replace").strip()
        trouble = proc.returncode != 0 or proc.stderr.strip() or \
            any(f" {level} " in said for level in ("ERR", "WARN", "CRIT", "EMRG"))
        if trouble:
            return Reply(False, said)
        # A 2.xx; without a payload libcoap writes no file.
        return Reply(True, body.read_text(errors="replace") if body.exists() else "")


def first_client_hello(suite: int = 0xC0A8) -> bytes:
    """A DTLS 1.2 ClientHello without a cookie (RFC 6347 4.2.1), offering one PSK suite."""
    body = (b"\xfe\xfd" + os.urandom(32) + b"\x00" + b"\x00"  # version, random, no session/cookie
            + struct.pack("!HH", 2, suite) + b"\x01\x00")  # one suite, null compression
    handshake = struct.pack("!B", 1) + len(body).to_bytes(3, "big") + struct.pack("!H", 0) \
        + (0).to_bytes(3, "big") + len(body).to_bytes(3, "big") + body
    return struct.pack("!BHH", 22, 0xFEFD, 0) + (0).to_bytes(6, "big") \
        + struct.pack("!H", len(handshake)) + handshake


def send_datagram(data: bytes, port: int, timeout: float = 3.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(data, ("127.0.0.1", port))
        try:
            return sock.recvfrom(65535)[0]
        except TimeoutError:
            return None


def libcoap_psk(broker: Any, name: str, credential: dict[str, str]) -> tuple[str, bytes]:
    """The sensor's PSK identity and key, rekeyed (at most 20 times) until libcoap can take
    the key on its command line: a C string, so no NUL byte (1 key in 16 has one)."""
    for _ in range(20):
        key = bytes.fromhex(credential["psk"])
        if b"\0" not in key:
            return credential["psk_identity"], key
        code, rekeyed = broker.ctl_json("rekey", name)
        assert code == 0, rekeyed
        credential = rekeyed["credential"]
    raise AssertionError("20 keys in a row had a NUL byte")
