"""``edge run --config FILE [--frames N]``: run the service."""

from __future__ import annotations

import argparse
from typing import Any

from edge.config import DEFAULT_CONFIG_PATH, load_config

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the ``run`` subcommand to the ``edge`` parser."""
    p: argparse.ArgumentParser = sub.add_parser("run", help="run the inference service")
    p.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="configuration file (default: %(default)s)")
    p.add_argument("--frames", type=int, default=0, metavar="N", help="stop after N inferences (default: run on)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from edge.service import run_service  # noqa: PLC0415 (imports onnxruntime: only when the service runs)

    if args.frames < 0:
        raise SystemExit("edge run: --frames must be >= 0")
    run_service(load_config(args.config), max_frames=args.frames)
    return 0
