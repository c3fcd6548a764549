"""How the configuration verbs print (``edge config``, ``edge gateway config``): the check's lines, the shown values.

Shared by the box's verbs (``edge.commands.config``) and the gateway's (``edge.fleet.cli.gateway_config``), which
may not import each other. Only the standard library and edge's configuration base (``edge.toml_config``,
``edge.log`` for redaction) are imported, and only when a verb runs.

Invariants:
- A check prints every error on its own line, naming the key, then one summary line; exit status 2 if any, else 0.
- A shown configuration never carries a URL's credentials, and as TOML it is itself a valid configuration.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from edge.errors import EXIT_OK, EXIT_USAGE, ConfigError

__all__ = ["PathResolver", "effective_document", "print_check", "print_show"]

PathResolver = Callable[[str, str, Path], Path]
"""(section, key, path) -> the path as the service opens it (state paths inside their directory)."""


def print_check(names: str, errors: Iterable[ConfigError], warnings: Iterable[ConfigError] = ()) -> int:
    """Print a check's findings and return its exit status.

    Args:
        names: the files checked, e.g. ``configuration /etc/edge/edge.toml with the drop-in /data/edge/edge.toml``.
        errors: what stops the service: each on a line of its own on stderr, then ``edge: NAMES has N errors``.
        warnings: what the service runs on with: ``edge: warning: ...`` on stderr, not a failure.

    Returns:
        ``EXIT_USAGE`` (2) if there is an error, else ``EXIT_OK`` with ``edge: NAMES is ok`` on stdout.
    """
    from edge.log import redact  # noqa: PLC0415

    errors = list(errors)
    for w in warnings:
        print(f"edge: warning: {redact(str(w))}", file=sys.stderr)
    for e in errors:
        print(f"edge: {redact(str(e))}", file=sys.stderr)
    if errors:
        n = len(errors)
        print(f"edge: {names} has {n} error{'s' if n > 1 else ''}", file=sys.stderr)
        return EXIT_USAGE
    print(f"edge: {names} is ok")
    return EXIT_OK


def print_show(doc: Mapping[str, Mapping[str, Any]], names: str, *, as_json: bool) -> int:
    """Print an ``effective_document`` as TOML (a comment lists what is not set) or JSON; returns ``EXIT_OK``."""
    from edge.toml_config import dump_toml  # noqa: PLC0415

    if as_json:
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    tables = {name: {k: v for k, v in table.items() if v is not None} for name, table in doc.items()}
    unset = [f"{name}.{k}" for name, table in doc.items() for k, v in table.items() if v is None]
    print(f"# The effective {names}: defaults filled in, paths resolved, credentials masked.")
    if unset:
        print(f"# Not set (taken from the model or off): {', '.join(unset)}")
    print(dump_toml(tables), end="")
    return EXIT_OK


def effective_document(cfg: object, resolve: PathResolver) -> dict[str, dict[str, Any]]:
    """Every key of a validated configuration document (``edge.toml_config``), as TOML and JSON write it.

    Paths go through ``resolve``, tuples become lists, strings are redacted (``edge.log.redact``: a URL's password,
    a ``token=`` query). None is "not set": ``""`` for a path that may be turned off (as the file writes it); a value
    the file could not spell back (``source.port = ""``) is None too, so the TOML output is a valid configuration.

    Args:
        cfg: the configuration, a dataclass of section dataclasses.
        resolve: how a path key is opened.

    Returns:
        Section -> key -> value (None: not set).
    """
    from edge.toml_config import path_or_disabled, section_types, settings  # noqa: PLC0415

    doc: dict[str, dict[str, Any]] = {}
    for name, section in section_types(type(cfg)).items():
        values = getattr(cfg, name)
        table: dict[str, Any] = {}
        for s in settings(section):
            v = getattr(values, s.key)
            if v is None and s.convert is path_or_disabled:
                v = ""
            plain = _plain(name, s.key, v, resolve)
            try:
                s.convert(f"{name}.{s.key}", plain)
            except ConfigError:
                plain = None
            table[s.key] = plain
        doc[name] = table
    return doc


def _plain(section: str, key: str, v: Any, resolve: PathResolver) -> Any:
    from edge.log import redact  # noqa: PLC0415

    if isinstance(v, Path):
        return str(resolve(section, key, v))
    if isinstance(v, str):  # a StrEnum too; redact() masks a URL's password, a token=... query, never a plain word
        return redact(str(v))
    if isinstance(v, tuple | list):
        return list(v)
    if isinstance(v, Mapping):
        return dict(v)
    return v
