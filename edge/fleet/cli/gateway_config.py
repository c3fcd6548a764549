"""``edge gateway config check|show --config FILE``: the gateway's configuration as ``edge gateway run`` sees it.

The gateway's side of ``edge config check|show`` (``edge.commands.config``, the box's): ``check`` loads the file
with the real loader (every error at once, the certificate's CN as the gateway's id) and checks that the files it
names exist; ``show`` prints the effective values, paths resolved, the store's password masked.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["register_config"]

_EXAMPLES = """examples:
  edge gateway config check --config /etc/edge/gateway.toml   # before `systemctl restart edge-gateway`
  edge gateway config show --config /etc/edge/gateway.toml --json
"""


def register_config(actions: Any) -> None:
    """Add ``config check`` and ``config show`` under ``edge gateway``.

    Args:
        actions: the sub-parsers of ``edge gateway`` (``add_subparsers``' result).
    """
    parser = actions.add_parser(
        "config",
        help="check the gateway's configuration, or show its effective values",
        description="Check a gateway configuration as `edge gateway run` would load it, or show its effective values.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="gateway_config_command", required=True, metavar="ACTION")
    check = verbs.add_parser(
        "check",
        help="load and validate it as `edge gateway run` would; exit 2 on any error",
        description="Load the file as `edge gateway run` does (every unknown key and bad value at once; the CN of "
        "broker.cert as the gateway's id) and check that broker.ca and broker.key exist. Nothing is started or "
        "written. Exit status 0 ok, 2 errors.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("--config", required=True, metavar="FILE", help="gateway configuration (TOML)")
    check.set_defaults(func=_check)
    show = verbs.add_parser(
        "show",
        help="print the effective values (defaults, resolved paths; the store's password masked)",
        description="Print every key as the gateway runs with it: defaults filled in, fleet_dir resolved against "
        "the file's directory, broker paths and a SQLite store inside fleet_dir, credentials masked. TOML by "
        "default (a valid document), or JSON.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("--config", required=True, metavar="FILE", help="gateway configuration (TOML)")
    show.add_argument("--json", action="store_true", help="JSON instead of TOML")
    show.set_defaults(func=_show)


def _check(args: argparse.Namespace) -> int:
    from edge._config_output import print_check  # noqa: PLC0415
    from edge.errors import ConfigError  # noqa: PLC0415
    from edge.fleet.config import load_gateway_config  # noqa: PLC0415
    from edge.toml_config import all_errors  # noqa: PLC0415

    path = Path(args.config)
    names = f"configuration {path}"
    try:
        cfg = load_gateway_config(path)  # reads broker.cert: its CN is the gateway's identity
    except ConfigError as e:
        return print_check(names, all_errors(e))
    errors = []
    for key, p, fix in (
        ("broker.ca", cfg.broker.ca, "the fleet CA (`edge fleet ca init`)"),
        ("broker.key", cfg.broker.key, "the key of broker.cert (`edge fleet ca issue-client NAME`)"),
    ):
        full = cfg.fleet_path(p)
        if not full.is_file():
            errors.append(ConfigError(key, str(full), f"an existing file: {fix}"))
    return print_check(names, errors)


def _show(args: argparse.Namespace) -> int:
    from edge._config_output import effective_document, print_show  # noqa: PLC0415
    from edge.fleet.config import load_gateway_config  # noqa: PLC0415

    path = Path(args.config)
    cfg = load_gateway_config(path, resolve_id=False)  # shows the file; `check` is what reads the certificate

    def resolve(section: str, _key: str, p: Path) -> Path:
        return cfg.fleet_path(p) if section == "broker" else p

    return print_show(effective_document(cfg, resolve), f"configuration {path}", as_json=args.json)
