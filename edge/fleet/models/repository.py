"""The fleet's TUF model repository: static metadata and targets, built with python-tuf's Metadata API.

Layout (below the fleet directory; serve ``repository/`` with any static HTTP server, the box's base URL is its
root and it fetches ``metadata/...`` and ``targets/...`` below it)::

    tuf/config.json                      expiry periods (days) per role
    tuf/keys/<role>/<keyid>.pem          the fleet's private keys: root, targets, snapshot, timestamp (0600)
    tuf/publishers/<name>.pub            the publishers' public keys, as registered
    repository/metadata/                 1.root.json, 2.root.json... root.json (the latest, for convenience),
                                         timestamp.json, <v>.snapshot.json, <v>.targets.json, <v>.<publisher>.json
    repository/targets/<name>/<version>/<sha256>.<file>   release files (consistent snapshots: hash-prefixed)

Trust model:
- Top-level roles root, targets, snapshot and timestamp each have their own keys and threshold. The targets role
  lists no target itself: it delegates, terminating and with threshold 1, one role per publisher, named after it,
  whose paths are ``<model>/*/*`` for each model the fleet lets that publisher publish. A publisher signs its own
  role with its own key; the fleet never holds that key (``publish`` takes it as an argument and does not store it).
- Every timestamp carries ``x-edge-issued`` (RFC 3339 UTC) in its signed part: a box without a real-time clock takes
  it as proven time, its floor.

Invariants:
- Files are written in dependency order, each atomically: targets files, then the changed role metadata, then the
  snapshot, and the timestamp last. A crash at any point leaves the old timestamp, hence the old consistent
  repository (plus unreferenced files), which a client keeps seeing until the next complete write.
- Versions only grow. A publisher role that was removed keeps its entry in the snapshot (a TUF client refuses a
  snapshot that drops one), so its name is never given to another publisher.
- A model version is published only when it is newer (``version_key``) than every published version of that model.
- Rotating a top-level key writes a new root version; a new root key set is signed by the old keys and the new ones,
  so a client follows the chain. The retired private keys are deleted once the new metadata is written.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from securesystemslib.signer import CryptoSigner, Signer  # type: ignore[attr-defined]
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (  # type: ignore[attr-defined] # the public path; python-tuf has no __all__
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

import edge
from edge._fs import TooLargeError, atomic_write, fsync_dir, read_bounded
from edge.arrays import NpzArchive
from edge.errors import InputError
from edge.fleet.errors import GatewayError
from edge.fleet.models import _tuf_keys as keys
from edge.wire.errors import ManifestError
from edge.wire.manifest import (
    FLOAT_FILE,
    GOLDEN_FILE,
    GOLDEN_LIMITS,
    MAX_GOLDEN_BYTES,
    MODEL_FILE,
    Companion,
    GoldenSpec,
    InputInfo,
    ModelManifest,
    parse_golden,
    target_path,
    validate_name,
    version_key,
)

__all__ = [
    "DEFAULT_EXPIRY_DAYS",
    "ISSUED_FIELD",
    "METADATA_DIR",
    "REPOSITORY_DIR",
    "ROLES",
    "TARGETS_DIR",
    "FleetRepository",
    "RepositoryError",
    "issued_text",
    "validate_publisher",
]

ROLES: Final = ("root", "targets", "snapshot", "timestamp")
DEFAULT_EXPIRY_DAYS: Final[Mapping[str, float]] = {
    "root": 365,
    "targets": 90,
    "publishers": 90,
    "snapshot": 7,
    "timestamp": 1,
}
ISSUED_FIELD: Final = "x-edge-issued"
REPOSITORY_DIR: Final = "repository"
METADATA_DIR: Final = "metadata"
TARGETS_DIR: Final = "targets"
_CONFIG_FILE: Final = Path("tuf") / "config.json"
_PUBLISHER = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_ROOT_FILE = re.compile(r"([1-9][0-9]{0,9})\.root\.json")
_MAX_THRESHOLD = 16
_COPY_CHUNK = 1 << 20

Progress = Callable[[int, int], None]
ReleaseCheck = Callable[["ModelManifest", Mapping[str, Path], "bytes | None"], object]


class RepositoryError(GatewayError, InputError):
    """The repository refuses an operation (not initialised, unknown publisher, version not newer...) or its files
    are inconsistent; the message says which and what to do. Nothing was published."""


def validate_publisher(name: object) -> str:
    """Check a publisher name (``[a-z0-9][a-z0-9_-]{0,31}``, not a top-level role); returns it.

    Raises:
        RepositoryError: the name is not valid.
    """
    if not isinstance(name, str) or not _PUBLISHER.fullmatch(name) or name in ROLES:
        raise RepositoryError(
            f"publisher name must match [a-z0-9][a-z0-9_-]{{0,31}} and not be a top-level role, got {name!r:.80}"
        )
    return name


def _utc(now: datetime.datetime) -> datetime.datetime:
    if now.tzinfo is None:
        raise RepositoryError("now must be a timezone-aware datetime")
    return now.astimezone(datetime.UTC).replace(microsecond=0)


def issued_text(now: datetime.datetime) -> str:
    """``now`` as the ``x-edge-issued`` value: RFC 3339 UTC to the second, e.g. ``2026-11-22T06:30:00Z``."""
    return _utc(now).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_expiry(expiry_days: Mapping[str, float] | None) -> dict[str, float]:
    out = dict(DEFAULT_EXPIRY_DAYS)
    for role, days in (expiry_days or {}).items():
        if role not in DEFAULT_EXPIRY_DAYS:
            raise RepositoryError(f"expiry: unknown role {role!r}, expected one of {sorted(DEFAULT_EXPIRY_DAYS)}")
        if isinstance(days, bool) or not isinstance(days, int | float) or not math.isfinite(days) or days <= 0:
            raise RepositoryError(f"expiry of {role}: expected a positive number of days, got {days!r}")
        out[role] = float(days)
    return out


def _check_thresholds(thresholds: Mapping[str, int] | None) -> dict[str, int]:
    out = dict.fromkeys(ROLES, 1)
    for role, n in (thresholds or {}).items():
        if role not in ROLES:
            raise RepositoryError(f"threshold: unknown role {role!r}, expected one of {list(ROLES)}")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= _MAX_THRESHOLD:
            raise RepositoryError(f"threshold of {role}: expected an integer from 1 to {_MAX_THRESHOLD}, got {n!r}")
        out[role] = n
    return out


def _sign(md: Metadata[Any], signers: Sequence[Signer]) -> None:
    md.signatures.clear()
    for s in signers:
        md.sign(s, append=True)


def _read_metadata(path: Path, kind: type[Signed]) -> Metadata[Any]:
    try:
        md: Metadata[Any] = Metadata.from_bytes(path.read_bytes())
    except FileNotFoundError as e:
        raise RepositoryError(f"repository metadata {path} is missing") from e
    except Exception as e:  # python-tuf raises DeserializationError, ValueError, KeyError...: all mean "unreadable"
        raise RepositoryError(f"repository metadata {path} is unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(md.signed, kind):
        raise RepositoryError(f"repository metadata {path} holds {md.signed.type}, expected {kind.type}")
    return md


class FleetRepository:
    """The fleet's TUF repository on disk; every mutating method signs and writes a new consistent state.

    Attributes:
        fleet_dir: the fleet directory.
        repository_dir: ``<fleet dir>/repository``, the directory to serve.
        metadata_dir, targets_dir: its ``metadata`` and ``targets`` subdirectories.
        expiry_days: expiry period per role (``publishers`` for the publishers' roles).
    """

    def __init__(
        self,
        fleet_dir: Path,
        *,
        expiry_days: Mapping[str, float],
        root: Metadata[Root],
        targets: Metadata[Targets],
        delegated: Mapping[str, Metadata[Targets]],
        snapshot: Metadata[Snapshot] | None,
        timestamp_version: int,
    ) -> None:
        """Wrap loaded state; use :meth:`init` or :meth:`load` instead."""
        self.fleet_dir = fleet_dir
        self.repository_dir = fleet_dir / REPOSITORY_DIR
        self.metadata_dir = self.repository_dir / METADATA_DIR
        self.targets_dir = self.repository_dir / TARGETS_DIR
        self.expiry_days = dict(expiry_days)
        self._root = root
        self._targets = targets
        self._delegated = dict(delegated)
        self._snapshot = snapshot
        self._timestamp_version = timestamp_version

    # -- creation and loading ----------------------------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        fleet_dir: Path,
        *,
        now: datetime.datetime,
        thresholds: Mapping[str, int] | None = None,
        expiry_days: Mapping[str, float] | None = None,
    ) -> FleetRepository:
        """Create the repository: keys for every top-level role, root v1, empty targets, snapshot and timestamp.

        Args:
            fleet_dir: the fleet directory (created if missing).
            now: the signing time (metadata expires relative to it).
            thresholds: signatures required per top-level role (default 1); that many keys are made for it.
            expiry_days: expiry periods (days) overriding ``DEFAULT_EXPIRY_DAYS``.

        Returns:
            The repository.

        Raises:
            RepositoryError: already initialised, or a threshold or expiry is invalid.
        """
        now = _utc(now)
        counts = _check_thresholds(thresholds)
        expiry = _check_expiry(expiry_days)
        fleet_dir = Path(fleet_dir)
        meta_dir = fleet_dir / REPOSITORY_DIR / METADATA_DIR
        if meta_dir.is_dir() and any(_ROOT_FILE.fullmatch(p.name) for p in meta_dir.iterdir()):
            raise RepositoryError(f"a TUF repository already exists in {fleet_dir}")
        meta_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        (fleet_dir / REPOSITORY_DIR / TARGETS_DIR).mkdir(mode=0o755, exist_ok=True)
        (fleet_dir / keys.PUBLISHERS_DIR).mkdir(mode=0o755, parents=True, exist_ok=True)
        atomic_write(fleet_dir / _CONFIG_FILE, json.dumps({"expiry_days": expiry}, indent=2).encode() + b"\n")

        root = Metadata(Root(expires=now + datetime.timedelta(days=expiry["root"]), consistent_snapshot=True))
        for role in ROLES:
            root.signed.roles[role].threshold = counts[role]
            for _ in range(counts[role]):
                key = Ed25519PrivateKey.generate()
                keys.write_role_key(fleet_dir, role, key)
                root.signed.add_key(keys.sslib_key(key.public_key()), role)
        targets = Metadata(
            Targets(
                expires=now + datetime.timedelta(days=expiry["targets"]),
                delegations=Delegations(keys={}, roles={}),
            )
        )
        repo = cls(
            fleet_dir,
            expiry_days=expiry,
            root=root,
            targets=targets,
            delegated={},
            snapshot=None,
            timestamp_version=0,
        )
        _sign(root, repo._signers("root"))
        repo._write_root()
        _sign(targets, repo._signers("targets"))
        repo._write(targets, "1.targets.json")
        repo._commit(now)
        return repo

    @classmethod
    def load(cls, fleet_dir: Path) -> FleetRepository:
        """Open the repository of a fleet directory, following the timestamp to the current snapshot and roles.

        Raises:
            RepositoryError: not initialised (run ``edge fleet models init``) or a metadata file is missing/unreadable.
        """
        fleet_dir = Path(fleet_dir)
        meta_dir = fleet_dir / REPOSITORY_DIR / METADATA_DIR
        versions = sorted(
            int(m.group(1))
            for p in (meta_dir.iterdir() if meta_dir.is_dir() else [])
            if (m := _ROOT_FILE.fullmatch(p.name))
        )
        if not versions:
            raise RepositoryError(f"no TUF repository in {fleet_dir} (create it with: edge fleet models init)")
        try:
            config = json.loads((fleet_dir / _CONFIG_FILE).read_bytes())
            expiry = _check_expiry(config["expiry_days"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RepositoryError(f"repository config {fleet_dir / _CONFIG_FILE} is unreadable: {e}") from e
        root = _read_metadata(meta_dir / f"{versions[-1]}.root.json", Root)
        timestamp = _read_metadata(meta_dir / "timestamp.json", Timestamp)
        snapshot = _read_metadata(meta_dir / f"{timestamp.signed.snapshot_meta.version}.snapshot.json", Snapshot)
        delegated: dict[str, Metadata[Targets]] = {}
        targets: Metadata[Targets] | None = None
        for filename, meta in snapshot.signed.meta.items():
            md = _read_metadata(meta_dir / f"{meta.version}.{filename}", Targets)
            if filename == "targets.json":
                targets = md
            else:
                delegated[filename.removesuffix(".json")] = md
        if targets is None:
            raise RepositoryError(f"snapshot {snapshot.signed.version} lists no targets metadata")
        return cls(
            fleet_dir,
            expiry_days=expiry,
            root=root,
            targets=targets,
            delegated=delegated,
            snapshot=snapshot,
            timestamp_version=timestamp.signed.version,
        )

    # -- reading -----------------------------------------------------------------------------------------------------

    def root_bytes(self) -> bytes:
        """The latest root metadata as served (``<v>.root.json``): what a box is provisioned with as trusted root."""
        return (self.metadata_dir / f"{self._root.signed.version}.root.json").read_bytes()

    def metadata(self, role: str) -> Metadata[Any]:
        """A copy of the current metadata of a top-level role or a publisher's role (tests craft attacks from it).

        Raises:
            RepositoryError: no such role.
        """
        current: Metadata[Any] | None
        if role == "root":
            current = self._root
        elif role == "targets":
            current = self._targets
        elif role == "snapshot":
            current = self._snapshot
        elif role == "timestamp":
            current = _read_metadata(self.metadata_dir / "timestamp.json", Timestamp)
        else:
            current = self._delegated.get(role)
        if current is None:
            raise RepositoryError(f"no metadata for role {role!r}")
        copy: Metadata[Any] = Metadata.from_bytes(current.to_bytes())
        return copy

    def role_keys(self, role: str) -> list[CryptoSigner]:
        """The signers of a top-level role's current keys (for tests crafting metadata, and for rotation).

        Raises:
            RepositoryError: ``role`` is not a top-level role (the fleet does not hold publishers' keys).
            KeyFileError: a key file is missing or unsafe.
        """
        if role not in ROLES:
            raise RepositoryError(f"the fleet holds keys of {list(ROLES)} only, not of {role!r}")
        return self._signers(role)

    def publishers(self) -> dict[str, DelegatedRole]:
        """The current publishers' delegations by name (key ids, threshold, path patterns)."""
        roles = self._targets.signed.delegations.roles if self._targets.signed.delegations else None
        return dict(sorted((roles or {}).items()))

    def publisher_models(self, name: str) -> list[str]:
        """The model names a publisher may publish (from its delegation's ``<model>/*/*`` patterns)."""
        role = self._publisher_role(name)
        return [p.removesuffix("/*/*") for p in role.paths or []]

    def publisher_version(self, name: str) -> int:
        """The version of a publisher's role metadata (0 before its first publish)."""
        md = self._delegated.get(name)
        return 0 if md is None else md.signed.version

    def releases(self, name: str | None = None) -> list[ModelManifest]:
        """The published releases (of one model, or all), from the current publishers' metadata.

        Returns:
            Manifests sorted by model name and version.

        Raises:
            ManifestError: a stored manifest does not parse (the repository was edited by hand).
        """
        out: list[ModelManifest] = []
        for publisher in self.publishers():
            md = self._delegated.get(publisher)
            for path, tf in (md.signed.targets if md else {}).items():
                if not path.endswith(f"/{MODEL_FILE}"):
                    continue
                m = ModelManifest.from_custom(path, tf.custom, length=tf.length, sha256=tf.hashes["sha256"])
                if name is None or m.name == name:
                    out.append(m)
        return sorted(out, key=lambda m: (m.name, version_key(m.version)))

    # -- publishers --------------------------------------------------------------------------------------------------

    def add_publisher(
        self, name: str, public_key: Ed25519PublicKey, models: Sequence[str], *, now: datetime.datetime
    ) -> None:
        """Delegate ``<model>/*/*`` of each model to a new publisher role signed by ``public_key``.

        Args:
            name: the publisher (and its role's) name.
            public_key: the publisher's Ed25519 public key.
            models: the model names it may publish (at least one).
            now: the signing time.

        Raises:
            RepositoryError: invalid or already used name, no models.
            ManifestError: an invalid model name.
        """
        now = _utc(now)
        validate_publisher(name)
        if name in self.publishers():
            raise RepositoryError(f"publisher {name!r} exists already (rotate its key with: publishers rotate)")
        if self._snapshot is not None and f"{name}.json" in self._snapshot.signed.meta:
            raise RepositoryError(
                f"publisher name {name!r} was used by a removed publisher; boxes remember its metadata, choose another"
            )
        names = sorted({validate_name(m) for m in models})
        if not names:
            raise RepositoryError(f"publisher {name!r}: give at least one model it may publish")
        delegations = self._delegations()
        assert delegations.roles is not None
        delegations.roles[name] = DelegatedRole(name, [], 1, True, paths=[f"{m}/*/*" for m in names])
        self._targets.signed.add_key(keys.sslib_key(public_key), name)
        atomic_write(self.fleet_dir / keys.PUBLISHERS_DIR / f"{name}.pub", keys.public_pem(public_key))
        self._bump_targets(now)
        self._commit(now)

    def allow_models(
        self,
        name: str,
        *,
        now: datetime.datetime,
        add: Sequence[str] = (),
        remove: Sequence[str] = (),
        replace: Sequence[str] | None = None,
    ) -> list[str]:
        """Change the models an existing publisher may publish (its delegation's ``<model>/*/*`` paths).

        Args:
            name: the publisher.
            now: the signing time.
            add: model names to add to its list.
            remove: model names to take off it (boxes then stop trusting its releases of them).
            replace: the whole new list (instead of ``add``/``remove``).

        Returns:
            The models it may publish now. Nothing is signed when the list does not change.

        Raises:
            RepositoryError: unknown publisher, or no model would be left.
            ManifestError: an invalid model name.
        """
        now = _utc(now)
        role = self._publisher_role(name)
        current = set(self.publisher_models(name))
        if replace is not None:
            wanted = {validate_name(m) for m in replace}
        else:
            wanted = (current | {validate_name(m) for m in add}) - {validate_name(m) for m in remove}
        if not wanted:
            raise RepositoryError(f"publisher {name!r} would be left with no model (remove it with: publishers remove)")
        if wanted == current:
            return sorted(current)
        role.paths = [f"{m}/*/*" for m in sorted(wanted)]
        self._bump_targets(now)
        self._commit(now)
        return sorted(wanted)

    def rotate_publisher(
        self,
        name: str,
        public_key: Ed25519PublicKey,
        *,
        now: datetime.datetime,
        resign_key: Ed25519PrivateKey | None = None,
    ) -> None:
        """Replace a publisher's key in its delegation; its old key's signatures are no longer accepted.

        Until the publisher signs its role again (its next publish, or ``resign_key`` here), boxes cannot verify its
        releases.

        Args:
            name: the publisher.
            public_key: its new public key.
            now: the signing time.
            resign_key: the new private key, to re-sign the publisher's role right away (used, never stored).

        Raises:
            RepositoryError: unknown publisher, the same key, or ``resign_key`` does not match ``public_key``.
        """
        now = _utc(now)
        role = self._publisher_role(name)
        new = keys.sslib_key(public_key)
        if role.keyids == [new.keyid]:
            raise RepositoryError(f"publisher {name!r} already has key {new.keyid}")
        if resign_key is not None and keys.sslib_key(resign_key.public_key()).keyid != new.keyid:
            raise RepositoryError("the re-signing key is not the new public key's private key")
        for keyid in list(role.keyids):
            self._targets.signed.revoke_key(keyid, name)
        self._targets.signed.add_key(new, name)
        atomic_write(self.fleet_dir / keys.PUBLISHERS_DIR / f"{name}.pub", keys.public_pem(public_key))
        self._bump_targets(now)
        if resign_key is not None and name in self._delegated:
            self._sign_publisher(name, self._delegated[name], resign_key, now)
        self._commit(now)

    def resign_publisher(self, name: str, key: Ed25519PrivateKey, *, now: datetime.datetime) -> None:
        """Sign a publisher's role again (new version, new expiry) without publishing: before it expires.

        Raises:
            RepositoryError: unknown publisher, nothing published yet, or not the publisher's registered key.
        """
        now = _utc(now)
        self._check_publisher_key(name, key)
        md = self._delegated.get(name)
        if md is None:
            raise RepositoryError(f"publisher {name!r} has published nothing yet")
        self._sign_publisher(name, md, key, now)
        self._commit(now)

    def remove_publisher(self, name: str, *, now: datetime.datetime) -> None:
        """Withdraw a publisher's delegation: boxes stop trusting every release it signed.

        Raises:
            RepositoryError: unknown publisher.
        """
        now = _utc(now)
        role = self._publisher_role(name)
        delegations = self._delegations()
        assert delegations.roles is not None
        del delegations.roles[name]
        for keyid in role.keyids:
            if not any(keyid in r.keyids for r in delegations.roles.values()):
                delegations.keys.pop(keyid, None)
        (self.fleet_dir / keys.PUBLISHERS_DIR / f"{name}.pub").unlink(missing_ok=True)
        self._bump_targets(now)
        self._commit(now)

    # -- publishing --------------------------------------------------------------------------------------------------

    def publish(
        self,
        model: Path,
        *,
        name: str,
        version: str,
        publisher: str,
        publisher_key: Ed25519PrivateKey,
        now: datetime.datetime,
        golden: Path | None = None,
        float_variant: Path | None = None,
        tolerance: float = 0.05,
        min_agreement: float = 1.0,
        latency_budget_ms: float | None = None,
        requires: Mapping[str, str] | None = None,
        quantization: str | None = None,
        progress: Progress | None = None,
        check: ReleaseCheck | None = None,
    ) -> ModelManifest:
        """Publish a release: copy its files into the targets, sign the publisher's role, then snapshot and timestamp.

        Args:
            model: the primary ONNX model.
            name, version: the release; must agree with the model's ``edge.name``/``edge.version`` metadata when set.
            publisher: the publisher role that signs it (must be delegated this model).
            publisher_key: the publisher's private key (used to sign, never stored).
            now: the signing time.
            golden: an ``.npz`` with ``inputs`` (and ``outputs``: computed with the primary model when missing).
            float_variant: the float model beside an int8 primary.
            tolerance, min_agreement: the golden check's limits.
            latency_budget_ms: the p50 latency the box must reach, or None.
            requires: minimum runtime versions (default: this onnxruntime's major.minor and edge's version).
            quantization: "int8" or "float" (default: "int8" for a uint8/int8 input, else "float").
            progress: called with (bytes copied, bytes in total) while the release files are copied.
            check: called with the manifest, the variant files (``{"int8"|"float": path}``) and the golden file's
                bytes before anything is copied or signed; raises to refuse the release
                (``edge.fleet.models.precheck.check_release``: the golden samples and latency budget on this machine).

        Returns:
            The manifest as published.

        Raises:
            RepositoryError: unknown publisher or model not delegated to it, wrong key, version not newer, metadata
                contradicting ``name``/``version``, a float variant that does not fit, an unreadable file.
            ManifestError: invalid name, version, golden file or limits.
            ModelError: a model file cannot be loaded.
        """
        from edge.inference.model import Model  # noqa: PLC0415 -- onnxruntime only for publishing

        now = _utc(now)
        validate_name(name)
        vkey = version_key(version)
        role = self._publisher_role(publisher)
        if f"{name}/*/*" not in (role.paths or []):
            raise RepositoryError(
                f"publisher {publisher!r} may not publish {name!r} (it may publish: "
                f"{', '.join(self.publisher_models(publisher)) or 'nothing'})"
            )
        self._check_publisher_key(publisher, publisher_key)
        for old in self.releases(name):
            if version_key(old.version) >= vkey:
                raise RepositoryError(
                    f"{name}@{version} is not newer than the published {old.model_id}: publish a higher version"
                )
        if not (math.isfinite(tolerance) and tolerance >= 0):
            raise ManifestError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
        if not (math.isfinite(min_agreement) and 0 <= min_agreement <= 1):
            raise ManifestError(f"min_agreement must be in [0, 1], got {min_agreement!r}")
        if latency_budget_ms is not None and not (math.isfinite(latency_budget_ms) and latency_budget_ms > 0):
            raise ManifestError(f"latency budget must be a positive number of ms, got {latency_budget_ms!r}")

        primary = Model(model, warmup=0)
        _check_identity(primary.metadata, model, name, version)
        spec = primary.input_spec
        info = InputInfo(spec.name, spec.shape, spec.dtype)
        quant = quantization or ("int8" if spec.dtype in ("uint8", "int8") else "float")
        if quant not in ("int8", "float"):
            raise RepositoryError(f"quantization must be int8 or float, got {quant!r}")
        if float_variant is not None:
            if quant != "int8":
                raise RepositoryError("a float variant is only published beside an int8 primary model")
            fv = Model(float_variant, warmup=0)
            _check_identity(fv.metadata, float_variant, name, version)
            if fv.input_spec.dtype != "float32" or fv.input_spec.shape != spec.shape:
                raise RepositoryError(
                    f"float variant {float_variant} takes {fv.input_spec.dtype}{list(fv.input_spec.shape)}, "
                    f"expected float32{list(spec.shape)}"
                )
        golden_data, golden_count = (None, 0) if golden is None else _golden_bytes(golden, primary, info)
        try:
            preprocess = json.loads(primary.metadata.get("edge.preprocess", "{}"))
        except ValueError as e:  # Model already refused malformed JSON; kept for a clear message
            raise RepositoryError(f"model {model}: edge.preprocess is not JSON") from e

        rel = f"{name}/{version}"
        # What each file must be, from the sources: the manifest (and the publisher's check) come before any copy.
        sources: dict[str, Path | bytes] = {MODEL_FILE: Path(model)}
        expected: dict[str, tuple[str, int]] = {MODEL_FILE: (primary.sha256, _size(Path(model)))}
        if float_variant is not None:
            sources[FLOAT_FILE] = Path(float_variant)
            expected[FLOAT_FILE] = (fv.sha256, _size(Path(float_variant)))
        if golden_data is not None:
            sources[GOLDEN_FILE] = golden_data
            expected[GOLDEN_FILE] = (hashlib.sha256(golden_data).hexdigest(), len(golden_data))
        sha, length = expected[MODEL_FILE]

        def companion(filename: str) -> Companion | None:
            if filename not in expected:
                return None
            return Companion(target_path(name, version, filename), *expected[filename])

        golden_file = companion(GOLDEN_FILE)
        manifest = ModelManifest(
            name=name,
            version=version,
            sha256=sha,
            length=length,
            quantization="int8" if quant == "int8" else "float",
            input=info,
            preprocess=preprocess,
            latency_budget_ms=latency_budget_ms,
            requires=dict(requires) if requires is not None else default_requires(),
            golden=None
            if golden_file is None
            else GoldenSpec(golden_file, golden_count, float(tolerance), float(min_agreement)),
            float_variant=companion(FLOAT_FILE),
            publisher=publisher,
        )
        custom = manifest.to_custom()
        # Round trip through the box's parser: what cannot be read back is never signed.
        ModelManifest.from_custom(manifest.path, custom, length=length, sha256=sha)
        if check is not None:
            variants: dict[str, Path] = {manifest.quantization: Path(model)}
            if float_variant is not None:
                variants["float"] = Path(float_variant)
            check(manifest, variants, golden_data)

        total = sum(s.stat().st_size if isinstance(s, Path) else len(s) for s in sources.values())
        copier = _Copier(self.targets_dir / rel, total, progress)
        stored = {filename: copier.store(filename, src) for filename, src in sources.items()}
        for filename, want in expected.items():
            if stored[filename] != want:
                src = sources[filename]
                what = src if isinstance(src, Path) else f"the golden samples of {name}@{version}"
                raise RepositoryError(f"{what} changed while it was being published: publish again")

        md = self._delegated.get(publisher)
        if md is None:
            md = Metadata(Targets(expires=now))
            md.signed.version = 0  # the first signature makes it version 1
        kinds = {MODEL_FILE: custom, FLOAT_FILE: _kind("variant"), GOLDEN_FILE: _kind("golden")}
        for filename, (file_sha, file_len) in stored.items():
            path = target_path(name, version, filename)
            md.signed.targets[path] = TargetFile(
                file_len, {"sha256": file_sha}, path, unrecognized_fields={"custom": kinds[filename]}
            )
        self._sign_publisher(publisher, md, publisher_key, now)
        self._commit(now)
        return manifest

    # -- keys and freshness ------------------------------------------------------------------------------------------

    def rotate_key(self, role: str, *, now: datetime.datetime) -> list[str]:
        """Replace every key of a top-level role by a new one (as many as it had, at least its threshold).

        A new root version lists the new keys; a new root key set is signed by the old root keys and the new ones
        (the chain a client follows). The role's metadata is re-signed with the new keys, then snapshot and
        timestamp. The old private keys are deleted.

        Args:
            role: root, targets, snapshot or timestamp (publishers: :meth:`rotate_publisher`).
            now: the signing time.

        Returns:
            The new key ids.

        Raises:
            RepositoryError: not a top-level role.
            KeyFileError: a current key file is missing or unsafe.
        """
        now = _utc(now)
        if role not in ROLES:
            raise RepositoryError(f"rotate_key takes one of {list(ROLES)}; a publisher's key: publishers rotate")
        current = self._root.signed.roles[role]
        old_ids = list(current.keyids)
        old_root_signers = self._signers("root")
        self._signers(role)  # fail before anything is generated when a current key is missing
        new_ids = []
        for _ in range(max(len(old_ids), current.threshold)):
            key = Ed25519PrivateKey.generate()
            new_ids.append(keys.write_role_key(self.fleet_dir, role, key))
            self._root.signed.add_key(keys.sslib_key(key.public_key()), role)
        for keyid in old_ids:
            self._root.signed.revoke_key(keyid, role)
        self._root.signed.version += 1
        self._root.signed.expires = now + datetime.timedelta(days=self.expiry_days["root"])
        new_signers = self._signers("root") if role == "root" else []
        _sign(self._root, [*old_root_signers, *new_signers])
        self._write_root()
        if role == "targets":
            self._bump_targets(now)
        self._commit(now)
        for keyid in old_ids:
            keys.delete_role_key(self.fleet_dir, role, keyid)
        return new_ids

    def refresh(self, *, now: datetime.datetime) -> None:
        """Sign a new snapshot and timestamp (run from a timer well before the timestamp expires)."""
        self._commit(_utc(now))

    def expiries(self) -> dict[str, datetime.datetime]:
        """When each role's current metadata expires (top-level roles and published publishers' roles)."""
        out = {
            "root": self._root.signed.expires,
            "targets": self._targets.signed.expires,
            "timestamp": self.metadata("timestamp").signed.expires,
        }
        if self._snapshot is not None:
            out["snapshot"] = self._snapshot.signed.expires
        for name in self.publishers():
            if name in self._delegated:
                out[name] = self._delegated[name].signed.expires
        return out

    # -- internals ---------------------------------------------------------------------------------------------------

    def _signers(self, role: str) -> list[CryptoSigner]:
        return keys.load_role_signers(self.fleet_dir, role, list(self._root.signed.roles[role].keyids))

    def _delegations(self) -> Delegations:
        if self._targets.signed.delegations is None:
            self._targets.signed.delegations = Delegations(keys={}, roles={})
        return self._targets.signed.delegations

    def _publisher_role(self, name: str) -> DelegatedRole:
        role = self.publishers().get(name)
        if role is None:
            raise RepositoryError(f"no publisher {name!r} (add it with: edge fleet publishers add)")
        return role

    def _check_publisher_key(self, name: str, key: Ed25519PrivateKey) -> None:
        keyid = keys.sslib_key(key.public_key()).keyid
        if keyid not in self._publisher_role(name).keyids:
            raise RepositoryError(f"the key {keyid[:16]}... is not publisher {name!r}'s registered key")

    def _write(self, md: Metadata[Any], filename: str) -> None:
        atomic_write(self.metadata_dir / filename, md.to_bytes())

    def _write_root(self) -> None:
        data = self._root.to_bytes()
        atomic_write(self.metadata_dir / f"{self._root.signed.version}.root.json", data)
        atomic_write(self.metadata_dir / "root.json", data)

    def _bump_targets(self, now: datetime.datetime) -> None:
        self._targets.signed.version += 1
        self._targets.signed.expires = now + datetime.timedelta(days=self.expiry_days["targets"])
        _sign(self._targets, self._signers("targets"))
        self._write(self._targets, f"{self._targets.signed.version}.targets.json")

    def _sign_publisher(self, name: str, md: Metadata[Targets], key: Ed25519PrivateKey, now: datetime.datetime) -> None:
        md.signed.version += 1
        md.signed.expires = now + datetime.timedelta(days=self.expiry_days["publishers"])
        _sign(md, [CryptoSigner(key, keys.sslib_key(key.public_key()))])
        try:
            self._targets.verify_delegate(name, md)
        except UnsignedMetadataError as e:
            raise RepositoryError(f"publisher {name!r}'s metadata does not verify against its delegation") from e
        self._write(md, f"{md.signed.version}.{name}.json")
        self._delegated[name] = md

    def _commit(self, now: datetime.datetime) -> None:
        """Sign and write a snapshot of the current role versions, then the timestamp pointing at it."""
        meta = dict(self._snapshot.signed.meta) if self._snapshot is not None else {}
        meta["targets.json"] = MetaFile(self._targets.signed.version)
        for name, md in self._delegated.items():
            meta[f"{name}.json"] = MetaFile(md.signed.version)
        version = self._snapshot.signed.version + 1 if self._snapshot is not None else 1
        snapshot = Metadata(
            Snapshot(version=version, expires=now + datetime.timedelta(days=self.expiry_days["snapshot"]), meta=meta)
        )
        _sign(snapshot, self._signers("snapshot"))
        data = snapshot.to_bytes()
        atomic_write(self.metadata_dir / f"{version}.snapshot.json", data)
        self._timestamp_version += 1
        timestamp = Metadata(
            Timestamp(
                version=self._timestamp_version,
                expires=now + datetime.timedelta(days=self.expiry_days["timestamp"]),
                snapshot_meta=MetaFile(version, len(data), {"sha256": hashlib.sha256(data).hexdigest()}),
                unrecognized_fields={ISSUED_FIELD: issued_text(now)},
            )
        )
        _sign(timestamp, self._signers("timestamp"))
        self._write(timestamp, "timestamp.json")
        self._snapshot = snapshot


# -- publishing helpers -----------------------------------------------------------------------------------------------


def _kind(kind: str) -> dict[str, Any]:
    return {"edge": {"kind": kind}}


def default_requires() -> dict[str, str]:
    """The runtime minimums a release requires unless its publisher says otherwise: the publishing machine's
    onnxruntime (major.minor) and edge versions."""
    ort = importlib.metadata.version("onnxruntime")
    return {"onnxruntime": ".".join(ort.split(".")[:2]), "edge": edge.__version__}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise RepositoryError(f"cannot read {path}: {e.strerror or e}") from e


def _check_identity(metadata: Mapping[str, str], path: Path, name: str, version: str) -> None:
    """Refuse a model whose own ``edge.name``/``edge.version`` metadata says it is another release."""
    meta_name = metadata.get("edge.name")
    if meta_name is not None and meta_name != name:
        raise RepositoryError(f"model {path} says it is {meta_name!r} (edge.name), not {name!r}")
    meta_version = metadata.get("edge.version")
    if meta_version is not None:
        try:
            same = version_key(meta_version) == version_key(version)
        except ManifestError:
            same = False
        if not same:
            raise RepositoryError(f"model {path} says it is version {meta_version!r} (edge.version), not {version!r}")


def _golden_bytes(path: Path, model: Any, info: InputInfo) -> tuple[bytes, int]:
    """The golden file to publish: as given, or with ``outputs`` computed by ``model`` when it has only inputs."""
    try:
        data = read_bounded(path, MAX_GOLDEN_BYTES)
    except TooLargeError as e:
        raise ManifestError(f"golden file {e}") from e
    except OSError as e:
        raise RepositoryError(f"cannot read golden file {path}: {e.strerror or e}") from e
    try:
        # The box's reader and its limits: every declared size checked before anything is allocated from it.
        with NpzArchive(data, GOLDEN_LIMITS, label=f"golden file {path}") as z:
            files = set(z.names)
            inputs = z.read("inputs") if "inputs" in files else None
    except InputError as e:
        raise ManifestError(str(e)) from e
    if inputs is None:
        raise ManifestError(f"golden file {path} has no 'inputs' array")
    if files == {"inputs"}:
        want = tuple(info.shape[1:])
        if str(inputs.dtype) != info.dtype or inputs.ndim < 2 or tuple(inputs.shape[1:]) != want:
            raise ManifestError(
                f"golden inputs are {inputs.dtype}{list(inputs.shape[1:])}, the model takes {info.dtype}{list(want)}"
            )
        outputs = np.stack(
            [
                np.asarray(model.run(np.ascontiguousarray(inputs[i : i + 1])), dtype=np.float32).reshape(-1)
                for i in range(inputs.shape[0])
            ]
        )
        buf = io.BytesIO()
        np.savez(buf, inputs=inputs, outputs=outputs)
        data = buf.getvalue()
    return data, len(parse_golden(data, input_info=info))


class _Copier:
    """Copies release files into ``<sha256>.<file>`` names below one release directory, reporting progress."""

    def __init__(self, directory: Path, total: int, progress: Progress | None) -> None:
        self.directory = directory
        self.total = total
        self.done = 0
        self.progress = progress

    def store(self, filename: str, src: Path | bytes) -> tuple[str, int]:
        """Copy one file (or bytes) durably; returns its SHA-256 and length."""
        self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        digest = hashlib.sha256()
        length = 0
        fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", suffix=".tmp", dir=self.directory)
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb") as out:
                for chunk in self._chunks(src):
                    out.write(chunk)
                    digest.update(chunk)
                    length += len(chunk)
                    self.done += len(chunk)
                    if self.progress is not None:
                        self.progress(self.done, self.total)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            os.replace(tmp, self.directory / f"{sha}.{filename}")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(self.directory)
        return sha, length

    @staticmethod
    def _chunks(src: Path | bytes) -> Any:
        if isinstance(src, bytes):
            yield src
            return
        try:
            with open(src, "rb") as f:
                while chunk := f.read(_COPY_CHUNK):
                    yield chunk
        except OSError as e:
            raise RepositoryError(f"cannot read {src}: {e.strerror or e}") from e
