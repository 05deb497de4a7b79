"""The broker's OSCORE contexts without a network: aiocoap's own client context protects,
the broker's SensorContext unprotects, and the replay state survives a clean stop and
a crash the way RFC 8613 Appendix B.1 asks (no replay accepted, no nonce reused)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiocoap import CON, Code, Message
from aiocoap import error as coap_error
from aiocoap.message import Direction
from aiocoap.oscore import (
    COSE_KID,
    FilesystemSecurityContext,
    ReplayError,
    ReplayErrorWithEcho,
)

from agent.broker.oscore import CHUNK_START, SensorContexts
from agent.broker.traffic import Traffic
from agent.sensors.store import NewSensor, SensorStore
from tests.unit.test_sensors import NOW, _cipher


class _Remote:
    hostinfo = "192.0.2.7:5683"


@pytest.fixture
def registry(tmp_path):
    store = SensorStore(tmp_path / "sensors.db", _cipher())
    [(sensor, credential)] = store.add([NewSensor("t-1", "temperature")], NOW)
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    doc = credential.to_dict()
    (client_dir / "secret.json").write_text(json.dumps({
        "sender-id_hex": doc["sender_id"], "recipient-id_hex": doc["recipient_id"],
        "secret_hex": doc["master_secret"], "salt_hex": doc["master_salt"]}))
    return store, sensor, client_dir


def _contexts(store: SensorStore, tmp_path: Path) -> tuple[SensorContexts, Traffic]:
    from agent.audit import AuditLog

    traffic = Traffic(store, AuditLog(tmp_path / "audit.log"))
    return SensorContexts(store, traffic), traffic


def _datagram(client: FilesystemSecurityContext, payload: bytes = b"21.5",
              echo: bytes | None = None) -> bytes:
    """A request as the sensor sends it: protected and encoded."""
    request = Message(code=Code.POST, payload=payload, uri="coap://gw/telemetry")
    if echo is not None:
        request.opt.echo = echo
    protected, _ = client.protect(request)
    protected.mtype, protected.mid, protected.token = CON, 1, b"t"
    return protected.encode()


def _wire(client: FilesystemSecurityContext, payload: bytes = b"21.5",
          echo: bytes | None = None) -> Message:
    """A request as it arrives."""
    return _arrived(_datagram(client, payload, echo))


def _arrived(datagram: bytes) -> Message:
    message = Message.decode(datagram)
    message.direction, message.remote = Direction.INCOMING, _Remote()
    return message


def _unprotect(contexts: SensorContexts, message: Message) -> Message:
    from aiocoap.oscore import verify_start

    context = contexts.find_oscore(verify_start(message))
    plain, _ = context.unprotect(message)
    return plain


def test_a_sensors_request_opens_with_its_context_and_a_replay_is_refused(registry, tmp_path):
    store, sensor, client_dir = registry
    contexts, traffic = _contexts(store, tmp_path)
    client = FilesystemSecurityContext(str(client_dir))
    datagram = _datagram(client)
    assert _unprotect(contexts, _arrived(datagram)).payload == b"21.5"
    with pytest.raises(ReplayError):
        _unprotect(contexts, _arrived(datagram))
    assert traffic.totals["refused.replay"] == 1
    # First use marked the window unknown in the registry (a crash now means Echo).
    assert store.oscore_state(sensor.serial) == (CHUNK_START, None)


def test_a_clean_stop_keeps_the_window_and_a_crash_forces_echo(registry, tmp_path):
    store, _sensor, client_dir = registry
    client = FilesystemSecurityContext(str(client_dir))
    contexts, _ = _contexts(store, tmp_path)
    first = _datagram(client)
    _unprotect(contexts, _arrived(first))
    contexts.save_all()  # a clean stop

    restarted, _ = _contexts(store, tmp_path)
    with pytest.raises(ReplayError):
        _unprotect(restarted, _arrived(first))
    assert _unprotect(restarted, _wire(client, b"next")).payload == b"next"
    second = _datagram(client, b"again")
    _unprotect(restarted, _arrived(second))
    # ... and no save_all: a crash. The next broker knows no window.
    crashed, traffic = _contexts(store, tmp_path)
    for datagram in (first, second):
        with pytest.raises(ReplayErrorWithEcho) as challenge:
            _unprotect(crashed, _arrived(datagram))
    assert traffic.totals["echo_challenges"] == 2
    # Only a fresh request carrying the Echo value opens the window again.
    echo = challenge.value.echo
    assert _unprotect(crashed, _wire(client, b"fresh", echo=echo)).payload == b"fresh"
    with pytest.raises(ReplayError):
        _unprotect(crashed, _arrived(second))


def test_the_gateways_sequence_numbers_are_reserved_ahead_never_reused(registry, tmp_path):
    store, sensor, client_dir = registry
    contexts, _ = _contexts(store, tmp_path)
    client = FilesystemSecurityContext(str(client_dir))
    _unprotect(contexts, _wire(client))
    context = contexts.find_oscore({COSE_KID: sensor.kid})
    used = [context.new_sequence_number() for _ in range(100)]
    reserved, _ = store.oscore_state(sensor.serial)
    assert max(used) < reserved
    # Growing chunks: 100 numbers took a handful of writes, not 100.
    assert reserved - CHUNK_START < 4 * 100
    # A crash (no save_all): the next broker starts above every number it may have used.
    crashed, _ = _contexts(store, tmp_path)
    again = crashed.find_oscore({COSE_KID: sensor.kid})
    assert again.new_sequence_number() >= reserved > max(used)


def test_contexts_follow_the_registry(registry, tmp_path):
    store, sensor, client_dir = registry
    contexts, traffic = _contexts(store, tmp_path)
    client = FilesystemSecurityContext(str(client_dir))
    _unprotect(contexts, _wire(client))

    store.set_status("t-1", "quarantined", "odd", NOW)
    contexts.refresh()
    with pytest.raises(coap_error.Unauthorized):
        _unprotect(contexts, _wire(client))
    store.set_status("t-1", "active", None, NOW)
    contexts.refresh()
    assert _unprotect(contexts, _wire(client, b"back")).payload == b"back"

    store.rekey("t-1", NOW)  # the old key is refused, its replay state is gone
    contexts.refresh()
    assert len(contexts) == 0 and store.oscore_state(sensor.serial) is None
    with pytest.raises(ReplayError.__mro__[1]):  # ProtectionInvalid: the tag does not verify
        _unprotect(contexts, _wire(client))
    assert traffic.totals["refused.auth-failed"] == 1 and traffic.totals["refused.disabled"] == 1

    with pytest.raises(KeyError):
        contexts.find_oscore({COSE_KID: b"\x7f\x7f"})
    assert traffic.totals["refused.unknown-credential"] == 1


def test_a_malformed_oscore_option_is_a_bad_option_not_a_traceback(registry, tmp_path):
    from aiocoap import error as coap_error

    from agent.broker.oscore import _SiteWrapper

    store, _, _ = registry
    contexts, traffic = _contexts(store, tmp_path)

    class _Pipe:
        def __init__(self, request: Message) -> None:
            self.request = request

    site = _SiteWrapper(None, contexts, traffic)
    for option in (b"\xe0", b"\x09", b"\x1f"):  # reserved bits; PIV or kid context missing
        request = Message(code=Code.POST, uri_path=("telemetry",), oscore=option)
        request.mtype, request.remote = CON, _Remote()
        with pytest.raises(coap_error.BadOption):
            asyncio.run(site.render_to_pipe(_Pipe(request)))
    assert traffic.totals["malformed"] == 3


def test_unknown_kids_are_remembered_until_the_registry_changes(registry, tmp_path,
                                                                monkeypatch):
    store, _sensor, _ = registry
    contexts, traffic = _contexts(store, tmp_path)
    asked: list[bytes] = []
    find = store.find
    monkeypatch.setattr(store, "find", lambda transport, kid: asked.append(kid)
                        or find(transport, kid))
    for _ in range(3):
        with pytest.raises(KeyError):
            contexts.find_oscore({COSE_KID: b"\x7e"})
    assert asked == [b"\x7e"]  # one registry query for a flood of the same made-up kid
    assert traffic.totals["refused.unknown-credential"] == 3
    contexts.refresh()  # the registry changed: perhaps that kid exists now
    with pytest.raises(KeyError):
        contexts.find_oscore({COSE_KID: b"\x7e"})
    assert asked == [b"\x7e", b"\x7e"]


def test_a_port_already_taken_is_a_listener_error_naming_the_key(registry, tmp_path):
    import socket

    from agent.broker.oscore import OscoreListener
    from agent.errors import ListenerError

    store, _sensor, _ = registry
    contexts, traffic = _contexts(store, tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        listener = OscoreListener(address, contexts, object(), traffic)  # type: ignore[arg-type]
        with pytest.raises(ListenerError) as refused:
            asyncio.run(listener.start())
    assert f"oscore listener {address}" in refused.value.message
    assert "[listen] oscore" in (refused.value.hint or "")
