"""``edge config check`` and ``edge config show``: the configuration as ``edge run`` sees it.

``check`` is ``nginx -t`` for the box: it loads the file and the drop-in exactly as ``edge run`` does, then looks at
what the keys name on this box (``edge.config_check.preflight``: the model loads, the files exist, the box is
enrolled) and prints every problem at once, one line each. ``show`` prints the effective values: defaults filled
in, the drop-in merged, every path as the service will open it, credentials in URLs masked. The gateway's
equivalents are ``edge gateway config check|show`` (``edge.fleet.cli.gateway_config``): the box never imports the
fleet.

Exit status: 0 ok (warnings are printed and do not fail), 2 the configuration has errors (docs/configuration.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge._paths import DEFAULT_CONFIG_PATH

if TYPE_CHECKING:
    from edge.config import Config

__all__ = ["register"]

_EXAMPLES = """examples:
  edge config check                                  # /etc/edge/edge.toml and its drop-in, as edge run reads them
  edge config check --config ./edge.toml --no-model  # the paths only, without loading the model
  edge config show --json | jq .telemetry
"""


def register(sub: Any) -> None:
    """Add ``edge config check`` and ``edge config show`` to the ``edge`` parser.

    Args:
        sub: the object ``argparse.ArgumentParser.add_subparsers`` returned.
    """
    parser = sub.add_parser(
        "config",
        help="check the configuration, or show its effective values",
        description="Check the configuration as the service would load it, or show its effective values.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check",
        help="load and validate the configuration as `edge run` would; exit 2 on any error",
        description="Load the configuration and its drop-in exactly as `edge run` does, then check what it names on "
        "this box: the model exists and loads, the source's and the sink's paths, the enrollment (certificate, "
        "key, CA) when telemetry is on, the data directory. Every error is printed, one line each, naming the key; "
        "warnings (what the service logs and runs on with) too. Read only: safe while the service runs. "
        "Exit status 0 ok, 2 errors.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(check)
    check.add_argument("--no-model", action="store_true", help="check that the model file exists, do not load it")
    check.set_defaults(func=_check)
    show = actions.add_parser(
        "show",
        help="print the effective values (defaults, drop-in, resolved paths; secrets masked)",
        description="Print the configuration the service would run with: every key, the defaults filled in, the "
        "drop-in merged, relative paths resolved (state paths inside device.data_dir), credentials in URLs "
        "masked. TOML by default (a valid document), or JSON.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(show)
    show.add_argument("--json", action="store_true", help="JSON instead of TOML")
    show.set_defaults(func=_show)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="FILE", default=None, help=f"the box's configuration (default: {DEFAULT_CONFIG_PATH})"
    )


# -- check -------------------------------------------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    from edge._config_output import print_check  # noqa: PLC0415
    from edge.config_check import preflight  # noqa: PLC0415
    from edge.errors import ConfigError  # noqa: PLC0415
    from edge.toml_config import all_errors  # noqa: PLC0415

    path = _path(args)
    try:
        cfg, names = _load(path)
    except ConfigError as e:
        return print_check(f"configuration {path}", all_errors(e))
    found = preflight(cfg, load_model=not args.no_model)
    return print_check(names, found.errors, found.warnings)


def _load(path: Path) -> tuple[Config, str]:
    """The box's configuration as ``edge run`` loads it, and the words naming its files."""
    from edge.config import dropin_path, load_config  # noqa: PLC0415

    cfg = load_config(path)
    dropin = dropin_path(cfg)
    if dropin.is_file() and dropin.resolve() != path.resolve():
        return cfg, f"configuration {path} with the drop-in {dropin}"
    return cfg, f"configuration {path} (no drop-in {dropin})"


# -- show --------------------------------------------------------------------------------------------------------------


def _show(args: argparse.Namespace) -> int:
    from edge._config_output import effective_document, print_show  # noqa: PLC0415
    from edge.config import data_path  # noqa: PLC0415

    cfg, names = _load(_path(args))

    def resolve(section: str, _key: str, p: Path) -> Path:
        # State paths live in device.data_dir; the others were resolved against their file when it was loaded.
        return data_path(cfg, p) if section in ("telemetry", "ota") else p

    doc = effective_document(cfg, resolve)
    if doc["model"]["path"] is None:
        from edge.service import factory_model_path  # noqa: PLC0415 -- numpy: only for show

        doc["model"]["path"] = str(factory_model_path())  # what runs when the file names no model
    return print_show(doc, names, as_json=args.json)


def _path(args: argparse.Namespace) -> Path:
    return Path(args.config if args.config is not None else DEFAULT_CONFIG_PATH)
