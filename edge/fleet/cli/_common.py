"""What every ``edge fleet`` verb shares: the fleet directory, the CA, the store and registry it names, and times.

Global options (``edge.fleet.cli.register``): ``--dir DIR`` (the fleet directory; default ``$EDGE_FLEET_DIR`` or
``./fleet``; its layout is in ``edge.fleet.pki.registry``) and ``--store URL`` (default
``sqlite:///<dir>/fleet.db``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from edge.errors import ConfigError

if TYPE_CHECKING:
    from edge.fleet.pki.ca import FleetCA
    from edge.fleet.pki.registry import Registry
    from edge.fleet.store import Store

__all__ = ["fleet_dir", "iso_utc", "load_ca", "open_fleet_store", "open_registry", "operator_identity"]


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
    """Epoch seconds as an ISO 8601 UTC time to the second (None stays None), for operators' output."""
    return None if t is None else datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds")


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
