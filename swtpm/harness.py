#!/usr/bin/env python3
"""Hermetic swtpm instances for tests, the demo and benchmarks.

Standard library only, so `swtpm/start` works before any venv exists.

A STATE_DIR holds everything one simulated TPM needs and nothing outside it is
touched (swtpm_setup and swtpm_localca get config files inside STATE_DIR instead
of /etc and /var/lib/swtpm-localca):

    STATE_DIR/tpm/               swtpm NV state
    STATE_DIR/ca/                the per-TPM "vendor" CA: root + issuing intermediate
    STATE_DIR/vendor-ca.pem      the vendor root certificate (what a verifier trusts)
    STATE_DIR/vendor-intermediate.pem
    STATE_DIR/manufactured       marker: manufacturing finished
    STATE_DIR/swtpm.pid, tcti, swtpm.log

Manufacturing mirrors a real vendor line: EK certificates for the RSA-2048 and
ECC EKs are written to their TCG NV indices, and the intermediate CA that signed
them is written to the first EK-certificate-chain index (0x01C00100), as the TCG
EK Credential Profile allows, so verifiers must build a chain through it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EK_CHAIN_FIRST_INDEX = 0x01C00100
LOCALHOST = "127.0.0.1"
START_ATTEMPTS = 20
READY_TIMEOUT_S = 10.0


class HarnessError(RuntimeError):
    """A simulated TPM could not be manufactured, started or stopped."""


def _run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        detail = proc.stderr.strip() or proc.stdout.strip()
        raise HarnessError(f"{cmd[0]} failed (exit {proc.returncode}): {detail}")
    return proc.stdout


def _write_setup_configs(state: Path) -> Path:
    ca = state / "ca"
    ca.mkdir(parents=True, exist_ok=True)
    (state / "swtpm-localca.conf").write_text(
        f"statedir = {ca}\n"
        f"signingkey = {ca}/signkey.pem\n"
        f"issuercert = {ca}/issuercert.pem\n"
        f"certserial = {ca}/certserial\n"
    )
    (state / "swtpm-localca.options").write_text(
        "--platform-manufacturer devid-agent-test\n"
        "--platform-version 1.0\n"
        "--platform-model swtpm\n"
    )
    setup_conf = state / "swtpm_setup.conf"
    setup_conf.write_text(
        "create_certs_tool = /usr/bin/swtpm_localca\n"
        f"create_certs_tool_config = {state}/swtpm-localca.conf\n"
        f"create_certs_tool_options = {state}/swtpm-localca.options\n"
        "active_pcr_banks = sha256\n"
    )
    return setup_conf


def _pem_to_der(pem: str) -> bytes:
    import base64

    body = "".join(
        line for line in pem.strip().splitlines() if line and not line.startswith("-----")
    )
    return base64.b64decode(body)


def _store_intermediate_in_nv(state: Path, tcti: str) -> None:
    intermediate_pem = (state / "ca" / "issuercert.pem").read_text()
    der = _pem_to_der(intermediate_pem)
    index = f"0x{EK_CHAIN_FIRST_INDEX:08x}"
    # Same attributes the EK certificate indices get from swtpm_setup.
    attrs = "ppwrite|ppread|ownerread|authread|no_da|platformcreate|writedefine"
    _run(["tpm2_nvdefine", "-T", tcti, "-C", "p", "-s", str(len(der)), "-a", attrs, index])
    with tempfile.NamedTemporaryFile(dir=state, suffix=".der") as f:
        f.write(der)
        f.flush()
        _run(["tpm2_nvwrite", "-T", tcti, "-C", "p", "-i", f.name, index])
    _run(["tpm2_nvwritelock", "-T", tcti, "-C", "p", index])


def _manufacture(state: Path) -> None:
    tpm_dir = state / "tpm"
    tpm_dir.mkdir(parents=True, exist_ok=True)
    setup_conf = _write_setup_configs(state)
    env = dict(os.environ, XDG_CONFIG_HOME=str(state))
    _run(
        [
            "swtpm_setup", "--tpm2", "--tpmstate", str(tpm_dir), "--config", str(setup_conf),
            "--create-ek-cert", "--logfile", str(state / "swtpm_setup.log"),
        ],
        env=env,
    )
    (state / "vendor-ca.pem").write_text(
        (state / "ca" / "swtpm-localca-rootca-cert.pem").read_text()
    )
    (state / "vendor-intermediate.pem").write_text((state / "ca" / "issuercert.pem").read_text())


def _ports_free(port: int) -> bool:
    for p in (port, port + 1):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((LOCALHOST, p))
            except OSError:
                return False
    return True


def _wait_listening(port: int, proc_pid: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if not _pid_alive(proc_pid):
            return False
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            # Probe the control port: a connect to the command port would occupy
            # swtpm's single command connection.
            if s.connect_ex((LOCALHOST, port + 1)) == 0:
                return True
        time.sleep(0.02)
    return False


def pid_runs(pid: int, needle: str) -> bool:
    """Whether process `pid` exists and its command line contains `needle`: a PID read
    from a file may have been reused by an unrelated process since it was written."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return needle.encode() in cmdline.replace(b"\0", b" ")


def _is_ours(pid: int, state: Path) -> bool:
    """`pid` is alive and is the swtpm serving `state` (started with its absolute path)."""
    return _pid_alive(pid) and pid_runs(pid, f"dir={state / 'tpm'}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as dead.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _read_pid(state: Path) -> int | None:
    try:
        return int((state / "swtpm.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _launch(state: Path, fixed_port: int | None = None) -> str:
    """Start swtpm on a free pair of loopback ports; retry on a port race."""
    rng = random.Random()
    last_error = "no attempt made"
    for _ in range(START_ATTEMPTS):
        port = fixed_port if fixed_port is not None else rng.randrange(20000, 60000, 2)
        if not _ports_free(port):
            last_error = f"ports {port}/{port + 1} in use"
            if fixed_port is not None:
                time.sleep(0.1)
            continue
        pid_file = state / "swtpm.pid"
        pid_file.unlink(missing_ok=True)
        # Not --daemon: the parent must stay the one process we can signal and
        # reap; start_new_session detaches it from the caller's terminal.
        log = open(state / "swtpm.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            [
                "swtpm", "socket", "--tpm2",
                "--tpmstate", f"dir={state / 'tpm'}",
                "--server", f"type=tcp,port={port},bindaddr={LOCALHOST}",
                "--ctrl", f"type=tcp,port={port + 1},bindaddr={LOCALHOST}",
                "--flags", "not-need-init,startup-clear",
                "--pid", f"file={pid_file}",
            ],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()
        if _wait_listening(port, proc.pid, time.monotonic() + READY_TIMEOUT_S):
            tcti = f"swtpm:host={LOCALHOST},port={port}"
            (state / "tcti").write_text(tcti + "\n")
            (state / "swtpm.pid").write_text(f"{proc.pid}\n")
            return tcti
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        last_error = (state / "swtpm.log").read_text(errors="replace")[-500:]
    raise HarnessError(f"swtpm did not start after {START_ATTEMPTS} attempts: {last_error}")


def running_tcti(state_dir: str | os.PathLike[str]) -> str | None:
    """The TCTI string of the swtpm already serving STATE_DIR, if any."""
    state = Path(state_dir).resolve()
    pid = _read_pid(state)
    tcti_file = state / "tcti"
    if pid is not None and _is_ours(pid, state) and tcti_file.exists():
        return tcti_file.read_text().strip()
    return None


def start(state_dir: str | os.PathLike[str], port: int | None = None) -> str:
    """Manufacture STATE_DIR's TPM on first use, start it, return its TCTI string.

    Idempotent: if this STATE_DIR's swtpm is already running its TCTI is returned.
    `port` pins the command port (control is port+1), e.g. to restart a TPM
    where its clients expect it; by default a free pair is chosen.
    """
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    existing = running_tcti(state)
    if existing:
        return existing
    manufactured = (state / "manufactured").exists()
    if not manufactured:
        _manufacture(state)
    tcti = _launch(state, port)
    if not manufactured:
        try:
            _store_intermediate_in_nv(state, tcti)
        except HarnessError:
            stop(state)
            raise
        (state / "manufactured").write_text("ok\n")
    return tcti


def stop(state_dir: str | os.PathLike[str], timeout: float = 5.0) -> bool:
    """Stop STATE_DIR's swtpm. Returns True if one was running."""
    state = Path(state_dir).resolve()
    pid = _read_pid(state)
    if pid is None or not _is_ours(pid, state):
        (state / "swtpm.pid").unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.02)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    (state / "swtpm.pid").unlink(missing_ok=True)
    (state / "tcti").unlink(missing_ok=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swtpm-harness", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("state_dir")
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            print(start(args.state_dir))
        else:
            stop(args.state_dir)
    except HarnessError as e:
        print(f"swtpm/{args.action}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
