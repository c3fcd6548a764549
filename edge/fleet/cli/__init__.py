"""The fleet's command-line verbs: ``edge fleet ...`` (operator tools) and ``edge gateway run``.

``edge.cli`` calls ``register`` only when this package is installed (a box image leaves it out). Each module holds
one group of verbs in its ``SUBCOMMANDS``: ``devices`` (CA, enrollment, revocation, broker configuration), ``data``
(status, ledger, commands), ``models`` (the TUF repository), ``rollout`` and ``doctor`` (checks); ``gateway`` runs
the gateway. The global options live in ``_common``.
"""

from __future__ import annotations

import argparse
from typing import Any

from edge.fleet.cli import data, devices, doctor, gateway, models, onboard, rollout

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
    parser.add_argument(
        "--dir",
        dest="fleet_dir",
        metavar="DIR",
        help="the fleet directory (default: $EDGE_FLEET_DIR or ./fleet)",
    )
    parser.add_argument("--store", metavar="URL", help="the store (default: sqlite:///<fleet dir>/fleet.db)")
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
    gateway.register(subparsers)
