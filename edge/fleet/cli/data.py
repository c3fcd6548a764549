"""``edge fleet status|ledger|ledger-verify|command``: what the fleet did, proof of it, and commands to boxes.

Registered into ``edge fleet`` through ``SUBCOMMANDS`` by ``edge.fleet.cli``; the global options (``--dir``,
``--store``) come from there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import threading
import time
from typing import Any

from edge.errors import ConfigError
from edge.fleet.cli._common import iso_utc, open_fleet_store, operator_identity

__all__ = ["SUBCOMMANDS", "register_command", "register_ledger", "register_ledger_verify", "register_status"]


def _day(text: str) -> str:
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day (YYYY-MM-DD)") from None
    return text


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


# -- status -----------------------------------------------------------------------------------------------------------


def register_status(sub: Any) -> None:
    """Add ``edge fleet status [--json]``."""
    p = sub.add_parser(
        "status",
        help="devices online/offline/suspended, chain heads, gaps, rejects, models, outbox backlogs",
        description="Each enrolled device's state from its birth/death messages (or 'suspended' while a gateway has "
        "cut it off for flooding the fleet with rejected messages: `edge fleet resume ID` lifts it), the head of "
        "its verified chain, open gaps, rejected inputs, the model it reported, and the outbox backlog it reported.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_status)


def _status(args: argparse.Namespace) -> int:
    store = open_fleet_store(args)
    try:
        statuses = store.statuses()
        strangers = store.strangers()
        suspended = {x.device_id: x for x in store.suspensions(now=time.time())}
    finally:
        store.close()
    if args.json:
        body = [
            {
                "device_id": s.device_id,
                "state": s.state,
                "reason": s.reason,
                "since": iso_utc(s.since),
                "last_seen": iso_utc(s.last_seen),
                "last_counter": s.last_counter,
                "gaps": s.gaps,
                "rejects": s.rejects,
                "model": s.model,
                "outbox_backlog": s.outbox_backlog,
                "suspended_until": iso_utc(suspended[s.device_id].until) if s.device_id in suspended else None,
                "suspension_reason": suspended[s.device_id].reason if s.device_id in suspended else None,
            }
            for s in statuses
        ]
        print(json.dumps({"devices": body, "strangers": [s.device_id for s in strangers]}, indent=2))
        return 0
    rows = [
        [
            s.device_id,
            (f"suspended until {iso_utc(suspended[s.device_id].until)}; " if s.device_id in suspended else "")
            + s.state
            + (f" ({s.reason})" if s.reason else ""),
            iso_utc(s.since) or "-",
            str(s.last_counter if s.last_counter is not None else "-"),
            str(s.gaps),
            str(s.rejects),
            s.model or "-",
            str(s.outbox_backlog if s.outbox_backlog is not None else "-"),
        ]
        for s in statuses
    ]
    header = ["DEVICE", "STATE", "SINCE", "COUNTER", "GAPS", "REJECTS", "MODEL", "BACKLOG"]
    print(_table(rows, header))
    online = sum(s.state == "online" for s in statuses)
    print(f"\n{len(statuses)} devices, {online} online, {len(statuses) - online} offline or never seen")
    for x in suspended.values():
        print(
            f"suspended: {x.device_id} (strike {x.strikes}, by {x.by}): {x.reason}; `edge fleet resume {x.device_id}`"
        )
    if strangers:
        print(f"unenrolled ids seen on status topics: {', '.join(s.device_id for s in strangers)}")
    return 0


# -- ledger -----------------------------------------------------------------------------------------------------------


def register_ledger(sub: Any) -> None:
    """Add ``edge fleet ledger [--device ID] [--from DAY] [--to DAY] [--json] [--export FILE]``."""
    p = sub.add_parser(
        "ledger",
        help="verified work per device and day; --export writes a signed, re-verifiable proof of a device's work",
        description="Per device and UTC day (by the gateway's receipt time): verified envelopes and records, "
        "inferences claimed and credited (and why the others were not: duplicate_input, copied, over_ceiling, "
        "implausible_time), gaps, late and duplicate envelopes, rejects. With --export FILE (and --device), write "
        "the device's stored envelopes, its did:key and the credit of each inference to FILE, signed with the "
        "fleet's ledger key (<fleet dir>/ledger.key, made on first use); anyone holding ledger.pub can check it "
        "with `edge fleet ledger-verify FILE --key ledger.pub`.",
    )
    p.add_argument("--device", metavar="ID", help="one device")
    p.add_argument("--from", dest="day_from", type=_day, metavar="DAY", help="first day (YYYY-MM-DD)")
    p.add_argument("--to", dest="day_to", type=_day, metavar="DAY", help="last day (YYYY-MM-DD)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--export", metavar="FILE", help="write the device's re-verifiable export (needs --device)")
    p.set_defaults(func=_ledger)


def _ledger(args: argparse.Namespace) -> int:
    if args.export and not args.device:
        raise ConfigError("--export", args.export, "--device ID as well: an export proves one device's work")
    store = open_fleet_store(args)
    try:
        if args.export:
            from edge.fleet.cli._common import fleet_dir  # noqa: PLC0415
            from edge.fleet.ledger import export_ledger, ledger_key  # noqa: PLC0415

            key = ledger_key(fleet_dir(args))
            totals = export_ledger(store, args.device, args.export, key=key, day_from=args.day_from, day_to=args.day_to)
            print(json.dumps({"export": args.export, "device_id": totals.device_id, **totals.claims()}, indent=2))
            return 0
        rows = store.ledger(device_id=args.device, day_from=args.day_from, day_to=args.day_to)
    finally:
        store.close()
    fields = ("envelopes", "records", "readings", "events", "missing", "late", "duplicates", "rejects")
    if args.json:
        body = [
            {
                "device_id": r.device_id,
                "day": r.day,
                "inferences": r.inferences,
                "claimed": r.claimed,
                "credited": r.credited,
                "uncredited": r.uncredited(),
                "credits": r.credits,
                "announced_lost": r.announced_lost,
                "announced_lost_records": r.announced_lost_records,
            }
            | {f: getattr(r, f) for f in fields}
            for r in rows
        ]
        print(json.dumps({"ledger": body}, indent=2))
        return 0
    reasons = ("duplicate_input", "copied", "over_ceiling", "implausible_time")
    table = [
        [r.device_id, r.day, str(r.claimed), str(r.credited), *(str(r.uncredited()[x]) for x in reasons)]
        + [str(getattr(r, f)) for f in fields]
        for r in rows
    ]
    header = ["DEVICE", "DAY", "CLAIMED", "CREDITED", "DUP_INPUT", "COPIED", "OVER_CEIL", "BAD_TIME"]
    print(_table(table, header + [f.upper() for f in fields]))
    claimed, credited = sum(r.claimed for r in rows), sum(r.credited for r in rows)
    print(f"\n{len({r.device_id for r in rows})} devices, {claimed} inferences claimed, {credited} credited")
    return 0


def register_ledger_verify(sub: Any) -> None:
    """Add ``edge fleet ledger-verify FILE``."""
    p = sub.add_parser(
        "ledger-verify",
        help="re-verify a ledger export from the file and the fleet's ledger key (what a third party runs)",
        description="Refuse an export the fleet's ledger key did not sign; check every envelope's signature "
        "against the device's did:key in the file and the hash chain between consecutive counters; recompute the "
        "credit of every inference with the gateway's rules, and the totals the header claims. Needs the file and "
        "the ledger's public key (--key FILE, or --dir: <fleet dir>/ledger.pub).",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("--key", metavar="PUB", help="the fleet's ledger.pub (default: ledger.pub of --dir)")
    p.set_defaults(func=_ledger_verify)


def _ledger_verify(args: argparse.Namespace) -> int:
    from edge.fleet.cli._common import fleet_dir  # noqa: PLC0415
    from edge.fleet.ledger import LEDGER_PUBLIC_FILE, verify_export  # noqa: PLC0415
    from edge.identity.keys import load_public_key  # noqa: PLC0415

    path = args.key or fleet_dir(args) / LEDGER_PUBLIC_FILE
    if not os.path.exists(path):
        raise ConfigError(
            "--key", str(path), "the fleet's ledger.pub (from the fleet operator): an export is checked against it"
        )
    from edge.fleet.errors import LedgerExportError  # noqa: PLC0415

    try:
        totals = verify_export(args.file, ledger_key=load_public_key(path))
    except LedgerExportError as e:
        # Exit 3: the file does not verify (a script can tell a forged or tampered export from a usage error).
        print(f"edge: error: {args.file} does not verify: {e}", file=sys.stderr)
        return 3
    print(json.dumps({"verified": args.file, "device_id": totals.device_id, "did": totals.did, **totals.claims()}))
    return 0


# -- command ----------------------------------------------------------------------------------------------------------


def register_command(sub: Any) -> None:
    """Add ``edge fleet command --config GATEWAY.toml DEVICE NAME [KEY=VALUE ...]``."""
    p = sub.add_parser(
        "command",
        help="send a signed command to a device and print its reply",
        description="Sign NAME with the fleet command key (expiry and nonce included), publish it to "
        "devices/DEVICE/commands as an operator identity (<fleet dir>/operator/operator.pem, or "
        "operator/$EDGE_FLEET_OPERATOR.pem; `edge fleet ca issue-client NAME --operator` makes one), and wait for "
        "the reply on devices/DEVICE/replies. "
        "Commands: ping; status; set key=telemetry.batch_records value=50 (batching and log level change live); "
        "time/reset [to=EPOCH] (with --at-box-floor: recovers a box whose time floors are wrongly in the future; "
        "docs/commands.md).",
    )
    p.add_argument(
        "--config", required=True, metavar="FILE", help="the gateway configuration (the broker and the fleet directory)"
    )
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("name", metavar="NAME", help="ping, status, set or time/reset")
    p.add_argument("args", nargs="*", metavar="KEY=VALUE", help="arguments (values parsed as JSON when they parse)")
    p.add_argument("--ttl", type=float, default=60.0, help="seconds the command stays valid (default: %(default)s)")
    p.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the reply (default: %(default)s)")
    p.add_argument(
        "--at-box-floor",
        action="store_true",
        help="issue the command at the box's command floor from its last status in the fleet store, when that is "
        "later than now, so that a box whose floor is wrongly in the future does not find it expired (for "
        "time/reset; its 'to' defaults to now, the fleet's true time)",
    )
    p.set_defaults(func=_command)


def _parse_args(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError("KEY=VALUE", item, "an argument of the form key=value")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if isinstance(value, list | dict):
            value = raw
        out[key] = value
    return out


def _box_time(store_url: str, device: str, now: float) -> float:
    """When to issue a command so that ``device`` does not find it expired: ``max(now, its reported command floor)``.

    Raises:
        ConfigError: the fleet store has no status of ``device`` with its times (names what to do).
    """
    from edge.fleet.store import open_store  # noqa: PLC0415

    store = open_store(store_url)
    try:
        found = [s for s in (*store.statuses(), *store.strangers()) if s.device_id == device]
    finally:
        store.close()
    times = found[0].info.get("time") if found else None
    floor = times.get("command_floor") if isinstance(times, dict) else None
    if isinstance(floor, bool) or not isinstance(floor, int | float):
        raise ConfigError(
            "--at-box-floor",
            device,
            f"a status of {device} with its time floors in the fleet store {store_url} (the gateway records it "
            "while `edge gateway run` runs; boxes report them since the time/reset command exists)",
        )
    return max(now, float(floor))


def _command(args: argparse.Namespace) -> int:
    from edge.fleet.config import load_gateway_config  # noqa: PLC0415
    from edge.fleet.gateway import mqtt_settings  # noqa: PLC0415
    from edge.fleet.pki.ca import FleetCA  # noqa: PLC0415
    from edge.identity.keys import validate_device_id  # noqa: PLC0415
    from edge.mqtt import NO_MATCHING_SUBSCRIBERS, MqttTransport  # noqa: PLC0415
    from edge.wire.commands import sign_command  # noqa: PLC0415
    from edge.wire.topics import device_topics  # noqa: PLC0415

    # The gateway's configuration gives the broker's address and the fleet; the identity is the operator's own.
    cfg = load_gateway_config(args.config, resolve_id=False)
    device = validate_device_id(args.device)
    key = FleetCA.load(cfg.gateway.fleet_dir).commands_key
    nonce = os.urandom(16)
    now = time.time()
    command_args = _parse_args(args.args)
    if args.name == "time/reset":
        command_args.setdefault("to", now)  # the fleet's true time: what the box's floors go back to
    issued = _box_time(cfg.store_url, device, now) if args.at_box_floor else now
    message = sign_command(key, device, args.name, command_args, now=issued, ttl_s=args.ttl, nonce=nonce)
    t = device_topics(device)
    got: dict[str, Any] = {}
    arrived = threading.Event()

    def on_reply(_topic: str, payload: bytes) -> None:
        try:
            body = json.loads(payload)
        except ValueError:
            return
        if isinstance(body, dict) and body.get("nonce") == nonce.hex():
            got.update(body)
            arrived.set()

    b = cfg.broker
    # A one-shot client with the operator's identity, never a gateway's: the broker makes the certificate's CN the
    # client id, so a gateway's certificate here would take over (disconnect) the running gateway. Nothing to keep.
    operator, operator_cert, operator_key = operator_identity(cfg.gateway.fleet_dir)
    settings = mqtt_settings(cfg, client_id=operator, cert=operator_cert, key=operator_key, session_expiry=0)
    # Subscribed before the command is published, on the same connection, so the reply cannot overtake it.
    transport = MqttTransport(settings, on_message=on_reply, subscriptions=[t["replies"]])
    transport.start()
    try:
        if not transport.wait_connected(10):
            print(f"edge: error: cannot connect to {b.host}:{b.port}", file=sys.stderr)
            return 2
        delivery = transport.publish(t["commands"], message, qos=1)
        if not delivery.wait(10) or not delivery.ok:
            print(f"edge: error: the broker did not take the command ({delivery.reason})", file=sys.stderr)
            return 2
        if delivery.reason_code == NO_MATCHING_SUBSCRIBERS:
            print(f"edge: error: {device} is not subscribed to its commands (offline?)", file=sys.stderr)
            return 1
        if not arrived.wait(args.wait):
            print(f"edge: error: no reply from {device} within {args.wait:g} s", file=sys.stderr)
            return 1
    finally:
        transport.stop()
    print(json.dumps(got))
    return 0 if got.get("ok") else 1


# Appended to ``edge fleet``'s own sub-subcommands, in help order.
SUBCOMMANDS = [register_status, register_ledger, register_ledger_verify, register_command]
