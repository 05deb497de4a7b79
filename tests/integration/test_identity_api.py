"""The local identity API end to end: a real agent on swtpm, enrolled at a real registrar,
serving consumers over its Unix socket and through file sinks on tmpfs."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stack import BIN, REPO, AgentProcess, enrollment_toml, rotation_toml

from agent.consumer import IdentityClient, Withdrawn
from agent.errors import PcrPolicyMismatch, PermissionDenied, StateError
from agent.identityapi.protocol import b64url_decode
from agent.tpm.custody import TpmCustody

NOBODY = 65534


def _consumer(name: str, grants: list[str], user: int | str | None = None, **more: object
              ) -> str:
    lines = [f"\n[[consumers]]\nname = {json.dumps(name)}",
             f"user = {json.dumps(os.getuid() if user is None else user)}",
             f"grants = {json.dumps(grants)}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in more.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def public() -> Iterator[Path]:
    """A directory on tmpfs (/dev/shm) that every uid may enter, for the identity socket
    and the sinks (pytest's own tmp is root's alone); removed after the test."""
    root = Path("/dev/shm") / f"devid-test-{uuid.uuid4().hex[:12]}"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    yield root
    subprocess.run(["rm", "-rf", str(root)], check=False)


def _identity_api(public: Path) -> str:
    return (f"socket = {json.dumps(str(public / 'identity.sock'))}\n"
            f"sink_root = {json.dumps(str(public / 'tls'))}\n")


def _agent(tpm, registrar_factory, agent_factory, public: Path, consumers: str,
           lifetime: str = "1h", **kwargs: object) -> tuple[object, AgentProcess]:
    registrar = registrar_factory([tpm.vendor_ca],
                                  settings={"cert_lifetime": json.dumps(lifetime)})
    agent = agent_factory(tpm, extra=enrollment_toml(registrar, registrar.token())
                          + rotation_toml() + consumers, identity_api=_identity_api(public),
                          **kwargs)
    agent.wait_enrollment("enrolled")
    agent.public = public  # type: ignore[attr-defined]
    return registrar, agent


def _socket(agent: AgentProcess) -> Path:
    return agent.public / "identity.sock"  # type: ignore[attr-defined,no-any-return]


def _found_in_files(root: Path, forms: dict[str, bytes]) -> list[str]:
    """Which of `forms` occur in which regular file under `root` ("what: path")."""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{what}: {path}" for what, form in forms.items() if form in data]
    return found


def _as_nobody(agent: AgentProcess, code: str) -> subprocess.CompletedProcess[str]:
    """Run Python `code` as uid/gid 65534 with `client` bound to the agent's socket."""
    prelude = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
               "from agent.consumer import IdentityClient\n"
               f"client = IdentityClient({str(_socket(agent))!r}, timeout=20)\n")
    return subprocess.run(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY),
                           "--clear-groups", sys.executable, "-c", prelude + code],
                          capture_output=True, text=True, timeout=60)


def test_a_consumer_fetches_watches_signs_and_keeps_a_secret(tpm, registrar_factory,
                                                             agent_factory, public):
    _, agent = _agent(tpm, registrar_factory, agent_factory, public,
                      _consumer("connector", ["credentials", "sign", "secrets"]))
    client = IdentityClient(_socket(agent))
    assert client.hello()["consumer"] == "connector"

    creds = client.credentials()
    status = agent.status()
    assert creds.serial == status["tls_certificate"]["serial"]
    assert creds.device_id == status["enrollment"]["device_id"]
    assert "<secret" in repr(creds.key) and b"PRIVATE KEY" not in repr(creds).encode()

    # Every rotation reaches the watcher, newest serial each time.
    seen: list[str] = []
    watch = client.watch(idle_timeout=30)
    seen.append(next(watch).serial)  # type: ignore[union-attr]
    for _ in range(2):
        assert agent.ctl("renew", "--wait").returncode == 0
        update = next(watch)
        assert not isinstance(update, Withdrawn)
        seen.append(update.serial)
    watch.close()
    assert len(set(seen)) == 3 and seen[0] == creds.serial

    # An ES256 JWT client assertion, verifiable with the identity certificate it carries.
    token = client.jwt({"iss": creds.device_id, "sub": creds.device_id,
                        "aud": "https://backend.example/token"})
    header_b64, payload_b64, sig_b64 = token.split(".")
    header = json.loads(b64url_decode(header_b64, "header"))
    leaf = x509.load_der_x509_certificate(__import__("base64").b64decode(header["x5c"][0]))
    raw = b64url_decode(sig_b64, "signature")
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    leaf.public_key().verify(  # type: ignore[call-arg]
        encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")),
        f"{header_b64}.{payload_b64}".encode(), ec.ECDSA(hashes.SHA256()))
    assert json.loads(b64url_decode(payload_b64, "payload"))["aud"].endswith("/token")

    # The identity key never signs what looks like the agent's own requests.
    with pytest.raises(PermissionDenied, match="agent's own signed requests"):
        client.sign(b"\x30\x82\x01\x00 a DER certificate request")

    # A secret: made once, the same afterwards and after a restart.
    first = client.secret("db")
    assert client.secret("db") == first and client.secret("other") != first
    for n in range(14):
        client.secret(f"more-{n}")
    with pytest.raises(StateError, match="already has 16 secrets, the most one may have"):
        client.secret("one-too-many")
    agent.stop()
    agent.start()
    agent.wait_enrollment("enrolled")
    assert client.secret("db") == first

    # After a PCR change the TPM refuses to unseal it, and the consumer is told why.
    agent.stop()
    with TpmCustody.open(tpm.tcti, agent.config.parent / "state") as custody:
        custody.extend_pcr(7, b"a new bootloader")
    agent.start()
    with pytest.raises(PcrPolicyMismatch, match="changed since sealing: sha256:7"):
        client.secret("db")

    # Nothing handed out is anywhere on persistent storage: not the key in any form, not
    # the secret (config, state, logs and sockets of this agent: all it writes).
    key = serialization.load_pem_private_key(creds.key.reveal(), None)
    scalar = key.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]
    forms = {"key PEM": creds.key.reveal(), "key scalar": scalar,
             "key scalar hex": scalar.hex().encode(), "secret": first.reveal(),
             "secret base64": base64.b64encode(first.reveal()),
             "secret hex": first.reveal().hex().encode()}
    assert _found_in_files(agent.config.parent, forms) == []

    records = agent.ctl_json("audit", "--limit", "1000")[1]["records"]
    delivered = [r for r in records if r["event"] == "consumer-credentials"]
    assert {r["via"] for r in delivered} >= {"socket", "watch"}
    assert all(r["consumer"] == "connector" for r in delivered)
    assert any(r["event"] == "consumer-signature" for r in records)


def test_strangers_and_grants_beyond_their_own_are_refused_and_audited(
        tpm, registrar_factory, agent_factory, public):
    _, agent = _agent(tpm, registrar_factory, agent_factory, public,
                      _consumer("reader", ["credentials"], user=NOBODY)
                      + _consumer("root-signer", ["sign"]))
    # uid 65534 is "reader": credentials yes, sign no.
    out = _as_nobody(agent, "print(client.credentials().serial)\n"
                            "try:\n    client.sign(b'x')\nexcept Exception as e:\n"
                            "    print(type(e).__name__, e.message)\n")
    assert out.returncode == 0, out.stderr
    serial, refusal = out.stdout.splitlines()
    assert serial == agent.status()["tls_certificate"]["serial"]
    assert refusal.startswith("PermissionDenied permission denied: consumer 'reader' is not "
                              "granted 'sign'")
    # devidctl as that consumer: agent.toml (root's, here) is not needed to fetch.
    fetched = subprocess.run(
        ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups",
         str(BIN / "devidctl"), "--config", str(agent.config),
         "credentials", "fetch", "--socket", str(_socket(agent)), "--json"],
        capture_output=True, text=True, timeout=60)
    assert fetched.returncode == 0, fetched.stderr
    assert json.loads(fetched.stdout)["serial"] == serial and "key_pem" not in fetched.stdout
    # Root is "root-signer": it may sign but not fetch credentials.
    client = IdentityClient(_socket(agent))
    with pytest.raises(PermissionDenied, match="not granted 'credentials'"):
        client.credentials()
    # A uid no consumer names is refused before anything else.
    out = subprocess.run(["setpriv", "--reuid", "65533", "--regid", "65533", "--clear-groups",
                          sys.executable, "-c",
                          f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
                          "from agent.consumer import IdentityClient\n"
                          f"IdentityClient({str(_socket(agent))!r}).hello()"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "uid 65533 gid 65533" in out.stderr and "matches no consumer" in out.stderr
    assert "Traceback" in out.stderr  # a library raises; devidctl turns it into a message
    records = agent.ctl_json("audit", "--limit", "1000")[1]["records"]
    refused = [r for r in records if r["event"] == "consumer-refused"]
    assert {r["uid"] for r in refused} == {0, NOBODY, 65533}
    listed = agent.ctl_json("consumers", "list")[1]
    by_name = {c["name"]: c for c in listed["consumers"]}
    assert by_name["reader"]["refused"] == 1 and by_name["root-signer"]["refused"] == 1
    assert by_name["reader"]["last"]["what"] == "credentials"


def test_sink_files_follow_rotation_and_vanish_on_revocation(tpm, registrar_factory,
                                                             agent_factory, public):
    reloads = public / "reloads"
    registrar, agent = _agent(
        tpm, registrar_factory, agent_factory, public,
        _consumer("bridge", ["credentials"], user=NOBODY, sink=True,
                  reload=f"/bin/sh -c 'date +%s%N >> {reloads}'"))
    sink = public / "tls" / "bridge"
    status = agent.wait_status("sink written", lambda d: (d["identity_api"]["consumers"][0]
                                                          .get("last") or {}).get("via") == "sink")
    first = agent.status()["tls_certificate"]["serial"]
    cert = x509.load_pem_x509_certificate((sink / "cert.pem").read_bytes())
    assert format(cert.serial_number, "x") == first, status
    assert (sink / "key.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    # Readable by the consumer's uid through the ACL, by no other.
    out = _as_nobody(agent, f"print(len(open({str(sink / 'key.pem')!r}, 'rb').read()))")
    assert out.returncode == 0 and int(out.stdout) > 100, out.stderr
    other = subprocess.run(["setpriv", "--reuid", "65533", "--regid", "65533",
                            "--clear-groups", "cat", str(sink / "key.pem")],
                           capture_output=True, text=True)
    assert other.returncode != 0 and "Permission denied" in other.stderr
    assert _found_in_files(agent.config.parent,
                           {"sink key": (sink / "key.pem").read_bytes()}) == []

    assert agent.ctl("renew", "--wait").returncode == 0
    second = agent.status()["tls_certificate"]["serial"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        cert = x509.load_pem_x509_certificate((sink / "cert.pem").read_bytes())
        if format(cert.serial_number, "x") == second:
            break
        time.sleep(0.1)
    assert format(cert.serial_number, "x") == second != first
    assert len([p for p in sink.iterdir() if p.name.startswith("..gen-")]) == 1
    assert len(reloads.read_text().split()) >= 2

    # Revoked: the watch says so, and the files are gone.
    client_out = subprocess.Popen(
        ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups",
         sys.executable, "-c",
         f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
         "from agent.consumer import IdentityClient, Withdrawn\n"
         f"for u in IdentityClient({str(_socket(agent))!r}).watch(idle_timeout=30):\n"
         "    print(type(u).__name__, getattr(u, 'reason', ''), flush=True)\n"
         "    if isinstance(u, Withdrawn): break\n"],
        stdout=subprocess.PIPE, text=True)
    assert client_out.stdout is not None
    assert client_out.stdout.readline().startswith("CredentialSet")
    device_id = agent.status()["enrollment"]["device_id"]
    registrar.cli("devices", "revoke", "--dir", str(registrar.directory), device_id,
                  "--reason", "stolen")
    agent.ctl("renew", "--wait")
    line = client_out.stdout.readline()
    assert line.startswith("Withdrawn") and "revoked" in line, line
    assert client_out.wait(20) == 0
    deadline = time.monotonic() + 10
    while sink.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not sink.exists()


def test_a_sink_off_tmpfs_is_refused_at_start(tpm, agent_factory, tmp_path):
    agent = agent_factory(tpm, extra=_consumer("bridge", ["credentials"], sink=True),
                          identity_api=f"sink_root = {json.dumps(str(tmp_path / 'tls'))}\n",
                          wait=False)
    assert agent.proc is not None and agent.proc.wait(20) == 78
    log = agent.log_path.read_text()
    assert "[identity_api] sink_root" in log and "not tmpfs or ramfs" in log
    assert not (tmp_path / "tls").exists()


# --- garbage on the socket ------------------------------------------------------------------

def _raw(path: Path, data: bytes, half_close: bool = True, timeout: float = 10.0) -> bytes:
    """Send `data`, optionally half-close, and read what the agent answers until it closes."""
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def _errors(answer: bytes) -> list[dict]:
    lines = [json.loads(line) for line in answer.splitlines()]
    assert lines and all(line["v"] == 1 for line in lines), answer
    return [line["error"] for line in lines if not line["ok"]]


@pytest.fixture
def serving(tpm, registrar_factory, agent_factory, public):
    _, agent = _agent(tpm, registrar_factory, agent_factory, public,
                      _consumer("tester", ["credentials", "sign"], sign_burst=2,
                                sign_interval="1h"))
    yield agent, _socket(agent)


@pytest.mark.parametrize("data, message", [
    (b"\xff\xfe\x00garbage\n", "not valid JSON"),
    (b'{"v": 1, "method": "hello"', "half-closed before the end of the line"),
    (b"{" + b"x" * 70000 + b"}\n", "longer than 65536 bytes"),
    (b'{"v": 9, "method": "hello"}\n', "unsupported protocol version 9"),
    (b'{"v": 1, "method": "sign", "params": {"data": 3}}\n', "params.data"),
    (b"\n", "empty line"),
])
def test_garbage_gets_a_clear_error_and_the_agent_serves_others(serving, data, message):
    _, path = serving
    errors = _errors(_raw(path, data))
    assert errors[-1]["type"] == "protocol-error" and message in errors[-1]["message"]
    assert IdentityClient(path).hello()["consumer"] == "tester"


def test_a_slow_or_silent_peer_is_cut_off_and_others_are_served(serving):
    _, path = serving
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(str(path))
        silent.settimeout(15)
        assert IdentityClient(path).hello()["consumer"] == "tester"  # served meanwhile
        answer = silent.recv(65536)
    assert "none arrived within 5s" in _errors(answer)[0]["message"]
    # Several requests on one connection are answered in order.
    two = _raw(path, b'{"v":1,"method":"hello"}\n{"v":1,"method":"hello"}\n')
    assert [json.loads(line)["result"]["consumer"] for line in two.splitlines()] == \
        ["tester", "tester"]


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=4))
def test_random_frames_never_break_the_agent(serving, frames):
    agent, path = serving
    answer = _raw(path, b"\n".join(frames) + b"\n")
    for line in answer.splitlines():
        doc = json.loads(line)  # every answer is a protocol line, never a traceback
        assert doc["v"] == 1 and (doc["ok"] or doc["error"]["message"])
        assert "Traceback" not in line.decode()
        if not doc["ok"]:
            assert doc["error"]["type"] != "error", doc  # never "internal error"
    assert agent.proc.poll() is None


def test_sign_is_rate_limited_per_consumer(serving):
    _, path = serving
    client = IdentityClient(path)
    client.sign(b"one")
    client.sign(b"two")
    with pytest.raises(StateError, match=r"rate limit of consumer 'tester' reached \(2 at "
                                         r"once, then one per 3600s\); retry in"):
        client.sign(b"three")


def test_a_removed_consumers_secrets_are_purged_on_request(tpm, registrar_factory,
                                                           agent_factory, public):
    _, agent = _agent(tpm, registrar_factory, agent_factory, public,
                      _consumer("vault", ["credentials", "secrets"]))
    IdentityClient(_socket(agent)).secret("db")
    watch = IdentityClient(_socket(agent)).watch(idle_timeout=30)
    assert not isinstance(next(watch), Withdrawn)
    secrets_dir = agent.config.parent / "state" / "consumers" / "vault"
    assert (secrets_dir / "db.json").exists()
    code, _ = agent.ctl_json("consumers", "purge", "vault")
    assert code == 2  # still declared: refused
    assert "still declared" in agent.ctl("consumers", "purge", "vault").stderr
    # Undeclare it and reload: its secrets stay until purged, and list says so.
    text = agent.config.read_text()
    agent.config.write_text(text[:text.index("\n[[consumers]]")] + "\n")
    agent.proc.send_signal(signal.SIGHUP)
    listed = agent.wait_status("reloaded", lambda d: d["identity_api"]["consumers"] == [])
    assert listed["identity_api"]["undeclared_with_secrets"] == ["vault"]
    with pytest.raises(PermissionDenied, match="'vault' is no longer declared"):
        next(watch)  # its watch ends, saying why
    with pytest.raises(PermissionDenied, match="matches no consumer"):
        IdentityClient(_socket(agent)).secret("db")
    code, done = agent.ctl_json("consumers", "purge", "vault")
    assert code == 0 and done["destroyed"] == ["db"]
    assert not secrets_dir.exists()
    records = agent.ctl_json("audit", "--limit", "100")[1]["records"]
    assert any(r["event"] == "consumer-purged" and r["secrets"] == ["db"] for r in records)
