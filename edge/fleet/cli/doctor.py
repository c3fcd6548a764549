"""``edge fleet doctor``: check the fleet directory and the running broker against the delivery guarantees."""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge.fleet.cli._common import fleet_dir

__all__ = ["SUBCOMMANDS"]


def _register_doctor(sub: Any) -> None:
    p = sub.add_parser(
        "doctor",
        help="check the broker's settings, certificates, CRL, the gateway's session and the TUF timestamp",
        description="Check a fleet directory and its broker against what the delivery guarantees need: the generated "
        "fragment present and current; persistence, autosave, queue, packet and session settings (with "
        "--broker-conf, as mosquitto applies the whole configuration); the CA, server and gateway certificates and "
        "the CRL (expired: error; within 30 days: warning); the server key readable by the broker's user; the TUF "
        "timestamp; and whether the broker answers a gateway identity. Prints `SEVERITY what: detail; fix: ...` "
        "lines; exits 1 if any is an ERROR, else 0.",
    )
    p.add_argument(
        "--broker-conf",
        metavar="PATH",
        help="the broker's mosquitto.conf: check the settings as it applies them, with its include_dir files",
    )
    p.add_argument(
        "--connect",
        action="store_true",
        help="also send a CONNECT as the gateway identity and report whether the broker keeps its persistent "
        "session. The broker makes the client id the certificate's CN, so this takes the session over from a "
        "running gateway with that identity (it reconnects after its backoff); nothing queued is acknowledged",
    )
    p.add_argument("--gateway", metavar="NAME", help="the gateway identity to use (default: the first one found)")
    p.add_argument("--host", metavar="HOST", help="the broker's address (default: the listener's, else 127.0.0.1)")
    p.add_argument(
        "--session-expiry",
        type=int,
        default=None,
        metavar="S",
        # Resolved when the command runs: the doctor's module loads the store (numpy), which `edge --help` must not.
        help="the Session Expiry Interval --connect asks for: the gateway's session_expiry_s (default: its default, "
        "86400)",
    )
    p.add_argument("--json", action="store_true", help="print the findings as a JSON array")
    p.set_defaults(func=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    from edge.fleet.doctor import DEFAULT_SESSION_EXPIRY_S, diagnose, exit_code, render  # noqa: PLC0415

    findings = diagnose(
        fleet_dir(args),
        now=datetime.datetime.now(datetime.UTC),
        broker_conf=Path(args.broker_conf).absolute() if args.broker_conf else None,
        connect=args.connect,
        gateway=args.gateway,
        host=args.host,
        session_expiry=DEFAULT_SESSION_EXPIRY_S if args.session_expiry is None else args.session_expiry,
    )
    print(render(findings, as_json=args.json))
    return exit_code(findings)


SUBCOMMANDS: list[Callable[[Any], None]] = [_register_doctor]
