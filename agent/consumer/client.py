"""A blocking client of the identity API (docs/identity-api.md).

Each call is one connection; `watch()` keeps its own open and yields every
change. The agent's refusals come back as the same typed errors the agent
raised (PermissionDenied, StateError, ...), with its message and hint.
"""

from __future__ import annotations

import base64
import errno
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.access import access_denied
from agent.codec import b64decode_strict
from agent.errors import ControlError, DaemonNotRunning, PermissionDenied, ProtocolError, from_dict
from agent.identityapi import protocol
from agent.identityapi.credentialset import CredentialSet
from agent.secret import SecretBytes

DEFAULT_SOCKET = Path("/run/devid-agent/identity.sock")
DEFAULT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Withdrawn:
    """The agent has no credentials to give (revoked, decommissioned, not enrolled,
    expired): stop using any you hold."""
    reason: str


@dataclass(frozen=True)
class Signed:
    der: bytes  # ECDSA signature, DER (X.509, OpenSSL)
    jws: str  # the same as JWS ES256 wants it: base64url(r || s)
    certificate_chain_pem: str  # the identity certificate first, to verify with


class _Connection:
    def __init__(self, path: Path, timeout: float | None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self._buffer = b""
        try:
            self.sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            raise DaemonNotRunning(f"the identity API is not available: nothing listens on "
                                   f"{path}", "is devid-agent running? (systemctl status "
                                   "devid-agent)") from None
        except PermissionError:
            self.sock.close()
            denied = access_denied(path, "the identity API socket")
            raise PermissionDenied(denied.message, "the socket and the directories above it "
                                   "must let this user connect (the agent makes it 0666 in "
                                   "/run/devid-agent, 0711)") from None
        except OSError as e:
            self.sock.close()
            if e.errno == errno.ENOTSOCK:
                raise ControlError(f"{path} is not a socket") from None
            raise ControlError(f"cannot connect to {path}: {e.strerror}") from None

    def send(self, request: protocol.Request) -> None:
        self.sock.sendall(protocol.encode_request(request))

    def receive(self) -> protocol.Message:
        while b"\n" not in self._buffer:
            if len(self._buffer) > protocol.MAX_RESPONSE:
                raise ProtocolError(f"identity API message: longer than "
                                    f"{protocol.MAX_RESPONSE} bytes")
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise ControlError("devid-agent did not answer in time",
                                   "the agent or its TPM may be busy; see devidctl status"
                                   ) from None
            if not chunk:
                raise ControlError("the agent closed the connection without an answer")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return protocol.decode_message(line + b"\n")

    def close(self) -> None:
        self.sock.close()


class IdentityClient:
    def __init__(self, socket_path: Path | str = DEFAULT_SOCKET,
                 timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.socket_path, self.timeout = Path(socket_path), timeout

    def _call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        conn = _Connection(self.socket_path, self.timeout)
        try:
            conn.send(protocol.Request(method, params or {}))
            message = conn.receive()
        except OSError as e:
            raise ControlError(f"identity API {self.socket_path}: {e.strerror or e}") from None
        finally:
            conn.close()
        if not message.ok:
            raise from_dict(message.error or {})
        assert message.result is not None
        return message.result

    def hello(self) -> dict[str, Any]:
        """Which consumer the agent takes us for, and what we are granted."""
        return self._call("hello")

    def credentials(self) -> CredentialSet:
        return CredentialSet.from_document(self._call("credentials"))

    def watch(self, idle_timeout: float | None = None) -> Iterator[CredentialSet | Withdrawn]:
        """The current state, then each change, for as long as the caller iterates.
        `idle_timeout`: give up (TimeoutError) when nothing came for that long."""
        conn = _Connection(self.socket_path, self.timeout)
        try:
            conn.send(protocol.Request("watch"))
            conn.sock.settimeout(idle_timeout)
            while True:
                message = conn.receive()
                if not message.ok:
                    raise from_dict(message.error or {})
                assert message.result is not None
                if message.event == "credentials":
                    yield CredentialSet.from_document(message.result)
                elif message.event == "withdrawn":
                    yield Withdrawn(str(message.result.get("reason", "")))
                else:
                    raise ProtocolError("identity API: a watch message without an event")
        finally:
            conn.close()

    def sign(self, data: bytes) -> Signed:
        """ES256 over `data` (hashed by the agent) with the TPM identity key."""
        result = self._call("sign", {"data": base64.b64encode(data).decode()})
        der = b64decode_strict(result.get("signature"), "sign: signature")
        jws, chain = result.get("jws_signature"), result.get("certificate_chain")
        if not isinstance(jws, str) or not isinstance(chain, str):
            raise ProtocolError("sign: expected jws_signature and certificate_chain strings")
        return Signed(der, jws, chain)

    def secret(self, name: str) -> SecretBytes:
        """This consumer's secret `name` (32 bytes), created on first use."""
        result = self._call("secret", {"name": name})
        value = b64decode_strict(result.get("secret"), "secret: secret")
        if len(value) != protocol.SECRET_BYTES:
            raise ProtocolError(f"secret: {len(value)} bytes, expected {protocol.SECRET_BYTES}")
        return SecretBytes(value)

    def jwt(self, claims: dict[str, Any], lifetime: float = 300.0) -> str:
        """An RFC 7523 client assertion: a compact JWS (ES256) of `claims` with iat/exp
        filled in, signed by the TPM identity key, its certificate chain in x5c."""
        now = int(time.time())
        chain = self.hello().get("identity_x5c")
        header: dict[str, Any] = {"alg": "ES256", "typ": "JWT"}
        if isinstance(chain, list) and chain:
            header["x5c"] = chain
        body = {"iat": now, "exp": now + int(lifetime), **claims}
        signing_input = ".".join(protocol.b64url(json.dumps(part, separators=(",", ":"))
                                                 .encode()) for part in (header, body))
        return f"{signing_input}.{self.sign(signing_input.encode()).jws}"
