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
_COMMANDS = ("run", "enroll", "model", "keys", "ota", "telemetry")
_FLEET_CLI = "edge.fleet.cli"


def fleet_installed() -> bool:
    """Whether the fleet side (``edge.fleet``) is installed beside the box package."""
    return importlib.util.find_spec("edge.fleet") is not None


def build_parser(*, fleet: bool = True) -> argparse.ArgumentParser:
    """Build the parser with the box's subcommands and, where it is installed and ``fleet`` is true, the fleet's."""
    parser = argparse.ArgumentParser(prog="edge", description="N3 Edge box firmware service.")
    parser.add_argument("--version", action="version", version=f"edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        module = importlib.import_module(f"edge.commands.{name}")
        module.register(sub)
    if fleet and fleet_installed():
        importlib.import_module(_FLEET_CLI).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # A box verb (edge run, above all: every start of the service) does not pay for the fleet's parsers; anything
    # else (help, a fleet verb, a typo) gets the whole parser, so help and errors list every verb.
    parser = build_parser(fleet=not argv or argv[0] not in _COMMANDS)
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except EdgeError as e:
        print(f"edge: error: {e}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
