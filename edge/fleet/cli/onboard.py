"""``edge fleet claims`` (one-time claim codes) and ``edge fleet serve`` (the HTTPS enrollment endpoint).

The endpoint's public address is recorded in ``<fleet dir>/enroll/endpoint.json`` by ``serve`` (or by
``claims create --server``), so codes made later point at it without repeating it.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import json
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge.errors import ConfigError
from edge.fleet.cli._common import fleet_dir, iso_utc, load_ca, open_fleet_store

__all__ = ["SUBCOMMANDS"]

ENROLL_DIR = "enroll"
_ENDPOINT_FILE = "endpoint.json"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
DEFAULT_PORT = 8443


def _duration(text: str) -> float:
    m = _DURATION.fullmatch(text.strip())
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30m, 24h or 7d")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _endpoint(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (an IPv6 address in brackets: [::1]:8443)")
    return host, int(port)


def _enroll_dir(args: argparse.Namespace) -> Path:
    return fleet_dir(args) / ENROLL_DIR


def _recorded_endpoint(directory: Path) -> tuple[str, int] | None:
    try:
        doc = json.loads((directory / _ENDPOINT_FILE).read_text())
        return str(doc["host"]), int(doc["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _record_endpoint(directory: Path, host: str, port: int) -> None:
    from edge._fs import atomic_write  # noqa: PLC0415

    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(directory / _ENDPOINT_FILE, json.dumps({"host": host, "port": port}).encode())


def _claim_book(args: argparse.Namespace) -> Any:
    from edge.fleet.onboard.claims import CLAIMS_FILE, ClaimBook  # noqa: PLC0415

    return ClaimBook(_enroll_dir(args) / CLAIMS_FILE)


# -- claims -------------------------------------------------------------------------------------------------------


def _register_claims(sub: Any) -> None:
    p = sub.add_parser(
        "claims",
        help="one-time claim codes that let a box enroll itself over the network",
        description="A claim code carries a one-time secret, the enrollment endpoint's address and the fleet CA's "
        "fingerprint: `edge enroll --claim CODE` on a box (or the code in a claim file on its boot partition) "
        "generates the box's key on the box, enrolls it and ends with its first verified envelope.",
    )
    actions = p.add_subparsers(dest="claims_command", required=True, metavar="ACTION")
    c = actions.add_parser(
        "create",
        help="make claim codes",
        description="Print one claim code per line (text), optionally as QR codes. The secret is shown only now "
        "and stored only hashed. Examples:\n  edge fleet claims create --server fleet.example.net:8443\n"
        "  edge fleet claims create --count 20 --expires 30d --qr-dir labels/\n"
        "  edge fleet claims create --device-id pi-kitchen --approval manual --qr terminal",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("--count", type=int, default=1, metavar="N", help="how many codes (default: 1)")
    c.add_argument("--expires", type=_duration, default=7 * 86400.0, metavar="DURATION", help="e.g. 24h, 7d (default)")
    c.add_argument("--device-id", metavar="ID", help="pin the code to this device id (only with --count 1)")
    c.add_argument(
        "--approval",
        choices=("auto", "manual"),
        default="auto",
        help="auto: enroll at once (default); manual: the box waits for `edge fleet claims approve`",
    )
    c.add_argument(
        "--server",
        type=_endpoint,
        metavar="HOST:PORT",
        help="the enrollment endpoint boxes call (default: as recorded by `edge fleet serve`)",
    )
    c.add_argument("--note", default="", help="a label shown by `claims list`")
    c.add_argument("--qr", choices=("terminal",), help="also print each code as a QR code on the terminal")
    c.add_argument("--qr-dir", metavar="DIR", help="also write each code as a PNG QR code (claim-<id>.png) into DIR")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=_claims_create)

    lst = actions.add_parser("list", help="list claims: state, expiry, the device that used each")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(func=_claims_list)
    r = actions.add_parser("revoke", help="revoke an unused claim: no box can enroll with it any more")
    r.add_argument("claim_id", metavar="ID", help="the claim's id (from `claims list`)")
    r.set_defaults(func=_claims_revoke)
    a = actions.add_parser("approve", help="approve a claim of --approval manual: the waiting box enrolls")
    a.add_argument("claim_id", metavar="ID", help="the claim's id (from `claims list`)")
    a.set_defaults(func=_claims_approve)


def _claims_create(args: argparse.Namespace) -> int:
    from edge.wire.onboard import certificate_fingerprint  # noqa: PLC0415

    if args.count < 1 or args.count > 10_000:
        raise ConfigError("--count", args.count, "1 to 10000 codes")
    if args.device_id is not None and args.count != 1:
        raise ConfigError("--device-id", args.device_id, "--count 1: a device id is pinned to one code")
    if args.device_id is not None:
        from edge.identity.keys import validate_device_id  # noqa: PLC0415

        try:
            validate_device_id(args.device_id)
        except ValueError as e:
            raise ConfigError("--device-id", args.device_id, "a device id [A-Za-z0-9][A-Za-z0-9_.-]{0,63}") from e
    directory = _enroll_dir(args)
    endpoint = args.server or _recorded_endpoint(directory)
    if endpoint is None:
        raise ConfigError(
            "--server",
            None,
            "the enrollment endpoint's HOST:PORT as boxes reach it (or start `edge fleet serve` once, which records "
            "it)",
        )
    if args.server:
        _record_endpoint(directory, *endpoint)
    qr = _qr_writer(args)
    ca = load_ca(args)
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives.serialization import Encoding  # noqa: PLC0415

    fingerprint = certificate_fingerprint(x509.load_pem_x509_certificate(ca.cert_pem).public_bytes(Encoding.DER))
    book = _claim_book(args)
    out = []
    try:
        for _ in range(args.count):
            code, row = book.create(
                host=endpoint[0],
                port=endpoint[1],
                ca_fingerprint=fingerprint,
                now=time.time(),
                ttl_s=args.expires,
                device_id=args.device_id,
                approval=args.approval,
                note=args.note,
            )
            png = qr(code.text(), row.claim_id) if qr is not None else None
            out.append((code, row, png))
    finally:
        book.close()
    if args.json:
        body = [
            {
                "claim_id": row.claim_id,
                "code": code.text(),
                "device_id": row.device_id,
                "approval": row.approval,
                "expires": iso_utc(row.expires),
                "qr_png": png,
            }
            for code, row, png in out
        ]
        print(json.dumps(body, indent=2))
    else:
        for code, _row, _png in out:
            print(code.text())
    first = out[0][1]
    print(
        f"{len(out)} claim code(s), {first.approval} approval, expiring {iso_utc(first.expires)}; endpoint "
        f"{endpoint[0]}:{endpoint[1]} (run `edge fleet serve` there). On a box: edge enroll --claim CODE",
        file=sys.stderr,
    )
    return 0


def _qr_writer(args: argparse.Namespace) -> Callable[[str, str], str | None] | None:
    """A function that renders a code as asked (terminal, PNG file), or None when no QR was asked for."""
    if not args.qr and not args.qr_dir:
        return None
    try:
        import segno  # noqa: PLC0415 -- an optional part of the fleet extra
    except ImportError:
        raise ConfigError(
            "--qr", args.qr or args.qr_dir, "the segno package: pip install 'n3-edge[fleet]' (or pip install segno)"
        ) from None
    qr_dir = Path(args.qr_dir) if args.qr_dir else None
    if qr_dir is not None:
        try:
            qr_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError("--qr-dir", str(qr_dir), f"a writable directory ({e.strerror})") from e

    def write(text: str, claim_id: str) -> str | None:
        qr = segno.make(text, error="m")
        if args.qr == "terminal":
            print(f"claim {claim_id}:", file=sys.stderr)
            qr.terminal(out=sys.stderr, compact=True)
        if qr_dir is None:
            return None
        path = qr_dir / f"claim-{claim_id}.png"
        qr.save(str(path), scale=6, border=4)
        return str(path)

    return write


def _claims_list(args: argparse.Namespace) -> int:
    book = _claim_book(args)
    try:
        rows = book.list()
    finally:
        book.close()
    now = time.time()

    def state(r: Any) -> str:
        return "expired" if r.state in ("open", "pending", "approved") and now > r.expires else str(r.state)

    body = [
        {
            "claim_id": r.claim_id,
            "state": state(r),
            "approval": r.approval,
            "device_id": r.enrolled_id or r.device_id,
            "created": iso_utc(r.created),
            "expires": iso_utc(r.expires),
            "used_at": iso_utc(r.used_at),
            "note": r.note,
        }
        for r in rows
    ]
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    print(f"{'CLAIM':<10}  {'STATE':<8}  {'APPROVAL':<8}  {'DEVICE':<20}  {'EXPIRES':<25}  NOTE")
    for b in body:
        print(
            f"{b['claim_id']:<10}  {b['state']:<8}  {b['approval']:<8}  {b['device_id'] or '-':<20}  "
            f"{b['expires']:<25}  {b['note']}"
        )
    return 0


def _claims_revoke(args: argparse.Namespace) -> int:
    book = _claim_book(args)
    try:
        row = book.revoke(args.claim_id)
    finally:
        book.close()
    print(f"claim {row.claim_id} revoked: no box can enroll with it")
    return 0


def _claims_approve(args: argparse.Namespace) -> int:
    book = _claim_book(args)
    try:
        row = book.approve(args.claim_id)
    finally:
        book.close()
    waiting = f" (box key {row.did})" if row.did else ""
    print(f"claim {row.claim_id} approved{waiting}: the box enrolls at its next poll")
    return 0


# -- serve --------------------------------------------------------------------------------------------------------


def _register_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the HTTPS enrollment endpoint boxes redeem claim codes at (EST-style)",
        description="Serve EST's cacerts, simpleenroll (a claim code) and simplereenroll (renewal with the box's "
        "current certificate), and each enrolled box's bundle. Its TLS certificate is issued by the fleet CA for "
        "--public-host. Enrolling rewrites the broker's access rules: a running `edge gateway run` applies them to "
        "the broker within seconds (without one, restart the broker). Runs until SIGTERM or SIGINT.",
    )
    p.add_argument(
        "--listen",
        type=_endpoint,
        default=("0.0.0.0", DEFAULT_PORT),  # noqa: S104 -- boxes call in from the network; --listen narrows it
        metavar="ADDR:PORT",
        help=f"where to listen (default: 0.0.0.0:{DEFAULT_PORT})",
    )
    p.add_argument(
        "--public-host",
        action="append",
        metavar="HOST",
        help="the name or address boxes reach this endpoint at (repeatable; the first goes into claim codes; "
        "default: the --listen address)",
    )
    p.add_argument(
        "--broker",
        type=_endpoint,
        metavar="HOST:PORT",
        help="the broker address enrolled boxes publish to (default: the first --public-host and the broker "
        "listener's port from `edge fleet broker-config`)",
    )
    p.add_argument("--cert-days", type=int, default=30, metavar="DAYS", help="device certificate validity (30)")
    p.add_argument("--ota-repository", default="", metavar="URL", help="the model repository URL boxes use")
    p.add_argument("--ready-file", metavar="FILE", help="write the bound HOST:PORT into FILE once listening")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from edge.fleet.onboard.http import EnrollServer, ensure_server_certificate, server_context  # noqa: PLC0415
    from edge.fleet.onboard.service import EndpointSettings, EnrollService  # noqa: PLC0415
    from edge.fleet.pki.registry import Registry  # noqa: PLC0415
    from edge.log import configure  # noqa: PLC0415

    configure("info", "text")
    if not 1 <= args.cert_days <= 3650:
        raise ConfigError("--cert-days", args.cert_days, "1 to 3650 days")
    ca = load_ca(args)
    directory = _enroll_dir(args)
    listen_host, listen_port = args.listen
    public = args.public_host or [listen_host]
    if any(h in ("0.0.0.0", "::") for h in public):  # noqa: S104
        raise ConfigError("--public-host", public, "the name or address boxes reach the endpoint at")
    store = open_fleet_store(args)  # fails now, not at the first box, if the store is unreachable
    try:
        broker_port = Registry(store, fleet_dir(args)).listener().port
    finally:
        store.close()
    broker = args.broker or (public[0], broker_port)
    now = datetime.datetime.now(datetime.UTC)
    cert, key = ensure_server_certificate(directory, ca, public, now=now)
    service = EnrollService(
        fleet_dir=fleet_dir(args),
        ca=ca,
        claims=_claim_book(args),
        open_store=lambda: open_fleet_store(args),
        settings=EndpointSettings(
            broker_host=broker[0], broker_port=broker[1], cert_days=args.cert_days, ota_repository=args.ota_repository
        ),
        clock=time.time,
    )
    try:
        server = EnrollServer((listen_host, listen_port), service, server_context(cert, key, ca.cert_path))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:  # not a wrong option but a held resource: exit status 1 (docs/cli.md)
            raise OSError(e.errno, e.strerror, f"{listen_host}:{listen_port} (--listen)") from e
        raise ConfigError(
            "--listen", f"{listen_host}:{listen_port}", f"a free address to listen on ({e.strerror})"
        ) from e
    port = server.server_address[1]
    _record_endpoint(directory, public[0], port if listen_port == 0 else listen_port)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread = threading.Thread(target=server.serve_forever, name="enroll-http", daemon=True)
    thread.start()
    if args.ready_file:
        Path(args.ready_file).write_text(f"{listen_host}:{port}\n")
    print(
        f"enrollment endpoint on {listen_host}:{port} for {', '.join(public)}; boxes publish to "
        f"{broker[0]}:{broker[1]}; certificates for {args.cert_days} days",
        file=sys.stderr,
    )
    stop.wait()
    server.shutdown()
    server.server_close()
    service.claims.close()
    print(f"enrollment endpoint stopped: {dict(service.counters)}", file=sys.stderr)
    return 0


SUBCOMMANDS: list[Callable[[Any], None]] = [_register_claims, _register_serve]
