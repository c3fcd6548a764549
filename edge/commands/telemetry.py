"""``edge telemetry status``: what this box sealed, what the fleet has receipted, what it still holds.

Read-only and safe while the service runs. The latest receipt is the box's proof of delivered work: it is shown
with its signature checked against the fleet receipt key (``telemetry.receipt_key``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``edge telemetry status``.

    Args:
        subparsers: the object ``argparse.ArgumentParser.add_subparsers`` returned.
    """
    from edge._paths import DEFAULT_CONFIG_PATH  # noqa: PLC0415

    parser = subparsers.add_parser("telemetry", help="this box's signed telemetry: delivery and receipts")
    sub = parser.add_subparsers(dest="telemetry_command", required=True, metavar="ACTION")
    s = sub.add_parser(
        "status",
        help="what was sealed, what the fleet receipted, what the outbox still holds",
        description="Read the outbox (read-only; safe while the service runs) and show the envelopes sealed, the "
        "ones the fleet's receipts covered, what is still waiting and the latest receipt (its signature checked "
        "with telemetry.receipt_key): the box's proof of delivered work. Exit status 0; 2 for a configuration "
        "error; 1 when the outbox cannot be read.",
        epilog="example: edge telemetry status --config /etc/edge/edge.toml --json",
    )
    s.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="configuration file (default: %(default)s)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_status)


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _status(args: argparse.Namespace) -> int:
    from edge.config import data_path, load_config  # noqa: PLC0415
    from edge.errors import ConfigError  # noqa: PLC0415
    from edge.identity.keys import load_public_key  # noqa: PLC0415
    from edge.telemetry.inspect import OutboxUnreadableError, inspect_outbox  # noqa: PLC0415
    from edge.wire.receipts import ReceiptError, verify_receipt  # noqa: PLC0415

    cfg = load_config(args.config)
    tc = cfg.telemetry
    path = data_path(cfg, tc.outbox)
    try:
        report = inspect_outbox(path)
    except OutboxUnreadableError as e:
        print(f"edge: error: {e}", file=sys.stderr)
        return 1
    d = report.delivery
    receipt: dict[str, Any] | None = None
    mode = "puback"
    key_note = "telemetry.receipt_key is empty"
    if tc.receipt_key is not None:
        key_path = data_path(cfg, tc.receipt_key)
        key_note = str(key_path)
        try:
            key = load_public_key(key_path)
            mode = "receipts"
        except (ConfigError, OSError) as e:  # shown in the report: a status does not fail over a missing key
            key, key_note = None, f"{key_path} (telemetry.receipt_key): {e}"
        if d.receipt is not None:
            receipt = {"stored": d.stored, "head": d.head, "issued": _iso(d.issued), "verified": False}
            if key is not None:
                try:
                    r = verify_receipt(d.receipt, key, report.device_id)
                    receipt.update(verified=True, holes=[list(h) for h in r.holes], gateway=r.gateway)
                except ReceiptError as e:
                    receipt["error"] = str(e)
    out = {
        "device": report.device_id,
        "outbox": str(path),
        "delivery": mode,
        "receipt_key": key_note,
        "sealed": report.sealed,
        "receipted": d.receipted_envelopes,
        "deleted_on_puback": d.acked_envelopes,
        "waiting": report.backlog_envelopes,
        "waiting_records": report.backlog_records,
        "waiting_bytes": report.backlog_bytes,
        "oldest_waiting": report.oldest_counter,
        "oldest_waiting_age_s": None if report.oldest_created is None else round(time.time() - report.oldest_created),
        "dropped": report.dropped_envelopes,
        "dropped_records": report.dropped_records,
        "corrupt": report.corrupt_rows,
        "latest_receipt": receipt,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"device {report.device_id}: delivery by {mode} ({key_note})")
    print(
        f"sealed {report.sealed} envelopes: {d.receipted_envelopes} receipted, {d.acked_envelopes} deleted on the "
        f"broker's PUBACK, {report.dropped_envelopes} dropped by the outbox's bounds and {report.corrupt_rows} "
        "corrupt (both announced in signed loss notices)"
    )
    waiting = (
        f"waiting for a receipt: {report.backlog_envelopes} envelopes ({report.backlog_records} records, "
        f"{report.backlog_bytes} bytes)"
    )
    if report.oldest_counter is not None:
        waiting += f", oldest counter {report.oldest_counter} sealed {_iso(report.oldest_created)}"
    print(waiting)
    if receipt is None:
        print("latest receipt: none yet")
    else:
        check = "signature verified" if receipt.get("verified") else f"NOT verified: {receipt.get('error', key_note)}"
        holes = f", holes {receipt['holes']}" if receipt.get("holes") else ""
        print(
            f"latest receipt: every envelope 1..{d.stored} stored, highest {d.head}{holes}; issued {receipt['issued']}"
            f" by {receipt.get('gateway', '?')}; {check}"
        )
    return 0
