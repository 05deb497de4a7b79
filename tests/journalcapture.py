"""Run a command with a journald of the test's own: its native socket, in a private /run.

Usage (as root): unshare --mount --propagation private -- python journalcapture.py
OUT STDERR -- COMMAND...

Inside the new mount namespace a tmpfs is mounted on /run, so binding
/run/systemd/journal/socket touches neither the host nor a real journald.
COMMAND runs with stderr to the file STDERR and JOURNAL_STREAM naming it, as
systemd does for a service whose output goes to the journal. Every datagram
it sends (journald's native protocol, sd_journal_sendv(3)) is decoded and
written to OUT as one JSON object per line. SIGTERM is passed on; the
capture ends when COMMAND exits, with its exit status.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading


def parse_native(data: bytes) -> dict[str, str]:
    """KEY=value lines, or KEY\\n<le64 length><value>\\n for values with newlines."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            i = end + 1
        else:
            key = line
            (size,) = struct.unpack_from("<Q", data, end + 1)
            start = end + 9
            value = data[start:start + size]
            i = start + size + 1
        fields[key.decode()] = value.decode(errors="replace")
    return fields


def main() -> int:
    out_path, stderr_path, sep, *command = sys.argv[1:]
    assert sep == "--" and command, __doc__
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
    os.makedirs("/run/systemd/journal")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("/run/systemd/journal/socket")
    sock.settimeout(0.2)
    stderr = open(stderr_path, "ab")  # noqa: SIM115 - handed to the child
    st = os.fstat(stderr.fileno())
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    child = subprocess.Popen(command, stdout=stderr, stderr=stderr, env=env)
    signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    done = threading.Event()

    def receive() -> None:
        with open(out_path, "a", encoding="utf-8") as out:
            while not done.is_set():
                try:
                    data = sock.recv(1 << 20)
                except TimeoutError:
                    continue
                out.write(json.dumps(parse_native(data)) + "\n")
                out.flush()

    reader = threading.Thread(target=receive)
    reader.start()
    code = child.wait()
    done.set()
    reader.join()
    return code


if __name__ == "__main__":
    sys.exit(main())
