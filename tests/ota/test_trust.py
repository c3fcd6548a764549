"""The box's TUF client against a real fleet repository served on loopback: the happy path, resume, limits, time."""

from __future__ import annotations

import datetime
import hashlib

import pytest
from ota_env import OtaEnv, sign
from repo_helpers import NOW
from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import (
    BadVersionNumberError,
    DownloadError,
    DownloadLengthMismatchError,
    ExpiredMetadataError,
    LengthOrHashMismatchError,
    RepositoryError,
    UnsignedMetadataError,
)
from tuf.api.metadata import Metadata, Root, Targets
from tuf.ngclient._internal.trusted_metadata_set import TrustedMetadataSet
from tuf.ngclient.config import EnvelopeType

from edge.ota.clock import TimeFloor
from edge.ota.errors import UpdateRejected
from edge.ota.trial import load_golden
from edge.ota.trust import rejection
from edge.wire.manifest import GOLDEN_FILE


def test_refresh_release_fetch(ota_env: OtaEnv) -> None:
    client = ota_env.client()
    client.refresh()
    m = client.release("digits", "1.0.0")
    assert m == ota_env.repo.releases("digits")[0]
    assert m.publisher == "acme" and m.golden is not None
    slot = ota_env.box / "slot"
    slot.mkdir()
    dest = slot / "model.onnx"
    seen: list[tuple[int, int]] = []
    assert client.fetch(m.path, dest, expected_sha256=m.sha256, progress=lambda d, t: seen.append((d, t))) == dest
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == m.sha256
    assert seen[-1] == (m.length, m.length)
    golden = client.fetch(m.golden.file.path, slot / GOLDEN_FILE, expected_sha256=m.golden.file.sha256)
    assert len(load_golden(golden, input_info=m.input)) == m.golden.count
    assert sorted(p.name for p in slot.iterdir()) == [GOLDEN_FILE, "model.onnx"]  # no temp files left
    assert not list((ota_env.box / "downloads" / "partial").iterdir())
    # Consistent snapshots: the model came from its hash-prefixed URL.
    assert ota_env.server.paths("model.onnx") == [f"targets/digits/1.0.0/{m.sha256}.model.onnx"]


def test_refresh_raises_the_time_floor_from_the_signed_timestamp(ota_env: OtaEnv) -> None:
    floor = TimeFloor(ota_env.box / "time-floor.json")
    ota_env.client(floor=floor).refresh()
    assert floor.floor() == NOW.timestamp()
    assert floor.source.startswith("tuf timestamp v")
    later = NOW + datetime.timedelta(hours=5)
    ota_env.repo.refresh(now=later)
    ota_env.clock = 0.0  # the clock reset: the floor keeps the box inside the metadata's validity
    ota_env.client(floor=floor).refresh()
    # With the clock unset, a timestamp alone is a claim (edge.ota.clock); a fleet command that agrees proves it.
    assert floor.floor() == NOW.timestamp()
    floor.prove(later.timestamp() + 60, "command", kind="command", clock=10.0)
    assert floor.floor() == later.timestamp()


def test_reference_time_hook_still_exists() -> None:
    """The client sets TrustedMetadataSet.reference_time; if tuf renames it the time floor would silently vanish."""
    root = Metadata.from_bytes(_root_bytes())
    trusted = TrustedMetadataSet(root.to_bytes(), EnvelopeType.METADATA)
    assert isinstance(trusted.reference_time, datetime.datetime)


def _root_bytes() -> bytes:
    signer = CryptoSigner.generate_ed25519()
    md = Metadata(Root(expires=NOW + datetime.timedelta(days=1)))
    for role in ("root", "targets", "snapshot", "timestamp"):
        md.signed.add_key(signer.public_key, role)
    md.sign(signer)
    return md.to_bytes()


def test_expiry_uses_the_effective_time(ota_env: OtaEnv) -> None:
    client = ota_env.client()
    ota_env.clock = (NOW + datetime.timedelta(days=2)).timestamp()
    with pytest.raises(UpdateRejected) as ei:
        client.refresh()
    assert ei.value.reason == "expired"
    floor = TimeFloor(ota_env.box / "f2.json")
    two_days = (NOW + datetime.timedelta(days=2)).timestamp()
    floor.prove(two_days, "command", kind="command", clock=two_days)
    ota_env.clock = 0.0
    with pytest.raises(UpdateRejected) as ei:
        ota_env.client(floor=floor).refresh()
    assert ei.value.reason == "expired"
    assert ota_env.client(floor=floor).effective_time() == floor.floor()


def test_resume_after_network_cut_transfers_only_the_remainder(ota_env: OtaEnv) -> None:
    client = ota_env.client()
    m = client.release("digits", "1.0.0")
    dest = ota_env.box / "model.onnx"
    cut = m.length // 3
    ota_env.server.cut_after("model.onnx", cut)
    with pytest.raises(UpdateRejected) as ei:
        client.fetch(m.path, dest)
    assert ei.value.reason == "network"
    assert not dest.exists()
    client.fetch(m.path, dest)  # the same client, e.g. the updater's next attempt
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == m.sha256
    assert ota_env.server.bytes_sent("model.onnx") == m.length
    assert [r.range for r in ota_env.server.requests if r.path.endswith("model.onnx")] == [None, f"bytes={cut}-"]
    assert client.stats.last_resumed_from == cut


def test_resume_survives_a_restart(ota_env: OtaEnv) -> None:
    m = ota_env.client().release("digits", "1.0.0")
    ota_env.server.cut_after("model.onnx", 1000)
    with pytest.raises(UpdateRejected):
        ota_env.client().fetch(m.path, ota_env.box / "model.onnx")
    restarted = ota_env.client()  # a new process: fresh Updater, same metadata cache and downloads dir
    restarted.fetch(m.path, ota_env.box / "model.onnx")
    assert ota_env.server.bytes_sent("model.onnx") == m.length


def test_max_target_bytes_refuses_before_downloading(ota_env: OtaEnv) -> None:
    client = ota_env.client(max_target_bytes=1000)
    m = client.release("digits", "1.0.0")
    with pytest.raises(UpdateRejected) as ei:
        client.fetch(m.path, ota_env.box / "model.onnx")
    assert ei.value.reason == "too_large"
    assert ota_env.server.paths("model.onnx") == []
    assert not (ota_env.box / "model.onnx").exists()


def test_expected_sha256_must_match(ota_env: OtaEnv) -> None:
    client = ota_env.client()
    m = client.release("digits", "1.0.0")
    with pytest.raises(UpdateRejected) as ei:
        client.fetch(m.path, ota_env.box / "model.onnx", expected_sha256="0" * 64)
    assert ei.value.reason == "hash_mismatch"
    assert not (ota_env.box / "model.onnx").exists()


def test_unknown_release_is_not_found(ota_env: OtaEnv) -> None:
    client = ota_env.client()
    for name, version in (("digits", "9.0.0"), ("mobilenet", "1.0.0")):
        with pytest.raises(UpdateRejected) as ei:
            client.release(name, version)
        assert ei.value.reason == "not_found"


def test_manifest_naming_another_publisher_is_rejected(ota_env: OtaEnv) -> None:
    acme: Metadata[Targets] = ota_env.repo.metadata("acme")
    tf = acme.signed.targets["digits/1.0.0/model.onnx"]
    tf.unrecognized_fields["custom"]["edge"]["publisher"] = "bigcorp"
    acme.signed.version += 1
    sign(acme, [ota_env.publisher_signer()])
    ota_env.commit({"acme": acme})
    with pytest.raises(UpdateRejected) as ei:
        ota_env.client().release("digits", "1.0.0")
    assert ei.value.reason == "bad_metadata" and "bigcorp" in ei.value.detail


def test_server_down_is_network(ota_env: OtaEnv) -> None:
    client = ota_env.client()
    ota_env.server.fail("timestamp.json", 503)
    with pytest.raises(UpdateRejected) as ei:
        client.refresh()
    assert ei.value.reason == "network"


def test_rotated_root_is_kept_across_restarts(ota_env: OtaEnv) -> None:
    provisioned = ota_env.repo.root_bytes()
    ota_env.client(trusted_root=provisioned).refresh()
    ota_env.repo.rotate_key("root", now=NOW)
    ota_env.repo.rotate_key("root", now=NOW)
    ota_env.client(trusted_root=provisioned).refresh()
    # The server loses the old roots: a restarted box still trusts root v3 from its cache, anchored in v1.
    for v in (2, 3):
        ota_env.server.fail(f"metadata/{v}.root.json", 404)
    client = ota_env.client(trusted_root=provisioned)
    client.refresh()
    assert client.release("digits", "1.0.0").version == "1.0.0"
    assert (ota_env.box / "tuf" / "root_history" / "3.root.json").exists()


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ExpiredMetadataError("timestamp.json is expired"), "expired"),
        (BadVersionNumberError("New timestamp version 3 must be >= 4"), "rollback"),
        (BadVersionNumberError("New snapshot version must be >= 5, got version 4"), "rollback"),
        (BadVersionNumberError("Expected acme.json version 1, got 2."), "rollback"),
        (BadVersionNumberError("Expected snapshot version 5, got 4"), "bad_metadata"),
        (BadVersionNumberError("Expected acme v2, got v1."), "bad_metadata"),
        (UnsignedMetadataError("timestamp was signed by 0/1 keys"), "bad_signature"),
        (LengthOrHashMismatchError("hash mismatch"), "hash_mismatch"),
        (DownloadLengthMismatchError("too many bytes"), "too_large"),
        (DownloadError("cut"), "network"),
        (RepositoryError("New snapshot is missing info for 'acme.json'"), "bad_metadata"),
    ],
)
def test_rejection_reasons(error: Exception, reason: str) -> None:
    verdict = rejection(error)
    assert verdict.reason == reason
    assert str(error) in verdict.detail
