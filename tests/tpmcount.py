"""Count the TPM commands a process sends, by command code: a TCP proxy in front of
swtpm's command port (and its control port, passed through uncounted).

tss2-tcti-swtpm takes the control port as the command port + 1, so the proxy
listens on two consecutive loopback ports. Each command is a TPM2 command
frame (tag, size, command code, ...); the proxy reads the size to find the next
one in the stream. Nothing is changed in what passes.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from processes import wait_until
from tpm2_pytss.constants import TPM2_CC

HEADER = 10


_NAMES = {int(getattr(TPM2_CC, n)): n for n in dir(TPM2_CC)
          if not n.startswith("_") and isinstance(getattr(TPM2_CC, n), int)
          and n not in ("FIRST", "LAST")}


def command_name(code: int) -> str:
    """TPM2_CC's name for a command code, e.g. CreatePrimary."""
    return _NAMES.get(code, f"0x{code:08x}")


def _consecutive_listeners() -> tuple[socket.socket, socket.socket]:
    for _ in range(100):
        first = socket.create_server(("127.0.0.1", 0))
        port = first.getsockname()[1]
        try:
            second = socket.create_server(("127.0.0.1", port + 1))
        except OSError:
            first.close()
            continue
        return first, second
    raise RuntimeError("no two consecutive free loopback ports")


class CountingProxy:
    def __init__(self, swtpm_port: int) -> None:
        self._target = swtpm_port
        self._lock = threading.Lock()
        self._timeline: list[tuple[float, str]] = []  # (time.time(), command), since take()
        self.failed: list[str] = []  # commands the TPM answered with an error code
        self._command, self._control = _consecutive_listeners()
        self.port = self._command.getsockname()[1]
        self._closed = False
        for listener, target, counted in ((self._command, swtpm_port, True),
                                          (self._control, swtpm_port + 1, False)):
            threading.Thread(target=self._accept, args=(listener, target, counted),
                             daemon=True).start()

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def take(self, split_at: float | None = None) -> list[collections.Counter[str]]:
        """The commands since the last take, by name, and start again from zero; with
        `split_at` (a time.time()), as two counts: before it and from it on."""
        with self._lock:
            timeline, self._timeline = self._timeline, []
        if split_at is None:
            return [collections.Counter(name for _, name in timeline)]
        return [collections.Counter(name for t, name in timeline if t < split_at),
                collections.Counter(name for t, name in timeline if t >= split_at)]

    def wait_quiet(self, seconds: float = 0.5, limit: float = 30.0) -> None:
        """Until no command has passed for `seconds` (at most `limit`)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            with self._lock:
                last = self._timeline[-1][0] if self._timeline else 0.0
            if time.time() - last >= seconds:
                return
            time.sleep(0.05)

    def close(self) -> None:
        self._closed = True
        self._command.close()
        self._control.close()

    def _accept(self, listener: socket.socket, target: int, counted: bool) -> None:
        while not self._closed:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", target))
            # Commands sent on this connection whose responses have not come back yet.
            sent: collections.deque[int] = collections.deque()
            threading.Thread(target=self._pump, args=(client, upstream, sent if counted
                                                      else None, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, sent if counted
                                                      else None, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket,
              sent: collections.deque[int] | None, commands: bool) -> None:
        pending = bytearray()
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                if sent is not None:
                    pending += data
                    for frame in _frames(pending):
                        self._seen(frame, sent, commands)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _seen(self, frame: bytes, sent: collections.deque[int], command: bool) -> None:
        code = int.from_bytes(frame[6:10], "big")
        if command:
            sent.append(code)
            with self._lock:
                self._timeline.append((time.time(), command_name(code)))
        elif sent:
            asked = sent.popleft()
            if code != 0:  # a response code: the TPM refused; counted apart, by name
                with self._lock:
                    self.failed.append(f"{command_name(asked)}: 0x{code:03x}")


def _frames(pending: bytearray) -> Iterator[bytes]:
    """Whole TPM command or response frames (tag, size, code, ...) off the buffer."""
    while len(pending) >= HEADER:
        size = int.from_bytes(pending[2:6], "big")
        if len(pending) < size:
            return
        frame = bytes(pending[:max(size, HEADER)])
        del pending[:max(size, HEADER)]
        yield frame


@contextmanager
def counting(swtpm_tcti: str) -> Iterator[CountingProxy]:
    port = int(swtpm_tcti.rsplit("port=", 1)[1].split(",")[0])
    proxy = CountingProxy(port)
    try:
        yield proxy
    finally:
        proxy.close()




PHASES = ("first start (keys made)", "enrollment", "first TLS certificate", "renewal",
          "status", "stop", "start (enrolled)")
LOG_TIME = "%Y-%m-%d %H:%M:%S,%f"


def _logged_at(log: Path, marker: str, seconds: float = 60.0) -> float:
    """The time.time() of the first log line containing `marker`, once there is one."""
    line = wait_until(lambda: next((x for x in log.read_text().splitlines() if marker in x),
                                   None), f"{marker!r} in {log}", seconds)
    stamp = datetime.datetime.strptime(line[:23], LOG_TIME)  # local time, as logging writes
    return stamp.timestamp()


def measure_phases(directory: Path, tpm_section: str = "") -> dict[str, collections.Counter[str]]:
    """The TPM commands a real devid-agent sends in each phase of its life, on a fresh
    swtpm behind a CountingProxy and a real registrar. `tpm_section`: more [tpm] lines
    (e.g. srk_handle). Phases end when the agent has gone quiet after our action; what
    we wait on is the agent's log, never its status (which asks the TPM itself). The
    renewal that follows enrollment at once is split off at the "enrolled as" line.
    Used by bench/tpm_ops.py and the budget test."""
    from stack import (
        AgentProcess,
        RegistrarProcess,
        enrollment_toml,
        rotation_toml,
        start_tpm,
        write_agent_config,
    )

    tpm = start_tpm(directory / "tpm")
    counts: dict[str, collections.Counter[str]] = {}
    agent: AgentProcess | None = None
    try:
        registrar = RegistrarProcess(directory / "registrar", [tpm.vendor_ca],
                                     settings={"cert_lifetime": '"1h"'}).start()
        with counting(tpm.tcti) as proxy:
            config = write_agent_config(directory / "agent" / "agent.toml", proxy.tcti,
                                        [tpm.vendor_ca], rotation_toml())
            if tpm_section:
                config.write_text(config.read_text().replace(
                    "[tpm]\n", "[tpm]\n" + tpm_section.strip() + "\n", 1))
            agent = AgentProcess(config)
            agent.start(wait=False)
            log = agent.log_path
            _logged_at(log, "TPM ready via")
            proxy.wait_quiet()
            [counts[PHASES[0]]] = proxy.take()
            with config.open("a") as f:  # [enrollment] added and reloaded
                f.write(enrollment_toml(registrar, registrar.token()))
            assert agent.proc is not None
            agent.proc.send_signal(signal.SIGHUP)
            enrolled = _logged_at(log, "enrolled as")
            _logged_at(log, "renewed: TLS certificate")
            proxy.wait_quiet()
            counts[PHASES[1]], counts[PHASES[2]] = proxy.take(split_at=enrolled)
            code, renewed = agent.ctl_json("renew", "--wait")
            assert code == 0, renewed
            proxy.wait_quiet()
            [counts[PHASES[3]]] = proxy.take()
            agent.status()
            proxy.wait_quiet()
            [counts[PHASES[4]]] = proxy.take()
            assert agent.stop() == 0
            [counts[PHASES[5]]] = proxy.take()
            log.write_text("")
            agent.start(wait=False)
            _logged_at(log, "restored")
            proxy.wait_quiet()
            [counts[PHASES[6]]] = proxy.take()
            registrar.stop()
    finally:
        if agent is not None:
            agent.stop()
        tpm.stop()
    return counts
