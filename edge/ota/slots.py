"""The two model slots (A/B) under the data directory, the ``active`` link between them, and the factory model.

Layout of ``models_dir``::

    a/, b/      model.onnx [model-float.onnx] [golden.npz] manifest.json
    active      symbolic link to "a" or "b"; absent: the factory model (read-only, shipped in the image)

Invariants:

- ``active`` only ever points at a slot whose ``manifest.json`` is committed and whose chosen file's SHA-256
  matches it: the updater writes the committed manifest before it switches the link.
- The link is switched atomically: a temporary link is made beside it and renamed over it, then the directory is
  fsynced. A crash leaves either the old link or the new one.
- Reading never trusts the disk: :meth:`Slots.active` re-validates the slot, and when anything is wrong (a missing,
  partial or tampered file, an unparsable manifest) it logs why and answers the factory model. A partial file is
  never run.
- A slot's ``manifest.json`` is written before its files (``variant`` null: "being written") so that a slot in the
  middle of a download is recognisably incomplete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from edge._fs import atomic_write, fsync_dir
from edge.errors import InputError
from edge.log import event
from edge.ota import _faults
from edge.ota.errors import OtaError, SlotBusyError
from edge.wire.errors import ManifestError
from edge.wire.manifest import FLOAT_FILE, GOLDEN_FILE, MODEL_FILE, ModelManifest, target_path

__all__ = ["ActiveModel", "SlotInvalid", "SlotName", "SlotRecord", "Slots", "file_sha256", "release_files"]

log = logging.getLogger("edge.ota.slots")

SlotName = Literal["a", "b"]
Variant = Literal["int8", "float"]
SLOTS: Final[tuple[SlotName, SlotName]] = ("a", "b")
ACTIVE_LINK: Final = "active"
MANIFEST: Final = "manifest.json"
_TMP_LINK: Final = ".active.tmp"
_MAX_MANIFEST_BYTES: Final = 1 << 20
_CHUNK: Final = 1 << 20


class SlotInvalid(OtaError, InputError):  # noqa: N818 -- names the condition
    """A slot's manifest or files are missing, malformed or do not match (the slot must not run)."""

    reason = "slot_invalid"


@dataclass(frozen=True, slots=True)
class SlotRecord:
    """A slot's ``manifest.json``.

    Attributes:
        manifest: the release's manifest as signed by its publisher.
        variant: the chosen variant ("int8" or "float"), None while the slot is being written.
        file: the file the box runs (``model.onnx`` or ``model-float.onnx``), None while being written.
        sha256: that file's SHA-256, None while being written.
        committed_at: epoch seconds of the commit, None before it.
    """

    manifest: ModelManifest
    variant: Variant | None
    file: str | None
    sha256: str | None
    committed_at: float | None


@dataclass(frozen=True, slots=True)
class ActiveModel:
    """The model the box runs.

    Attributes:
        slot: "a", "b" or "factory".
        path: the model file to load.
        manifest: the release manifest (None for the factory model).
        sha256: the file's SHA-256 (verified when this object was made).
    """

    slot: Literal["a", "b", "factory"]
    path: Path
    manifest: ModelManifest | None
    sha256: str


def file_sha256(path: Path) -> str:
    """The SHA-256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class Slots:
    """The A/B slots and the active link.

    Args:
        models_dir: ``<data>/models`` (created when missing).
        factory: the read-only factory model file.
    """

    def __init__(self, models_dir: Path, factory: Path) -> None:
        self.models_dir = models_dir
        self.factory = factory
        self._factory_sha: tuple[tuple[int, int], str] | None = None

    # -- reading ---------------------------------------------------------------------------------------------------

    def slot_dir(self, slot: SlotName) -> Path:
        """The directory of ``slot``."""
        if slot not in SLOTS:
            raise ValueError(f"no slot {slot!r}")
        return self.models_dir / slot

    def active_slot(self) -> SlotName | None:
        """The slot the ``active`` link names (unvalidated), or None for the factory model."""
        try:
            target = os.readlink(self.models_dir / ACTIVE_LINK)
        except FileNotFoundError:
            return None
        except OSError as e:  # e.g. a regular file where the link belongs
            event(log, logging.WARNING, "active link unreadable, running the factory model", error=str(e))
            return None
        if target == "a":
            return "a"
        if target == "b":
            return "b"
        event(log, logging.WARNING, "active link names no slot, running the factory model", target=target[:80])
        return None

    def active(self) -> ActiveModel:
        """The model to run: the active slot when it is valid, else the factory model (logging why)."""
        slot = self.active_slot()
        if slot is not None:
            try:
                record = self.validate(slot)
            except SlotInvalid as e:
                event(log, logging.ERROR, "active slot invalid, running the factory model", slot=slot, error=str(e))
            else:
                if record.committed_at is not None and record.file is not None and record.sha256 is not None:
                    return ActiveModel(slot, self.slot_dir(slot) / record.file, record.manifest, record.sha256)
                event(log, logging.ERROR, "active slot was never committed, running the factory model", slot=slot)
        return ActiveModel("factory", self.factory, None, self._factory_sha256())

    def inactive_slot(self) -> SlotName:
        """The slot an update may write: the one ``active`` does not name ("a" when the factory model runs)."""
        return "b" if self.active_slot() == "a" else "a"

    def read_record(self, slot: SlotName) -> SlotRecord:
        """Parse ``slot``'s ``manifest.json`` strictly (files are not checked).

        Raises:
            SlotInvalid: missing, unreadable or malformed.
        """
        path = self.slot_dir(slot) / MANIFEST
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                # Never read an oversized file whole: the size from the stat, then one byte more to see growth.
                data = f.read(size + 1) if size <= _MAX_MANIFEST_BYTES else b""
        except OSError as e:
            raise SlotInvalid(f"slot {slot}: cannot read {MANIFEST} ({e.strerror or e})") from e
        if size > _MAX_MANIFEST_BYTES or len(data) > size:
            raise SlotInvalid(
                f"slot {slot}: {path} is {max(size, len(data))} bytes or growing, the limit is {_MAX_MANIFEST_BYTES}"
            )
        try:
            body = json.loads(data)
            return _record(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ManifestError) as e:
            raise SlotInvalid(f"slot {slot}: {MANIFEST} is malformed ({e})") from e

    def validate(self, slot: SlotName) -> SlotRecord:
        """Parse ``slot``'s manifest and check that the chosen file exists with the recorded SHA-256 and length.

        Raises:
            SlotInvalid: the slot is incomplete (being written), malformed or does not match.
        """
        record = self.read_record(slot)
        if record.file is None or record.sha256 is None or record.variant is None:
            raise SlotInvalid(f"slot {slot}: {record.manifest.model_id} is incomplete (being written)")
        path = self.slot_dir(slot) / record.file
        try:
            digest = file_sha256(path)
        except OSError as e:
            raise SlotInvalid(f"slot {slot}: cannot read {record.file} ({e.strerror or e})") from e
        if digest != record.sha256:
            raise SlotInvalid(f"slot {slot}: {record.file} has SHA-256 {digest}, its manifest says {record.sha256}")
        return record

    # -- writing ---------------------------------------------------------------------------------------------------

    def clear(self, slot: SlotName) -> None:
        """Empty ``slot`` (its manifest first, so a crash midway leaves a slot that is recognisably invalid).

        Raises:
            SlotBusyError: ``slot`` is the active one (never clear what runs).
        """
        if slot == self.active_slot():
            raise SlotBusyError(f"refusing to clear slot {slot}: it is active")
        d = self.slot_dir(slot)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(d / MANIFEST)
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True, exist_ok=True)
        fsync_dir(d)
        fsync_dir(self.models_dir)

    def write_manifest(
        self,
        slot: SlotName,
        manifest: ModelManifest,
        *,
        variant: Variant | None = None,
        committed_at: float | None = None,
        point: Literal["stage", "commit"] | None = None,
    ) -> SlotRecord:
        """Write ``slot``'s ``manifest.json`` atomically.

        Args:
            slot: the slot.
            manifest: the release.
            variant: the file the box will run (None: the slot is being written).
            committed_at: epoch seconds of the commit (None: staged, not committed).
            point: fault point prefix (``slot.<point>.written`` / ``.renamed``), None for no fault points.

        Returns:
            What was written.
        """
        file: str | None = None
        sha: str | None = None
        if variant is not None:
            file, sha = _chosen_file(manifest, variant)
        body = {
            "manifest": manifest.to_custom()["edge"],
            "variant": variant,
            "file": file,
            "sha256": sha,
            "committed_at": committed_at,
        }
        d = self.slot_dir(slot)
        d.mkdir(parents=True, exist_ok=True)
        data = json.dumps(body, sort_keys=True, indent=1).encode() + b"\n"
        hook = None if point is None else (lambda step: _faults.checkpoint(f"slot.{point}.{step}"))
        atomic_write(d / MANIFEST, data, checkpoint=hook)
        return SlotRecord(manifest, variant, file, sha, committed_at)

    def activate(self, slot: SlotName) -> None:
        """Make ``slot`` active atomically (a temporary link renamed over ``active``; the directory fsynced).

        Raises:
            SlotInvalid: the slot is not a valid committed slot (the link is not touched).
        """
        record = self.validate(slot)
        if record.committed_at is None:
            raise SlotInvalid(f"slot {slot}: not committed, refusing to activate it")
        tmp = self.models_dir / _TMP_LINK
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # left by a crash between making and renaming it
        os.symlink(slot, tmp)
        _faults.checkpoint("activate.link_made")
        os.replace(tmp, self.models_dir / ACTIVE_LINK)
        _faults.checkpoint("activate.renamed")
        fsync_dir(self.models_dir)

    def activate_factory(self) -> None:
        """Run the factory model: remove the ``active`` link (an unlink is atomic) and fsync the directory."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.models_dir / ACTIVE_LINK)
        fsync_dir(self.models_dir)

    def _factory_sha256(self) -> str:
        st = self.factory.stat()
        key = (st.st_size, st.st_mtime_ns)
        if self._factory_sha is None or self._factory_sha[0] != key:
            self._factory_sha = (key, file_sha256(self.factory))
        return self._factory_sha[1]


def _chosen_file(manifest: ModelManifest, variant: Variant) -> tuple[str, str]:
    if variant == manifest.quantization:
        return MODEL_FILE, manifest.sha256
    if variant == "float" and manifest.float_variant is not None:
        return FLOAT_FILE, manifest.float_variant.sha256
    raise ManifestError(f"{manifest.model_id} offers no {variant} variant")


def release_files(manifest: ModelManifest) -> dict[str, tuple[str, str, int]]:
    """The files of a release: file name -> (target path, SHA-256, length), the primary model first."""
    files = {MODEL_FILE: (manifest.path, manifest.sha256, manifest.length)}
    if manifest.float_variant is not None:
        fv = manifest.float_variant
        files[FLOAT_FILE] = (fv.path, fv.sha256, fv.length)
    if manifest.golden is not None:
        g = manifest.golden.file
        files[GOLDEN_FILE] = (g.path, g.sha256, g.length)
    return files


def _record(body: Any) -> SlotRecord:
    if not isinstance(body, dict) or set(body) != {"manifest", "variant", "file", "sha256", "committed_at"}:
        raise ManifestError("slot manifest must hold exactly manifest, variant, file, sha256, committed_at")
    inner = body["manifest"]
    if not isinstance(inner, dict):
        raise ManifestError("slot manifest 'manifest' must be an object")
    name, version = inner.get("name"), inner.get("version")
    if not isinstance(name, str) or not isinstance(version, str):
        raise ManifestError("slot manifest names no model")
    sha, length = inner.get("sha256"), inner.get("length")
    if not isinstance(sha, str) or isinstance(length, bool) or not isinstance(length, int):
        raise ManifestError("slot manifest lacks the model's sha256/length")
    manifest = ModelManifest.from_custom(target_path(name, version), {"edge": inner}, length=length, sha256=sha)
    variant = body["variant"]
    committed_at = body["committed_at"]
    if variant is None:
        if body["file"] is not None or body["sha256"] is not None or committed_at is not None:
            raise ManifestError("a slot being written (variant null) has no file, sha256 or commit time")
        return SlotRecord(manifest, None, None, None, None)
    if variant not in ("int8", "float"):
        raise ManifestError(f"slot variant must be int8, float or null, got {variant!r:.40}")
    file, sha256 = _chosen_file(manifest, variant)
    if body["file"] != file or body["sha256"] != sha256:
        raise ManifestError(f"slot file/sha256 do not match the manifest's {variant} variant")
    if committed_at is not None and (
        isinstance(committed_at, bool) or not isinstance(committed_at, int | float) or not math.isfinite(committed_at)
    ):
        raise ManifestError(f"slot committed_at must be a finite number or null, got {committed_at!r:.40}")
    return SlotRecord(manifest, variant, file, sha256, None if committed_at is None else float(committed_at))
