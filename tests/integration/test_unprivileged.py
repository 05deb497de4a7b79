"""Every command, run as an unprivileged user (uid 65534, as a field engineer without root
would), against a running agent and a stopped one: no traceback, a documented exit code,
and for what this user may not touch, a message naming the path and who may use it, with
a hint to run the same command with sudo (or to join the control group)."""

from __future__ import annotations

import grp
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from stack import BIN, AgentProcess, enrollment_toml, rotation_toml, write_agent_config

NOBODY = 65534
CONTROL_GROUP = "users"  # a group uid 65534 is not in, unless the test adds it
DEVIDCTL_CODES = {0, 1, 2, 3, 64}  # docs/man/devidctl.1
AGENT_CODES = {0, 1, 78}  # docs/man/devid-agent.8
REGISTRAR_CODES = {0, 1, 64, 78}  # docs/man/devid-registrar.8


def _setpriv(groups: list[int] | None) -> list[str]:
    opts = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    return ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), *opts]


@pytest.fixture(scope="module")
def unprivileged() -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to become uid 65534")
    probe = subprocess.run([*_setpriv(None), sys.executable, "-c", "import agent.cli.main"],
                           capture_output=True, text=True, timeout=60, cwd="/")
    if probe.returncode != 0:
        pytest.skip(f"uid 65534 cannot run this venv's interpreter: {probe.stderr[-300:]}")
    try:
        grp.getgrnam(CONTROL_GROUP)
    except KeyError:
        pytest.skip(f"no group {CONTROL_GROUP!r} to use as the control group")


@pytest.fixture
def public_dir(unprivileged: None) -> Iterator[Path]:
    """A directory uid 65534 may enter (pytest's own tmp is root's alone), with an
    `out/` it may write to."""
    path = Path(tempfile.mkdtemp(prefix="devid-unprivileged-", dir="/tmp"))
    path.chmod(0o755)
    (path / "out").mkdir()
    os.chown(path / "out", NOBODY, NOBODY)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run(program: str, *args: str, groups: list[int] | None = None, cwd: Path
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_setpriv(groups), str(BIN / program), *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def _clean(proc: subprocess.CompletedProcess[str], documented: set[int]) -> str:
    """The output, after checking that it is a message, not a traceback."""
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    assert proc.returncode in documented, (proc.args, proc.returncode, output)
    return output


def _devidctl_verbs(out: Path) -> list[list[str]]:
    return [["status"], ["check"], ["renew"], ["renew", "--wait"], ["decommission", "--yes"],
            ["audit"], ["support-bundle", "-o", str(out / "bundle.tar.gz")]]


def test_every_command_as_an_unprivileged_user(registrar_factory, tpm, public_dir):
    registrar = registrar_factory([tpm.vendor_ca])
    token = registrar.token()
    assert token
    config = write_agent_config(
        public_dir / "agent" / "agent.toml", tpm.tcti, [tpm.vendor_ca],
        enrollment_toml(registrar, token) + rotation_toml()
        + f'\n[control]\ngroup = "{CONTROL_GROUP}"\n')
    config.chmod(0o644)
    config.parent.chmod(0o755)
    agent = AgentProcess(config).start()
    out, cwd = public_dir / "out", public_dir / "out"
    try:
        agent.wait_enrollment("enrolled")
        # Running, not in the control group: the socket is out of reach (exit 3), and the
        # message says whose it is and how to get in.
        for verb in _devidctl_verbs(out):
            for extra in ([], ["--json"]):
                proc = _run("devidctl", "--config", str(config), *verb, *extra, cwd=cwd)
                output = _clean(proc, DEVIDCTL_CODES)
                if verb[0] == "support-bundle":
                    # Written from what this user can see, the checks run locally; exit 1
                    # says it is incomplete, and the list says what needs sudo.
                    assert proc.returncode == 1, output
                    assert "permission denied for nobody" in output, output
                    assert "check.json" in output and "sudo devidctl" in output, output
                    continue
                assert proc.returncode == 3, (verb, output)
                assert "control.sock: permission denied for nobody" in output, output
                assert f"group {CONTROL_GROUP}" in output and "sudo devidctl" in output, output
                assert f"usermod -aG {CONTROL_GROUP} nobody" in output, output
        # Joining the group is the fix the hint gives: then status and check work.
        member = [grp.getgrnam(CONTROL_GROUP).gr_gid]
        for verb in (["status"], ["check"], ["audit"]):
            proc = _run("devidctl", "--config", str(config), *verb, groups=member, cwd=cwd)
            output = _clean(proc, DEVIDCTL_CODES)
            assert proc.returncode in (0, 1), (verb, output)  # 1: the clock is not NTP-synced
            assert "permission denied" not in output, output
        # The daemon itself, started by the wrong user: a message, not a traceback.
        proc = _run("devid-agent", "--config", str(config), cwd=cwd)
        output = _clean(proc, AGENT_CODES)
        assert proc.returncode == 78 and "permission denied for nobody" in output, output
    finally:
        agent.stop()

    # Stopped: the checks run locally, on files only the agent's user may read.
    for verb in _devidctl_verbs(out):
        for extra in ([], ["--json"]):
            proc = _run("devidctl", "--config", str(config), *verb, *extra, cwd=cwd)
            output = _clean(proc, DEVIDCTL_CODES)
            expected = {"check": 2, "audit": 2, "support-bundle": 1}.get(verb[0], 3)
            assert proc.returncode == expected, (verb, output)
            if verb[0] in ("check", "audit"):
                assert "/state is open to user root only" in output, output
                assert "sudo" in output, output

    # The registrar's command line on its private directory.
    home = str(registrar.directory)
    for verb in (["devices", "list"], ["devices", "show", "urn:devid:0"], ["token", "create"],
                 ["devices", "revoke", "urn:devid:0"], ["crl"], ["audit", "verify"],
                 ["serve"]):
        proc = _run("devid-registrar", *verb, "--dir", home, cwd=cwd)
        output = _clean(proc, REGISTRAR_CODES)
        assert proc.returncode == 1, (verb, output)
        assert "permission denied for nobody" in output and "sudo devid-registrar" in output
    proc = _run("devid-registrar", "init", "--dir", str(public_dir / "reg"), cwd=cwd)
    output = _clean(proc, REGISTRAR_CODES)
    assert proc.returncode == 1 and "cannot be created here" in output, output

    # A configuration file only root may read: the hint is sudo, not "fix the file".
    config.chmod(0o600)
    for program, documented in (("devidctl", DEVIDCTL_CODES), ("devid-agent", AGENT_CODES)):
        args = ["--config", str(config)] + (["status"] if program == "devidctl" else [])
        proc = _run(program, *args, cwd=cwd)
        output = _clean(proc, documented)
        assert f"the configuration file: {config}: permission denied for nobody" in output
        assert f"sudo {program} --config {config}" in output, output
        assert "fix the configuration file" not in output, output
