"""``edge fleet rollout start|status|abort``: staged model rollouts (``edge.fleet.rollout.planner``).

The commands only read and write the rollout files of the fleet directory (under its lock) and read the store; the
running gateway (``edge gateway run``, ``[rollout] enabled``) sends the commands. Registered into ``edge fleet``
through ``edge.fleet.cli``; ``--dir`` and ``--store`` come from there (``_common``).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from edge.fleet.cli._common import fleet_dir, iso_utc, open_fleet_store

__all__ = ["SUBCOMMANDS", "register_rollout"]


def _stages(text: str) -> tuple[float, ...]:
    from edge.fleet.rollout.planner import RolloutError, parse_stages  # noqa: PLC0415

    try:
        return parse_stages(text)
    except RolloutError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _percent(text: str) -> float:
    from edge.fleet.rollout.planner import RolloutError, parse_percent  # noqa: PLC0415

    try:
        return parse_percent(text, "--abort-on")
    except RolloutError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register_rollout(sub: Any) -> None:
    """Add ``edge fleet rollout start|status|abort``."""
    p = sub.add_parser(
        "rollout",
        help="staged model rollouts: start, status, abort",
        description="Roll a published model version out in stages. The running gateway commands the devices of "
        "each stage, tracks their signed OTA reports, advances when a stage succeeds, and aborts (rolling back the "
        "devices that committed) when failures reach the threshold.",
    )
    actions = p.add_subparsers(dest="rollout_command", required=True, metavar="ACTION")
    s = actions.add_parser(
        "start",
        help="start a rollout of NAME VERSION",
        description="Eligible devices: enrolled, not revoked, and (without --devices) whose last status names a "
        "NAME@... model. They are ordered by sha256(rollout id + device id); stage k covers the first "
        "ceil(stage k x N) of them. Refused while another rollout runs.",
    )
    s.add_argument("name", metavar="NAME")
    s.add_argument("version", metavar="VERSION")
    s.add_argument("--stages", type=_stages, default=(0.1, 0.5, 1.0), metavar="P%,...,100%",
                   help="fractions of the devices per stage (default: 10%%,50%%,100%%)")  # fmt: skip
    s.add_argument("--abort-on", type=_percent, default=0.05, metavar="P%",
                   help="abort when this share of the commanded devices failed (default: 5%%)")  # fmt: skip
    s.add_argument("--devices", metavar="A,B,...", help="these devices instead of those running NAME")
    s.add_argument("--force", action="store_true", help="ask boxes to retry the version even if it failed there")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_start)
    st = actions.add_parser("status", help="the current (or --id) rollout: stages, devices, outcomes")
    st.add_argument("--id", dest="rollout_id", metavar="ID", help="a past rollout")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_status)
    a = actions.add_parser("abort", help="abort the running rollout; the gateway rolls back committed devices")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.set_defaults(func=_abort)


def _start(args: argparse.Namespace) -> int:
    from edge.fleet.rollout.driver import start_rollout  # noqa: PLC0415

    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    store = open_fleet_store(args)
    try:
        rollout = start_rollout(
            fleet_dir(args),
            store,
            args.name,
            args.version,
            args.stages,
            now=time.time(),
            abort_on=args.abort_on,
            devices=devices,
            force=args.force,
        )
    finally:
        store.close()
    if args.json:
        print(json.dumps(_summary(rollout), indent=2))
    else:
        print(f"rollout {rollout.id}: {rollout.name} {rollout.version} to {len(rollout.devices)} devices in stages "
              f"{', '.join(f'{s * 100:g}%' for s in rollout.stages)}; the gateway sends the commands")  # fmt: skip
    return 0


def _abort(args: argparse.Namespace) -> int:
    from edge.fleet.rollout.driver import abort_rollout  # noqa: PLC0415

    rollout = abort_rollout(fleet_dir(args))
    if args.json:
        print(json.dumps(_summary(rollout), indent=2))
    else:
        committed = sum(d.outcome == "committed" for d in rollout.devices)
        print(f"rollout {rollout.id} aborted; the gateway rolls back the {committed} devices that committed")
    return 0


def _summary(rollout: Any) -> dict[str, Any]:
    from edge.fleet.rollout.planner import summary  # noqa: PLC0415

    body = summary(rollout)
    for key in ("created_at", "finished_at"):
        body[key] = iso_utc(body[key])
    for d in body["devices"]:
        for key in ("commanded_at", "outcome_at"):
            d[key] = iso_utc(d[key])
    return body


def _status(args: argparse.Namespace) -> int:
    from edge.fleet.rollout.driver import RolloutFiles  # noqa: PLC0415
    from edge.fleet.rollout.planner import RolloutConflictError  # noqa: PLC0415

    files = RolloutFiles(fleet_dir(args))
    rollout = files.load(args.rollout_id) if args.rollout_id else files.current()
    if rollout is None:
        raise RolloutConflictError("no rollout was ever started (edge fleet rollout start NAME VERSION)")
    body = _summary(rollout)
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    print(f"rollout {body['id']}: {body['name']} {body['version']}  {body['state']}"
          + (f" ({body['reason']})" if body["reason"] else "")
          + f"  stage {body['stage']}/{len(body['stages'])}  abort at {body['abort_on_percent']:g}%")  # fmt: skip
    keys = ("waiting", "commanded", "committed", "failed", "timed_out")
    print("\nSTAGE  PERCENT  DEVICES  " + "  ".join(k.upper() for k in keys))
    for s in body["stages"]:
        counts = "  ".join(str(s[k]).ljust(len(k)) for k in keys)
        print(f"{s['stage']:<5}  {s['percent']:<7g}  {s['devices']:<7}  {counts}")
    print("\nDEVICE  STAGE  OUTCOME  ROLLBACK  REASON")
    for d in body["devices"]:
        print(f"{d['device_id']}  {d['stage']}  {d['outcome']}  {d['rollback'] or '-'}  {d['reason'] or '-'}")
    return 0


# Appended to ``edge fleet``'s sub-subcommands.
SUBCOMMANDS = [register_rollout]
