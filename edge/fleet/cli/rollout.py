"""``edge fleet rollout start|status|list|abort``: staged model rollouts (``edge.fleet.rollout.planner``).

The commands only read and write the rollout files of the fleet directory (under its lock) and read the store; the
running gateway (``edge gateway run``, ``[rollout] enabled``) sends the commands. Registered into ``edge fleet``
through ``edge.fleet.cli``; ``--dir`` and ``--store`` come from there (``_common``).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from edge.errors import EXIT_USAGE
from edge.fleet.cli._common import (
    add_json,
    fleet_dir,
    iso_utc,
    open_fleet_store,
    print_json,
    table,
    verb,
    watch,
    watch_seconds,
)

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
    """Add ``edge fleet rollout start|status|list|abort``."""
    p = verb(
        sub,
        "rollout",
        help="staged model rollouts: start, status, list, abort",
        description="Roll a published model version out in stages. The running gateway commands the devices of "
        "each stage, tracks their signed OTA reports, advances when a stage succeeds, and aborts (rolling back the "
        "devices that committed) when failures reach the threshold.",
        examples=[
            "edge fleet rollout start digits 2.0.0 --stages 10%,50%,100% --abort-on 5%",
            "edge fleet rollout status --watch",
            "edge fleet rollout list",
            "edge fleet rollout abort",
        ],
    )
    actions = p.add_subparsers(dest="rollout_command", required=True, metavar="ACTION")
    s = verb(
        actions,
        "start",
        help="start a rollout of NAME VERSION",
        description="Eligible devices: enrolled, not revoked, and (without --devices) whose last status names a "
        "NAME@... model. They are ordered by sha256(rollout id + device id); stage k covers the first "
        "ceil(stage k x N) of them. Refused while another rollout runs.",
        examples=[
            "edge fleet rollout start digits 2.0.0",
            "edge fleet rollout start digits 2.0.0 --stages 5%,25%,100% --abort-on 2%",
            "edge fleet rollout start digits 2.0.1 --devices cam-a,cam-b --force --json",
        ],
    )
    s.add_argument("name", metavar="NAME")
    s.add_argument("version", metavar="VERSION")
    s.add_argument("--stages", type=_stages, default=(0.1, 0.5, 1.0), metavar="P%,...,100%",
                   help="fractions of the devices per stage (default: 10%%,50%%,100%%)")  # fmt: skip
    s.add_argument("--abort-on", type=_percent, default=0.05, metavar="P%",
                   help="abort when this share of the commanded devices failed (default: 5%%)")  # fmt: skip
    s.add_argument("--devices", metavar="A,B,...", help="these devices instead of those running NAME")
    s.add_argument("--force", action="store_true", help="ask boxes to retry the version even if it failed there")
    add_json(s)
    s.set_defaults(func=_start)
    st = verb(
        actions,
        "status",
        help="the current (or --id) rollout: stages, devices, outcomes",
        description="The rollout's state, each stage's counts and each device's outcome: waiting (its stage has not "
        "started), commanded (no outcome yet), committed, failed, timed_out, or skipped (the rollout was aborted "
        "before it reached the device: it never will). With --watch, redraw until Ctrl-C.",
        examples=[
            "edge fleet rollout status",
            "edge fleet rollout status --watch 5",
            "edge fleet rollout status --id 3f2a9c01 --json",
        ],
    )
    st.add_argument("--id", dest="rollout_id", metavar="ID", help="a past rollout (ids: `edge fleet rollout list`)")
    st.add_argument(
        "--watch", nargs="?", const=2.0, type=watch_seconds, metavar="SECONDS",
        help="redraw every SECONDS (default 2) until Ctrl-C",
    )  # fmt: skip
    add_json(st)
    st.set_defaults(func=_status)
    ls = verb(
        actions,
        "list",
        help="every rollout of the fleet directory, newest first, with its outcome",
        description="The history of rollouts (<fleet dir>/rollouts/*.json), newest first: when each started and "
        "finished, the model and version, its state (running, completed, aborted and why) and how many devices "
        "committed, failed or timed out, and how many it never reached (skipped).",
        examples=["edge fleet rollout list", "edge fleet rollout list --json | jq '.[0].state'"],
    )
    add_json(ls)
    ls.set_defaults(func=_list)
    a = verb(
        actions,
        "abort",
        help="abort the running rollout; the gateway rolls back committed devices",
        description="Mark the running rollout aborted: the gateway commands no further device, and rolls back each "
        "device that committed the version in this rollout. Devices it never reached are shown as skipped.",
        examples=["edge fleet rollout abort", "edge fleet --dir /srv/fleet rollout abort --json"],
    )
    add_json(a)
    a.set_defaults(func=_abort)


def _start(args: argparse.Namespace) -> int:
    from edge.fleet.rollout.driver import start_rollout  # noqa: PLC0415
    from edge.fleet.rollout.planner import RolloutError  # noqa: PLC0415

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
    except RolloutError as e:
        # The arguments name no valid rollout (a revoked or unknown device, no device running NAME): a usage error.
        # A conflict with the rollouts' state (RolloutConflictError: one is running) is not one: it exits 1.
        print(f"edge: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        store.close()
    if args.json:
        print_json(_summary(rollout))
    else:
        print(f"rollout {rollout.id}: {rollout.name} {rollout.version} to {len(rollout.devices)} devices in stages "
              f"{', '.join(f'{s * 100:g}%' for s in rollout.stages)}; the gateway sends the commands")  # fmt: skip
    return 0


def _abort(args: argparse.Namespace) -> int:
    from edge.fleet.rollout.driver import abort_rollout  # noqa: PLC0415

    rollout = abort_rollout(fleet_dir(args))
    if args.json:
        print_json(_summary(rollout))
    else:
        committed = sum(d.outcome == "committed" for d in rollout.devices)
        skipped = sum(d.commanded_at is None for d in rollout.devices)
        print(f"rollout {rollout.id} aborted; the gateway rolls back the {committed} devices that committed; "
              f"{skipped} never reached are skipped")  # fmt: skip
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
    if args.watch is not None:
        return watch(lambda: _status_once(args), args.watch, "edge fleet rollout status")
    return _status_once(args)


def _status_once(args: argparse.Namespace) -> int:
    from edge.fleet.rollout.driver import RolloutFiles  # noqa: PLC0415

    files = RolloutFiles(fleet_dir(args))
    rollout = files.load(args.rollout_id) if args.rollout_id else files.current()
    if rollout is None:  # an empty state, not a failure (exit 0)
        print("null" if args.json else "no rollout was ever started (edge fleet rollout start NAME VERSION)")
        return 0
    body = _summary(rollout)
    if args.json:
        print_json(body)
        return 0
    print(f"rollout {body['id']}: {body['name']} {body['version']}  {body['state']}"
          + (f" ({body['reason']})" if body["reason"] else "")
          + f"  stage {body['stage']}/{len(body['stages'])}  abort at {body['abort_on_percent']:g}%"
          + f"  started {body['created_at']}"
          + (f"  finished {body['finished_at']}" if body["finished_at"] else ""))  # fmt: skip
    keys = ("waiting", "skipped", "commanded", "committed", "failed", "timed_out")
    stage_rows = [[s["stage"], f"{s['percent']:g}", s["devices"], *(s[k] for k in keys)] for s in body["stages"]]
    print("\n" + table(stage_rows, ["STAGE", "PERCENT", "DEVICES", *(k.upper() for k in keys)]))
    device_rows = [
        [d["device_id"], d["stage"], d["outcome"], d["commanded_at"], d["outcome_at"], d["rollback"], d["reason"]]
        for d in body["devices"]
    ]
    print("\n" + table(device_rows, ["DEVICE", "STAGE", "OUTCOME", "COMMANDED", "OUTCOME AT", "ROLLBACK", "REASON"]))
    return 0


def _list(args: argparse.Namespace) -> int:
    from edge.fleet.rollout.driver import RolloutFiles  # noqa: PLC0415

    files = RolloutFiles(fleet_dir(args))
    rollouts, problems = files.history()
    current = files.current_id()
    rows = []
    for r in rollouts:
        body = _summary(r)
        counts = {k: sum(s[k] for s in body["stages"]) for k in ("committed", "failed", "timed_out", "skipped")}
        rows.append(
            {
                "id": r.id,
                "current": r.id == current,
                "name": r.name,
                "version": r.version,
                "state": r.state,
                "reason": r.reason,
                "created_at": body["created_at"],
                "finished_at": body["finished_at"],
                "devices": len(r.devices),
                **counts,
            }
        )
    for problem in problems:
        print(f"edge: warning: {problem}", file=sys.stderr)
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no rollouts yet (edge fleet rollout start NAME VERSION)")
        return 0
    cells = [
        [
            r["id"] + (" *" if r["current"] else ""),
            r["created_at"],
            r["finished_at"],
            f"{r['name']} {r['version']}",
            r["state"] + (f" ({r['reason']})" if r["reason"] else ""),
            r["devices"],
            r["committed"],
            r["failed"],
            r["timed_out"],
            r["skipped"],
        ]
        for r in rows
    ]
    header = ["ID", "STARTED", "FINISHED", "MODEL", "OUTCOME", "DEVICES", "COMMITTED", "FAILED", "TIMED_OUT", "SKIPPED"]
    print(table(cells, header))
    print("\n* the current rollout (the one `rollout status` shows and the gateway drives)")
    return 0


# Appended to ``edge fleet``'s sub-subcommands.
SUBCOMMANDS = [register_rollout]
