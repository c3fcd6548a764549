"""``edge ota``: the box's model updates by hand (the service runs the same updater on fleet commands and a timer).

- ``edge ota status [--json]``: the updater's state, the active model, failed versions, the last reason.
- ``edge ota update NAME VERSION [--force] [--rollout ID]``: install a release now.
- ``edge ota check``: finish an interrupted update, refresh the metadata, retry a transient failure.
- ``edge ota revert [--reason WORD]``: run the previous model again and never retry the current one.

Settings come from ``--config`` (``[device] data_dir``, ``[model] path`` as the factory model, ``[ota] repository``,
``root``, ``max_model_mb``, ``trial_runs``); ``--data-dir``, ``--repo-url``, ``--root`` and ``--factory`` override
them (tests and first provisioning). Exit status: 0 committed or nothing to do, 1 rolled back or refused, 2 error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.config import DEFAULT_CONFIG_PATH, Config, load_config
from edge.errors import ConfigError

if TYPE_CHECKING:
    from edge.ota.updater import Outcome, Updater

__all__ = ["register"]

log = logging.getLogger("edge.ota")


def register(subparsers: Any) -> None:
    """Add ``edge ota status|update|check|revert``.

    Args:
        subparsers: the object ``argparse.ArgumentParser.add_subparsers`` returned.
    """
    parser = subparsers.add_parser("ota", help="over-the-air model updates (status, update, check, revert)")
    sub = parser.add_subparsers(dest="ota_command", required=True, metavar="ACTION")

    s = sub.add_parser("status", help="show the updater's state and the active model")
    _common(s)
    s.set_defaults(func=_status)

    u = sub.add_parser("update", help="install a model release now")
    u.add_argument("name", metavar="NAME", help="model name, e.g. digits")
    u.add_argument("version", metavar="VERSION", help="release version, e.g. 2.0.0")
    u.add_argument("--force", action="store_true", help="install even a failed or not newer version")
    u.add_argument("--rollout", metavar="ID", default=None, help="rollout id reported with every transition")
    _common(u)
    u.set_defaults(func=_update)

    c = sub.add_parser("check", help="finish an interrupted update, refresh metadata, retry a transient failure")
    _common(c)
    c.set_defaults(func=_check)

    r = sub.add_parser("revert", help="run the previous model again; the current one is never retried")
    r.add_argument("--reason", default="operator_revert", metavar="WORD", help="snake_case reason (%(default)s)")
    r.add_argument("--rollout", metavar="ID", default=None, help="rollout id reported with the revert")
    _common(r)
    r.set_defaults(func=_revert)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", default=None, metavar="FILE", help=f"configuration (default: {DEFAULT_CONFIG_PATH} if present)"
    )
    p.add_argument("--data-dir", type=Path, default=None, metavar="DIR", help="override [device] data_dir")
    p.add_argument("--repo-url", default=None, metavar="URL", help="override [ota] repository")
    p.add_argument("--root", type=Path, default=None, metavar="FILE", help="override [ota] root (trusted root.json)")
    p.add_argument("--factory", type=Path, default=None, metavar="MODEL", help="override the factory model")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _config(args: argparse.Namespace) -> Config:
    if args.config is not None:
        return load_config(args.config)
    if DEFAULT_CONFIG_PATH.exists():
        return load_config(DEFAULT_CONFIG_PATH)
    return Config()


def _updater(args: argparse.Namespace, *, need_repository: bool = True) -> Updater:
    from edge.log import configure, event  # noqa: PLC0415
    from edge.ota.agent import open_updater  # noqa: PLC0415 -- tuf and onnxruntime load only for this command
    from edge.service import factory_model_path  # noqa: PLC0415

    cfg = _config(args)
    configure(cfg.log.level, "text")
    if need_repository and not (args.repo_url or cfg.ota.repository):
        raise ConfigError("ota.repository", "", "the TUF repository's URL (or --repo-url)")

    def emit(kind: str, data: Mapping[str, Any]) -> None:
        event(log, logging.INFO, kind, **data)

    updater, _floor = open_updater(
        cfg,
        args.factory or cfg.model.path or factory_model_path(),
        emit=emit,
        repo_url=args.repo_url,
        root=args.root,
        data_dir=args.data_dir,
    )
    return updater


def _print(args: argparse.Namespace, body: Mapping[str, Any], text: str) -> None:
    print(json.dumps(body, sort_keys=True) if args.json else text)
    sys.stdout.flush()


def _outcome(
    args: argparse.Namespace, outcome: Outcome | None, ok: tuple[str, ...] = ("committed", "unchanged")
) -> int:
    if outcome is None:
        _print(args, {"state": "unchanged", "model": None, "reason": None}, "nothing to do")
        return 0
    body = outcome.as_dict()
    detail = f" ({outcome.reason})" if outcome.reason else ""
    extra = f" variant={outcome.variant} p50={outcome.latency_ms} ms" if outcome.variant else ""
    _print(args, body, f"{outcome.state}: {outcome.model}{detail}{extra}")
    return 0 if outcome.state in ok else 1


def _status(args: argparse.Namespace) -> int:
    st = _updater(args, need_repository=False).status()
    active = st["active"]
    lines = [
        f"state:   {st['state']}" + (f" ({st['reason']})" if st["reason"] else ""),
        f"active:  {active['model']} (slot {active['slot']}, sha256 {active['sha256'][:16]}...)",
        f"last:    {st['model'] or '-'}" + (f" rollout {st['rollout']}" if st["rollout"] else ""),
        f"failed:  {', '.join(st['failed']) or '-'}",
    ]
    _print(args, st, "\n".join(lines))
    return 0


def _update(args: argparse.Namespace) -> int:
    return _outcome(args, _updater(args).update(args.name, args.version, force=args.force, rollout=args.rollout))


def _check(args: argparse.Namespace) -> int:
    return _outcome(args, _updater(args).check())


def _revert(args: argparse.Namespace) -> int:
    outcome = _updater(args, need_repository=False).revert(reason=args.reason, rollout=args.rollout)
    return _outcome(args, outcome, ok=("rolled_back", "unchanged"))
