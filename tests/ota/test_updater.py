"""The installer against real parts: a TUF repository signed by real keys (H1's helpers), served by a loopback HTTP
server, the real TUF client, the real health gate (onnxruntime sessions) and real files in a box data directory.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from box_helpers import FACTORY, assert_valid_active, make_updater, utc_now
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from repo_helpers import PUBLISHER, digits_release_files, make_golden, ready_repository
from static_server import StaticServer

from edge.fleet.models.repository import FleetRepository
from edge.ota.slots import Slots
from edge.ota.state import StateFile

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "models"))
import ota_models as om  # noqa: E402


@dataclass
class Fleet:
    repo: FleetRepository
    key: Ed25519PrivateKey
    server: StaticServer
    root: bytes


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """digits 1.0.0 and 2.0.0 (good), 3.0.0 (needs onnxruntime 999), 4.0.0 (wrong outputs), served on loopback."""
    d = tmp_path_factory.mktemp("fleet")
    now = utc_now()
    repo, key = ready_repository(d, now=now, versions=("1.0.0", "2.0.0"))
    work = d / "work"
    v3 = digits_release_files(work, "3.0.0")
    repo.publish(
        v3,
        name="digits",
        version="3.0.0",
        publisher=PUBLISHER,
        publisher_key=key,
        now=now,
        golden=make_golden(v3, work / "golden-3.npz"),
        requires={"onnxruntime": "999"},
    )
    v4 = om.broken(FACTORY, work / "broken-4.onnx", "4.0.0")
    golden4 = work / "golden-4.npz"
    om.golden(v4, golden4, reference=FACTORY)
    repo.publish(
        v4,
        name="digits",
        version="4.0.0",
        publisher=PUBLISHER,
        publisher_key=key,
        now=now,
        golden=work / "golden-4.npz",
    )
    with StaticServer(repo.repository_dir) as server:
        yield Fleet(repo, key, server, repo.root_bytes())


@pytest.fixture
def server(fleet: Fleet) -> Iterator[StaticServer]:
    yield fleet.server
    fleet.server.clear()


def test_happy_path_factory_to_v2_committed(tmp_path: Path, fleet: Fleet) -> None:
    up, rec = make_updater(tmp_path, fleet.server.url, fleet.root)
    committed = []
    up.on_commit = lambda result, active: committed.append((result.model.model_id, active.slot))
    assert up.status()["active"] == {
        "slot": "factory",
        "model": "digits@1.0.0",
        "sha256": Slots(tmp_path / "models", FACTORY).active().sha256,
        "path": str(FACTORY),
    }

    out = up.update("digits", "2.0.0", rollout="r1")

    assert (out.state, out.model, out.reason, out.variant) == ("committed", "digits@2.0.0", None, "int8")
    assert out.latency_ms is not None and out.latency_ms > 0
    assert set(out.timings) >= {"download", "verify", "trial", "commit", "total"}
    assert rec.kinds == [
        "ota.downloading",
        "ota.verifying",
        "ota.staged",
        "ota.trial",
        "ota.committed",
        "ota.idle",
    ]
    first, commit = rec.events[0][1], rec.events[4][1]
    assert first == {
        "model": "digits",
        "version": "2.0.0",
        "from": "digits@1.0.0",
        "slot": "a",
        "reason": None,
        "rollout": "r1",
    }
    assert commit["variant"] == "int8" and commit["latency_ms"] > 0
    assert all(isinstance(v, int | float | str | bool | type(None)) for _, d in rec.events for v in d.values())
    assert committed == [("digits@2.0.0", "a")]
    active = assert_valid_active(tmp_path)
    assert active.slot == "a" and os.readlink(tmp_path / "models" / "active") == "a"
    st = up.status()
    assert (st["state"], st["model"], st["active"]["model"], st["failed"]) == (
        "idle",
        "digits@2.0.0",
        "digits@2.0.0",
        [],
    )
    assert up.recover() is None


def test_not_newer_refused_unless_forced(tmp_path: Path, fleet: Fleet) -> None:
    up, rec = make_updater(tmp_path, fleet.server.url, fleet.root)
    out = up.update("digits", "1.0.0")
    assert (out.state, out.reason) == ("refused", "not_newer")
    assert rec.kinds == ["ota.refused"] and rec.events[0][1]["reason"] == "not_newer"
    assert not (tmp_path / "ota" / "state.json").exists()

    forced = up.update("digits", "1.0.0", force=True)
    assert forced.state == "committed"
    assert assert_valid_active(tmp_path).manifest.model_id == "digits@1.0.0"  # type: ignore[union-attr]


def test_incompatible_runtime_rolls_back_and_is_never_retried_unless_forced(tmp_path: Path, fleet: Fleet) -> None:
    up, rec = make_updater(tmp_path, fleet.server.url, fleet.root)
    out = up.update("digits", "3.0.0")
    assert (out.state, out.reason) == ("rolled_back", "incompatible")
    assert rec.kinds == ["ota.downloading", "ota.verifying", "ota.rolled_back"]
    assert rec.events[-1][1]["reason"] == "incompatible"
    assert assert_valid_active(tmp_path).slot == "factory"
    assert list((tmp_path / "models" / "a").iterdir()) == []  # the staging slot was cleared
    assert up.status()["failed"] == ["digits@3.0.0"]

    again = up.update("digits", "3.0.0")
    assert (again.state, again.reason) == ("refused", "failed_before")
    assert rec.kinds[-1] == "ota.refused"

    forced = up.update("digits", "3.0.0", force=True)
    assert (forced.state, forced.reason) == ("rolled_back", "incompatible")  # tried again, still incompatible


def test_wrong_outputs_rolls_back_keeping_the_running_model(tmp_path: Path, fleet: Fleet) -> None:
    up, rec = make_updater(tmp_path, fleet.server.url, fleet.root)
    assert up.update("digits", "2.0.0").state == "committed"
    out = up.update("digits", "4.0.0")
    assert (out.state, out.reason) == ("rolled_back", "wrong_outputs")
    assert rec.kinds[-2:] == ["ota.trial", "ota.rolled_back"]
    active = assert_valid_active(tmp_path)
    assert (active.slot, active.manifest.model_id) == ("a", "digits@2.0.0")  # type: ignore[union-attr]
    assert list((tmp_path / "models" / "b").iterdir()) == []
    assert "digits@4.0.0" in up.status()["failed"]


def test_network_failure_is_transient_and_retried(tmp_path: Path, fleet: Fleet, server: StaticServer) -> None:
    up, _ = make_updater(tmp_path, server.url, fleet.root)
    manifest = fleet.repo.releases("digits")[1]
    assert manifest.version == "2.0.0"
    model_url = f"targets/digits/2.0.0/{manifest.sha256}.model.onnx"
    server.cut_after(model_url, 1000)
    before = server.bytes_sent(f"{manifest.sha256}.model.onnx")  # the server is shared by the module's tests

    out = up.update("digits", "2.0.0")

    assert (out.state, out.reason) == ("rolled_back", "network")
    assert up.status()["failed"] == []
    assert assert_valid_active(tmp_path).slot == "factory"
    retry = up.update("digits", "2.0.0")
    assert retry.state == "committed"
    # The retry resumed the cut download: the model's bytes crossed the wire about once.
    assert server.bytes_sent(f"{manifest.sha256}.model.onnx") - before <= manifest.length + 1000


def test_revert_returns_to_the_previous_slot_then_factory(tmp_path: Path, fleet: Fleet) -> None:
    up, rec = make_updater(tmp_path, fleet.server.url, fleet.root)
    reverted = []
    up.on_revert = lambda active: reverted.append(active.slot)
    assert up.update("digits", "1.0.0", force=True).state == "committed"  # slot a
    assert up.update("digits", "2.0.0").state == "committed"  # slot b

    out = up.revert(reason="rollout_aborted", rollout="r9")

    assert (out.state, out.model, out.reason) == ("rolled_back", "digits@2.0.0", "rollout_aborted")
    assert rec.kinds[-2:] == ["ota.idle", "ota.reverted"] or rec.kinds[-1] == "ota.reverted"
    assert rec.events[-1][1]["rollout"] == "r9"
    active = assert_valid_active(tmp_path)
    assert (active.slot, active.manifest.model_id) == ("a", "digits@1.0.0")  # type: ignore[union-attr]
    assert up.update("digits", "2.0.0").reason == "failed_before"

    second = up.revert(reason="rollout_aborted")
    assert second.model == "digits@1.0.0"
    assert assert_valid_active(tmp_path).slot == "factory"
    assert reverted == ["a", "factory"]
    assert up.revert(reason="again").state == "unchanged"


def test_corrupt_state_file_keeps_the_active_model(tmp_path: Path, fleet: Fleet) -> None:
    up, rec = make_updater(tmp_path, fleet.server.url, fleet.root)
    assert up.update("digits", "2.0.0").state == "committed"
    (tmp_path / "ota" / "state.json").write_bytes(b'{"state": "tri')
    assert up.status()["reason"] == "corrupt_state"

    out = up.recover()

    assert out is not None and (out.state, out.reason) == ("rolled_back", "corrupt_state")
    assert rec.kinds[-1] == "ota.rolled_back"
    assert StateFile(tmp_path / "ota" / "state.json").load().reason == "corrupt_state"
    assert assert_valid_active(tmp_path).manifest.model_id == "digits@2.0.0"  # type: ignore[union-attr]


def test_tampered_active_slot_falls_back_to_factory(tmp_path: Path, fleet: Fleet) -> None:
    up, _ = make_updater(tmp_path, fleet.server.url, fleet.root)
    assert up.update("digits", "2.0.0").state == "committed"
    model = tmp_path / "models" / "a" / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])  # a partial file must never run
    assert assert_valid_active(tmp_path).slot == "factory"
    # The next update writes the other slot: never the one the link names.
    assert up.update("digits", "2.0.0", force=True).state == "committed"
    assert assert_valid_active(tmp_path).slot == "b"
