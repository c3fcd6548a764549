"""``edge ota``: the box's model updates by hand (the service runs the same updater on fleet commands and a timer).

- ``edge ota status [--json]``: the updater's state, the active model, failed versions, the last reason.
- ``edge ota update NAME VERSION [--force] [--replace] [--rollout ID]``: install a release now; a model of another
  name than the one running needs ``--replace``.
- ``edge ota check``: finish an interrupted update, refresh the metadata, retry a transient failure.
- ``edge ota revert [--reason WORD]``: run the previous model again and never retry the current one.

Settings come from ``--config`` (``[device] data_dir``, ``[model] path`` as the factory model, ``[ota] repository``,
``root``, ``max_model_mb``, ``trial_runs``); ``--data-dir``, ``--repo-url``, ``--root`` and ``--factory`` override
them (tests and first provisioning). Without ``--config``, the default configuration must exist, or ``--data-dir``
must name the box's data directory: a guess would describe some other box.

``update``, ``check`` and ``revert`` change the model slots, so they take the slots' owner lock
(``edge.ota.owner``) and refuse while the service runs: the service would keep serving the old model.

Exit status: 0 committed or nothing to do; 1 rolled back, refused, or the service runs; 2 usage or configuration
(no configuration, ``--replace`` missing).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge._paths import DEFAULT_CONFIG_PATH
from edge.errors import ConfigError

if TYPE_CHECKING:
    from edge.config import Config
    from edge.ota.owner import OwnerLock
    from edge.ota.updater import Outcome, Updater

__all__ = ["register"]

# How the refusal names each command that changes the slots.
_ACTIONS = {"update": "an update", "check": "a check (it may finish or retry an update)", "revert": "a revert"}


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
    u.add_argument("--replace", action="store_true", help="install a model of another name than the one running")
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


class _UsageError(ConfigError):
    """A command line that cannot be carried out as given (exit 2); the message is the whole sentence."""

    def __init__(self, key: str, value: object, message: str) -> None:
        super().__init__(key, value, message)
        self.args = (message,)


def _config(args: argparse.Namespace) -> Config:
    from edge.config import Config, load_config  # noqa: PLC0415 -- the validator loads only for a command

    if args.config is not None:
        return load_config(args.config)
    if DEFAULT_CONFIG_PATH.exists():
        return load_config(DEFAULT_CONFIG_PATH)
    if args.data_dir is not None:
        return Config()  # the data directory named on the command line; the rest from the other overrides
    raise _UsageError(
        "--config",
        str(DEFAULT_CONFIG_PATH),
        f"edge ota: no configuration: {DEFAULT_CONFIG_PATH} does not exist; pass --config FILE "
        "(or --data-dir DIR to read a box's data directory directly)",
    )


def _claim(data_dir: Path, action: str) -> OwnerLock:
    """Take the model slots' owner lock for this command, or refuse because the service (or another edge ota) has it.

    Raises:
        OwnerBusy: the lock is held (exit 1); the message names the pid, the lock and what to do.
    """
    from edge.ota.owner import OwnerBusy, OwnerLock, acquire  # noqa: PLC0415

    got = acquire(data_dir, "edge-ota")
    if isinstance(got, OwnerLock):
        return got
    if got.role == "service":
        raise OwnerBusy(
            got,
            f"the edge service is running ({got.describe()}); {action} changes the model it serves: stop it first "
            "(systemctl stop edge) or let the fleet roll it out (edge fleet rollout start ...)",
        )
    raise OwnerBusy(got, f"another edge ota command is changing the model ({got.describe()}): wait for it to finish")


def _updater(args: argparse.Namespace, *, need_repository: bool = True) -> Updater:
    import logging  # noqa: PLC0415

    from edge.log import configure, event  # noqa: PLC0415
    from edge.ota.agent import open_updater  # noqa: PLC0415 -- tuf and onnxruntime load only for this command
    from edge.service import factory_model_path  # noqa: PLC0415

    cfg = _config(args)
    configure(cfg.log.level, "text")
    if need_repository and not (args.repo_url or cfg.ota.repository):
        raise ConfigError("ota.repository", "", "the TUF repository's URL (or --repo-url)")
    if args.ota_command != "status":
        # Kept until the process exits (the lock dies with it): the service cannot start in the middle.
        args.owner_lock = _claim(args.data_dir or cfg.device.data_dir, _ACTIONS[args.ota_command])

    log = logging.getLogger("edge.ota")

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
    updater = _updater(args)
    running = updater.status()["active"]["model"]
    running_name = running.split("@", 1)[0] if running else None
    if running_name is not None and running_name != args.name and not args.replace:
        raise _UsageError(
            "--replace",
            args.name,
            f"edge ota update: {args.name}@{args.version} is another model than the running {running}: "
            f"add --replace to serve {args.name} instead of {running_name}",
        )
    return _outcome(args, updater.update(args.name, args.version, force=args.force, rollout=args.rollout))


def _check(args: argparse.Namespace) -> int:
    return _outcome(args, _updater(args).check())


def _revert(args: argparse.Namespace) -> int:
    outcome = _updater(args, need_repository=False).revert(reason=args.reason, rollout=args.rollout)
    return _outcome(args, outcome, ok=("rolled_back", "unchanged"))
