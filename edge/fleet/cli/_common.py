"""What every ``edge fleet`` verb shares: the fleet directory, the CA, the store and registry it names, and times.

Global options (``edge.fleet.cli.register``): ``--dir DIR`` (the fleet directory; default ``$EDGE_FLEET_DIR`` or
``./fleet``; its layout is in ``edge.fleet.pki.registry``) and ``--store URL`` (default
``sqlite:///<dir>/fleet.db``). Both are accepted before the verb and after it (``add_common_options`` on every
sub-parser, with ``SUPPRESS`` defaults so that an option not repeated there keeps the value given before).

Output conventions shared by every verb: a table by default, ``--json`` for scripts (``print_json``), times as
ISO 8601 UTC (``iso_utc``), and an ``examples:`` block in each ``--help`` (``verb``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.errors import ConfigError

if TYPE_CHECKING:
    from edge.fleet.pki.ca import FleetCA
    from edge.fleet.pki.registry import Registry
    from edge.fleet.store import Store

__all__ = [
    "add_common_options",
    "add_examples",
    "add_json",
    "ago",
    "fleet_dir",
    "iso_utc",
    "load_ca",
    "open_fleet_store",
    "open_registry",
    "operator_identity",
    "print_json",
    "table",
    "verb",
    "watch",
    "watch_seconds",
]

_HELP_WIDTH = 100


def add_common_options(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """Add ``--dir`` and ``--store`` to ``parser``.

    Args:
        parser: ``edge fleet`` itself (``top``) or one of its verbs.
        top: the global options; else ``SUPPRESS`` defaults, so that the verb's parser, whose namespace argparse
            copies over the global one, leaves a value given before the verb alone unless the option is repeated.
    """
    default = None if top else argparse.SUPPRESS
    if "--dir" not in parser._option_string_actions:  # argparse has no public "has option"
        parser.add_argument(
            "--dir",
            dest="fleet_dir",
            metavar="DIR",
            default=default,
            help="the fleet directory (default: $EDGE_FLEET_DIR or ./fleet)",
        )
    if "--store" not in parser._option_string_actions:
        parser.add_argument(
            "--store", metavar="URL", default=default, help="the store (default: sqlite:///<fleet dir>/fleet.db)"
        )


def verb(sub: Any, name: str, *, help: str, description: str, examples: Sequence[str]) -> argparse.ArgumentParser:
    """Add a verb's parser whose ``--help`` ends with an ``examples:`` block, printed as written.

    Args:
        sub: the subparsers object to add it to.
        name: the verb.
        help: the one-line summary in the parent's list.
        description: the paragraphs of the verb's help (wrapped here; blank lines separate paragraphs).
        examples: command lines, each printed on a line of its own (a ``#`` comment may follow).

    Returns:
        The parser.
    """
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description)
    add_examples(parser, examples)
    return parser


def add_examples(parser: argparse.ArgumentParser, examples: Sequence[str]) -> None:
    """End ``parser``'s ``--help`` with an ``examples:`` block printed as written (its description is wrapped here,
    paragraphs at blank lines, since the formatter that keeps the examples' lines keeps the description's too)."""
    description = parser.description or ""
    paragraphs = [textwrap.fill(" ".join(p.split()), _HELP_WIDTH) for p in description.split("\n\n") if p.strip()]
    parser.description = "\n\n".join(paragraphs) or None
    parser.epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def add_json(parser: argparse.ArgumentParser) -> None:
    """Add ``--json`` (machine-readable output instead of the table)."""
    parser.add_argument("--json", action="store_true", help="machine-readable output (times in ISO 8601 UTC)")


def print_json(body: object) -> None:
    """Print ``body`` as indented JSON (what ``--json`` prints)."""
    print(json.dumps(body, indent=2))


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """Rows under a header, in columns two spaces apart (None prints as ``-``)."""
    cells = [[str(h) for h in header], *[["-" if x is None else str(x) for x in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def ago(seconds: float) -> str:
    """A short age for people: ``42 s``, ``12 min``, ``3 h``, ``5 d`` (floored; negative reads as 0 s)."""
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s // size} {unit}"
    return f"{s} s"


def watch(draw: Callable[[], object], interval_s: float, title: str) -> int:
    """Redraw until Ctrl-C: clear the terminal (when stdout is one), print a title line, call ``draw``, wait.

    Args:
        draw: prints one picture (its errors end the watch as they would end one run).
        interval_s: seconds between redraws.
        title: what is watched, for the title line.

    Returns:
        0 once interrupted: stopping a watch is how it is meant to end.
    """
    clear = sys.stdout.isatty()
    try:
        while True:
            if clear:
                sys.stdout.write("\x1b[H\x1b[2J")
            print(f"{title} at {iso_utc(time.time())} (every {interval_s:g} s; Ctrl-C to stop)\n")
            draw()
            print(flush=True)
            time.sleep(interval_s)
    except KeyboardInterrupt:
        return 0


def watch_seconds(text: str) -> float:
    """``--watch``'s argument: seconds between redraws, at least 0.1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0.1:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"{text!r}: at least 0.1 s between redraws")
    return value


def fleet_dir(args: argparse.Namespace) -> Path:
    """The fleet directory the global options name.

    Args:
        args: the parsed command line.

    Returns:
        ``--dir``, else ``$EDGE_FLEET_DIR``, else ``./fleet``, made absolute.
    """
    return Path(args.fleet_dir or os.environ.get("EDGE_FLEET_DIR") or "fleet").absolute()


def load_ca(args: argparse.Namespace) -> FleetCA:
    """Open the fleet CA of the fleet directory.

    Args:
        args: the parsed command line.

    Returns:
        The CA.

    Raises:
        KeyFileError: no CA there (run ``edge fleet ca init``) or a key file with loose permissions.
        ConfigError: the CA certificate does not match its key.
    """
    from edge.fleet.pki.ca import FleetCA  # noqa: PLC0415 -- cryptography loads only for the fleet commands

    return FleetCA.load(fleet_dir(args))


def open_fleet_store(args: argparse.Namespace) -> Store:
    """Open the store the global options name (``--store``, else the fleet directory's SQLite file).

    Raises:
        StoreError: the store cannot be opened.
        ConfigError: the store URL is not supported.
    """
    from edge.fleet.config import default_store_url  # noqa: PLC0415
    from edge.fleet.store import open_store  # noqa: PLC0415

    return open_store(args.store or default_store_url(fleet_dir(args)))


@contextlib.contextmanager
def open_registry(args: argparse.Namespace) -> Iterator[Registry]:
    """The registry over the store the global options name; the store is closed on exit.

    Args:
        args: the parsed command line.

    Yields:
        The registry.

    Raises:
        StoreError: the store cannot be opened.
        ConfigError: the store URL is not supported.
    """
    from edge.fleet.pki.registry import Registry  # noqa: PLC0415

    store = open_fleet_store(args)
    try:
        yield Registry(store, fleet_dir(args))
    finally:
        store.close()


def iso_utc(t: float | None) -> str | None:
    """Epoch seconds as an ISO 8601 UTC time to the second, ``2026-12-03T18:05:00Z`` (None stays None)."""
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def operator_identity(directory: Path) -> tuple[str, Path, Path]:
    """The operator identity ``edge fleet command`` connects with: never a gateway's, whose client id (the CN) a
    second connection would take over, disconnecting the running gateway.

    ``$EDGE_FLEET_OPERATOR`` names it (default ``operator``); its files are ``<fleet dir>/operator/NAME.pem`` and
    ``NAME.key``, as ``edge fleet ca issue-client NAME --operator`` writes them.

    Args:
        directory: the fleet directory.

    Returns:
        (name, certificate, key).

    Raises:
        ConfigError: the name is invalid or the files are missing; the message says how to issue them.
    """
    from edge.fleet.pki.registry import DEFAULT_OPERATOR, OPERATOR_DIR  # noqa: PLC0415
    from edge.identity.keys import validate_device_id  # noqa: PLC0415

    name = os.environ.get("EDGE_FLEET_OPERATOR") or DEFAULT_OPERATOR
    try:
        validate_device_id(name)
    except ValueError as e:
        raise ConfigError("EDGE_FLEET_OPERATOR", name, "a valid identity name ([A-Za-z0-9][A-Za-z0-9_.-]*)") from e
    cert, key = directory / OPERATOR_DIR / f"{name}.pem", directory / OPERATOR_DIR / f"{name}.key"
    for path in (cert, key):
        if not path.is_file():
            raise ConfigError(
                "operator identity",
                str(path),
                f"the certificate and key of operator {name!r} (`edge fleet command` never uses a gateway's identity: "
                f"that would disconnect the running gateway); issue them with `edge fleet --dir {directory} ca "
                f"issue-client {name} --operator`",
            )
    return name, cert, key
