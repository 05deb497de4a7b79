"""devidctl's sensor verbs, over devid-broker's control socket.

A minted credential is shown once, in the answer to `add` or `rekey`: the
broker keeps it sealed and never shows it again. A batch (`--count`) goes to
a file written 0600, never to the terminal.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import segno

from agent.broker.config import DEFAULT_CONTROL_SOCKET
from agent.cli.render import render_lwm2m, render_sensor, render_sensors
from agent.control import client
from agent.errors import DaemonNotRunning, DevidError, PermissionDenied, SensorError
from agent.fsutil import write_atomic
from agent.sensors.credentials import TRANSPORTS

Verb = Callable[..., argparse.ArgumentParser]
Fail = Callable[[DevidError, bool, int], int]
EXIT_FAIL, EXIT_NO_DAEMON = 2, 3
SOCKET_ENV = "DEVIDCTL_BROKER_SOCKET"
ACTIONS = ("add", "import", "list", "show", "quarantine", "release", "revoke", "rekey",
           "remove", "read", "write", "execute", "discover", "observe", "firmware")
DOWNLINK = ("read", "write", "execute", "discover")  # LwM2M device management
BATCH_MAX_LINE = 64 << 20  # 10,000 credentials in one answer
IMPORT_MAX_BYTES = 24 << 20  # sent whole in one request (the broker takes 32 MiB)
FIRMWARE_MAX_BYTES = 4 << 20  # what the broker takes pushed; larger packages by --uri


def _attribute(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_verbs(verb: Verb) -> None:
    sensors = verb("sensors", help="constrained sensors served by devid-broker")
    sensors.add_argument("action", choices=ACTIONS)
    sensors.add_argument("sensor", nargs="?", metavar="NAME|ID|FILE",
                         help="the sensor (add: its name; import: the CSV or JSON file)")
    sensors.add_argument("operands", nargs="*", metavar="PATH [VALUE]",
                         help="read/write/execute/discover: the LwM2M path (/3/0/1); "
                         "write: the value; execute: optional arguments")
    sensors.add_argument("--profile", help="add: the policy profile (its role)")
    sensors.add_argument("--transport", choices=TRANSPORTS, default="oscore",
                         help="add: how the sensor talks to the gateway (default oscore)")
    sensors.add_argument("--attr", type=_attribute, action="append", default=[],
                         metavar="KEY=VALUE", help="add: an attribute policy can match "
                         "(repeatable): site, zone, kind, ...")
    sensors.add_argument("--count", type=int, help="add: a batch of N sensors named "
                         "PREFIX0001...; needs --prefix and --out; observe: stop after N "
                         "notifications (default 5)")
    sensors.add_argument("--prefix", help="add --count: the names' prefix")
    sensors.add_argument("--out", type=Path, metavar="FILE", help="add --count: write the "
                         "credentials there (0600; .csv or .json)")
    sensors.add_argument("--qr", type=Path, metavar="FILE", help="add/rekey: also write the "
                         "credential as a QR code PNG (0600) for the field installer")
    sensors.add_argument("--reason", help="quarantine/release/revoke: why (audited)")
    sensors.add_argument("--seconds", type=float, default=30.0,
                         help="observe: stop after this long (default 30, max 110)")
    sensors.add_argument("--uri", help="firmware: the sensor fetches the package from "
                         "this URI (pull) instead of the gateway writing FILE to it (push)")
    sensors.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                         help="read/write/execute/discover: for a sensor asleep in LwM2M "
                         "queue mode, wait up to this long for its next Update (max 110)")
    add_broker_socket(sensors)
    sensors.add_argument("--json", action="store_true", help="print one JSON object")


def broker_socket(args: argparse.Namespace) -> Path:
    """--broker-socket, else $DEVIDCTL_BROKER_SOCKET, else the broker's default."""
    given = getattr(args, "broker_socket", None)
    return given or Path(os.environ.get(SOCKET_ENV) or DEFAULT_CONTROL_SOCKET)


def add_broker_socket(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker-socket", type=Path, metavar="PATH",
                        help=f"devid-broker's control socket (default ${SOCKET_ENV}, else "
                             f"{DEFAULT_CONTROL_SOCKET})")


def broker_status(args: argparse.Namespace) -> dict[str, Any] | None:
    """devid-broker's status for `devidctl status` and `check`: None when the broker is not
    on this gateway (no socket); {"error": ...} when its socket does not answer."""
    path = broker_socket(args)
    if not path.exists():
        return None
    try:
        return client.call(path, "status", timeout=10.0, command=args.command_line)
    except DevidError as e:
        return {"socket": str(path), "state": "FAIL", "error": e.to_dict()}


def _batch_file(path: Path, sensors: list[dict[str, Any]]) -> None:
    if path.suffix == ".csv":
        out = io.StringIO()
        rows = [{"name": s["name"], "id": s["id"], "profile": s["profile"],
                 **s["credential"]} for s in sensors]
        fields = list(dict.fromkeys(k for row in rows for k in row if k != "cipher_suites"))
        writer = csv.DictWriter(out, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        data = out.getvalue().encode()
    else:
        data = json.dumps(sensors, indent=1, sort_keys=True).encode()
    write_atomic(path, data)  # 0600, atomically: a batch file holds every key


def qr_payload(sensor: dict[str, Any]) -> str:
    """What the installer's QR code says: compact JSON, versioned (docs/broker.md)."""
    return json.dumps({"v": 1, "id": sensor["id"], "name": sensor["name"],
                       **sensor["credential"]}, separators=(",", ":"), sort_keys=True)


def _qr_file(path: Path, sensor: dict[str, Any]) -> None:
    out = io.BytesIO()
    segno.make(qr_payload(sensor), error="m").save(out, kind="png", scale=6, border=4)
    write_atomic(path, out.getvalue())  # 0600: the picture is the key


def _request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    action, ref = args.action, args.sensor
    if args.qr is not None and (action not in ("add", "rekey") or args.count is not None):
        raise SensorError("--qr goes with `add NAME` or `rekey`: one new credential")
    if action == "add":
        params: dict[str, Any] = {"profile": args.profile, "transport": args.transport,
                                  "attributes": dict(args.attr)}
        if not args.profile:
            raise SensorError("sensors add: --profile is required")
        if args.count is not None:
            if not args.prefix or args.out is None or ref:
                raise SensorError("sensors add --count N: give --prefix and --out, not a name")
            return "sensors-add", {**params, "count": args.count, "prefix": args.prefix}
        if not ref:
            raise SensorError("sensors add: which name? (devidctl sensors add NAME --profile P)")
        return "sensors-add", {**params, "name": ref}
    if action == "list":
        return "sensors-list", {}
    if not ref:
        raise SensorError(f"sensors {action}: which sensor?")
    if action == "import":
        try:
            if Path(ref).stat().st_size > IMPORT_MAX_BYTES:
                raise SensorError(f"{ref}: larger than {IMPORT_MAX_BYTES >> 20} MiB",
                                  "split it into several files")
            text = Path(ref).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SensorError(f"{ref}: cannot read: {getattr(e, 'strerror', None) or e}"
                              ) from None
        return "sensors-import", {"text": text, "filename": Path(ref).name}
    if action in DOWNLINK:
        operands = args.operands
        if not operands or len(operands) > 2 or (action in ("read", "discover")
                                                 and len(operands) != 1):
            usage = "PATH VALUE" if action == "write" else "PATH [ARGUMENTS]" \
                if action == "execute" else "PATH"
            raise SensorError(f"sensors {action}: expected {ref} {usage}")
        params = {"sensor": ref, "operation": action, "path": operands[0],
                  "wait": args.wait}
        if len(operands) == 2:
            params["value"] = operands[1]
        return "lwm2m-operate", params
    if action == "observe":
        if len(args.operands) != 1:
            raise SensorError(f"sensors observe: expected {ref} PATH")
        return "lwm2m-observe", {"sensor": ref, "path": args.operands[0],
                                 "count": args.count or 5, "seconds": args.seconds,
                                 "wait": args.wait}
    if action == "firmware":
        return "lwm2m-firmware", {"sensor": ref, **_firmware_source(args)}
    if args.operands:
        raise SensorError(f"sensors {action}: unexpected {' '.join(args.operands)!r}")
    if action in ("quarantine", "release", "revoke"):
        return "sensors-change", {"sensor": ref, "change": action, "reason": args.reason}
    return f"sensors-{action}", {"sensor": ref}


def _firmware_source(args: argparse.Namespace) -> dict[str, str]:
    """--uri URI (the sensor pulls it), or FILE (the gateway pushes it, base64 over the
    control socket)."""
    if (args.uri is None) == (len(args.operands) != 1):
        raise SensorError("sensors firmware: expected SENSOR FILE, or SENSOR --uri URI")
    if args.uri is not None:
        return {"uri": args.uri}
    path = Path(args.operands[0])
    try:
        if path.stat().st_size > FIRMWARE_MAX_BYTES:
            raise SensorError(f"{path}: larger than {FIRMWARE_MAX_BYTES >> 20} MiB",
                              "give the sensor a URI to fetch it from (--uri)")
        return {"package": base64.b64encode(path.read_bytes()).decode("ascii")}
    except OSError as e:
        raise SensorError(f"{path}: cannot read: {e.strerror or e}") from None


def broker_call(args: argparse.Namespace, method: str, params: dict[str, Any]
                ) -> dict[str, Any]:
    """One request to devid-broker's control socket."""
    try:
        return client.call(broker_socket(args), method, params, timeout=120.0,
                           command=args.command_line, max_line=BATCH_MAX_LINE)
    except DaemonNotRunning as e:
        e.hint = e.hint or "is devid-broker running? (systemctl status devid-broker)"
        raise


def exit_code(error: DevidError) -> int:
    """3 when the broker is out of reach (down, or not ours to ask), else 2."""
    return EXIT_NO_DAEMON if isinstance(error, DaemonNotRunning | PermissionDenied) \
        else EXIT_FAIL


def cmd_sensors(args: argparse.Namespace, fail: Fail) -> int:
    try:
        method, params = _request(args)
        doc = broker_call(args, method, params)
        if args.qr is not None:
            _qr_file(args.qr, doc["sensors"][0] if "sensors" in doc else doc)
        if method == "sensors-add" and args.count is not None:
            _batch_file(args.out, doc["sensors"])
            doc = {"added": len(doc["sensors"]), "file": str(args.out.resolve()),
                   "first": doc["sensors"][0]["name"], "last": doc["sensors"][-1]["name"]}
    except OSError as e:
        return fail(DevidError(f"{args.out}: cannot write: {e.strerror}"), args.json, EXIT_FAIL)
    except DevidError as e:
        return fail(e, args.json, exit_code(e))
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    elif method in ("lwm2m-operate", "lwm2m-observe"):
        print(render_lwm2m(doc))
    elif method == "lwm2m-firmware":
        print(f"{doc['sensor']}: firmware update started ({doc['source']}); follow it with "
              f"`devidctl sensors show {doc['sensor']}`")
    elif "sensors" in doc:
        print(render_sensors(doc))
    else:
        print(render_sensor(doc))
    if method in ("lwm2m-operate", "lwm2m-observe") and \
            not str(doc.get("code", "")).startswith("2."):
        return EXIT_FAIL  # the sensor refused (its code and reason are printed)
    return 0
