"""The ``edge`` command line.

The box's verbs live in ``edge.commands.<name>`` and register themselves here. The fleet's verbs (``edge fleet``,
``edge gateway``) come from ``edge.fleet.cli`` and are registered only where the fleet is installed: a box image
ships without ``edge.fleet``, and its ``edge --help`` does not offer what it cannot run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence

from edge import __version__
from edge._cli_errors import (
    EXIT_INTERRUPTED,
    debug,
    print_traceback,
    report,
    silence_stdout,
    stdout_gone,
)
from edge.errors import EXIT_OK

__all__ = ["main"]

# Imported lazily per command so `edge run` does not pay for what `edge model` needs, and the reverse.
_COMMANDS = ("run", "enroll", "model", "keys", "ota", "telemetry", "config")
_FLEET_CLI = "edge.fleet.cli"


def fleet_installed() -> bool:
    """Whether the fleet side (``edge.fleet``) is installed beside the box package."""
    return importlib.util.find_spec("edge.fleet") is not None


def build_parser(*, fleet: bool = True) -> argparse.ArgumentParser:
    """Build the parser with the box's subcommands and, where it is installed and ``fleet`` is true, the fleet's.

    tools/gen_cli_docs.py generates the manual page and the shell completions from it (``fleet=False`` for a box).
    Building it imports only the standard library and the light ``edge.commands`` and ``edge.fleet.cli`` modules:
    ``edge --help`` loads no numpy, onnxruntime, cryptography, paho, tuf or configuration (tests/test_cli_help.py).
    """
    parser = argparse.ArgumentParser(
        prog="edge", description="N3 Edge box firmware service. `edge COMMAND --help` describes each command."
    )
    parser.add_argument("--version", action="version", version=f"edge {__version__}")
    sub = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        module = importlib.import_module(f"edge.commands.{name}")
        module.register(sub)
    if fleet and fleet_installed():
        importlib.import_module(_FLEET_CLI).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status (docs/cli.md).

    0 done; 2 usage or configuration (argparse's own status, and ``ConfigError``); 3 verification failed; 1 anything
    else; 130 interrupted. A failure is one line on stderr naming the key or path, the cause and the fix; a traceback
    only with ``EDGE_DEBUG=1``. A closed stdout pipe (``edge fleet status | head``) ends the command quietly with 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # A box verb (edge run, above all: every start of the service) does not pay for the fleet's parsers;
        # anything else (help, a fleet verb, a typo) gets the whole parser, so help and errors list every verb.
        parser = build_parser(fleet=not argv or argv[0] not in _COMMANDS)
        args = parser.parse_args(argv)
        status: int = args.func(args)
        # Here rather than in the interpreter's exit, where a closed pipe would print "Exception ignored".
        _flush_stdout()
    except SystemExit:  # argparse's usage errors (2), --help and --version (0): their output may meet a closed pipe
        _flush_or_silence()
        raise
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError as e:
        if stdout_gone():
            silence_stdout()
            return EXIT_OK
        return _fail(e)
    except Exception as e:
        return _fail(e)
    return status


def _flush_stdout() -> None:
    """Flush stdout; an error other than a closed pipe (``> /dev/full``: ENOSPC) names standard output."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        raise OSError(e.errno, e.strerror, "standard output") from e


def _flush_or_silence() -> None:
    """Flush stdout before the error line; output that cannot be written any more (a closed pipe, a full disk) goes
    to /dev/null, so the interpreter's exit does not fail over it a second time."""
    try:
        sys.stdout.flush()
    except OSError:
        silence_stdout()


def _fail(exc: Exception) -> int:
    """Report ``exc`` as one line (after its traceback under ``EDGE_DEBUG=1``, or for a bug in a systemd service)
    and return its exit status."""
    _flush_or_silence()
    status, line = report(exc)
    # A bug that ends a service (systemd sets INVOCATION_ID) happened on a box nobody can rerun it on: its traceback
    # goes to the journal, where the bug report comes from. An operator at a terminal gets the one line.
    bug = line.startswith("internal error")
    if debug() or (bug and os.environ.get("INVOCATION_ID")):
        print_traceback(exc)
    print(f"edge: {line}", file=sys.stderr)
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
