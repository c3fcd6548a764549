"""``edge gateway run --config FILE``: run a fleet gateway process (ingest, storage, metrics)."""

from __future__ import annotations

import argparse
import gc
import json
import sys
from typing import Any

from edge.fleet.cli.gateway_config import register_config

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add ``edge gateway run`` to the ``edge`` parser.

    Args:
        sub: the object ``argparse.ArgumentParser.add_subparsers`` returned.
    """
    parser = sub.add_parser("gateway", help="run the fleet gateway")
    actions = parser.add_subparsers(dest="gateway_command", required=True, metavar="ACTION")
    run = actions.add_parser(
        "run",
        help="ingest, verify and store the fleet's telemetry until stopped",
        description="Connect to the broker as the gateway identity, verify and store every envelope (acknowledged "
        "only once stored), record device status, serve Prometheus metrics and /healthz, and re-sign the TUF "
        "repository's timestamp before it expires (when the fleet directory holds its key). SIGTERM or SIGINT stops "
        "it cleanly. Under systemd: deploy/systemd/edge-gateway.service (docs/gateway.md, Operations).",
    )
    run.add_argument("--config", required=True, metavar="FILE", help="gateway configuration (TOML)")
    run.set_defaults(func=_run)
    register_config(actions)  # edge gateway config check|show


def _run(args: argparse.Namespace) -> int:
    from edge.fleet.config import load_gateway_config  # noqa: PLC0415 -- gateway imports only for this command
    from edge.fleet.errors import IngestFailedError  # noqa: PLC0415
    from edge.fleet.gateway import run_gateway  # noqa: PLC0415

    cfg = load_gateway_config(args.config)
    # Ingest allocates millions of short-lived objects that never form cycles (records, rows, verdicts): the cyclic
    # collector's young-generation passes over them cost about 8% of a gateway's CPU (py-spy, tools/bench/gateway.py)
    # and free nothing. Collect far less often, and never rescan what start-up built.
    gc.freeze()
    gc.set_threshold(100_000, 50, 50)
    try:
        stats = run_gateway(cfg)
    except IngestFailedError as e:
        # Exit 1, not 2: the configuration is fine, the store failed. systemd's Restart=on-failure starts it again.
        print(f"edge: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"gateway": vars(stats)}))
    return 0
