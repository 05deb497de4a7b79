"""devid-registrar: the command line of the reference registrar.

    devid-registrar init --dir DIR --ek-root VENDOR.pem [--listen 127.0.0.1:8443]
    devid-registrar serve --dir DIR [--listen HOST:PORT]
    devid-registrar token create --dir DIR [--ttl 1h] [--label TEXT]
    devid-registrar devices list --dir DIR [--json]
    devid-registrar devices show --dir DIR ID [--json]
    devid-registrar devices revoke --dir DIR ID [--reason TEXT]
    devid-registrar crl --dir DIR [-o FILE]
    devid-registrar ca import --dir DIR --certificate ISSUING.pem --root ROOT.pem
    devid-registrar audit verify --dir DIR

Exit codes: 0 success, 1 failure (e.g. a broken audit chain), 64 usage,
78 configuration error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import secrets
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent import __version__, logsetup
from agent.access import command_line, explain, os_error_text
from agent.clock import isoformat_utc
from agent.errors import ConfigError, DevidError, Problem
from agent.fsutil import write_atomic
from agent.registrar.config import CaKeySection, host_port
from agent.registrar.home import RegistrarHome
from agent.registrar.service import token_hash
from agent.tomlconfig import parse_duration

EXIT_FAILURE = 1
EXIT_USAGE = 64
EXIT_CONFIG = 78
MAX_TOKEN_TTL = 30 * 86400.0
SHOWN_CERTIFICATES = 10  # the newest, in `devices show`


def _pcr_list(text: str) -> list[int]:
    """'0-7' or '0,2,4,7' -> sorted PCR indices."""
    pcrs: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            pcrs.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PCRs like '0-7' or '0,2,7', got {text!r}") \
            from None
    if not pcrs or min(pcrs) < 0 or max(pcrs) > 23:
        raise argparse.ArgumentTypeError("PCR indices must be within 0..23")
    return sorted(pcrs)


def _listen(text: str) -> str:
    try:
        host_port(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _ttl(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if seconds > MAX_TOKEN_TTL:
        raise argparse.ArgumentTypeError("at most 30d")
    return seconds


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="devid-registrar",
                                     description="reference enrollment service and CA")
    parser.add_argument("--version", action="version", version=f"devid-registrar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_dir(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--dir", type=Path, required=True, help="the registrar's directory")
        return p

    init = with_dir(sub.add_parser("init", help="create the CA and registrar.toml"))
    init.add_argument("--ek-root", type=Path, action="append", default=[], dest="ek_roots",
                      metavar="PEM", help="trusted TPM vendor root CA file (repeatable)")
    init.add_argument("--listen", default="127.0.0.1:8443", help="HOST:PORT to serve on")
    init.add_argument("--server-name", action="append", dest="server_names", metavar="NAME",
                      help="DNS name or IP for the TLS certificate (repeatable; default "
                           "localhost, 127.0.0.1, ::1)")
    init.add_argument("--pcrs", type=_pcr_list, default=list(range(8)),
                      help="PCRs the policy quotes (default 0-7)")
    init.add_argument("--offline-root", action="store_true",
                      help="no root CA on this host: write ca/issuing.csr for a root kept "
                           "elsewhere to sign, then run `ca import`")
    hsm = init.add_argument_group("issuing key in a PKCS#11 token (all four, or none)")
    hsm.add_argument("--pkcs11-module", type=Path, metavar="SO",
                     help="the token's PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so")
    hsm.add_argument("--pkcs11-token", metavar="LABEL", help="the token's label")
    hsm.add_argument("--pkcs11-key-label", metavar="LABEL",
                     help="label for the key pair made in the token")
    hsm.add_argument("--pkcs11-pin-file", type=Path, metavar="FILE",
                     help="file holding the token's user PIN (never on the command line)")
    serve = with_dir(sub.add_parser("serve", help="serve enrollments over HTTPS"))
    serve.add_argument("--listen", type=_listen, metavar="HOST:PORT",
                       help="instead of registrar.toml's listen (another replica on this host)")

    token = sub.add_parser("token", help="enrollment tokens").add_subparsers(
        dest="action", required=True)
    create = with_dir(token.add_parser("create", help="print a new one-time token"))
    create.add_argument("--ttl", type=_ttl, default=3600.0, help="validity (default 1h)")
    create.add_argument("--label", help="note kept with the token, e.g. the gateway's name")

    devices = sub.add_parser("devices", help="enrolled devices").add_subparsers(
        dest="action", required=True)
    listing = with_dir(devices.add_parser("list", help="list enrolled devices"))
    listing.add_argument("--json", action="store_true")
    show = with_dir(devices.add_parser("show", help="one device and its certificates"))
    show.add_argument("device_id", metavar="ID")
    show.add_argument("--json", action="store_true")
    revoke = with_dir(devices.add_parser(
        "revoke", help="stop all renewals for a device and put its certificates on the CRL"))
    revoke.add_argument("device_id", metavar="ID")
    revoke.add_argument("--reason", default="revoked by the operator",
                        help="recorded in the audit log and shown to the device")

    ca = sub.add_parser("ca", help="the issuing CA").add_subparsers(dest="action",
                                                                    required=True)
    imported = with_dir(ca.add_parser("import", help="take the issuing CA certificate the "
                                                     "offline root signed (init --offline-root)"))
    imported.add_argument("--certificate", type=Path, required=True, metavar="PEM",
                          help="the issuing CA certificate made from ca/issuing.csr")
    imported.add_argument("--root", type=Path, required=True, metavar="PEM",
                          help="the root CA certificate (gateways pin it)")
    crl = with_dir(sub.add_parser("crl", help="write the current CRL (DER)"))
    crl.add_argument("-o", "--output", type=Path,
                     help="file to write (default: PEM on standard output)")

    audit = sub.add_parser("audit", help="the audit log").add_subparsers(
        dest="action", required=True)
    with_dir(audit.add_parser("verify", help="check the hash chain of the audit log"))
    return parser


def _init(args: argparse.Namespace) -> int:
    for root in args.ek_roots:
        if not root.is_file():
            raise ConfigError(f"--ek-root {root}: no such file")
    home = RegistrarHome(args.dir, args.command_line)
    names = args.server_names or ["localhost", "127.0.0.1", "::1"]
    hsm = (args.pkcs11_module, args.pkcs11_token, args.pkcs11_key_label, args.pkcs11_pin_file)
    if any(hsm) and not all(hsm):
        raise ConfigError("--pkcs11-module, --pkcs11-token, --pkcs11-key-label and "
                          "--pkcs11-pin-file go together")
    ca_key = CaKeySection(backend="pkcs11", module=args.pkcs11_module.resolve(),
                          token_label=args.pkcs11_token, key_label=args.pkcs11_key_label,
                          pin_file=args.pkcs11_pin_file.resolve()) if all(hsm) else None
    made = home.init(args.ek_roots, args.listen, names, args.pcrs, ca_key=ca_key,
                     offline_root=args.offline_root)
    print(f"created {home.config_path}")
    if isinstance(made, x509.CertificateSigningRequest):
        print(f"issuing CA request for the offline root: {home.ca_dir / 'issuing.csr'}")
        print("next: have the root sign it as a CA (basicConstraints cA, pathLen 0; keyUsage "
              "keyCertSign, cRLSign), then `devid-registrar ca import --dir "
              f"{args.dir} --certificate ISSUING.pem --root ROOT.pem`")
    else:
        print(f"registrar CA (pin this on gateways as [enrollment] ca): {made.root_path}")
    if not args.ek_roots:
        print("note: add trusted TPM vendor roots to ek_roots before `serve`")
    print("note: pcr_policy has no allowed sets yet; add the trusted platform states")
    return 0


def _ca_import(args: argparse.Namespace) -> int:
    home = RegistrarHome(args.dir, args.command_line)
    try:
        certificate, root = args.certificate.read_bytes(), args.root.read_bytes()
    except OSError as e:
        raise ConfigError(f"{e.filename}: {e.strerror}") from None
    ca = home.import_issuing(certificate, root)
    print(f"imported the issuing CA certificate (serial {ca.issuing.serial_number:x}, until "
          f"{ca.issuing.not_valid_after_utc.isoformat(timespec='seconds')})")
    print(f"registrar CA (pin this on gateways as [enrollment] ca): {ca.root_path}")
    return 0


def _token_create(args: argparse.Namespace) -> int:
    home = RegistrarHome(args.dir, args.command_line)
    token = secrets.token_urlsafe(32)
    now = time.time()
    store = home.store()
    try:
        store.add_token(token_hash(token), args.label, now, now + args.ttl)
    finally:
        store.close()
    expires = datetime.datetime.fromtimestamp(now + args.ttl, datetime.UTC)
    home.audit().append("token-created", label=args.label,
                        expires=expires.isoformat(timespec="seconds"))
    print(token)
    print(f"one-time token, valid until {expires.isoformat(timespec='seconds')}",
          file=sys.stderr)
    return 0


def _devices_list(args: argparse.Namespace) -> int:
    store = RegistrarHome(args.dir, args.command_line).store()
    try:
        devices = [d.summary() for d in store.devices()]
    finally:
        store.close()
    if args.json:
        print(json.dumps(devices, indent=2))
        return 0
    if not devices:
        print("no devices enrolled")
    for d in devices:
        print(f"{d['device_id']}  {d['status']:8}  cert until {d['cert_not_after']}  "
              f"enrolled {d['enrolled_at']} ({d['enrollments']}x)  {d['tpm_manufacturer'] or ''}")
    return 0


def _devices_show(args: argparse.Namespace) -> int:
    store = RegistrarHome(args.dir, args.command_line).store()
    try:
        device = store.device(args.device_id)
        if device is None:
            raise DevidError(f"{args.device_id}: no such device",
                             "see `devid-registrar devices list`")
        certificates = store.certificates_of(args.device_id)
    finally:
        store.close()
    doc = {**device.summary(), "certificates": [
        {"serial": c.serial, "kind": c.kind, "issued_at": isoformat_utc(c.issued_at),
         "not_after": isoformat_utc(c.not_after),
         "revoked_at": isoformat_utc(c.revoked_at) if c.revoked_at is not None else None,
         "reason": c.reason} for c in certificates]}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    for key, value in doc.items():
        if key == "platform" and isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items() if k != "asserted_by") \
                + " (device-asserted)"
        if key != "certificates":
            print(f"{key + ':':18} {value if value is not None else '-'}")
    shown = doc["certificates"][-SHOWN_CERTIFICATES:]  # type: ignore[index]
    print(f"certificates ({len(certificates)}"
          + (f", the last {len(shown)} shown; --json lists all" if len(shown) < len(certificates)
             else "") + "):")
    for c in shown:
        revoked = f"  revoked {c['revoked_at']}" if c["revoked_at"] else ""
        print(f"  {c['serial']}  {c['kind']:8}  until {c['not_after']}{revoked}")
    return 0


def _devices_revoke(args: argparse.Namespace) -> int:
    home = RegistrarHome(args.dir, args.command_line)
    lifecycle = home.lifecycle()
    try:
        serials = lifecycle.revoke(args.device_id, args.reason,
                                   operator=f"uid {os.getuid()} via devid-registrar")
    except Problem as p:
        raise DevidError(p.message, "see `devid-registrar devices list`") from None
    finally:
        lifecycle.store.close()
    print(f"revoked {args.device_id}: renewals refused from now on; {len(serials)} unexpired "
          "certificate(s) added to the CRL")
    return 0


def _crl(args: argparse.Namespace) -> int:
    lifecycle = RegistrarHome(args.dir, args.command_line).lifecycle()
    try:
        crl = lifecycle.crl()
    finally:
        lifecycle.store.close()
    if args.output:
        write_atomic(args.output, crl.public_bytes(serialization.Encoding.DER), mode=0o644)
        print(f"wrote {args.output}: {len(crl)} revoked certificate(s), next update "
              f"{crl.next_update_utc.isoformat(timespec='seconds')}")
    else:
        sys.stdout.write(crl.public_bytes(serialization.Encoding.PEM).decode())
    return 0




def _audit_verify(args: argparse.Namespace) -> int:
    home = RegistrarHome(args.dir, args.command_line)
    verdict = home.audit().verify()
    if verdict.ok:
        print(f"audit log intact: {verdict.records} records")
        return 0
    print(f"audit log BROKEN after {verdict.records} good records: {verdict.problem}",
          file=sys.stderr)
    return EXIT_FAILURE


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code not in (0, None) else 0
    logsetup.configure("info", "devid-registrar")
    args.command_line = command_line("devid-registrar", argv)
    try:
        if args.command == "init":
            return _init(args)
        if args.command == "serve":
            from agent.registrar.server import serve  # uvicorn only when serving
            serve(RegistrarHome(args.dir, args.command_line), listen=args.listen)
            return 0
        if args.command == "token":
            return _token_create(args)
        if args.command == "devices":
            actions = {"list": _devices_list, "show": _devices_show, "revoke": _devices_revoke}
            return actions[args.action](args)
        if args.command == "crl":
            return _crl(args)
        if args.command == "ca":
            return _ca_import(args)
        return _audit_verify(args)
    except ConfigError as e:
        print(f"devid-registrar: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except DevidError as e:
        print(f"devid-registrar: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except PermissionError as e:
        print(f"devid-registrar: {explain(e, 'the registrar', args.command_line)}",
              file=sys.stderr)
        return EXIT_FAILURE
    except OSError as e:
        print(f"devid-registrar: {os_error_text(e)}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
