"""A real PostgreSQL server for tests, from Debian's package, in a temporary directory.

initdb and pg_ctl run as an unprivileged user (PostgreSQL refuses root): as
ourselves when we are not root, else as the package's `postgres` user, in a
directory of its own under /tmp. The server listens on a free loopback port
with trust authentication for the test user, fsync off (tests, not data),
and is stopped at the end. `database()` makes a fresh database per test.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

USER = "devid"
_names = itertools.count(1)


def pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (Debian: apt install postgresql; "
                           "`make deps` does)")
    return Path(found[-1]).parent


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    def __init__(self) -> None:
        self.bin = pg_bin()
        self.directory = Path(tempfile.mkdtemp(prefix="devid-pg-"))
        self.data = self.directory / "data"
        self.port = _free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.directory, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        proc = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=120,
                              cwd=self.directory)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])}: {proc.stdout}{proc.stderr}")

    def start(self) -> PostgresServer:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, "-A", "trust",
                  "--no-sync", "-E", "UTF8")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                  str(self.directory / "server.log"), "-w", "-t", "60", "-o",
                  f"-p {self.port} -h 127.0.0.1 -k {self.directory} -c fsync=off "
                  "-c full_page_writes=off -c max_connections=200", "start")
        return self

    def conninfo(self, database: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={USER} dbname={database}"

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new, empty database; its name."""
        import psycopg

        name = f"registrar_{os.getpid()}_{next(_names)}"
        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run([*self._as, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m",
                            "immediate", "-w", "stop"], capture_output=True, timeout=60,
                           cwd=self.directory)
        shutil.rmtree(self.directory, ignore_errors=True)


def registrar_toml(server: PostgresServer) -> str:
    """registrar.toml's [database] section for a fresh database on `server`."""
    return f'\n[database]\nurl = "{server.url(server.database())}"\n'
