"""devid-broker's configuration: strict, messages naming the key, the shipped file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.broker.config import (
    BrokerConfig,
    Lwm2mUpstreamSection,
    SiemSection,
    parse_broker_config,
)
from agent.errors import ConfigError
from tests.unit.test_config import commented_defaults

SHIPPED = Path(__file__).resolve().parents[2] / "docs" / "broker.toml"


def test_the_shipped_file_lists_every_key_with_its_default(tmp_path):
    shown = commented_defaults(SHIPPED.read_text())
    for name, field in BrokerConfig.model_fields.items():
        if name not in ("source", "upstreams", "lwm2m_upstream", "siem"):  # examples
            assert set(shown[name]) == set(field.annotation.model_fields), name
    for section in (Lwm2mUpstreamSection, SiemSection):  # each example names every key
        for key in section.model_fields:
            assert f"#   {key} = " in SHIPPED.read_text(), key
    body = "".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()
                                      if (s, k) != ("control", "group"))
                   for s, keys in shown.items())
    parsed = parse_broker_config(body, tmp_path / "broker.toml")
    assert parsed.model_dump() == BrokerConfig().model_dump()


@pytest.mark.parametrize("text, message", [
    ("[paths]\nstate_dri = 'x'\n", "[paths] state_dri: unknown key"),
    ("[identity]\ndata_key = 'Bad Name'\n", "[identity] data_key: String should match"),
    ("[identity]\nretry = 'soon'\n", "[identity] retry: expected a duration"),
    ("[control]\ngroup = 'no-such-group-here'\n", "no such group"),
    ("[listeners]\n", "[listeners]: unknown section"),
    ("[listen]\noscore = '5683'\n", "[listen] oscore: '5683': expected IPV4:PORT"),
    ("[listen]\noscore = '[::1]:0'\n", "port 0 is not from 1 to 65535"),
    ("[listen]\nedhoc_lifetime = '5s'\n", "[listen] edhoc_lifetime: Input should be greater "
     "than or equal to 10"),
    ("[listen]\nedhoc_lifetime = 'soon'\n", "[listen] edhoc_lifetime: expected a duration"),
    ("[upstreams.cloud]\nurl = 'https://x'\n", "[upstreams] cloud.url: 'https://x': expected "
     "a coaps+tcp:// or mqtts:// URL"),
    ("[upstreams.m]\nurl = 'mqtts://h/fleet/#'\n", "cannot hold the wildcards"),
    ("[upstreams.m]\nurl = 'mqtts://h'\nclient_id = 'a b'\n", "m.client_id"),
    ("[upstreams.cloud]\nurl = 'coaps+tcp://x'\nbundle = 3\n", "cloud.bundle"),
    ("[upstreams.cloud]\nurl = 'coaps+tcp://x'\ntimeout = 'x'\n", "expected a duration"),
    ("[upstreams.cloud]\n", "cloud.url: Field required"),
    ("[lwm2m_upstream]\nurl = 'coap://x'\n", "[lwm2m_upstream] url: 'coap://x': expected "
     "coaps://HOST[:PORT]"),
    ("[lwm2m_upstream]\nurl = 'coaps://x/rd'\n", "only a host and a port"),
    ("[lwm2m_upstream]\nurl = 'coaps://x'\nlifetime = 5\n", "[lwm2m_upstream] lifetime"),
    ("[lwm2m_upstream]\nurl = 'coaps://x'\nendpoint = 'a b'\n", "[lwm2m_upstream] endpoint"),
    ("[lwm2m_upstream]\n", "[lwm2m_upstream] url: Field required"),
    ("[siem]\nurl = 'udp://x:514'\n", "[siem] url: 'udp://x:514': expected tls://"),
    ("[siem]\nurl = 'tls://x'\nframing = 'cef'\n", "[siem] framing"),
    ("[siem]\nurl = 'tls://x'\nqueue = 0\n", "[siem] queue"),
    ("[siem]\nurl = 'tls://x'\nsd_id = 'a b'\n", "[siem] sd_id"),
])
def test_bad_broker_configuration_names_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_broker_config(text, tmp_path / "broker.toml")
