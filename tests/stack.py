"""The embedded default stack on one machine: swtpm + devid-agent (+ later the registrar).

One piece of code serves the integration tests and `make demo`, so the demo
shows exactly what the tests exercise.

    python tests/stack.py demo --dir .demo        # bring up, show status and check
    python tests/stack.py demo --dir .demo --down # stop what a kept demo left running
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "swtpm"))

import harness  # noqa: E402  (swtpm/harness.py, stdlib only)

BIN = Path(sys.executable).parent


@dataclass
class SimulatedTpm:
    state_dir: Path
    tcti: str

    @property
    def vendor_ca(self) -> Path:
        return self.state_dir / "vendor-ca.pem"

    def stop(self) -> None:
        harness.stop(self.state_dir)


def start_tpm(state_dir: Path) -> SimulatedTpm:
    return SimulatedTpm(state_dir, harness.start(state_dir))


def write_agent_config(path: Path, tcti: str, ek_roots: list[Path], extra: str = "",
                       control_socket: Path | None = None) -> Path:
    roots = ", ".join(json.dumps(str(r)) for r in ek_roots)
    sock = json.dumps(str(control_socket or "run/control.sock"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "[tpm]\n"
        f"tcti = {json.dumps(tcti)}\n\n"
        "[paths]\n"
        'state_dir = "state"\n'
        f"control_socket = {sock}\n\n"
        "[trust]\n"
        f"ek_roots = [{roots}]\n" + extra
    )
    return path


class AgentProcess:
    """devid-agent running as a child process, with its log captured to a file."""

    def __init__(self, config: Path, control_socket: Path | None = None) -> None:
        self.config = config
        self.log_path = config.parent / "agent.log"
        self.socket = control_socket or config.parent / "run" / "control.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True, timeout: float = 20.0) -> AgentProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [str(BIN / "devid-agent"), "--config", str(self.config)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        )
        log.close()
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until the control socket answers and the TPM is connected (or `timeout`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"devid-agent exited with {self.proc.returncode}:\n"
                                   + self.log_path.read_text())
            if self.socket.exists():
                doc = self.ctl_json("status")[1]
                if doc.get("tpm", {}).get("reachable"):
                    return
            time.sleep(0.1)
        raise TimeoutError(f"devid-agent not ready after {timeout}s:\n" + self.log_path.read_text())

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "devidctl"), "--config", str(self.config), *args],
                              capture_output=True, text=True, timeout=60)

    def ctl_json(self, *args: str) -> tuple[int, dict[str, object]]:
        proc = self.ctl(*args, "--json")
        return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


# --- make demo ------------------------------------------------------------------


def _banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def demo(directory: Path, keep: bool) -> int:
    directory = directory.resolve()
    _banner(f"starting a simulated TPM (swtpm) in {directory / 'tpm'}")
    tpm = start_tpm(directory / "tpm")
    print(f"TCTI: {tpm.tcti}\nvendor CA: {tpm.vendor_ca}")
    config = write_agent_config(directory / "agent" / "agent.toml", tpm.tcti, [tpm.vendor_ca])
    _banner(f"starting devid-agent --config {config}")
    agent = AgentProcess(config).start()
    status = check = 2
    try:
        _banner("devidctl status")
        proc = agent.ctl("status")
        print(proc.stdout or proc.stderr, end="")
        status = proc.returncode
        _banner("devidctl check")
        proc = agent.ctl("check")
        print(proc.stdout or proc.stderr, end="")
        check = proc.returncode
    finally:
        if keep:
            _banner(f"left running (agent pid {agent.proc.pid if agent.proc else '?'}); "
                    f"try: .venv/bin/devidctl --config {config} status; stop with make demo-down")
            (directory / "agent.pid").write_text(f"{agent.proc.pid if agent.proc else ''}\n")
        else:
            _banner("stopping the agent and swtpm (DEMO_KEEP=1 keeps them running)")
            agent.stop()
            tpm.stop()
    print(f"\nstatus exit code {status}, check exit code {check} (0 OK, 1 WARN, 2 FAIL)")
    return 0 if status == 0 and check <= 1 else 1


def down(directory: Path) -> int:
    pid_file = directory / "agent.pid"
    if pid_file.exists():
        with contextlib.suppress(ValueError, ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        pid_file.unlink()
    harness.stop(directory / "tpm")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="the local devid-agent stack")
    parser.add_argument("action", choices=["demo"])
    parser.add_argument("--dir", type=Path, default=REPO / ".demo")
    parser.add_argument("--down", action="store_true")
    args = parser.parse_args()
    if args.down:
        return down(args.dir)
    return demo(args.dir, keep=os.environ.get("DEMO_KEEP") == "1")


if __name__ == "__main__":
    sys.exit(main())
