"""The fleet's TUF repository: layout, publishing, delegations, key rotation, freshness, and a real ngclient."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import stat
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hostile_files import bomb, traced_peak
from repo_helpers import (
    DIGITS_FP32,
    NOW,
    PUBLISHER,
    digits_release_files,
    make_golden,
    make_publisher_key,
    ready_repository,
)
from securesystemslib.signer import CryptoSigner
from static_server import StaticServer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata
from tuf.ngclient import Updater

from edge.fleet.models.repository import ISSUED_FIELD, FleetRepository, RepositoryError
from edge.inference.model import Model
from edge.wire.errors import ManifestError
from edge.wire.manifest import MAX_GOLDEN_BYTES, ModelManifest, parse_golden


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[FleetRepository, Ed25519PrivateKey]:
    """One repository with digits 1.0.0 published (read-only tests share it)."""
    return ready_repository(tmp_path_factory.mktemp("fleet"))


def _md(repo: FleetRepository, filename: str) -> Metadata:
    return Metadata.from_bytes((repo.metadata_dir / filename).read_bytes())


def test_init_writes_layout_keys_and_thresholds(tmp_path: Path) -> None:
    repo = FleetRepository.init(tmp_path, now=NOW, thresholds={"root": 2, "targets": 2})
    names = sorted(p.name for p in repo.metadata_dir.iterdir())
    assert names == ["1.root.json", "1.snapshot.json", "1.targets.json", "root.json", "timestamp.json"]
    root = Metadata.from_bytes(repo.root_bytes()).signed
    assert root.consistent_snapshot is True
    assert {r: (len(root.roles[r].keyids), root.roles[r].threshold) for r in root.roles} == {
        "root": (2, 2),
        "targets": (2, 2),
        "snapshot": (1, 1),
        "timestamp": (1, 1),
    }
    for role in root.roles:
        for keyid in root.roles[role].keyids:
            mode = stat.S_IMODE((tmp_path / "tuf" / "keys" / role / f"{keyid}.pem").stat().st_mode)
            assert mode == 0o600
    # The root is signed by both root keys; a client needs 2 of them.
    Metadata.from_bytes(repo.root_bytes()).verify_delegate("root", Metadata.from_bytes(repo.root_bytes()))
    assert _md(repo, "timestamp.json").signed.unrecognized_fields[ISSUED_FIELD] == "2026-11-22T06:30:00Z"
    assert root.expires == NOW + datetime.timedelta(days=365)


def test_init_twice_refused_and_load_requires_init(tmp_path: Path) -> None:
    FleetRepository.init(tmp_path / "a", now=NOW)
    with pytest.raises(RepositoryError, match="already exists"):
        FleetRepository.init(tmp_path / "a", now=NOW)
    with pytest.raises(RepositoryError, match="models init"):
        FleetRepository.load(tmp_path / "b")


@pytest.mark.parametrize(
    ("thresholds", "expiry"),
    [({"root": 0}, None), ({"mirror": 1}, None), (None, {"timestamp": -1}), (None, {"nope": 1})],
)
def test_init_rejects_bad_thresholds_and_expiries(tmp_path: Path, thresholds, expiry) -> None:
    with pytest.raises(RepositoryError):
        FleetRepository.init(tmp_path, now=NOW, thresholds=thresholds, expiry_days=expiry)


def test_publish_writes_hash_prefixed_targets_and_parsable_manifest(published) -> None:
    repo, _key = published
    (m,) = repo.releases("digits")
    assert m.model_id == "digits@1.0.0" and m.publisher == PUBLISHER and m.quantization == "int8"
    assert m.input.dtype == "uint8" and m.input.shape == (1, 3, 32, 32)
    stored = repo.targets_dir / "digits" / "1.0.0" / f"{m.sha256}.model.onnx"
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == m.sha256
    assert m.golden is not None and m.golden.count == 8 and m.golden.tolerance == 0.05
    golden = repo.targets_dir / "digits" / "1.0.0" / f"{m.golden.file.sha256}.golden.npz"
    assert parse_golden(golden.read_bytes(), input_info=m.input).inputs.shape == (8, 3, 32, 32)
    # The publisher's role verifies against the fleet's delegation and its custom metadata parses back.
    targets = _md(repo, "2.targets.json")
    acme = _md(repo, "1.acme.json")
    targets.verify_delegate(PUBLISHER, acme)
    tf = acme.signed.targets["digits/1.0.0/model.onnx"]
    assert ModelManifest.from_custom(tf.path, tf.custom, length=tf.length, sha256=tf.hashes["sha256"]) == m
    assert acme.signed.targets["digits/1.0.0/golden.npz"].custom == {"edge": {"kind": "golden"}}
    snapshot = _md(repo, f"{_md(repo, 'timestamp.json').signed.snapshot_meta.version}.snapshot.json")
    assert snapshot.signed.meta["acme.json"].version == 1
    assert snapshot.signed.meta["targets.json"].version == 2
    # Reloading from disk sees the same state.
    assert FleetRepository.load(repo.fleet_dir).releases() == repo.releases()


def test_golden_outputs_computed_when_absent(tmp_path: Path) -> None:
    repo, key = ready_repository(tmp_path / "fleet", versions=())
    model = digits_release_files(tmp_path, "1.0.0")
    full = make_golden(model, tmp_path / "full.npz", n=4)
    with np.load(full) as z:
        inputs, expected = z["inputs"], z["outputs"]
    only_inputs = tmp_path / "inputs.npz"
    np.savez(only_inputs, inputs=inputs)
    m = repo.publish(
        model, name="digits", version="1.0.0", publisher=PUBLISHER, publisher_key=key, now=NOW, golden=only_inputs
    )
    assert m.golden is not None and m.golden.count == 4
    data = (repo.targets_dir / "digits/1.0.0" / f"{m.golden.file.sha256}.golden.npz").read_bytes()
    got = parse_golden(data, input_info=m.input)
    np.testing.assert_allclose(got.outputs, expected, atol=1e-6)


def test_golden_with_wrong_input_shape_refused(tmp_path: Path) -> None:
    repo, key = ready_repository(tmp_path / "fleet", versions=())
    bad = tmp_path / "bad.npz"
    np.savez(bad, inputs=np.zeros((2, 1, 8, 8), dtype=np.uint8))
    model = digits_release_files(tmp_path, "1.0.0")
    with pytest.raises(ManifestError, match="model takes"):
        repo.publish(model, name="digits", version="1.0.0", publisher=PUBLISHER, publisher_key=key, now=NOW, golden=bad)
    assert repo.releases() == []


def test_golden_inputs_bomb_refused_at_publish_without_inflating(tmp_path: Path) -> None:
    """An inputs-only golden file (outputs computed at publish) goes through the box's bounded reader too."""
    repo, key = ready_repository(tmp_path / "fleet", versions=())
    expanded = 2 * MAX_GOLDEN_BYTES
    data = bomb(expanded)  # 128 MiB of zeros in ~130 KiB, an 'inputs' member only
    path = tmp_path / "bomb.npz"
    path.write_bytes(data)
    model = digits_release_files(tmp_path, "1.0.0")
    with traced_peak() as peak, pytest.raises(ManifestError, match=rf"golden file {path}: array 'inputs' declares"):
        repo.publish(
            model, name="digits", version="1.0.0", publisher=PUBLISHER, publisher_key=key, now=NOW, golden=path
        )
    # Publishing loads the model first (a few MiB, measured 2.8); the bomb's 128 MiB are never inflated.
    assert peak[0] < expanded // 16
    assert repo.releases() == []


def test_publish_float_variant_and_progress(tmp_path: Path) -> None:
    repo, key = ready_repository(tmp_path / "fleet", versions=())
    model = digits_release_files(tmp_path, "2.0.0")
    fv = digits_release_files(tmp_path, "2.0.0", source=DIGITS_FP32)
    seen: list[tuple[int, int]] = []
    m = repo.publish(
        model,
        name="digits",
        version="2.0.0",
        publisher=PUBLISHER,
        publisher_key=key,
        now=NOW,
        float_variant=fv,
        latency_budget_ms=2.5,
        progress=lambda done, total: seen.append((done, total)),
    )
    total = model.stat().st_size + fv.stat().st_size
    assert seen[-1] == (total, total) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert m.float_variant is not None and m.float_variant.length == fv.stat().st_size
    assert (repo.targets_dir / "digits/2.0.0" / f"{m.float_variant.sha256}.model-float.onnx").is_file()
    assert m.latency_budget_ms == 2.5
    assert FleetRepository.load(repo.fleet_dir).releases()[0] == m


@pytest.mark.parametrize("version", ["1.0.0", "1", "0.9.9"])
def test_version_not_newer_refused(published, tmp_path: Path, version: str) -> None:
    repo, key = published
    model = digits_release_files(tmp_path, version)
    with pytest.raises(RepositoryError, match="not newer"):
        repo.publish(model, name="digits", version=version, publisher=PUBLISHER, publisher_key=key, now=NOW)


def test_metadata_contradicting_name_or_version_refused(tmp_path: Path) -> None:
    repo, key = ready_repository(tmp_path / "fleet", versions=())
    model = digits_release_files(tmp_path, "1.0.0")
    with pytest.raises(RepositoryError, match=r"edge\.version"):
        repo.publish(model, name="digits", version="2.0.0", publisher=PUBLISHER, publisher_key=key, now=NOW)
    other = digits_release_files(tmp_path, "2.0.0", name="letters")
    with pytest.raises(RepositoryError, match=r"edge\.name"):
        repo.publish(other, name="digits", version="2.0.0", publisher=PUBLISHER, publisher_key=key, now=NOW)
    assert repo.releases() == []


def test_delegation_paths_and_publisher_checks(tmp_path: Path) -> None:
    repo = FleetRepository.init(tmp_path / "fleet", now=NOW)
    key, _ = make_publisher_key(tmp_path, "vision")
    repo.add_publisher("vision", key.public_key(), ["mobilenet", "digits"], now=NOW)
    role = repo.publishers()["vision"]
    assert role.paths == ["digits/*/*", "mobilenet/*/*"] and role.terminating and role.threshold == 1
    assert role.is_delegated_path("digits/1.0.0/model.onnx")
    assert not role.is_delegated_path("digits/model.onnx") and not role.is_delegated_path("letters/1/model.onnx")
    model = digits_release_files(tmp_path, "1.0.0", name="letters")
    with pytest.raises(RepositoryError, match="may not publish 'letters'"):
        repo.publish(model, name="letters", version="1.0.0", publisher="vision", publisher_key=key, now=NOW)
    stranger = Ed25519PrivateKey.generate()
    model = digits_release_files(tmp_path, "1.0.0")
    with pytest.raises(RepositoryError, match="not publisher 'vision'"):
        repo.publish(model, name="digits", version="1.0.0", publisher="vision", publisher_key=stranger, now=NOW)
    with pytest.raises(RepositoryError, match="no publisher"):
        repo.publish(model, name="digits", version="1.0.0", publisher="nobody", publisher_key=key, now=NOW)
    with pytest.raises(RepositoryError, match="exists already"):
        repo.add_publisher("vision", key.public_key(), ["digits"], now=NOW)
    for bad in ("targets", "Vision", "-x", "a" * 33):
        with pytest.raises(RepositoryError, match="publisher name"):
            repo.add_publisher(bad, key.public_key(), ["digits"], now=NOW)
    assert (repo.fleet_dir / "tuf" / "publishers" / "vision.pub").is_file()


@pytest.mark.parametrize("role", ["root", "targets", "snapshot", "timestamp"])
def test_rotate_key_replaces_the_role_key(tmp_path: Path, role: str) -> None:
    repo, _key = ready_repository(tmp_path / "fleet")
    old_root = Metadata.from_bytes(repo.root_bytes())
    old_signers = repo.role_keys(role)
    old_ids = list(old_root.signed.roles[role].keyids)
    new_ids = repo.rotate_key(role, now=NOW)
    new_root = Metadata.from_bytes(repo.root_bytes())
    assert new_root.signed.version == old_root.signed.version + 1
    assert (repo.metadata_dir / f"{new_root.signed.version}.root.json").read_bytes() == repo.root_bytes()
    assert new_root.signed.roles[role].keyids == new_ids and not set(new_ids) & set(old_ids)
    # The chain of trust: the old root accepts the new one, and the new root accepts itself.
    old_root.verify_delegate("root", new_root)
    new_root.verify_delegate("root", new_root)
    for keyid in old_ids:
        assert not (repo.fleet_dir / "tuf" / "keys" / role / f"{keyid}.pem").exists()
    # The role's current metadata is signed by the new key; a copy signed by the old key is refused.
    current = repo.metadata(role)
    new_root.verify_delegate(role, current)
    for s in old_signers:
        current.sign(s, append=False)
    with pytest.raises(UnsignedMetadataError):
        new_root.verify_delegate(role, current)
    assert FleetRepository.load(repo.fleet_dir).role_keys(role)[0].public_key.keyid == new_ids[0]


def test_rotate_publisher_key_revokes_the_old_one(tmp_path: Path) -> None:
    repo, old_key = ready_repository(tmp_path / "fleet")
    new_key = Ed25519PrivateKey.generate()
    repo.rotate_publisher(PUBLISHER, new_key.public_key(), now=NOW)
    targets = repo.metadata("targets")
    # Until the publisher re-signs, its (old-key) metadata no longer verifies.
    with pytest.raises(UnsignedMetadataError):
        targets.verify_delegate(PUBLISHER, repo.metadata(PUBLISHER))
    model = digits_release_files(tmp_path, "1.1.0")
    with pytest.raises(RepositoryError, match="not publisher"):
        repo.publish(model, name="digits", version="1.1.0", publisher=PUBLISHER, publisher_key=old_key, now=NOW)
    repo.resign_publisher(PUBLISHER, new_key, now=NOW)
    targets.verify_delegate(PUBLISHER, repo.metadata(PUBLISHER))
    repo.publish(model, name="digits", version="1.1.0", publisher=PUBLISHER, publisher_key=new_key, now=NOW)
    assert [m.version for m in repo.releases("digits")] == ["1.0.0", "1.1.0"]
    with pytest.raises(RepositoryError, match="re-signing key"):
        repo.rotate_publisher(PUBLISHER, old_key.public_key(), now=NOW, resign_key=new_key)


def test_remove_publisher_withdraws_releases_and_name(tmp_path: Path) -> None:
    repo, key = ready_repository(tmp_path / "fleet")
    repo.remove_publisher(PUBLISHER, now=NOW)
    assert repo.releases() == [] and repo.publishers() == {}
    snapshot = repo.metadata("snapshot")
    assert "acme.json" in snapshot.signed.meta  # a client refuses a snapshot that drops a role
    with pytest.raises(RepositoryError, match="was used by a removed publisher"):
        repo.add_publisher(PUBLISHER, key.public_key(), ["digits"], now=NOW)
    assert FleetRepository.load(repo.fleet_dir).releases() == []


def test_refresh_bumps_timestamp_snapshot_and_issued(published) -> None:
    repo, _key = published
    before = repo.metadata("timestamp").signed
    later = NOW + datetime.timedelta(hours=20)
    repo.refresh(now=later)
    after = repo.metadata("timestamp").signed
    assert after.version == before.version + 1
    assert after.snapshot_meta.version == before.snapshot_meta.version + 1
    assert after.unrecognized_fields[ISSUED_FIELD] == "2026-11-23T02:30:00Z"
    assert after.expires == later + datetime.timedelta(days=1)
    data = (repo.metadata_dir / f"{after.snapshot_meta.version}.snapshot.json").read_bytes()
    assert after.snapshot_meta.hashes == {"sha256": hashlib.sha256(data).hexdigest()}
    with pytest.raises(RepositoryError, match="timezone-aware"):
        repo.refresh(now=datetime.datetime(2026, 1, 1))


def test_ngclient_finds_and_downloads_a_release_and_follows_root_rotation(tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    repo, _key = ready_repository(tmp_path / "fleet", now=now)
    box = tmp_path / "box"
    (box / "tuf").mkdir(parents=True)
    provisioned = repo.root_bytes()  # the trusted root a box gets at enrollment
    repo.rotate_key("root", now=now)
    repo.rotate_key("timestamp", now=now)
    with StaticServer(repo.repository_dir) as server:
        base = server.url
        updater = Updater(
            metadata_dir=str(box / "tuf"),
            metadata_base_url=f"{base.rstrip('/')}/metadata/",
            target_base_url=f"{base.rstrip('/')}/targets/",
            target_dir=str(box),
            bootstrap=provisioned,
        )
        updater.refresh()
        info = updater.get_targetinfo("digits/1.0.0/model.onnx")
        assert info is not None
        m = ModelManifest.from_custom(info.path, info.custom, length=info.length, sha256=info.hashes["sha256"])
        path = updater.download_target(info, str(box / "model.onnx"))
        assert updater.get_targetinfo("digits/9.0.0/model.onnx") is None
    assert Model(path, warmup=0).sha256 == m.sha256
    assert json.loads((box / "tuf" / "root.json").read_bytes())["signed"]["version"] == 3


def test_role_keys_refuses_publishers(published) -> None:
    repo, _key = published
    with pytest.raises(RepositoryError, match="holds keys of"):
        repo.role_keys(PUBLISHER)
    assert all(isinstance(s, CryptoSigner) for s in repo.role_keys("snapshot"))


def test_custom_metadata_has_no_floats(published) -> None:
    # TUF signs canonical JSON, which has no floats: tolerance etc. travel as decimal strings and read back as numbers.
    repo, _key = published
    m = repo.releases("digits")[0]
    m = dataclasses.replace(m, latency_budget_ms=12.5, preprocess={"mean": [0.5, 1.0], "std": 0.25})
    custom = m.to_custom()

    def floats(v) -> list[float]:
        if isinstance(v, float):
            return [v]
        if isinstance(v, dict):
            return [f for x in v.values() for f in floats(x)]
        if isinstance(v, list):
            return [f for x in v for f in floats(x)]
        return []

    assert floats(custom) == []
    assert custom["edge"]["latency_budget_ms"] == "12.5"
    assert custom["edge"]["preprocess"] == {"mean": ["0.5", 1], "std": "0.25"}
    back = ModelManifest.from_custom(m.path, custom, length=m.length, sha256=m.sha256)
    assert back.latency_budget_ms == 12.5
    assert back.preprocess == {"mean": [0.5, 1.0], "std": 0.25}
    assert back == dataclasses.replace(m, preprocess=back.preprocess)
