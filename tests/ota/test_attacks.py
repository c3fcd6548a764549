"""The attacks TUF exists to stop, each against the real client, a real fleet repository and a loopback server the
test controls. Every test asserts the verdict's reason AND that nothing reached the install destination.

The install attempt mirrors the updater: refresh, read the release's manifest, fetch the model and its golden file.
"""

from __future__ import annotations

import datetime
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from ota_env import OtaEnv, sign
from repo_helpers import NOW, PUBLISHER, digits_release_files, make_golden, make_publisher_key
from securesystemslib.signer import CryptoSigner
from static_server import StaticServer
from tuf.api.metadata import Metadata, Root, TargetFile, Targets, Timestamp

from edge.fleet.models._tuf_keys import sslib_key
from edge.fleet.models.repository import FleetRepository
from edge.ota.clock import TimeFloor
from edge.ota.errors import UpdateRejected
from edge.ota.trust import TrustClient

DAY = datetime.timedelta(days=1)


@pytest.fixture
def dest(ota_env: OtaEnv) -> Path:
    d = ota_env.box / "slot"
    d.mkdir()
    return d


def install(client: TrustClient, dest: Path, version: str = "1.0.0", *, refresh: bool = True) -> None:
    if refresh:
        client.refresh()
    m = client.release("digits", version)
    client.fetch(m.path, dest / "model.onnx", expected_sha256=m.sha256)
    if m.golden is not None:
        client.fetch(m.golden.file.path, dest / "golden.npz", expected_sha256=m.golden.file.sha256)


def rejected(client: TrustClient, dest: Path, version: str = "1.0.0", *, refresh: bool = True) -> UpdateRejected:
    """The verdict of an install attempt that must fail, after checking that the destination stayed empty."""
    with pytest.raises(UpdateRejected) as ei:
        install(client, dest, version, refresh=refresh)
    assert list(dest.iterdir()) == [], "a rejected update wrote to the install destination"
    return ei.value


def test_arbitrary_target_hash_mismatch(ota_env: OtaEnv, dest: Path) -> None:
    client = ota_env.client()
    m = client.release("digits", "1.0.0")
    ota_env.server.override("model.onnx", os.urandom(m.length))  # same length, attacker's bytes
    assert rejected(client, dest).reason == "hash_mismatch"
    assert not list((ota_env.box / "downloads" / "partial").iterdir())  # never resumed later
    ota_env.server.clear()
    install(client, dest)  # the genuine file still installs
    assert (dest / "model.onnx").stat().st_size == m.length


def test_endless_data_oversized_target(ota_env: OtaEnv, dest: Path) -> None:
    def endless() -> Iterator[bytes]:
        while True:
            yield b"\0" * 65536

    client = ota_env.client()
    m = client.release("digits", "1.0.0")
    ota_env.server.override("model.onnx", endless)
    assert rejected(client, dest).reason == "too_large"
    # Streaming stopped at the signed length: not the gigabytes the server would have sent.
    assert client.stats.target_bytes <= m.length + 2 * 256 * 1024
    # A box-side cap refuses a big target before any byte is requested.
    capped = ota_env.client(max_target_bytes=m.length - 1)
    assert rejected(capped, dest).reason == "too_large"
    assert capped.stats.target_bytes == 0 and capped.stats.requests > 0  # metadata only


def test_rollback_to_older_metadata(ota_env: OtaEnv, dest: Path) -> None:
    client = ota_env.client()
    client.refresh()
    old_timestamp = ota_env.served("timestamp.json")
    work = ota_env.repo.fleet_dir / "work"
    model = digits_release_files(work, "2.0.0")
    ota_env.repo.publish(
        model, name="digits", version="2.0.0", publisher=PUBLISHER, publisher_key=ota_env.publisher_key, now=NOW
    )
    install(client, dest, "2.0.0")
    shutil.rmtree(dest)
    dest.mkdir()
    # The mirror serves yesterday's (validly signed, unexpired) timestamp, hiding 2.0.0 and whatever fixed it.
    ota_env.server.override("metadata/timestamp.json", old_timestamp)
    verdict = rejected(ota_env.client(), dest, "2.0.0")
    assert verdict.reason == "rollback"
    assert "timestamp" in verdict.detail


def test_freeze_expired_timestamp(ota_env: OtaEnv, dest: Path) -> None:
    ota_env.client().refresh()
    # The mirror stops updating (or an attacker holds back new metadata); the box's clock moves on.
    ota_env.clock = (NOW + 2 * DAY).timestamp()
    assert rejected(ota_env.client(), dest).reason == "expired"


def test_freeze_replayed_timestamp_with_reset_clock(ota_env: OtaEnv, dest: Path) -> None:
    old = {name: ota_env.served(name) for name in ("timestamp.json",)}
    # Two days later the fleet re-signs; the box refreshes and proves that time from x-edge-issued.
    later = NOW + 2 * DAY
    ota_env.repo.refresh(now=later)
    ota_env.clock = later.timestamp()
    floor = TimeFloor(ota_env.box / "time-floor.json")
    ota_env.client(floor=floor).refresh()
    assert floor.floor() == later.timestamp()
    # Power loss without RTC: the clock says 1970 and the metadata cache is gone; the attacker replays the old
    # (validly signed) timestamp, which would look fresh in 1970.
    ota_env.clock = 0.0
    shutil.rmtree(ota_env.box / "tuf")
    ota_env.server.override("metadata/timestamp.json", old["timestamp.json"])
    assert rejected(ota_env.client(floor=floor), dest).reason == "expired"
    # The floor is what stopped it: a box that has proven nothing would have been frozen on the replay.
    shutil.rmtree(ota_env.box / "tuf")
    naive = ota_env.client(floor=TimeFloor(ota_env.box / "no-floor.json"))
    naive.refresh()
    # Frozen at least two days in the past, and it cannot tell (a lone timestamp on a box whose clock is unset does
    # not even raise its floor past the build time: edge.ota.clock).
    assert naive.effective_time() <= NOW.timestamp() < later.timestamp()


def test_mix_and_match_snapshot_inconsistency(ota_env: OtaEnv, dest: Path) -> None:
    work = ota_env.repo.fleet_dir / "work"
    model = digits_release_files(work, "2.0.0")
    ota_env.repo.publish(
        model, name="digits", version="2.0.0", publisher=PUBLISHER, publisher_key=ota_env.publisher_key, now=NOW
    )
    v = ota_env.repo.publisher_version(PUBLISHER)
    # The mirror mixes states: the current snapshot (acme v2) with acme's metadata of the previous state (v1).
    ota_env.server.override(f"metadata/{v}.{PUBLISHER}.json", ota_env.served(f"{v - 1}.{PUBLISHER}.json"))
    verdict = rejected(ota_env.client(), dest, "1.0.0")
    assert verdict.reason == "bad_metadata"
    assert PUBLISHER in verdict.detail
    # A snapshot of another state under the current name is caught by the timestamp's hash of it.
    ota_env.server.clear()
    ts = Metadata[Timestamp].from_bytes(ota_env.served("timestamp.json"))
    sv = ts.signed.snapshot_meta.version
    ota_env.server.override(f"metadata/{sv}.snapshot.json", ota_env.served(f"{sv - 1}.snapshot.json"))
    shutil.rmtree(ota_env.box / "tuf")
    assert rejected(ota_env.client(), dest).reason == "hash_mismatch"


def test_fast_forward_attack(ota_env: OtaEnv, dest: Path) -> None:
    client = ota_env.client()
    client.refresh()
    # An attacker with the timestamp key signs version 1000: the box accepts it (validly signed) and caches it.
    forged = Metadata[Timestamp].from_bytes(ota_env.served("timestamp.json"))
    forged.signed.version = 1000
    sign(forged, ota_env.repo.role_keys("timestamp"))
    ota_env.server.override("metadata/timestamp.json", forged.to_bytes())
    ota_env.client().refresh()
    ota_env.server.clear()
    # Now every genuine timestamp looks like a rollback: the box is stuck...
    ota_env.repo.refresh(now=NOW)
    assert rejected(ota_env.client(), dest).reason == "rollback"
    # ...until the fleet rotates the compromised key (TUF spec 5.3.11): the new root makes the cached v1000
    # unverifiable, the box drops it and follows the genuine timestamp again.
    ota_env.repo.rotate_key("timestamp", now=NOW)
    install(ota_env.client(), dest)
    assert (dest / "model.onnx").exists()


def test_unapproved_publisher(ota_env: OtaEnv, dest: Path) -> None:
    work = ota_env.repo.fleet_dir / "work"
    evil_key, _ = make_publisher_key(work, "evil")
    evil = CryptoSigner(evil_key, sslib_key(evil_key.public_key()))
    model = digits_release_files(work, "2.0.0").read_bytes()
    genuine = Metadata[Targets].from_bytes(ota_env.served(f"1.{PUBLISHER}.json"))
    tf = genuine.signed.targets["digits/1.0.0/model.onnx"]
    custom = dict(tf.custom)
    custom["edge"] = {**custom["edge"], "version": "2.0.0", "publisher": "evil"}
    target = TargetFile.from_data("digits/2.0.0/model.onnx", model, ["sha256"])
    target.unrecognized_fields["custom"] = custom
    sha = target.hashes["sha256"]
    (ota_env.repo.targets_dir / "digits" / "2.0.0").mkdir()
    (ota_env.repo.targets_dir / "digits" / "2.0.0" / f"{sha}.model.onnx").write_bytes(model)
    # 1. A role the fleet never delegated, even listed in a snapshot: the client never consults it.
    role = Metadata(Targets(expires=NOW + 30 * DAY, targets={target.path: target}))
    sign(role, [evil])
    ota_env.commit({"evil": role})
    assert rejected(ota_env.client(), dest, "2.0.0").reason == "not_found"
    # 2. The same target slipped into acme's role, signed by the unapproved key: acme's delegation rejects it.
    acme = Metadata[Targets].from_bytes(ota_env.served(f"1.{PUBLISHER}.json"))
    acme.signed.targets[target.path] = target
    acme.signed.version = 2
    sign(acme, [evil])
    ota_env.commit({PUBLISHER: acme})
    assert rejected(ota_env.client(), dest, "2.0.0").reason == "bad_signature"


def test_publisher_outside_delegation(ota_env: OtaEnv, dest: Path) -> None:
    # acme, delegated digits/*/* only, signs a mobilenet release with its own genuine key.
    acme = Metadata[Targets].from_bytes(ota_env.served(f"1.{PUBLISHER}.json"))
    tf = acme.signed.targets["digits/1.0.0/model.onnx"]
    custom = {"edge": {**tf.custom["edge"], "name": "mobilenet"}}
    acme.signed.targets["mobilenet/1.0.0/model.onnx"] = TargetFile(
        tf.length, dict(tf.hashes), "mobilenet/1.0.0/model.onnx", unrecognized_fields={"custom": custom}
    )
    acme.signed.version = 2
    sign(acme, [ota_env.publisher_signer()])
    ota_env.commit({PUBLISHER: acme})
    client = ota_env.client()
    with pytest.raises(UpdateRejected) as ei:
        client.refresh()
        m = client.release("mobilenet", "1.0.0")
        client.fetch(m.path, dest / "model.onnx")
    assert ei.value.reason == "not_found"
    assert list(dest.iterdir()) == []
    install(ota_env.client(), dest)  # acme's genuine digits release in the same metadata is still fine


def test_below_threshold_signatures(tmp_path: Path) -> None:
    repo = FleetRepository.init(tmp_path / "fleet", now=NOW, thresholds={"root": 2})
    work = tmp_path / "fleet" / "work"
    key, _ = make_publisher_key(work, PUBLISHER)
    repo.add_publisher(PUBLISHER, key.public_key(), ["digits"], now=NOW)
    model = digits_release_files(work, "1.0.0")
    repo.publish(
        model,
        name="digits",
        version="1.0.0",
        publisher=PUBLISHER,
        publisher_key=key,
        now=NOW,
        golden=make_golden(model, work / "golden.npz"),
    )
    provisioned = repo.root_bytes()
    signers = repo.role_keys("root")
    assert len(signers) == 2
    # A new root (say, one that swaps the timestamp key for the attacker's) signed by only one of the two root keys.
    root = Metadata[Root].from_bytes(provisioned)
    attacker = CryptoSigner.generate_ed25519()
    for keyid in list(root.signed.roles["timestamp"].keyids):
        root.signed.revoke_key(keyid, "timestamp")
    root.signed.add_key(attacker.public_key, "timestamp")
    root.signed.version += 1
    sign(root, signers[:1])
    (repo.metadata_dir / f"{root.signed.version}.root.json").write_bytes(root.to_bytes())
    dest = tmp_path / "slot"
    dest.mkdir()
    with StaticServer(repo.repository_dir) as server:
        client = TrustClient(
            repo_url=server.url,
            metadata_dir=tmp_path / "box" / "tuf",
            downloads_dir=tmp_path / "box" / "downloads",
            trusted_root=provisioned,
            time_floor=TimeFloor(tmp_path / "box" / "floor.json"),
            clock=lambda: NOW.timestamp() + 60,
        )
        assert rejected(client, dest).reason == "bad_signature"
        # With both signatures the same root is accepted (the threshold, not the content, was the problem).
        sign(root, signers)
        (repo.metadata_dir / f"{root.signed.version}.root.json").write_bytes(root.to_bytes())
        with pytest.raises(UpdateRejected) as ei:
            install(client, dest)
        # Root v2 now verifies, but the genuine timestamp is not signed by the (attacker's) key it lists.
        assert ei.value.reason == "bad_signature"
        assert "timestamp" in ei.value.detail


def test_tampered_golden_sample(ota_env: OtaEnv, dest: Path) -> None:
    client = ota_env.client()
    m = client.release("digits", "1.0.0")
    assert m.golden is not None
    original = next((ota_env.repo.targets_dir / "digits" / "1.0.0").glob("*.golden.npz")).read_bytes()
    with np.load(io.BytesIO(original)) as z:
        inputs, outputs = z["inputs"], z["outputs"]
    buf = io.BytesIO()
    # Shifted expectations (so a broken model would pass its health check), same size as the genuine file.
    np.savez(buf, inputs=inputs, outputs=(outputs + 1.0).astype(np.float32))
    assert len(buf.getvalue()) == len(original)
    ota_env.server.override("golden.npz", buf.getvalue())
    with pytest.raises(UpdateRejected) as ei:
        client.fetch(m.golden.file.path, dest / "golden.npz", expected_sha256=m.golden.file.sha256)
    assert ei.value.reason == "hash_mismatch"
    assert list(dest.iterdir()) == []


def test_revoked_key_after_rotation(ota_env: OtaEnv, dest: Path) -> None:
    ota_env.client().refresh()
    old_timestamp_keys = ota_env.repo.role_keys("timestamp")
    ota_env.repo.rotate_key("timestamp", now=NOW)
    ota_env.client().refresh()  # the box follows the rotation (root v2)
    # The old (leaked, now revoked) key signs a newer timestamp.
    forged = Metadata[Timestamp].from_bytes(ota_env.served("timestamp.json"))
    forged.signed.version += 1
    sign(forged, old_timestamp_keys)
    ota_env.server.override("metadata/timestamp.json", forged.to_bytes())
    verdict = rejected(ota_env.client(), dest)
    assert verdict.reason == "bad_signature"
