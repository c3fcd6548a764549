"""The ``edge`` command line.

The box's verbs live in ``edge.commands.<name>`` and register themselves here. The fleet's verbs (``edge fleet``,
``edge gateway``) come from ``edge.fleet.cli`` and are registered only where the fleet is installed: a box image
ships without ``edge.fleet``, and its ``edge --help`` does not offer what it cannot run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from edge import __version__
from edge.errors import EdgeError

__all__ = ["main"]

# Imported lazily per command so `edge run` does not pay for what `edge model` needs, and the reverse.
_COMMANDS = ("run", "model", "keys", "ota")
_FLEET_CLI = "edge.fleet.cli"


def fleet_installed() -> bool:
    """Whether the fleet side (``edge.fleet``) is installed beside the box package."""
    return importlib.util.find_spec("edge.fleet") is not None


def build_parser() -> argparse.ArgumentParser:
    """Build the parser with every subcommand registered: the box's, and the fleet's where it is installed."""
    parser = argparse.ArgumentParser(prog="edge", description="N3 Edge box firmware service.")
    parser.add_argument("--version", action="version", version=f"edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        module = importlib.import_module(f"edge.commands.{name}")
        module.register(sub)
    if fleet_installed():
        importlib.import_module(_FLEET_CLI).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except EdgeError as e:
        print(f"edge: error: {e}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
