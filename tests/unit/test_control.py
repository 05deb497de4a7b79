import pytest

from agent.control import protocol
from agent.control.peer import PeerCredentials, authorize, parse_groups
from agent.errors import DaemonNotRunning, ProtocolError


def test_request_and_response_roundtrip():
    line = protocol.encode_request(protocol.Request("status", {"verbose": True}))
    assert line.endswith(b"\n")
    assert protocol.decode_request(line) == protocol.Request("status", {"verbose": True})
    ok = protocol.decode_response(protocol.encode_result({"state": "OK"}))
    assert ok.ok and ok.result == {"state": "OK"}
    err = protocol.decode_response(protocol.encode_error(DaemonNotRunning("down")))
    assert not err.ok and err.error["type"] == "daemon-not-running" and err.error["hint"]


@pytest.mark.parametrize("line, needle", [
    (b"", "empty line"),
    (b"{", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[]", "expected a JSON object, got list"),
    (b'{"v": 2, "method": "status"}', "unsupported protocol version 2"),
    (b'{"v": 1, "method": "reboot"}', "unknown method 'reboot'"),
    (b'{"v": 1, "method": "status", "params": []}', "params must be an object"),
    (b'{"v": 1, "method": "status", "x": "' + b"a" * protocol.MAX_LINE + b'"}', "longer than"),
])
def test_bad_requests_are_rejected_clearly(line, needle):
    with pytest.raises(ProtocolError) as exc:
        protocol.decode_request(line)
    assert needle in exc.value.message


@pytest.mark.parametrize("line", [b'{"v":1}', b'{"v":1,"ok":true,"result":3}',
                                  b'{"v":1,"ok":false,"error":{}}'])
def test_bad_responses_are_rejected(line):
    with pytest.raises(ProtocolError):
        protocol.decode_response(line)


@pytest.mark.parametrize("peer, allowed_gid, ok", [
    (PeerCredentials(1, 0, 0), None, True),                     # root
    (PeerCredentials(1, 1000, 1000), None, True),               # the agent's own user
    (PeerCredentials(1, 1001, 1001), None, False),
    (PeerCredentials(1, 1001, 500), 500, True),                 # primary group
    (PeerCredentials(1, 1001, 1001, frozenset({500})), 500, True),  # supplementary
    (PeerCredentials(1, 1001, 1001, frozenset({501})), 500, False),
])
def test_authorize(peer, allowed_gid, ok):
    reason = authorize(peer, own_uid=1000, allowed_gid=allowed_gid)
    assert (reason is None) == ok
    if not ok:
        assert f"uid {peer.uid}" in reason


def test_parse_groups():
    assert parse_groups("Name:\tx\nGroups:\t4 24 27 \nUid: 0\n") == {4, 24, 27}
    assert parse_groups("Name: x\n") == frozenset()
