"""The A/B slots: the atomic switch of ``active``, validation by SHA-256, and the fall-back to the factory model."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from box_helpers import FACTORY

from edge.ota.errors import OtaError
from edge.ota.slots import MANIFEST, SlotInvalid, Slots, file_sha256
from edge.wire.manifest import InputInfo, ModelManifest

DATA = FACTORY.read_bytes()


def _manifest(data: bytes = DATA, version: str = "2.0.0") -> ModelManifest:
    return ModelManifest(
        name="digits",
        version=version,
        sha256=hashlib.sha256(data).hexdigest(),
        length=len(data),
        quantization="int8",
        input=InputInfo("input", (1, 1, 28, 28), "uint8"),
        preprocess={"mean": 0.5},
        requires={"onnxruntime": "1.17"},
    )


def _committed(slots: Slots, slot: str, data: bytes = DATA, version: str = "2.0.0") -> None:
    slots.clear(slot)  # type: ignore[arg-type]
    (slots.slot_dir(slot) / "model.onnx").write_bytes(data)  # type: ignore[arg-type]
    slots.write_manifest(slot, _manifest(data, version), variant="int8", committed_at=1.0)  # type: ignore[arg-type]


@pytest.fixture
def slots(tmp_path: Path) -> Slots:
    (tmp_path / "models").mkdir()
    return Slots(tmp_path / "models", FACTORY)


def test_no_link_runs_the_factory_model(slots: Slots) -> None:
    active = slots.active()
    assert (active.slot, active.path, active.manifest) == ("factory", FACTORY, None)
    assert active.sha256 == file_sha256(FACTORY)
    assert slots.inactive_slot() == "a"


def test_activate_switches_the_link_atomically(slots: Slots) -> None:
    _committed(slots, "a")
    slots.activate("a")
    link = slots.models_dir / "active"
    assert link.is_symlink() and os.readlink(link) == "a"
    active = slots.active()
    assert (active.slot, active.manifest.model_id) == ("a", "digits@2.0.0")  # type: ignore[union-attr]
    assert slots.inactive_slot() == "b"
    _committed(slots, "b", version="3.0.0")
    ino = link.lstat().st_ino
    slots.activate("b")
    assert os.readlink(link) == "b" and link.lstat().st_ino != ino  # a new link renamed over the old one
    assert not (slots.models_dir / ".active.tmp").exists()
    slots.activate_factory()
    assert slots.active().slot == "factory"


def test_stale_temp_link_from_a_crash_is_replaced(slots: Slots) -> None:
    _committed(slots, "a")
    os.symlink("b", slots.models_dir / ".active.tmp")
    slots.activate("a")
    assert os.readlink(slots.models_dir / "active") == "a"


def test_activate_refuses_uncommitted_or_incomplete_slots(slots: Slots) -> None:
    slots.clear("a")
    slots.write_manifest("a", _manifest())  # being written: no variant yet
    with pytest.raises(SlotInvalid, match="incomplete"):
        slots.activate("a")
    (slots.slot_dir("a") / "model.onnx").write_bytes(DATA)
    slots.write_manifest("a", _manifest(), variant="int8")  # staged, not committed
    with pytest.raises(SlotInvalid, match="not committed"):
        slots.activate("a")
    assert not (slots.models_dir / "active").exists()


@pytest.mark.parametrize(
    "damage",
    ["truncate", "flip", "remove_model", "remove_manifest", "garble_manifest", "wrong_sha_in_manifest", "bad_link"],
)
def test_invalid_active_slot_falls_back_to_factory(slots: Slots, damage: str) -> None:
    _committed(slots, "a")
    slots.activate("a")
    model, manifest = slots.slot_dir("a") / "model.onnx", slots.slot_dir("a") / MANIFEST
    if damage == "truncate":
        model.write_bytes(DATA[: len(DATA) // 2])
    elif damage == "flip":
        model.write_bytes(DATA[:-1] + bytes([DATA[-1] ^ 1]))
    elif damage == "remove_model":
        model.unlink()
    elif damage == "remove_manifest":
        manifest.unlink()
    elif damage == "garble_manifest":
        manifest.write_text('{"manifest": ')
    elif damage == "wrong_sha_in_manifest":
        body = json.loads(manifest.read_text())
        body["sha256"] = "0" * 64
        manifest.write_text(json.dumps(body))
    else:
        (slots.models_dir / "active").unlink()
        os.symlink("../../etc", slots.models_dir / "active")
    active = slots.active()
    assert (active.slot, active.path) == ("factory", FACTORY)


def test_validate_checks_sha256(slots: Slots) -> None:
    _committed(slots, "b")
    assert slots.validate("b").sha256 == hashlib.sha256(DATA).hexdigest()
    (slots.slot_dir("b") / "model.onnx").write_bytes(b"x" + DATA[1:])
    with pytest.raises(SlotInvalid, match="SHA-256"):
        slots.validate("b")


def test_clear_refuses_the_active_slot(slots: Slots) -> None:
    _committed(slots, "a")
    slots.activate("a")
    with pytest.raises(OtaError, match="active"):
        slots.clear("a")
    slots.clear("b")
    assert list(slots.slot_dir("b").iterdir()) == []
