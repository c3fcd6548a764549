"""The fleet's command-line verbs: ``edge fleet ...`` (operator tools) and ``edge gateway run``.

``edge.cli`` calls ``register`` only when this package is installed (a box image leaves it out). Each module holds
one group of verbs in its ``SUBCOMMANDS``: ``devices`` (CA, enrollment, revocation, broker configuration), ``data``
(status, ledger, commands), ``models`` (the TUF repository), ``rollout`` and ``doctor`` (checks); ``gateway`` runs
the gateway. The global options live in ``_common``; every verb accepts them after its name too.
"""

from __future__ import annotations

import argparse
from typing import Any

from edge.fleet.cli import data, devices, doctor, gateway, models, onboard, rollout
from edge.fleet.cli._common import add_common_options, add_examples
from edge.fleet.cli._examples import EXAMPLES

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``edge fleet`` (with its global options and every verb) and ``edge gateway`` to the ``edge`` parser.

    Args:
        subparsers: the object ``argparse.ArgumentParser.add_subparsers`` returned.
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "fleet",
        help="fleet CA, enrollment and revocation, broker configuration, models and rollouts",
        description="Operate the fleet: its CA and command key, enrolled devices, and the broker's access rules.",
    )
    add_common_options(parser, top=True)
    sub = parser.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")
    for add in [
        *devices.SUBCOMMANDS,
        *onboard.SUBCOMMANDS,
        *data.SUBCOMMANDS,
        *models.SUBCOMMANDS,
        *rollout.SUBCOMMANDS,
        *doctor.SUBCOMMANDS,
    ]:
        add(sub)
    _finish_verbs(parser, ())
    gateway.register(subparsers)


def _finish_verbs(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
    """Give every verb below ``parser`` (at any depth) ``--dir`` and ``--store`` too, so that they work after the
    verb as well as before it, and its ``examples:`` (``_examples``) unless its module wrote its own."""
    for action in parser._actions:  # argparse exposes no public walk of its sub-parsers
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                if child.prog.rsplit(" ", 1)[-1] != name:
                    continue  # an alias: the same parser under its own name
                add_common_options(child)
                examples = EXAMPLES.get(" ".join((*path, name)))
                if examples and child.epilog is None and child.formatter_class is argparse.HelpFormatter:
                    add_examples(child, examples)
                _finish_verbs(child, (*path, name))
