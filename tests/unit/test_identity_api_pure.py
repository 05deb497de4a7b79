"""The identity API's pure parts: protocol, consumer matching, rate limit, cgroup units,
credential sets, POSIX ACLs and the tmpfs check. No TPM, no sockets."""

from __future__ import annotations

import base64
import datetime
import json
import struct
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import AgentConfig, parse_config
from agent.control.peer import PeerCredentials
from agent.errors import ConfigError, PcrPolicyMismatch, PermissionDenied, ProtocolError, from_dict
from agent.identityapi import protocol
from agent.identityapi.consumers import (
    Refusal,
    UnitUnknown,
    grant_refusal,
    identify,
    unit_from_cgroup,
)
from agent.identityapi.credentialset import CredentialSet, credential_document
from agent.identityapi.sinks import check_volatile, filesystem_type, posix_acl
from agent.ratelimit import TokenBucket
from agent.rotation.credentials import TlsCredentials


def _config(tmp_path: Path, consumers: str) -> AgentConfig:
    return parse_config(consumers, tmp_path / "agent.toml")


# --- protocol ---------------------------------------------------------------------------

def test_requests_round_trip_and_are_checked_per_method():
    line = protocol.encode_request(protocol.Request("sign", {"data": "aGk="}))
    assert protocol.decode_request(line) == protocol.Request("sign", {"data": "aGk="})
    assert protocol.sign_data({"data": "aGk="}) == b"hi"


@pytest.mark.parametrize("line, message", [
    (b"", "empty line"),
    (b"[1]\n", "expected a JSON object"),
    (b'{"v": 2, "method": "hello"}\n', "unsupported protocol version 2"),
    (b'{"v": 1, "method": "steal"}\n', "unknown method 'steal'"),
    (b'{"v": 1, "method": "hello", "params": []}\n', "params must be an object"),
    (b'{"v": 1, "method": "sign", "params": {}}\n', "params.data: expected a base64 string"),
    (b'{"v": 1, "method": "sign", "params": {"data": "!!"}}\n', "params.data: not valid base64"),
    (b'{"v": 1, "method": "sign", "params": {"data": ""}}\n', "0 bytes; expected 1 to 16384"),
    (b'{"v": 1, "method": "secret", "params": {"name": "../x"}}\n', "params.name: expected"),
    (b'{"v": 1, "method": "secret", "params": {"name": 5}}\n', "params.name: expected"),
])
def test_bad_requests_say_what_is_wrong(line, message):
    with pytest.raises(ProtocolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        protocol.decode_request(line)


def test_oversized_request_and_sign_data_are_refused():
    big = base64.b64encode(b"x" * (protocol.MAX_SIGN_DATA + 1)).decode()
    with pytest.raises(ProtocolError, match="16385 bytes"):
        protocol.decode_request(protocol.encode_request(protocol.Request("sign", {"data": big})))
    with pytest.raises(ProtocolError, match="longer than 65536 bytes"):
        protocol.decode_request(b"{" + b" " * protocol.MAX_REQUEST + b"}\n")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4), max_leaves=12
).map(lambda doc: json.dumps({"v": 1, "method": "sign", "params": doc}).encode()))
def test_any_line_is_a_request_or_a_protocol_error(line):
    try:
        protocol.decode_request(line)
    except ProtocolError as e:
        assert e.message.startswith("request")


def test_messages_decode_results_events_and_errors():
    assert protocol.decode_message(protocol.encode_result({"a": 1})).result == {"a": 1}
    event = protocol.decode_message(protocol.encode_event("withdrawn", {"reason": "r"}))
    assert event.event == "withdrawn" and event.result == {"reason": "r"}
    err = protocol.decode_message(protocol.encode_error(PcrPolicyMismatch("changed: 7")))
    rebuilt = from_dict(err.error or {})
    assert isinstance(rebuilt, PcrPolicyMismatch) and rebuilt.message == "changed: 7"
    assert rebuilt.hint  # the class's default hint travelled too
    with pytest.raises(ProtocolError, match="unknown event 'boom'"):
        protocol.decode_message(b'{"v":1,"ok":true,"event":"boom","result":{}}\n')
    with pytest.raises(ProtocolError, match="neither a result nor an error"):
        protocol.decode_message(b'{"v":1,"ok":true}\n')


def test_base64url_round_trips_without_padding():
    assert protocol.b64url(b"\xff\xfe") == "__4"
    assert protocol.b64url_decode("__4", "x") == b"\xff\xfe"
    with pytest.raises(ProtocolError, match="x: not base64url"):
        protocol.b64url_decode("a+b", "x")


# --- consumers ---------------------------------------------------------------------------

CONSUMERS = """
[[consumers]]
name = "any-root"
user = 0
grants = ["credentials"]

[[consumers]]
name = "root-in-unit"
user = 0
unit = "mosquitto.service"
grants = ["credentials", "sign"]

[[consumers]]
name = "nobody-group"
user = 65534
group = 65534
grants = ["secrets"]
"""


def _never(_pid: int) -> str:
    raise AssertionError("the unit was read although no candidate needs it")


def test_the_most_specific_consumer_wins_and_units_are_read_only_when_needed(tmp_path):
    consumers = _config(tmp_path, CONSUMERS).consumers
    root = PeerCredentials(10, 0, 0)
    assert identify(root, consumers, lambda _: "mosquitto.service").name == "root-in-unit"
    assert identify(root, consumers, lambda _: "cron.service").name == "any-root"
    nobody = PeerCredentials(11, 65534, 100, frozenset({65534}))
    assert identify(nobody, consumers, _never).name == "nobody-group"  # supplementary group
    stranger = identify(PeerCredentials(12, 1000, 1000), consumers, _never)
    assert isinstance(stranger, Refusal)
    assert stranger.reason == "uid 1000 gid 1000 (pid 12) matches no consumer declared in " \
                              "the agent's configuration"
    no_group = identify(PeerCredentials(13, 65534, 100), consumers, _never)
    assert isinstance(no_group, Refusal)


def test_a_unit_that_cannot_be_read_is_named_in_the_refusal(tmp_path):
    consumers = _config(tmp_path, """
[[consumers]]
name = "only-in-unit"
user = 0
unit = "mosquitto.service"
grants = ["credentials"]
""").consumers
    refusal = identify(PeerCredentials(5, 0, 0), consumers,
                       lambda _: UnitUnknown("/proc/5 is hidden"))
    assert isinstance(refusal, Refusal) and "its unit cannot be told: /proc/5 is hidden" in \
        refusal.reason
    refusal = identify(PeerCredentials(5, 0, 0), consumers, lambda _: None)
    assert isinstance(refusal, Refusal)
    assert "runs in no systemd unit, not in mosquitto.service" in refusal.reason


def test_grants_are_checked_per_method(tmp_path):
    consumer = _config(tmp_path, CONSUMERS).consumers[0]
    assert grant_refusal(consumer, None, "hello") is None
    assert grant_refusal(consumer, "credentials", "watch") is None
    refusal = grant_refusal(consumer, "sign", "sign")
    assert refusal is not None and "'any-root' is not granted 'sign'" in refusal.reason
    assert '"sign"' in refusal.hint


@pytest.mark.parametrize("text, message", [
    ('name = "Bad_Name"\nuser = 0\ngrants = ["sign"]', "consumers[0].name: String should match"),
    ('name = "a"\nuser = "no-such-user-here"\ngrants = ["sign"]', "no such user"),
    ('name = "a"\nuser = 0\ngroup = "no-such-group-here"\ngrants = ["sign"]', "no such group"),
    ('name = "a"\nuser = 0\ngrants = []', "consumers[0].grants: List should have at least 1"),
    ('name = "a"\nuser = 0\ngrants = ["root"]', "consumers[0].grants[0]: Input should be"),
    ('name = "a"\nuser = 0\ngrants = ["sign"]\nsink = true', "sink and reload need the grant"),
    ('name = "a"\nuser = 0\ngrants = ["credentials"]\nsink = true\nsink_mode = "0640"',
     "set group"),
    ('name = "a"\nuser = 0\ngrants = ["credentials"]\nsink = true\nreload = "systemctl x"',
     "start with an absolute path"),
    ('name = "a"\nuser = 0\ngrants = ["credentials"]\nreload = "/bin/true"',
     "set sink = true"),
    ('name = "a"\nuser = 0\nunit = "../x"\ngrants = ["sign"]', "consumers[0].unit"),
])
def test_bad_consumer_declarations_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _config(tmp_path, "[[consumers]]\n" + text + "\n")


def test_two_consumers_matching_the_same_peers_are_refused(tmp_path):
    twice = '[[consumers]]\nname = "a"\nuser = 0\ngrants = ["sign"]\n'
    with pytest.raises(ConfigError, match="two consumers are named 'a'"):
        _config(tmp_path, twice + twice)
    with pytest.raises(ConfigError, match="'a' and 'b' match the same peers"):
        _config(tmp_path, twice + twice.replace('"a"', '"b"'))


@pytest.mark.parametrize("text, unit", [
    ("0::/system.slice/mosquitto.service\n", "mosquitto.service"),
    ("0::/system.slice/foo.service/worker\n", "foo.service"),
    ("0::/user.slice/user-1000.slice/session-3.scope\n", "session-3.scope"),
    ("12:pids:/x\n1:name=systemd:/system.slice/cron.service\n", "cron.service"),
    ("0::/\n", None),
    ("garbage without colons", None),
    ("", None),
])
def test_units_are_read_from_cgroup_paths(text, unit):
    assert unit_from_cgroup(text) == unit


# --- rate limit --------------------------------------------------------------------------

def test_token_bucket_allows_a_burst_then_one_per_interval():
    now = [0.0]
    bucket = TokenBucket(2, 10.0, lambda: now[0])
    assert bucket.take() is None and bucket.take() is None
    assert bucket.take() == pytest.approx(10.0)
    now[0] = 4.0
    assert bucket.take() == pytest.approx(6.0)
    now[0] = 10.0
    assert bucket.take() is None
    now[0] = 1000.0  # a long pause refills to the burst, no more
    assert [bucket.take() for _ in range(3)][:2] == [None, None]
    bucket.reshape(1, 5.0)  # a reload does not hand out a fresh burst
    assert bucket.take() == pytest.approx(5.0)


# --- credential sets ---------------------------------------------------------------------

def _cert(key: ec.EllipticCurvePrivateKey, issuer_key: ec.EllipticCurvePrivateKey, cn: str,
          issuer_cn: str) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(hours=1))
            .sign(issuer_key, hashes.SHA256()))


@pytest.fixture(scope="module")
def document() -> dict:
    root_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), \
        ec.generate_private_key(ec.SECP256R1())
    inter_key = ec.generate_private_key(ec.SECP256R1())
    root = _cert(root_key, root_key, "root", "root")
    inter = _cert(inter_key, root_key, "issuing", "root")
    leaf = _cert(leaf_key, inter_key, "urn:devid:x", "issuing")
    return credential_document(TlsCredentials("urn:devid:x", (leaf, inter), leaf_key), [root],
                               generation=3)


def test_a_credential_set_round_trips_and_makes_files_and_contexts(document):
    creds = CredentialSet.from_document(document)
    assert creds.generation == 3 and len(creds.chain) == 1 and len(creds.bundle) == 1
    files = creds.files()
    assert files["fullchain.pem"] == files["cert.pem"] + files["chain.pem"]
    assert files["key.pem"].startswith(b"-----BEGIN PRIVATE KEY")
    assert "PRIVATE" not in repr(creds) and "key" not in creds.summary()
    creds.ssl_context("client")
    creds.ssl_context("server")


@pytest.mark.parametrize("change, message", [
    ({"device_id": ""}, "device_id: expected a non-empty string"),
    ({"generation": -1}, "generation: expected a non-negative integer"),
    ({"generation": True}, "generation: expected a non-negative integer"),
    ({"certificate": "junk"}, "certificate: not PEM certificates"),
    ({"certificate": ""}, "certificate: expected at least 1"),
    ({"bundle": ""}, "bundle: expected at least 1"),
    ({"key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"},
     "key: not an unencrypted PEM private key"),
    ({"not_after": "tomorrow"}, "not_after: expected an ISO 8601 time"),
])
def test_a_damaged_credential_set_is_refused_by_the_client(document, change, message):
    with pytest.raises(ProtocolError, match=message):
        CredentialSet.from_document({**document, **change})


def test_a_key_that_is_not_the_certificates_is_refused(document):
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    with pytest.raises(ProtocolError, match="key: does not match the certificate"):
        CredentialSet.from_document({**document, "key": other})


# --- sinks -------------------------------------------------------------------------------

def test_posix_acl_layout_matches_the_kernel_format():
    raw = posix_acl(0o6, {1000: 0o4}, {50: 0o4})
    version, = struct.unpack_from("<I", raw)
    entries = [struct.unpack_from("<HHI", raw, 4 + 8 * i) for i in range((len(raw) - 4) // 8)]
    undefined = 0xFFFFFFFF
    assert version == 2
    assert entries == [(0x01, 6, undefined), (0x02, 4, 1000), (0x04, 0, undefined),
                       (0x08, 4, 50), (0x10, 4, undefined), (0x20, 0, undefined)]
    assert posix_acl(0o6, {}, {})[-16:] == struct.pack("<HHIHHI", 0x10, 0, undefined,
                                                       0x20, 0, undefined)


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
25 22 0:22 / /run rw,nosuid shared:5 - tmpfs tmpfs rw,mode=755
26 25 0:23 / /run/lock rw shared:6 - tmpfs tmpfs rw
27 22 0:24 / /srv/my\\040data rw shared:7 - tmpfs tmpfs rw
28 22 8:2 / /var rw shared:8 - xfs /dev/sda2 rw
"""


@pytest.mark.parametrize("path, fstype", [
    ("/run/devid-agent/tls", "tmpfs"), ("/run", "tmpfs"), ("/var/lib/x", "xfs"),
    ("/etc", "ext4"), ("/srv/my data/tls", "tmpfs"), ("/srv/my", "ext4"),
    ("/runaway", "ext4"),
])
def test_the_filesystem_of_a_path_is_its_deepest_mount(path, fstype):
    assert filesystem_type(Path(path), MOUNTINFO) == fstype


def test_a_sink_root_on_disk_is_refused_naming_the_key():
    check_volatile(Path("/run/devid-agent/tls"), MOUNTINFO)
    with pytest.raises(ConfigError, match=r"\[identity_api\] sink_root: /var/tls is on xfs, "
                                          "not tmpfs or ramfs"):
        check_volatile(Path("/var/tls"), MOUNTINFO)


def test_errors_from_the_wire_keep_their_type_and_code():
    assert isinstance(from_dict({"type": "permission-denied", "message": "no"}),
                      PermissionDenied)
    unknown = from_dict({"type": "something-new", "message": "m", "hint": "h"})
    assert unknown.code == "something-new" and str(unknown) == "m (hint: h)"
