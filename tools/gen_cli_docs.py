#!/usr/bin/env python3
"""Generate the manual page and the shell completions of ``edge`` from its argparse parser.

``tools/gen_cli_docs.py OUTDIR [--box] [--date YYYY-MM-DD]`` writes:

- ``OUTDIR/edge.1``: the manual page (argparse-manpage), every verb and its options, with the sections a parser
  cannot hold (description, exit status, environment, files) from tools/cli_docs/edge.include;
- ``OUTDIR/completions/edge.bash`` (bash-completion's ``completions/edge``) and ``OUTDIR/completions/_edge`` (zsh's
  ``_edge``), both by shtab.

Without ``--box`` the parser is the whole command line (the box's verbs, ``edge fleet`` and ``edge gateway``), as a
fleet server has it; with ``--box`` it is what a box runs (``build_parser(fleet=False)``): the Debian package and the
image ship no edge/fleet, so their page and completions do not offer it. The output is a function of the parser and
the date alone (``--date``, else SOURCE_DATE_EPOCH, else today in UTC): tools/deb/build.py runs this at every build
and its package stays reproducible.

shtab and argparse-manpage are build-time tools (pyproject.toml's ``dev`` extra); the box never imports them.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INCLUDE = ROOT / "tools" / "cli_docs" / "edge.include"
WIDTH = 80  # the width argparse formats usage and help lines to

# argparse's metavars that name a file or a directory: their values complete as paths, not as words.
DIR_METAVARS = {"DIR"}
FILE_METAVARS = {"FILE", "PATH", "MODEL", "CSR", "IN", "OUT", "DIR|NPZ"}
FILE_SUFFIXES = (".onnx", ".pem", ".pub", ".toml", ".json")
# The requests argparse-manpage and tools/cli_docs/edge.include write. A line of help text that starts with "." or
# "'" (".onnx model") would be read by troff as an undefined request: such lines get "\&", which prints nothing.
REQUESTS = {"TH", "SH", "SS", "TP", "PP", "IP", "RS", "RE", "nf", "fi", "UR", "UE", "B", "I", "BR", "IR", "RB", "RI"}


def _parser(*, box: bool) -> argparse.ArgumentParser:
    sys.path.insert(0, str(ROOT))  # the work tree's edge, whatever else the interpreter has installed
    from edge.cli import build_parser, fleet_installed  # noqa: PLC0415

    if not box and not fleet_installed():
        raise SystemExit("gen_cli_docs: edge.fleet is not installed here: pass --box, or install n3-edge[fleet]")
    return build_parser(fleet=not box)


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # an alias maps to the same parser: once
                found += _subparsers(sub)
    return found


def mark_paths(parser: argparse.ArgumentParser) -> None:
    """Tell shtab which arguments take a file or a directory (by their metavar), so those complete as paths."""
    import shtab  # noqa: PLC0415

    for sub in _subparsers(parser):
        for action in sub._actions:
            if action.nargs == 0 or isinstance(action, argparse._SubParsersAction):
                continue
            metavar = action.metavar if isinstance(action.metavar, str) else ""
            if metavar in DIR_METAVARS:
                action.complete = shtab.DIRECTORY  # type: ignore[attr-defined]
            elif metavar in FILE_METAVARS or metavar.endswith(FILE_SUFFIXES) or action.dest == "config":
                action.complete = shtab.FILE  # type: ignore[attr-defined]


def protect_text_lines(roff: str) -> str:
    """Prefix ``\\&`` to every line that starts with a control character but is not one of the known requests."""
    out = []
    for line in roff.split("\n"):
        request = re.match(r"[.'](\S*)", line)
        out.append("\\&" + line if request and request[1] not in REQUESTS else line)
    return "\n".join(out)


def manpage(parser: argparse.ArgumentParser, *, box: bool, date: str, version: str) -> str:
    """The roff source of edge(1)."""
    from argparse_manpage.manpage import Manpage  # noqa: PLC0415

    what = "the N3 Edge box service: sensor inference and signed telemetry"
    if not box:
        what += "; the fleet's operator tools and gateway"
    page = Manpage(
        parser,
        {
            "description": what,
            "project_name": "edge",
            "version": version,
            "date": date,
            "manual_title": "N3 Edge",
            "include": str(INCLUDE),
        },
        format="single-commands-section",
    )
    return protect_text_lines(str(page))


def default_date() -> str:
    """The page's date: SOURCE_DATE_EPOCH's day (reproducible builds), else today's, in UTC."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    return time.strftime("%Y-%m-%d", time.gmtime(int(epoch) if epoch else None))


def generate(out: Path, *, box: bool, date: str) -> list[Path]:
    """Write edge.1 and the completions under ``out``; returns the paths written."""
    import shtab  # noqa: PLC0415

    # argparse wraps usage and help to the terminal's width ($COLUMNS): the page must not depend on who built it.
    os.environ["COLUMNS"] = str(WIDTH)
    parser = _parser(box=box)
    from edge import __version__  # noqa: PLC0415 -- after _parser put the work tree first on sys.path

    mark_paths(parser)
    completions = out / "completions"
    completions.mkdir(parents=True, exist_ok=True)
    written = {
        out / "edge.1": manpage(parser, box=box, date=date, version=__version__),
        completions / "edge.bash": shtab.complete(parser, shell="bash"),
        completions / "_edge": shtab.complete(parser, shell="zsh"),
    }
    for path, text in written.items():
        path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    return list(written)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, generate, print the paths written."""
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("outdir", type=Path, metavar="OUTDIR")
    cli.add_argument("--box", action="store_true", help="the box's command line only (no edge fleet, edge gateway)")
    cli.add_argument("--date", default=None, help="the page's date, YYYY-MM-DD (default: SOURCE_DATE_EPOCH or today)")
    args = cli.parse_args(argv)
    for path in generate(args.outdir, box=args.box, date=args.date or default_date()):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
