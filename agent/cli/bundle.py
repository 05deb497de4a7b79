"""`devidctl support-bundle`: one tarball a remote expert can diagnose from.

It holds the status and check documents (from the daemon, or a local check
when it is out of reach), the recent audit records, the certificates (PEM:
public), the clock and its offset from the registrar's, a listing of the state
directory (names and modes, never contents), recent journal lines, the agent's
log file when it logs to one, the configuration with secrets redacted, and the
versions of everything that matters (agent, Python libraries, tpm2-tss,
kernel, OS). It never holds state files, key blobs or the enrollment token. A
part that cannot be collected is named in manifest.json with the reason; the
bundle is still written, and devidctl exits 1 to say it is incomplete.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import io
import json
import os
import platform
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tarfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import __version__
from agent.access import explain, os_error_text
from agent.config import AgentConfig, secret_keys
from agent.diagnostics.certificates import certificates_pem, without_pem
from agent.errors import DevidError
from agent.fsutil import write_atomic

JOURNAL_LINES = 2000
AUDIT_RECORDS = 200
REDACTED = '"<redacted>"'
_PYTHON_PACKAGES = ("tpm2-pytss", "cryptography", "pydantic", "requests", "systemd-python",
                    "starlette", "uvicorn", "aiocoap")


def redact_config_text(text: str, secrets: set[tuple[str, str]]) -> str:
    """The TOML text with the values of secret keys replaced.

    Works on the text (not a re-rendering) so the expert sees the file as it is,
    comments, mistakes and all. Any `key = value` whose key is a secret's name
    is redacted wherever it stands (sections, dotted keys, inline tables); if a
    secret's value would still be in the output, the whole file is withheld.
    """
    names = sorted({key for _, key in secrets})
    if not names:
        return text
    redacted = _assignment(names).sub(lambda m: m.group(1) + REDACTED, text)
    for value in _secret_values(text, secrets):
        if value in redacted:
            return "# withheld: a secret in this file could not be redacted safely\n"
    return redacted


_STRING = r'"""[\s\S]*?"""|' + r"'''[\s\S]*?'''|" + r'"(?:[^"\\\n]|\\.)*"|' + r"'[^'\n]*'"


def _assignment(names: list[str]) -> re.Pattern[str]:
    keys = "|".join(map(re.escape, names))
    return re.compile(rf"(\b(?:{keys})\s*=\s*)({_STRING}|[^\s,}}#]+)")


def _secret_values(text: str, secrets: set[tuple[str, str]]) -> list[str]:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return []
    values = []
    for section, key in secrets:
        table = doc.get(section)
        value = table.get(key) if isinstance(table, dict) else None
        if isinstance(value, str) and value:
            values.append(value)
    return values


def _command_with_stderr(argv: list[str], timeout: float = 20.0) -> tuple[str, str]:
    if shutil.which(argv[0]) is None:
        raise OSError(f"{argv[0]} is not installed")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0 and not proc.stdout:
        raise OSError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()[:300]}")
    return proc.stdout, proc.stderr


def _command(argv: list[str], timeout: float = 20.0) -> str:
    return _command_with_stderr(argv, timeout)[0]


def _tss_version() -> str:
    try:
        out = _command(["dpkg-query", "-W", "-f=${Package} ${Version}\\n", "libtss2-esys*"])
        installed = [line for line in out.splitlines() if line.split(" ", 1)[-1].strip()]
        if installed:
            return installed[0]
    except OSError:
        pass
    return "tss2-esys " + _command(["pkg-config", "--modversion", "tss2-esys"]).strip()


def versions() -> dict[str, Any]:
    packages = {}
    for name in _PYTHON_PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    doc: dict[str, Any] = {
        "devid-agent": __version__,
        "python": platform.python_version(),
        "python_packages": packages,
        "kernel": platform.release(),
        "machine": platform.machine(),
    }
    for key, probe in (("tpm2-tss", _tss_version),
                       ("systemd", lambda: _command(["systemctl", "--version"]).splitlines()[0]),
                       ("os", _os_release)):
        try:
            doc[key] = probe()
        except (OSError, subprocess.SubprocessError, IndexError) as e:
            doc[key] = f"unknown ({e})"
    return doc


def _os_release() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return "unknown"


@dataclass
class Bundle:
    """The members of the tarball, and what could not be collected."""

    files: dict[str, bytes] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)

    def fetch(self, name: str, collect: Callable[[], Any]) -> Any | None:
        """`collect()`, or None with the reason recorded under `name`."""
        try:
            return collect()
        except PermissionError as e:
            self.problems[name] = str(explain(e, None, "devidctl support-bundle"))
        except DevidError as e:
            self.problems[name] = str(e)
        except OSError as e:
            self.problems[name] = os_error_text(e)
        except Exception as e:  # a collector's bug must not cost the other parts
            self.problems[name] = f"{type(e).__name__}: {e}"
        return None

    def add(self, name: str, collect: Callable[[], str | dict[str, Any]]) -> Any | None:
        """Collect `name` into the bundle; its value, for the parts built from it."""
        value = self.fetch(name, collect)
        if value is None:
            return None
        text = value if isinstance(value, str) else json.dumps(value, indent=2,
                                                                sort_keys=True) + "\n"
        self.files[name] = text.encode()
        return value

    def tar_gz(self, now: datetime.datetime, top: str) -> bytes:
        manifest = {"created": now.isoformat(timespec="seconds"), "host": socket.gethostname(),
                    "devid-agent": __version__, "files": sorted(self.files),
                    "not_collected": self.problems}
        members = {**self.files,
                   "manifest.json": (json.dumps(manifest, indent=2) + "\n").encode()}
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for name, data in sorted(members.items()):
                info = tarfile.TarInfo(f"{top}/{name}")
                info.size, info.mtime, info.mode = len(data), int(now.timestamp()), 0o600
                tar.addfile(info, io.BytesIO(data))
        return buffer.getvalue()


@dataclass(frozen=True)
class Sources:
    """Where the documents come from: the daemon, or a local fallback when it is down."""

    status: Callable[[], dict[str, Any]]
    check: Callable[[], dict[str, Any]]
    audit: Callable[[], dict[str, Any]]
    certificates: Callable[[], dict[str, Any]]


def collect(config: AgentConfig, sources: Sources) -> Bundle:
    bundle = Bundle()
    status = bundle.add("status.json", sources.status) or {}
    check = bundle.add("check.json", sources.check) or {}
    bundle.add("audit.json", sources.audit)
    certificates = bundle.fetch("certificates.json", sources.certificates)
    if certificates is not None:  # asked once; the PEM in a file of its own
        bundle.add("certificates.json", lambda: without_pem(certificates))
        bundle.add("certificates.pem", lambda: _pem(certificates))
    bundle.add("clock.json", lambda: _clock(check))
    bundle.add("state-dir.txt", lambda: state_dir_listing(config.paths.state_dir))
    bundle.add("journal.txt", _journal)
    log_file = (status.get("agent") or {}).get("log_file")
    bundle.add("agent.log", lambda: _agent_log(log_file))
    if config.source is not None:
        source = config.source
        bundle.add("agent.toml", lambda: redact_config_text(source.read_text(),
                                                            secret_keys()))
    bundle.add("config.effective.json", lambda: json.loads(config.model_dump_json()))
    bundle.add("versions.json", versions)
    return bundle


def _pem(doc: dict[str, Any]) -> str:
    """The identity and TLS chains: public, and what a relying party would be shown."""
    pem = certificates_pem(doc)
    if not pem:
        raise DevidError("not enrolled: no certificates")
    return pem


def _clock(check: dict[str, Any]) -> dict[str, Any]:
    """The local clock, its NTP state and its offset from the registrar's (from the check)."""
    if check.get("clock") is None:
        raise DevidError("no check document to read the registrar offset from")
    doc: dict[str, Any] = {"check": check["clock"],
                           "collected": datetime.datetime.now(datetime.UTC)
                           .isoformat(timespec="seconds")}
    try:
        doc["timedatectl"] = _command(["timedatectl", "show"], timeout=10.0)
    except (OSError, subprocess.SubprocessError) as e:
        doc["timedatectl"] = f"unknown ({e})"
    return doc


def state_dir_listing(state_dir: Path) -> str:
    """Names, types, modes, owners, sizes and times: never contents."""
    lines = [f"{state_dir}:"]
    try:
        top = state_dir.lstat()
    except FileNotFoundError:
        return f"{state_dir}: does not exist\n"
    lines.append(_entry(state_dir, top, "."))
    entries = sorted(state_dir.rglob("*"))  # PermissionError: named by Bundle.add
    for path in entries:
        try:
            lines.append(_entry(path, path.lstat(), str(path.relative_to(state_dir))))
        except OSError as e:
            lines.append(f"?          {path.relative_to(state_dir)}: {e.strerror}")
    return "\n".join(lines) + "\n"


def _entry(path: Path, st: os.stat_result, name: str) -> str:
    when = datetime.datetime.fromtimestamp(st.st_mtime, datetime.UTC)
    return (f"{stat.filemode(st.st_mode)} {_owner(st.st_uid):>12} {st.st_size:>8} "
            f"{when:%Y-%m-%d %H:%M:%SZ} {name}")


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _journal() -> str:
    stdout, stderr = _command_with_stderr(
        ["journalctl", "--no-pager", "-o", "short-iso-precise", "-n", str(JOURNAL_LINES),
         "-u", "devid-agent.service", "-u", "devid-registrar.service"])
    entries = [line for line in stdout.splitlines() if line and not line.startswith("-- ")]
    if "insufficient permissions" in stderr and not entries:
        raise DevidError(f"journalctl: {stderr.strip()[:300]}",
                         "run as root or a member of group systemd-journal or adm")
    return stdout


AGENT_LOG_BYTES = 512 * 1024


def _agent_log(path: str | None) -> str:
    """The tail of the file the daemon writes its log to when not under the journal."""
    if path is None:
        raise DevidError("the daemon did not say where it logs (not running, or logging to "
                         "the journal: see journal.txt)")
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - AGENT_LOG_BYTES))
        data = f.read()
    text = data.decode("utf-8", "replace")
    return text if size <= AGENT_LOG_BYTES else text.partition("\n")[2]


def default_name(now: datetime.datetime) -> str:
    return f"devid-support-{socket.gethostname()}-{now:%Y%m%dT%H%M%SZ}"


def write_bundle(bundle: Bundle, path: Path, now: datetime.datetime) -> None:
    data = bundle.tar_gz(now, path.name.removesuffix(".tar.gz"))
    write_atomic(path, data)  # 0600: it describes the gateway in detail
