"""`devidctl support-bundle`: one tarball a remote expert can diagnose from.

It holds the status and check documents (from the daemon, or a local check
when it is down), the recent audit records, recent journal lines, the
configuration with secrets redacted, and the versions of everything that
matters (agent, Python libraries, tpm2-tss, kernel, OS). It never holds state
files, key blobs or the enrollment token. A part that cannot be collected is
named in manifest.json with the reason; the bundle is still written.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import io
import json
import platform
import re
import shutil
import socket
import subprocess
import tarfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import __version__
from agent.access import explain
from agent.config import AgentConfig, secret_keys
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


def _command(argv: list[str], timeout: float = 20.0) -> str:
    if shutil.which(argv[0]) is None:
        raise OSError(f"{argv[0]} is not installed")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0 and not proc.stdout:
        raise OSError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()[:300]}")
    return proc.stdout


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

    def add(self, name: str, collect: Callable[[], str | dict[str, Any]]) -> None:
        try:
            value = collect()
        except PermissionError as e:
            self.problems[name] = str(explain(e, None, "devidctl support-bundle"))
            return
        except DevidError as e:
            self.problems[name] = str(e)
            return
        except Exception as e:
            self.problems[name] = f"{type(e).__name__}: {e}"
            return
        text = value if isinstance(value, str) else json.dumps(value, indent=2,
                                                                sort_keys=True) + "\n"
        self.files[name] = text.encode()

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


def collect(config: AgentConfig, status: Callable[[], dict[str, Any]],
            check: Callable[[], dict[str, Any]], audit: Callable[[], dict[str, Any]]) -> Bundle:
    bundle = Bundle()
    bundle.add("status.json", status)
    bundle.add("check.json", check)
    bundle.add("audit.json", audit)
    bundle.add("journal.txt", lambda: _command(
        ["journalctl", "--no-pager", "-o", "short-iso-precise", "-n", str(JOURNAL_LINES),
         "-u", "devid-agent.service", "-u", "devid-registrar.service"]))
    if config.source is not None:
        source = config.source
        bundle.add("agent.toml", lambda: redact_config_text(source.read_text(),
                                                            secret_keys()))
    bundle.add("config.effective.json", lambda: json.loads(config.model_dump_json()))
    bundle.add("versions.json", versions)
    return bundle


def default_name(now: datetime.datetime) -> str:
    return f"devid-support-{socket.gethostname()}-{now:%Y%m%dT%H%M%SZ}"


def write_bundle(bundle: Bundle, path: Path, now: datetime.datetime) -> None:
    data = bundle.tar_gz(now, path.name.removesuffix(".tar.gz"))
    write_atomic(path, data)  # 0600: it describes the gateway in detail
