from pathlib import Path

import pytest

from agent.config import load_config, parse_config
from agent.errors import ConfigError


def test_full_config_parses_and_resolves_relative_paths(tmp_path):
    root = tmp_path / "vendor.pem"
    root.write_text("x")
    cfg = parse_config(
        '[tpm]\ntcti = "swtpm:host=127.0.0.1,port=2321"\n'
        '[paths]\nstate_dir = "state"\ncontrol_socket = "/run/x.sock"\n'
        '[trust]\nek_roots = ["vendor.pem"]\n[log]\nlevel = "debug"\n',
        tmp_path / "agent.toml",
    )
    assert cfg.tpm.tcti.startswith("swtpm:")
    assert cfg.paths.state_dir == tmp_path / "state"
    assert cfg.paths.control_socket == Path("/run/x.sock")
    assert cfg.trust.ek_roots == [root]
    assert cfg.source == tmp_path / "agent.toml"


def test_defaults_are_hardware_paths():
    cfg = parse_config("", Path("/etc/devid-agent/agent.toml"))
    assert cfg.tpm.tcti == "device:/dev/tpmrm0"
    assert cfg.paths.state_dir == Path("/var/lib/devid-agent")


@pytest.mark.parametrize("text, message", [
    ("[tpm]\ntcit = 'x'",
     "agent.toml: [tpm] tcit: unknown key (known: tcti, hang_timeout, srk_handle)"),
    ("[tpm]\ntcti = 5", "[tpm] tcti: Input should be a valid string, got int 5"),
    ("[tpm]\ntcti = 'usb:/dev/x'", "[tpm] tcti: unknown TCTI 'usb'"),
    ("[tpm]\nhang_timeout = 'forever'", "[tpm] hang_timeout: expected a duration like '90s'"),
    ("[tpm]\nhang_timeout = -1", "[tpm] hang_timeout: a duration must be positive"),
    ("[nope]\nx = 1", "[nope]: unknown section"),
    ("[paths]\nstate_dir = 3", "[paths] state_dir: should be a non-empty path string, got int 3"),
    ("[trust]\nek_roots = 'a.pem'", "[trust] ek_roots: Input should be a valid list"),
    ("[trust]\nek_roots = ['/no/such.pem']", "[trust] ek_roots[0]: /no/such.pem: no such file"),
    ("[log]\nlevel = 'loud'", "[log] level: Input should be"),
    ("[control]\ngroup = 'no-such-group-xyz'", "[control] group: no such group"),
    ("tpm = 1", "[tpm]: Input should be"),
    ("[tpm\n", "not valid TOML"),
    ("[siem]\nurl = 'syslog://x'", "[siem] url: 'syslog://x': expected tls://HOST[:PORT]"),
    ("[siem]\nurl = 'tls://x'\nframing = 'leef'", "[siem] framing: Input should be"),
    ("[siem]\nurl = 'tls://x'\nqueue = 5", "[siem] queue: Input should be greater"),
    ("[siem]\nurl = 'tls://x'\nsd_id = 'a]b'", "[siem] sd_id: String should match"),
    ("[device]\nserial = ''", "[device] serial: String should have at least 1"),
    ('[device]\nmodel = "GW\\u0007"', "[device] model: String should match"),
    ("[device]\nversion = '" + "1" * 65 + "'", "[device] version: String should have at most"),
    ("[device]\nvendor = 'x'", "[device] vendor: unknown key"),
    ("[tpm]\nsrk_handle = 0x80000001", "[tpm] srk_handle: Input should be greater"),
    ("[tpm]\nsrk_handle = '0x81000001'", "[tpm] srk_handle: Input should be a valid integer"),
])
def test_bad_config_names_file_section_and_key(text, message):
    with pytest.raises(ConfigError) as exc:
        parse_config(text, Path("/etc/agent.toml"))
    assert message in exc.value.message


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "binary.toml"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(bad)


@pytest.mark.parametrize("section, needle", [
    ('url = "http://r:8443"\nca = "ca.pem"', "[enrollment] url: expected an https:// URL"),
    ('url = "https://r:8443/?x=1"\nca = "ca.pem"', "must not have a query"),
    ('url = "https://r:8443"', "[enrollment] ca: Field required"),
    ('url = "https://r:8443"\nca = "missing.pem"', "[enrollment] ca: "),
    ('url = "https://r:8443"\nca = "ca.pem"\ntoken = "t"\ntoken_file = "t"',
     "set token or token_file, not both"),
    ('url = "https://r:8443"\nca = "ca.pem"\ntimeout = "soon"', "[enrollment] timeout: "),
    ('url = "https://r:8443"\nca = "ca.pem"\ntoekn = "t"', "[enrollment] toekn: unknown key"),
])
def test_bad_enrollment_section_names_the_key(tmp_path, section, needle):
    (tmp_path / "ca.pem").write_text("x")
    with pytest.raises(ConfigError) as exc:
        parse_config(f"[enrollment]\n{section}\n", tmp_path / "agent.toml")
    assert needle in exc.value.message


def test_enrollment_token_is_never_shown(tmp_path):
    (tmp_path / "ca.pem").write_text("x")
    cfg = parse_config('[enrollment]\nurl = "https://r:8443"\nca = "ca.pem"\n'
                       'token = "s3cr3t-token-value"\n', tmp_path / "agent.toml")
    assert "s3cr3t" not in repr(cfg) and "s3cr3t" not in str(cfg.enrollment)
    assert cfg.enrollment.read_token() == "s3cr3t-token-value"


def commented_defaults(text: str) -> dict[str, dict[str, str]]:
    """A shipped config's `# [section]` and `# key = default` lines, by section."""
    import re

    shown: dict[str, dict[str, str]] = {}
    section = ""
    for line in text.splitlines():
        if m := re.fullmatch(r"# \[(\w+)\]", line):
            section = m.group(1)
            shown[section] = {}
        elif m := re.fullmatch(r"# (\w+) = (.+)", line):
            shown[section][m.group(1)] = m.group(2)
    return shown


def test_shipped_agent_toml_lists_every_key_with_its_default(tmp_path):
    """docs/agent.toml (the package's /etc/devid-agent/agent.toml) shows every key
    commented out with its default: uncommented, it parses to the defaults."""

    from agent.config import AgentConfig

    shown = commented_defaults(
        (Path(__file__).resolve().parents[2] / "docs" / "agent.toml").read_text())
    for name, field in AgentConfig.model_fields.items():
        if name in ("source", "consumers", "siem"):  # consumers, siem: examples only
            continue
        model = field.annotation if name != "enrollment" else AgentConfig.model_fields[
            "enrollment"].annotation.__args__[0]
        assert set(shown[name]) == set(model.model_fields), name
    # Without [enrollment] (no defaults: examples) and the example control group.
    body = "".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()
                                      if (s, k) not in (("control", "group"),
                                                        ("tpm", "srk_handle"))
                                      and (s == "device") <= (k == "dmi"))
                   for s, keys in shown.items() if s != "enrollment")
    parsed = parse_config(body, tmp_path / "agent.toml")
    defaults = AgentConfig()
    assert parsed.rotation.renew_fraction == pytest.approx(defaults.rotation.renew_fraction,
                                                           abs=1e-4)
    for name in ("tpm", "paths", "trust", "control", "log", "device"):
        assert getattr(parsed, name) == getattr(defaults, name), name
    assert parsed.rotation.model_copy(update={"renew_fraction": 0.5}) == \
        defaults.rotation.model_copy(update={"renew_fraction": 0.5})
    from agent.config import EnrollmentSection
    from agent.tomlconfig import parse_duration

    for key in ("timeout", "retry_initial", "retry_max"):
        shown_value = parse_duration(shown["enrollment"][key].strip('"'))
        assert shown_value == EnrollmentSection.model_fields[key].default, key


def test_the_control_socket_is_found_even_in_a_broken_file(tmp_path):
    from agent.config import control_socket_of

    config = tmp_path / "agent.toml"
    config.write_text('[paths]\ncontrol_socket = "run/c.sock"\n[tpm]\ntcit = 1\n')
    assert control_socket_of(config) == tmp_path / "run" / "c.sock"  # invalid, still TOML
    config.write_text('[paths\ncontrol_socket = "/run/x.sock"\n')
    assert control_socket_of(config) == Path("/run/x.sock")  # not TOML any more
    config.write_text("[tpm]\n")
    assert control_socket_of(config) == Path("/run/devid-agent/control.sock")
    assert control_socket_of(tmp_path / "missing.toml") == Path("/run/devid-agent/control.sock")


def test_the_identity_socket_is_read_leniently_for_consumers(tmp_path):
    """devidctl credentials runs as a consumer, which may not read agent.toml at all."""
    import os

    from agent.config import identity_socket_of

    config = tmp_path / "agent.toml"
    config.write_text('[identity_api]\nsocket = "run/i.sock"\n[tpm]\ntcit = 1\n')
    assert identity_socket_of(config) == tmp_path / "run" / "i.sock"
    config.write_text('[identity_api\nsocket = "/run/y.sock"\n')
    assert identity_socket_of(config) == Path("/run/y.sock")
    config.write_text('[paths]\ncontrol_socket = "/run/c.sock"\n')
    assert identity_socket_of(config) == Path("/run/devid-agent/identity.sock")
    config.chmod(0)
    if os.geteuid() != 0:  # root reads it anyway
        assert identity_socket_of(config) == Path("/run/devid-agent/identity.sock")


def test_the_platform_comes_from_dmi_with_agent_toml_winning(tmp_path):
    """DMI placeholders and control characters are dropped; [device] keys win."""
    from agent.config import DeviceSection

    dmi = tmp_path / "dmi"
    dmi.mkdir()
    (dmi / "sys_vendor").write_bytes(b"Acme\tIndustrial \n")
    (dmi / "product_name").write_bytes(b"To Be Filled By O.E.M.\n")
    (dmi / "bios_version").write_bytes(b"1.0\x00\xff" + b"x" * 100 + b"\n")
    # product_serial absent, as for an agent that may not read it
    platform = DeviceSection(serial="SN-9").platform(dmi)
    assert platform is not None
    assert (platform.manufacturer, platform.model, platform.serial) == (
        "Acme Industrial", None, "SN-9")
    assert platform.version is not None and platform.version.startswith("1.0")
    assert len(platform.version) == 64
    assert DeviceSection(dmi=False).platform(dmi) is None
    assert DeviceSection(model="M", dmi=False).platform(tmp_path / "none").model == "M"
