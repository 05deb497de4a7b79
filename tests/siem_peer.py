"""rsyslog (Debian's rsyslogd with rsyslog-gnutls) as the SIEM's collector: a TLS
listener on loopback (RFC 5425) that requires client certificates under a given CA, and
writes what it receives twice: as rsyslog parsed it (PRI, APP-NAME, MSGID, the
structured data and MSG, one line each, `|`-separated) and as received (raw)."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from processes import terminate
from stack import free_port

CONF = """
global(workDirectory="{dir}/work"
       DefaultNetstreamDriver="gtls"
       DefaultNetstreamDriverCAFile="{clients_ca}"
       DefaultNetstreamDriverCertFile="{cert}"
       DefaultNetstreamDriverKeyFile="{key}")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1"
       StreamDriver.Authmode="x509/certvalid")
template(name="parsed" type="string"
         string="%pri%|%app-name%|%msgid%|%structured-data%|%msg%\\n")
template(name="raw" type="string" string="%rawmsg%\\n")
ruleset(name="siem") {{
  action(type="omfile" file="{dir}/parsed.log" template="parsed")
  action(type="omfile" file="{dir}/raw.log" template="raw")
}}
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="siem")
"""


class Rsyslog:
    def __init__(self, directory: Path, cert: Path, key: Path, clients_ca: Path,
                 port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        (directory / "work").mkdir(parents=True, exist_ok=True)
        self.conf = directory / "rsyslog.conf"
        self.conf.write_text(CONF.format(dir=directory, clients_ca=clients_ca, cert=cert,
                                         key=key, port=self.port))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Rsyslog:
        with open(self.directory / "rsyslogd.err", "ab") as errors:
            self.proc = subprocess.Popen(
                ["rsyslogd", "-n", "-f", str(self.conf), "-i", str(self.directory / "pid")],
                stdout=subprocess.DEVNULL, stderr=errors)
        for _ in range(100):  # listening: a TCP connect succeeds
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("rsyslogd ended: " + (
                        self.directory / "rsyslogd.err").read_text()) from None
                time.sleep(0.1)
        raise RuntimeError("rsyslogd did not listen")

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
            self.proc = None

    def parsed(self) -> list[list[str]]:
        path = self.directory / "parsed.log"
        if not path.exists():
            return []
        return [line.split("|", 4) for line in path.read_text().splitlines() if line]

    def raw(self) -> list[str]:
        path = self.directory / "raw.log"
        return path.read_text().splitlines() if path.exists() else []
