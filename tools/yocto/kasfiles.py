"""The kas files read the way kas 5 reads them, offline: includes, lock files and their overrides.

kas clones repositories to resolve them, so nothing here asks kas itself; what it models comes from kas's
includehandler.py and plugins/lock.py: an include is merged before the file that names it (mappings merge
recursively, the including file wins), a lock file ``<name>.lock.yml`` beside any file of the chain is merged right
after that file, and ``overrides.repos.<repo>.commit`` then pins the repositories that exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# kas lock writes new lock files with this header version (plugins/dump.py LOCKFILE_VERSION_MIN).
LOCKFILE_VERSION = 14


class KasFileError(Exception):
    """A kas file cannot be read as kas would: a missing include, a cycle, an include from another repository."""


def lock_file(path: Path) -> Path:
    """includehandler.get_lock_filename: ``common.yml`` -> ``common.lock.yml``."""
    return path.with_name(path.stem + ".lock" + path.suffix)


def is_lock_file(path: Path) -> bool:
    return path.name.endswith(".lock" + path.suffix)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """kas's include semantics: mappings merge recursively, the later file wins."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _load_chain(path: Path, root: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if path in seen:
        raise KasFileError(f"include cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    merged: dict[str, Any] = {}
    for inc in data.get("header", {}).get("includes", []):
        if not isinstance(inc, str):
            raise KasFileError(f"{path.name}: includes from other repositories are not checked offline: {inc}")
        target = root / inc  # relative to the repository root, as kas resolves it
        if not target.is_file():
            raise KasFileError(f"{path.name} includes {inc}, which does not exist")
        merged = merge(merged, _load_chain(target, root, (*seen, path)))
    merged = merge(merged, data)
    lock = lock_file(path)
    if lock.is_file():
        merged = merge(merged, yaml.safe_load(lock.read_text(encoding="utf-8")) or {})
    return merged


def load(path: Path, root: Path) -> dict[str, Any]:
    """The configuration kas builds from ``path``: includes and lock files merged, repository overrides applied."""
    config = _load_chain(path, root, ())
    repos = config.get("repos") or {}
    for name, override in ((config.get("overrides") or {}).get("repos") or {}).items():
        if name in repos:
            repos[name] = {**(repos[name] or {}), **{k: v for k, v in override.items() if v is not None}}
    return config


def lock_format_problems(path: Path) -> list[str]:
    """What ``kas lock`` would write differently: only commit overrides, and kas's own YAML layout."""
    from kas.plugins.dump import Dump  # noqa: PLC0415 -- kas's dumper, a dev dependency of the check

    text = path.read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    problems = []
    if set(data) != {"header", "overrides"} or set(data.get("overrides") or {}) != {"repos"}:
        problems.append(f"{path.name}: a lock file holds header and overrides.repos only")
    if (data.get("header") or {}).get("version", 0) < LOCKFILE_VERSION:
        problems.append(f"{path.name}: header version below {LOCKFILE_VERSION}, which kas lock writes")
    for repo, entry in ((data.get("overrides") or {}).get("repos") or {}).items():
        commit = (entry or {}).get("commit") or ""
        if set(entry or {}) != {"commit"} or len(commit) != 40 or not all(c in "0123456789abcdef" for c in commit):
            problems.append(f"{path.name}: {repo} is not pinned by a full commit id alone: {entry}")
    if text != yaml.dump(data, indent=2, sort_keys=False, Dumper=Dump.KasYamlDumper):
        problems.append(f"{path.name}: not laid out as kas lock writes it (kas lock --update would rewrite it)")
    return problems
