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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.errors import EXIT_UNVERIFIED, ConfigError
from edge.fleet.cli._common import (
    add_json,
    ago,
    fleet_dir,
    iso_utc,
    open_fleet_store,
    operator_identity,
    print_json,
    table,
    verb,
    watch,
    watch_seconds,
)

if TYPE_CHECKING:
    from edge.fleet.config import GatewayConfig
    from edge.mqtt import MqttSettings

__all__ = ["SUBCOMMANDS", "register_command", "register_ledger", "register_ledger_verify", "register_status"]


def _day(text: str) -> str:
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day (YYYY-MM-DD)") from None
    return text


# -- status -----------------------------------------------------------------------------------------------------------


def register_status(sub: Any) -> None:
    """Add ``edge fleet status [--json] [--watch [SECONDS]] [--stale-after SECONDS]``."""
    p = verb(
        sub,
        "status",
        help="devices online/offline/revoked/suspended, last seen, chain heads, gaps, rejects, models, backlogs",
        description="Each enrolled device's state from its birth/death messages ('revoked' once `edge fleet revoke` "
        "revoked it; 'suspended' while a gateway has cut it off for flooding the fleet with rejected messages: "
        "`edge fleet resume ID` lifts it), when the fleet last heard from it (a status message or an accepted "
        "envelope), the head of its verified chain, open gaps, rejected inputs, the model it reported, and its outbox "
        "backlog: what its latest status reported, less the envelopes accepted since (a box sends its outbox in "
        "order; while it is offline this is a lower bound)."
        "\n\n"
        "All of it is what a running gateway (`edge gateway run`) wrote into the store. The gateway writes a "
        "heartbeat every 10 s; the first line says when the last one was, and a STALE warning says that no gateway "
        "has written for --stale-after seconds, so the picture is not being kept current.",
        examples=[
            "edge fleet status --dir /srv/fleet",
            "edge fleet status --json | jq '.devices[] | select(.state != \"online\") | .device_id'",
            "edge fleet status --watch 5          # redraw every 5 s until Ctrl-C",
            "edge fleet --store postgresql://gw@db/fleet status",
        ],
    )
    add_json(p)
    p.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        type=watch_seconds,
        metavar="SECONDS",
        help="redraw every SECONDS (default 2) until Ctrl-C",
    )
    p.add_argument(
        "--stale-after",
        type=watch_seconds,
        default=None,
        metavar="SECONDS",
        help="warn when the newest gateway heartbeat is older than this (default: 30)",
    )
    p.set_defaults(func=_status)


def _status(args: argparse.Namespace) -> int:
    if args.watch is not None:
        return watch(lambda: _status_once(args), args.watch, "edge fleet status")
    return _status_once(args)


def _status_once(args: argparse.Namespace) -> int:
    from edge.fleet.heartbeat import STALE_AFTER_S  # noqa: PLC0415

    stale_after = STALE_AFTER_S if args.stale_after is None else args.stale_after
    store = open_fleet_store(args)
    try:
        now = time.time()
        statuses = store.statuses()
        strangers = store.strangers()
        suspended = {x.device_id: x for x in store.suspensions(now=now)}
        beats = store.heartbeats()
    finally:
        store.close()
    stale = not _live(beats, now, stale_after)
    if args.json:
        body = {
            "generated_at": iso_utc(now),
            "stale": stale,
            "gateways": [
                {
                    "gateway_id": b.gateway_id,
                    "host": b.host,
                    "pid": b.pid,
                    "started_at": iso_utc(b.started_at),
                    "last_heartbeat": iso_utc(b.at),
                    "heartbeat_age_s": round(now - b.at, 1),
                    "connected": b.connected,
                    "stopped_at": iso_utc(b.stopped_at),
                }
                for b in beats
            ],
            "devices": [_status_json(s, suspended, now) for s in statuses],
            "strangers": [s.device_id for s in strangers],
        }
        print_json(body)
        return 0
    _print_gateways(beats, now, stale_after)
    rows = [
        [
            s.device_id,
            _state_text(s, suspended),
            iso_utc(s.since),
            iso_utc(s.last_seen),
            None if s.last_seen is None else ago(now - s.last_seen),
            s.last_counter,
            s.gaps,
            s.rejects,
            s.model,
            s.outbox_backlog,
        ]
        for s in statuses
    ]
    header = ["DEVICE", "STATE", "SINCE", "LAST SEEN", "AGO", "COUNTER", "GAPS", "REJECTS", "MODEL", "BACKLOG"]
    print(table(rows, header))
    online = sum(s.state == "online" and s.revoked_at is None for s in statuses)
    revoked = sum(s.revoked_at is not None for s in statuses)
    print(
        f"\n{len(statuses)} devices, {online} online, {revoked} revoked, "
        f"{len(statuses) - online - revoked} offline or never seen"
    )
    for x in suspended.values():
        print(
            f"suspended: {x.device_id} (strike {x.strikes}, by {x.by}): {x.reason}; `edge fleet resume {x.device_id}`"
        )
    if strangers:
        print(f"unenrolled ids seen on status topics: {', '.join(s.device_id for s in strangers)}")
    return 0


def _state_text(s: Any, suspended: dict[str, Any]) -> str:
    if s.revoked_at is not None:
        return "revoked"  # whatever its last status said: it can no longer publish anything
    text = s.state + (f" ({s.reason})" if s.reason else "")
    if s.device_id in suspended:
        text = f"suspended until {iso_utc(suspended[s.device_id].until)}; {text}"
    return str(text)


def _status_json(s: Any, suspended: dict[str, Any], now: float) -> dict[str, Any]:
    x = suspended.get(s.device_id)
    return {
        "device_id": s.device_id,
        "state": "revoked" if s.revoked_at is not None else s.state,
        "reported_state": s.state,
        "reason": s.reason,
        "since": iso_utc(s.since),
        "last_seen": iso_utc(s.last_seen),
        "last_seen_age_s": None if s.last_seen is None else round(now - s.last_seen, 1),
        "revoked_at": iso_utc(s.revoked_at),
        "last_counter": s.last_counter,
        "gaps": s.gaps,
        "rejects": s.rejects,
        "model": s.model,
        "outbox_backlog": s.outbox_backlog,
        "backlog_reported": s.backlog_reported,
        "backlog_reported_at": iso_utc(s.backlog_reported_at),
        "suspended_until": iso_utc(x.until) if x is not None else None,
        "suspension_reason": x.reason if x is not None else None,
    }


def _live(beats: list[Any], now: float, stale_after: float) -> bool:
    """Whether a gateway that has not stopped beat within ``stale_after`` seconds (the picture is being kept)."""
    return any(b.stopped_at is None and now - b.at <= stale_after for b in beats)


def _print_gateways(beats: list[Any], now: float, stale_after: float) -> None:
    """The heartbeat lines above the table, and the STALE warning (stdout only: `status | head` must stay quiet on
    stderr; scripts read ``stale`` from --json)."""
    for b in beats:
        state = (
            f"stopped {iso_utc(b.stopped_at)}"
            if b.stopped_at is not None
            else ("connected to the broker" if b.connected else "NOT connected to the broker")
        )
        print(f"gateway {b.gateway_id} ({b.host}, pid {b.pid}): last heartbeat {iso_utc(b.at)} "
              f"({ago(now - b.at)} ago), {state}")  # fmt: skip
    newest = beats[0] if beats else None
    if _live(beats, now, stale_after):
        print()
        return
    if newest is None:
        warning = "STALE: no gateway heartbeat was ever recorded in this store; is `edge gateway run` running?"
    elif newest.stopped_at is not None:
        warning = (
            f"STALE: the gateway stopped at {iso_utc(newest.stopped_at)} ({ago(now - newest.stopped_at)} ago); "
            "start `edge gateway run` to bring this picture up to date"
        )
    else:
        warning = f"STALE: no gateway heartbeat for {int(now - newest.at)} s; is `edge gateway run` running?"
    print(warning + "\n")


# -- ledger -----------------------------------------------------------------------------------------------------------


def register_ledger(sub: Any) -> None:
    """Add ``edge fleet ledger [--device ID] [--from DAY] [--to DAY] [--json] [--export FILE]``."""
    p = verb(
        sub,
        "ledger",
        help="verified work per device and day; --export writes a signed, re-verifiable proof of a device's work",
        examples=[
            "edge fleet ledger --from 2026-12-01 --to 2026-12-31",
            "edge fleet ledger --device cam-a --json",
            "edge fleet ledger --device cam-a --export cam-a.ledger   # then: edge fleet ledger-verify cam-a.ledger",
        ],
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
    add_json(p)
    p.add_argument("--export", metavar="FILE", help="write the device's re-verifiable export (needs --device)")
    p.set_defaults(func=_ledger)


def _ledger(args: argparse.Namespace) -> int:
    if args.export and not args.device:
        raise ConfigError("--export", args.export, "--device ID as well: an export proves one device's work")
    store = open_fleet_store(args)
    try:
        if args.export:
            from edge.fleet.ledger import export_ledger, ledger_key  # noqa: PLC0415

            key = ledger_key(fleet_dir(args))
            totals = export_ledger(store, args.device, args.export, key=key, day_from=args.day_from, day_to=args.day_to)
            print_json({"export": args.export, "device_id": totals.device_id, **totals.claims()})
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
        print_json({"ledger": body})
        return 0
    reasons = ("duplicate_input", "copied", "over_ceiling", "implausible_time")
    cells = [
        [r.device_id, r.day, r.claimed, r.credited, *(r.uncredited()[x] for x in reasons)]
        + [getattr(r, f) for f in fields]
        for r in rows
    ]
    header = ["DEVICE", "DAY", "CLAIMED", "CREDITED", "DUP_INPUT", "COPIED", "OVER_CEIL", "BAD_TIME"]
    print(table(cells, header + [f.upper() for f in fields]))
    claimed, credited = sum(r.claimed for r in rows), sum(r.credited for r in rows)
    print(f"\n{len({r.device_id for r in rows})} devices, {claimed} inferences claimed, {credited} credited")
    return 0


def register_ledger_verify(sub: Any) -> None:
    """Add ``edge fleet ledger-verify FILE [--key PUB] [--did DID] [--json]``."""
    p = verb(
        sub,
        "ledger-verify",
        help="re-verify a ledger export from the file and the fleet's ledger key (what a third party runs)",
        description="Refuse an export the fleet's ledger key did not sign; check every envelope's signature "
        "against the device's did:key in the file and the hash chain between consecutive counters; recompute the "
        "credit of every inference with the gateway's rules, and the totals the header claims. Needs the file and "
        "the ledger's public key (--key FILE, or --dir: <fleet dir>/ledger.pub)."
        "\n\n"
        "The file proves what its did:key signed, not whose key that is: with --did, the export must be for that "
        "identity (the one you know the device by, e.g. from `edge fleet devices`), else it does not verify. "
        "Exit status 0: verified; 3: it does not verify; 2: a usage error (no ledger key).",
        examples=[
            "edge fleet ledger-verify cam-a.ledger --key ledger.pub",
            "edge fleet ledger-verify cam-a.ledger --key ledger.pub --did did:key:z6Mk...",
            "edge fleet --dir /srv/fleet ledger-verify cam-a.ledger --json",
        ],
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("--key", metavar="PUB", help="the fleet's ledger.pub (default: ledger.pub of --dir)")
    p.add_argument("--did", metavar="DID", help="the did:key the export must be for (pins the device's identity)")
    add_json(p)
    p.set_defaults(func=_ledger_verify)


def _ledger_verify(args: argparse.Namespace) -> int:
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
        return EXIT_UNVERIFIED
    if args.did is not None and totals.did != args.did:
        # Validly signed, but by another device's key: the proof of someone else's work.
        print(
            f"edge: error: {args.file} does not verify: it is the export of {totals.did} (device "
            f"{totals.device_id}), not of --did {args.did}",
            file=sys.stderr,
        )
        return EXIT_UNVERIFIED
    body = {"verified": args.file, "device_id": totals.device_id, "did": totals.did, **totals.claims()}
    if args.json:
        print_json(body)
    else:
        print(
            f"verified {args.file}: {totals.device_id} ({totals.did}), {body.get('envelopes')} envelopes, "
            f"{body.get('records')} records"
            + (f", counters {body.get('first_counter')}..{body.get('last_counter')}" if totals.envelopes else "")
            + f", {body.get('gaps')} gaps"
        )
    return 0


# -- command ----------------------------------------------------------------------------------------------------------


def register_command(sub: Any) -> None:
    """Add ``edge fleet command DEVICE NAME [KEY=VALUE ...]``."""
    p = verb(
        sub,
        "command",
        help="send a signed command to a device and print its reply",
        examples=[
            "edge fleet --dir /srv/fleet command cam-a ping",
            "edge fleet command cam-a status --json       # also refreshes the backlog `edge fleet status` shows",
            "edge fleet command cam-a set key=telemetry.batch_records value=50",
            "edge fleet command cam-a time/reset --at-box-floor",
            "edge fleet command --host broker.lan cam-a ping   # the broker is not where the fleet directory is",
        ],
        description="Sign NAME with the fleet command key (expiry and nonce included), publish it to "
        "devices/DEVICE/commands as an operator identity (<fleet dir>/operator/operator.pem, or "
        "operator/$EDGE_FLEET_OPERATOR.pem; `edge fleet ca issue-client NAME --operator` makes one), and wait for "
        "the reply on devices/DEVICE/replies. "
        "Commands: ping; status; set key=telemetry.batch_records value=50 (batching and log level change live); "
        "time/reset [to=EPOCH] (with --at-box-floor: recovers a box whose time floors are wrongly in the future; "
        "docs/commands.md)."
        "\n\n"
        "The broker is the fleet directory's listener (`edge fleet broker-config`: broker/listener.json; its bind "
        "address, else 127.0.0.1, and its port), checked against the fleet CA (<fleet dir>/ca.pem). --host and "
        "--port override it; --config GATEWAY.toml takes the broker, the fleet directory and the store from a "
        "gateway's configuration instead.",
    )
    p.add_argument("--config", metavar="FILE", help="take the broker and the fleet directory from this gateway config")
    p.add_argument("--host", metavar="HOST", help="the broker's host (default: the fleet directory's listener)")
    p.add_argument("--port", type=int, metavar="PORT", help="the broker's TLS port (default: the listener's)")
    add_json(p)
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


def _target(args: argparse.Namespace) -> tuple[Path, str, GatewayConfig | None]:
    """The fleet directory, the store URL and the gateway configuration (``--config``, else None) of the command.

    Raises:
        ConfigError: the gateway configuration is missing or invalid.
    """
    from edge.fleet.config import default_store_url, load_gateway_config  # noqa: PLC0415

    if args.config:
        cfg = load_gateway_config(args.config, resolve_id=False)
        return cfg.gateway.fleet_dir, args.store or cfg.store_url, cfg
    directory = fleet_dir(args)
    return directory, args.store or default_store_url(directory), None


def _broker(args: argparse.Namespace, directory: Path, cfg: GatewayConfig | None) -> tuple[MqttSettings, str]:
    """The operator's connection to the broker, and where its address came from (for an error message).

    Raises:
        ConfigError: the listener file or the operator identity is missing or invalid.
    """
    import dataclasses  # noqa: PLC0415 -- not for edge --help

    from edge.fleet.pki.ca import CA_CERT_FILE  # noqa: PLC0415
    from edge.fleet.pki.registry import BROKER_DIR, LISTENER_FILE, load_listener  # noqa: PLC0415
    from edge.mqtt import MqttSettings  # noqa: PLC0415

    # The identity is the operator's own: a gateway's would take over (disconnect) the running gateway.
    operator, cert, key = operator_identity(directory)
    if cfg is not None:
        from edge.fleet.gateway import mqtt_settings  # noqa: PLC0415

        settings = mqtt_settings(cfg, client_id=operator, cert=cert, key=key, session_expiry=0)
        source = f"broker.host, broker.port in {args.config}"
    else:
        listener = load_listener(directory / BROKER_DIR)
        # A listener bound to every interface is reached on this host; a remote broker needs --host.
        bound = listener.bind if listener.bind not in (None, "", "0.0.0.0", "::") else None  # noqa: S104
        settings = MqttSettings(
            host=bound or "127.0.0.1",
            port=listener.port,
            ca=directory / CA_CERT_FILE,
            cert=cert,
            key=key,
            client_id=operator,
            session_expiry=0,
            backoff_max=5.0,
        )
        source = f"the listener of {directory / BROKER_DIR / LISTENER_FILE} (`edge fleet broker-config`)"
    if args.host or args.port:
        settings = dataclasses.replace(settings, host=args.host or settings.host, port=args.port or settings.port)
        source = "--host/--port"
    return settings, source


def _command(args: argparse.Namespace) -> int:
    from edge.fleet.pki.ca import FleetCA  # noqa: PLC0415
    from edge.identity.keys import validate_device_id  # noqa: PLC0415
    from edge.mqtt import BROKER_SETTING_NAMES, NO_MATCHING_SUBSCRIBERS, MqttTransport  # noqa: PLC0415
    from edge.wire.commands import sign_command  # noqa: PLC0415
    from edge.wire.topics import device_topics  # noqa: PLC0415

    device = validate_device_id(args.device)
    directory, store_url, cfg = _target(args)
    key = FleetCA.load(directory).commands_key
    nonce = os.urandom(16)
    now = time.time()
    command_args = _parse_args(args.args)
    if args.name == "time/reset":
        command_args.setdefault("to", now)  # the fleet's true time: what the box's floors go back to
    issued = _box_time(store_url, device, now) if args.at_box_floor else now
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

    # A one-shot client with the operator's identity, never a gateway's: the broker makes the certificate's CN the
    # client id, so a gateway's certificate here would take over (disconnect) the running gateway. Nothing to keep.
    settings, source = _broker(args, directory, cfg)
    # Subscribed before the command is published, on the same connection, so the reply cannot overtake it.
    transport = MqttTransport(
        settings, on_message=on_reply, subscriptions=[t["replies"]], setting_names=BROKER_SETTING_NAMES
    )
    transport.start()
    try:
        if not transport.wait_connected(10):
            # A broker that is down is no usage error: exit status 1 (docs/cli.md).
            print(
                f"edge: error: cannot connect to the broker at {settings.host}:{settings.port} (from {source}) "
                "within 10 s: is it running? (systemctl status mosquitto; --host/--port name another)",
                file=sys.stderr,
            )
            return 1
        delivery = transport.publish(t["commands"], message, qos=1)
        if not delivery.wait(10) or not delivery.ok:
            print(f"edge: error: the broker did not take the command ({delivery.reason})", file=sys.stderr)
            return 1
        if delivery.reason_code == NO_MATCHING_SUBSCRIBERS:
            print(f"edge: error: {device} is not subscribed to its commands (offline?)", file=sys.stderr)
            return 1
        if not arrived.wait(args.wait):
            print(f"edge: error: no reply from {device} within {args.wait:g} s", file=sys.stderr)
            return 1
    finally:
        transport.stop()
    if args.json:
        print_json(got)
    else:
        print(json.dumps(got))  # the box's reply, as it sent it: its fields differ per command
    return 0 if got.get("ok") else 1


# Appended to ``edge fleet``'s own sub-subcommands, in help order.
SUBCOMMANDS = [register_status, register_ledger, register_ledger_verify, register_command]
