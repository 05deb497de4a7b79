"""Permission problems in words (agent.access) and the checks of the files a configuration
names. These run as whoever runs the tests; what only an unprivileged user can see is in
tests/integration/test_unprivileged.py."""

from __future__ import annotations

import grp
import os
import pwd
import socket

import pytest

from agent.access import access_denied, blocking_path, explain, who_may_use
from agent.config import key_for_path, parse_config
from agent.errors import AccessDenied, ConfigError
from agent.tomlconfig import check_named_file


def _group_other_than_root() -> grp.struct_group:
    for name in ("users", "nogroup", "adm"):
        try:
            return grp.getgrnam(name)
        except KeyError:
            continue
    pytest.skip("no ordinary group on this system")


def test_who_may_read_a_file_by_its_mode(tmp_path):
    path = tmp_path / "ca.pem"
    path.write_text("x")
    path.chmod(0o600)
    assert who_may_use(path) == (f"user {_me()} only (mode 0600)", None)
    path.chmod(0o644)
    assert who_may_use(path) == ("everyone (mode 0644)", None)
    if os.geteuid() != 0:
        pytest.skip("needs chown")
    group = _group_other_than_root()
    os.chown(path, -1, group.gr_gid)
    path.chmod(0o640)
    assert who_may_use(path) == (f"user {_me()} and group {group.gr_name} (mode 0640)",
                                 group.gr_name)


def test_directories_are_judged_by_search_and_sockets_by_write(tmp_path):
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    directory.chmod(0o744)  # readable, not searchable by others
    assert who_may_use(directory)[0] == f"user {_me()} only (mode 0744)"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "control.sock"))
        (tmp_path / "control.sock").chmod(0o644)  # others may read, not connect
        assert who_may_use(tmp_path / "control.sock")[0] == f"user {_me()} only (mode 0644)"
    assert who_may_use(directory, write=True)[0] == f"user {_me()} only (mode 0744)"


def test_an_unexaminable_path_is_said_so(tmp_path):
    assert "cannot be examined" in who_may_use(tmp_path / "missing")[0]


def test_blocking_path_is_the_path_when_nothing_blocks(tmp_path):
    path = tmp_path / "a" / "b"
    assert blocking_path(path) == path


def test_access_denied_names_the_key_the_path_and_the_fix(tmp_path):
    path = tmp_path / "root.pem"
    path.write_text("x")
    path.chmod(0o600)
    error = access_denied(path, "[enrollment] ca", "devidctl --config a.toml status")
    assert isinstance(error, AccessDenied) and error.code == "access-denied"
    assert error.message.startswith(f"[enrollment] ca: {path}: permission denied for {_me()}")
    assert f"{path} is open to user {_me()} only (mode 0600)" in error.message
    assert error.hint == "run `sudo devidctl --config a.toml status`"
    assert access_denied(path, None).message.startswith(f"{path}: permission denied")
    assert access_denied(path, None).hint == "run it as root (sudo)"


def test_access_denied_offers_the_group_that_grants_access(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs chown")
    group = _group_other_than_root()
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        os.chown(path, -1, group.gr_gid)
        path.chmod(0o660)
        error = access_denied(path, "the agent's control socket", "devidctl status")
    assert f"group {group.gr_name} (mode 0660)" in error.message
    assert f"sudo usermod -aG {group.gr_name} {_me()}" in error.hint


def test_root_group_is_never_offered(tmp_path):
    path = tmp_path / "f"
    path.write_text("x")
    if os.geteuid() != 0:
        pytest.skip("needs chown")
    os.chown(path, -1, 0)
    path.chmod(0o640)
    assert "usermod" not in access_denied(path, "x", "cmd").hint


def test_a_missing_path_in_a_read_only_directory_cannot_be_created(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        error = access_denied(parent / "state", "[paths] state_dir")
    finally:
        parent.chmod(0o755)
    if os.geteuid() == 0:  # root may write anyway: the parent does not stop it
        assert "is open to" in error.message
    else:
        assert f"cannot be created here: the directory {parent} is writable by" \
            in error.message


def test_explain_uses_the_path_of_the_os_error(tmp_path):
    error = explain(PermissionError(13, "Permission denied", str(tmp_path / "x")), "what")
    assert error.message.startswith(f"what: {tmp_path / 'x'}: permission denied")


# --- the files a configuration names -------------------------------------------------


def test_check_named_file_says_what_is_wrong(tmp_path):
    source = tmp_path / "agent.toml"
    with pytest.raises(ConfigError, match=r"agent.toml: \[enrollment\] ca: .*/nope: no such file"):
        check_named_file(source, "[enrollment] ca", tmp_path / "nope")
    with pytest.raises(ConfigError, match="not a regular file"):
        check_named_file(source, "[enrollment] ca", tmp_path)
    program = tmp_path / "hook"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o644)
    with pytest.raises(ConfigError, match=r"not executable \(mode 0644\)") as raised:
        check_named_file(source, "[rotation] reload_hooks[0]", program, executable=True)
    assert raised.value.hint == f"chmod +x {program}"
    program.chmod(0o755)
    check_named_file(source, "[rotation] reload_hooks[0]", program, executable=True)


def test_a_hook_program_is_checked_with_the_configuration(tmp_path):
    with pytest.raises(ConfigError, match=r"\[rotation\] reload_hooks\[1\]: /no/such/prog: "
                                          "no such file"):
        parse_config('[rotation]\nreload_hooks = ["/bin/true", "/no/such/prog x"]\n',
                     tmp_path / "agent.toml")


def test_key_for_path_finds_the_key_that_names_a_path_or_its_directory(tmp_path):
    (tmp_path / "vendor.pem").write_text("x")
    config = parse_config('[paths]\nstate_dir = "state"\n[trust]\nek_roots = ["vendor.pem"]\n',
                          tmp_path / "agent.toml")
    assert key_for_path(config, tmp_path / "state" / "tpm" / "srk.name") == "[paths] state_dir"
    assert key_for_path(config, tmp_path / "vendor.pem") == "[trust] ek_roots[0]"
    assert key_for_path(config, "/etc/passwd") is None


def _me() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name
