"""``edge run --config FILE [--frames N]``: run the service."""

from __future__ import annotations

import argparse
from typing import Any

from edge._paths import DEFAULT_CONFIG_PATH
from edge.errors import ConfigError

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the ``run`` subcommand to the ``edge`` parser."""
    p: argparse.ArgumentParser = sub.add_parser("run", help="run the inference service")
    p.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="configuration file (default: %(default)s)")
    p.add_argument("--frames", type=int, default=0, metavar="N", help="stop after N inferences (default: run on)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from edge.config import load_config  # noqa: PLC0415
    from edge.service import run_service  # noqa: PLC0415 (imports onnxruntime: only when the service runs)

    if args.frames < 0:
        raise ConfigError("--frames", args.frames, "a count of inferences >= 0 (0: run on)")
    run_service(load_config(args.config), max_frames=args.frames)
    return 0
