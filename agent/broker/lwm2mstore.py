"""lwm2m.db: the LwM2M registrations and silent sensors, kept across restarts.

LwM2M clients register once and then only send Updates, so a broker that
forgot its registrations at a restart would answer their Updates 4.04 and
make every sensor register again at once. Changes are written in batches
(one transaction a second, from the broker's task), never per message: a
crash loses at most the last second, and a sensor whose registration was lost
hears 4.04 on its next Update and registers again, as LwM2M intends.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agent.errors import StateError
from agent.lwm2m.registration import Registration, Registrations, Silent
from agent.sqlite import Database

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS registrations (serial INTEGER PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS silent (serial INTEGER PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS firmware (serial INTEGER PRIMARY KEY, doc TEXT NOT NULL);
"""


def _registration_doc(r: Registration) -> str:
    return json.dumps({"serial": r.serial, "sensor_id": r.sensor_id, "endpoint": r.endpoint,
                       "location": r.location, "lifetime": r.lifetime, "version": r.version,
                       "binding": r.binding, "queue": r.queue,
                       "objects": [[o, list(i)] for o, i in r.objects.items()],
                       "versions": [[o, v] for o, v in r.versions.items()], "root": r.root,
                       "registered_at": r.registered_at, "updated_at": r.updated_at})


def _registration(doc: str) -> Registration:
    d = json.loads(doc)
    return Registration(int(d["serial"]), str(d["sensor_id"]), str(d["endpoint"]),
                        str(d["location"]), int(d["lifetime"]), str(d["version"]),
                        str(d["binding"]), bool(d["queue"]),
                        {int(o): tuple(int(i) for i in ids) for o, ids in d["objects"]},
                        {int(o): str(v) for o, v in d["versions"]}, str(d["root"]),
                        float(d["registered_at"]), float(d["updated_at"]))


def _silent_doc(s: Silent) -> str:
    return json.dumps({"serial": s.serial, "sensor_id": s.sensor_id, "endpoint": s.endpoint,
                       "last_update": s.last_update, "lifetime": s.lifetime})


def _silent(doc: str) -> Silent:
    d = json.loads(doc)
    return Silent(int(d["serial"]), str(d["sensor_id"]), str(d["endpoint"]),
                  float(d["last_update"]), int(d["lifetime"]))


class Lwm2mStore(Database):
    def __init__(self, path: Path) -> None:
        super().__init__(path, "the broker")
        with self._transaction() as db:
            self._schema_version(db, SCHEMA_VERSION, "devid-broker")
            self._create(db, SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def load(self) -> tuple[list[Registration], list[Silent]]:
        try:
            return ([_registration(str(doc)) for (doc,) in
                     self._query("SELECT doc FROM registrations ORDER BY serial")],
                    [_silent(str(doc)) for (doc,) in
                     self._query("SELECT doc FROM silent ORDER BY serial")])
        except (ValueError, KeyError, TypeError) as e:
            raise StateError(f"{self.path}: a damaged LwM2M registration ({e})",
                             "move the file aside: the sensors register again on their "
                             "next Update") from None

    def firmware(self) -> dict[int, dict[str, Any]]:
        """Each sensor's last firmware update (agent/broker/firmware.py)."""
        out = {}
        for serial, doc in self._query("SELECT serial, doc FROM firmware"):
            try:
                out[int(serial)] = dict(json.loads(str(doc)))  # type: ignore[arg-type]
            except (ValueError, TypeError):
                continue  # a damaged record: as if no update was ever run
        return out

    def save_firmware(self, serial: int, job: dict[str, Any]) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO firmware VALUES (?, ?)",
                       (serial, json.dumps(job, sort_keys=True)))

    def save(self, table: Registrations, serials: Iterable[int]) -> None:
        """The current state of each of `serials` (registered, silent or gone)."""
        with self._transaction() as db:
            for serial in serials:
                db.execute("DELETE FROM registrations WHERE serial = ?", (serial,))
                db.execute("DELETE FROM silent WHERE serial = ?", (serial,))
                registration = table.of(serial)
                if registration is not None:
                    db.execute("INSERT INTO registrations VALUES (?, ?)",
                               (serial, _registration_doc(registration)))
                elif serial in table.silent:
                    db.execute("INSERT INTO silent VALUES (?, ?)",
                               (serial, _silent_doc(table.silent[serial])))
