"""A tamper-evident audit log: hash-chained JSON lines.

Each line is a JSON object with `seq` (1, 2, ...), `time`, `event`, the
event's fields, `prev` (the previous line's hash) and `hash` = SHA-256 of the
line's canonical JSON without `hash`. Editing a line breaks its hash, deleting
or reordering lines breaks `prev`/`seq`, and a head file (the last seq and
hash, written atomically after every append) exposes a removed tail.

Appends take an exclusive flock, so several processes (the server, the CLI)
can write the same log; each append is fsynced before it returns.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.clock import Clock, utcnow
from agent.fsutil import write_atomic

GENESIS = "0" * 64
AGENT_AUDIT_LOG = "audit.log"  # in the agent's state directory


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


@dataclass(frozen=True)
class AuditVerdict:
    ok: bool
    records: int
    problem: str = ""


def new_record(seq: int, time: str, event: str, fields: dict[str, Any],
               prev: str) -> dict[str, Any]:
    """The next record of a chain: its fields, the previous hash, and its own."""
    record = {"seq": seq, "time": time, "event": event, **fields, "prev": prev}
    record["hash"] = _hash(record)
    return record


def encode_record(record: dict[str, Any]) -> bytes:
    return _canonical(record)


def check_chain(lines: Iterable[bytes], unit: str) -> tuple[AuditVerdict, str]:
    """Walk hash-chained records (one canonical JSON object each): the verdict and the last
    hash. `unit` names a position in messages ("line", "row")."""
    prev, seq = GENESIS, 0
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError:
            return AuditVerdict(False, seq, f"{unit} {number}: not valid JSON"), prev
        if not isinstance(record, dict) or record.get("hash") != _hash(record):
            return AuditVerdict(False, seq, f"{unit} {number}: hash mismatch ({unit} edited)"), \
                prev
        if record.get("prev") != prev or record.get("seq") != seq + 1:
            return AuditVerdict(False, seq, f"{unit} {number}: chain broken (a {unit} before "
                                            "it was removed or reordered)"), prev
        prev, seq = record["hash"], seq + 1
    return AuditVerdict(True, seq), prev


class AuditLog:
    def __init__(self, path: Path, clock: Clock = utcnow) -> None:
        self.path = path
        self.head_path = path.with_name(path.name + ".head")
        self._clock = clock
        self._lock = threading.Lock()

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one record; returns it (with seq and hash)."""
        with self._lock, open(self.path, "a+b") as f:
            os.fchmod(f.fileno(), 0o600)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                seq, prev = self._tail(f)
                record = new_record(seq + 1, self._clock().isoformat(timespec="seconds"),
                                    event, fields, prev)
                f.seek(0, os.SEEK_END)
                f.write(_canonical(record) + b"\n")
                f.flush()
                os.fsync(f.fileno())
                write_atomic(self.head_path, _canonical({"seq": record["seq"],
                                                         "hash": record["hash"]}) + b"\n")
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return record

    @staticmethod
    def _tail(f: Any) -> tuple[int, str]:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return 0, GENESIS
        block = min(size, 64 * 1024)
        f.seek(size - block)
        lines = f.read(block).rstrip(b"\n").split(b"\n")
        last = json.loads(lines[-1])
        return int(last["seq"]), str(last["hash"])

    def records(self) -> Iterator[dict[str, Any]]:
        """The records as written, up to the first line that is not a JSON object
        (verify() says whether the chain holds)."""
        try:
            with open(self.path, "rb") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        return
                    if not isinstance(record, dict):
                        return
                    yield record
        except FileNotFoundError:
            return

    def verify(self) -> AuditVerdict:
        """Walk the chain; the first break found is reported with its line number."""
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return AuditVerdict(not self.head_path.exists(), 0,
                                "" if not self.head_path.exists() else "log file missing")
        with f:
            verdict, prev = check_chain(f, "line")
        if not verdict.ok:
            return verdict
        seq = verdict.records
        try:
            head = json.loads(self.head_path.read_bytes())
        except (OSError, ValueError):
            return AuditVerdict(False, seq, f"{self.head_path.name}: missing or unreadable")
        if head.get("seq") != seq or head.get("hash") != prev:
            return AuditVerdict(False, seq, f"the log ends at record {seq} but the head says "
                                            f"{head.get('seq')} (lines removed from the end)")
        return AuditVerdict(True, seq)

    def report(self, limit: int | None = None) -> dict[str, Any]:
        """The last `limit` records and whether the chain verifies (devidctl audit)."""
        verdict = self.verify()
        records = list(self.records())
        if limit is not None and limit > 0:
            records = records[-limit:]
        return {"path": str(self.path), "intact": verdict.ok,
                "problem": verdict.problem or None, "count": verdict.records,
                "records": records}
