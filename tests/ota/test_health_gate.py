"""The health gate through the whole installer: a release with wrong outputs, one over its latency budget and a corrupt
ONNX file are each published in a real fleet repository, signed by their publisher, served on loopback, downloaded and
verified by the real TUF client, and then rolled back by the trial, reported, remembered as failed and never retried
unless the fleet forces it. The trial itself is unit-tested in test_trial.py; here the whole path is under test.
"""

from __future__ import annotations

import datetime
import hashlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from box_helpers import FACTORY, Recorder, assert_valid_active, make_updater, trust_client, utc_now
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from repo_helpers import PUBLISHER, ready_repository
from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]
from static_server import StaticServer
from tuf.api.metadata import TargetFile  # type: ignore[attr-defined] # python-tuf has no __all__

from edge._fs import atomic_write
from edge.fleet.models._tuf_keys import sslib_key
from edge.fleet.models.repository import FleetRepository
from edge.ota.agent import EventEmitter
from edge.ota.updater import Updater
from edge.telemetry.outbox import Outbox
from edge.telemetry.sink import TelemetrySink
from edge.wire.envelope import GENESIS_PREV, open_envelope
from edge.wire.errors import BadSignatureError
from edge.wire.manifest import ModelManifest, target_path
from edge.wire.schema import DEFAULT_LIMITS, EventRecord

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "models"))
import ota_models as om  # noqa: E402

GOOD = "2.0.0"
WRONG, SLOW, CORRUPT = "3.0.0", "4.0.0", "5.0.0"
#: The trial's path up to the verdict: a bad model passed TUF and staging and failed only in the trial.
TRIAL_FAILED = ["ota.downloading", "ota.verifying", "ota.staged", "ota.trial", "ota.rolled_back"]


@dataclass
class Fleet:
    repo: FleetRepository
    server: StaticServer
    root: bytes
    good_p50_ms: float
    slow_p50_ms: float
    budget_ms: float
    corrupt_sha256: str


def _publish_unloadable(
    repo: FleetRepository, key: Ed25519PrivateKey, version: str, data: bytes, now: datetime.datetime
) -> FleetRepository:
    """Sign ``data`` as the primary model of the already published ``digits@version``, as the publisher.

    ``FleetRepository.publish`` refuses a model it cannot load, so this plays a publisher whose own tooling signs
    whatever it is given: the publisher's role lists the corrupt bytes (length, SHA-256, manifest) under its key, and
    a new snapshot and timestamp serve it. Returns the repository reloaded from disk.
    """
    md = repo.metadata(PUBLISHER)
    path = target_path("digits", version)
    tf = md.signed.targets[path]
    good = ModelManifest.from_custom(path, tf.custom, length=tf.length, sha256=tf.hashes["sha256"])
    sha = hashlib.sha256(data).hexdigest()
    atomic_write(repo.targets_dir / "digits" / version / f"{sha}.model.onnx", data)
    bad = replace(good, sha256=sha, length=len(data))
    md.signed.targets[path] = TargetFile(
        len(data), {"sha256": sha}, path, unrecognized_fields={"custom": bad.to_custom()}
    )
    md.sign(CryptoSigner(key, sslib_key(key.public_key())), append=False)
    # Same version as the file it replaces: the reload reads it and re-signing moves it to the next version.
    atomic_write(repo.metadata_dir / f"{md.signed.version}.{PUBLISHER}.json", md.to_bytes())
    reloaded = FleetRepository.load(repo.fleet_dir)
    reloaded.resign_publisher(PUBLISHER, key, now=now)
    return reloaded


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """digits 2.0.0 (good), 3.0.0 (wrong outputs), 4.0.0 (over its budget), 5.0.0 (corrupt ONNX), on loopback."""
    d = tmp_path_factory.mktemp("fleet")
    now = utc_now()
    repo, key = ready_repository(d, now=now, versions=(GOOD,))
    work = d / "work"

    wrong = om.broken(FACTORY, work / "wrong.onnx", WRONG)
    om.golden(wrong, work / "golden-wrong.npz", reference=FACTORY)  # expected: what the good model says
    repo.publish(
        wrong,
        name="digits",
        version=WRONG,
        publisher=PUBLISHER,
        publisher_key=key,
        now=now,
        golden=work / "golden-wrong.npz",
    )

    # The budget is placed between two speeds measured here, so the verdict does not depend on this machine's speed.
    slow = om.slow(FACTORY, work / "slow.onnx", SLOW, extra_ms=3.0)
    good_p50, slow_p50 = om.p50_ms(FACTORY), om.p50_ms(slow)
    assert slow_p50 > 2 * good_p50, (good_p50, slow_p50)
    budget = (good_p50 + slow_p50) / 2
    om.golden(slow, work / "golden-slow.npz", reference=FACTORY)
    repo.publish(
        slow,
        name="digits",
        version=SLOW,
        publisher=PUBLISHER,
        publisher_key=key,
        now=now,
        golden=work / "golden-slow.npz",
        latency_budget_ms=budget,
    )

    fine = om.with_version(FACTORY, work / "fine-5.onnx", CORRUPT)
    om.golden(fine, work / "golden-5.npz")
    repo.publish(
        fine,
        name="digits",
        version=CORRUPT,
        publisher=PUBLISHER,
        publisher_key=key,
        now=now,
        golden=work / "golden-5.npz",
    )
    corrupt = om.corrupt(fine, work / "corrupt-5.onnx").read_bytes()
    repo = _publish_unloadable(repo, key, CORRUPT, corrupt, now)

    with StaticServer(repo.repository_dir) as server:
        yield Fleet(repo, server, repo.root_bytes(), good_p50, slow_p50, budget, hashlib.sha256(corrupt).hexdigest())


@dataclass(frozen=True)
class Case:
    version: str
    reason: str


CASES = [
    pytest.param(Case(WRONG, "wrong_outputs"), id="wrong_outputs"),
    pytest.param(Case(SLOW, "too_slow"), id="too_slow"),
    pytest.param(Case(CORRUPT, "load_failed"), id="corrupt_onnx"),
]


def _box(tmp_path: Path, fleet: Fleet, start: str) -> tuple[Updater, Recorder, str, str]:
    """A box running the factory digits@1.0.0 or a committed digits@2.0.0.

    Returns:
        The updater, its event recorder (emptied), the model it runs and the slot a new release is staged in.
    """
    up, rec = make_updater(tmp_path, fleet.server.url, fleet.root)
    if start == "factory":
        return up, rec, "digits@1.0.0", "a"
    assert up.update("digits", GOOD).state == "committed"
    rec.events.clear()
    return up, rec, f"digits@{GOOD}", "b"


def test_the_releases_are_what_their_publisher_signed(fleet: Fleet) -> None:
    by_version = {m.version: m for m in fleet.repo.releases("digits")}
    assert sorted(by_version) == [GOOD, WRONG, SLOW, CORRUPT]
    assert by_version[SLOW].latency_budget_ms == pytest.approx(fleet.budget_ms)
    assert fleet.good_p50_ms < by_version[SLOW].latency_budget_ms < fleet.slow_p50_ms  # type: ignore[operator]
    corrupt = by_version[CORRUPT]
    assert (corrupt.sha256, corrupt.publisher) == (fleet.corrupt_sha256, PUBLISHER)


@pytest.mark.parametrize("start", ["factory", "committed_v2"])
@pytest.mark.parametrize("case", CASES)
def test_bad_release_is_rolled_back_reported_and_never_retried_unless_forced(
    tmp_path: Path, fleet: Fleet, case: Case, start: str
) -> None:
    up, rec, running, staging = _box(tmp_path, fleet, start)
    model_id = f"digits@{case.version}"

    out = up.update("digits", case.version, rollout="r-health")

    assert (out.state, out.model, out.reason, out.variant) == ("rolled_back", model_id, case.reason, None)
    # Downloaded and verified by TUF (a corrupt file is what its publisher signed), failed only in the trial.
    assert rec.kinds == TRIAL_FAILED
    assert rec.events[-1][1] == {
        "model": "digits",
        "version": case.version,
        "from": running,
        "slot": staging,
        "reason": case.reason,
        "rollout": "r-health",
    }
    active = assert_valid_active(tmp_path)
    assert up.status()["active"]["model"] == running
    assert active.slot == ("factory" if start == "factory" else "a")
    assert list((tmp_path / "models" / staging).iterdir()) == []
    st = up.status()
    assert (st["state"], st["reason"], st["failed"]) == ("rolled_back", case.reason, [model_id])

    again = up.update("digits", case.version)

    assert (again.state, again.model, again.reason) == ("refused", model_id, "failed_before")
    assert rec.kinds == [*TRIAL_FAILED, "ota.refused"]
    assert rec.events[-1][1]["reason"] == "failed_before"
    assert up.status()["active"]["model"] == running

    forced = up.update("digits", case.version, force=True)

    # Tried again from the download on (the fleet said so), and the gate holds again.
    assert (forced.state, forced.reason) == ("rolled_back", case.reason)
    assert rec.kinds == [*TRIAL_FAILED, "ota.refused", *TRIAL_FAILED]
    assert assert_valid_active(tmp_path).slot == active.slot
    assert list((tmp_path / "models" / staging).iterdir()) == []
    assert up.status()["failed"] == [model_id]


def test_rollback_is_reported_in_signed_telemetry(tmp_path: Path, fleet: Fleet) -> None:
    device_key = Ed25519PrivateKey.generate()
    outbox = Outbox(tmp_path / "outbox.sqlite", device_id="health-box", key=device_key, limits=DEFAULT_LIMITS)
    sink = TelemetrySink(outbox, batch_records=100, batch_age_s=60)
    emitter = EventEmitter()
    emitter.attach(sink)
    box = tmp_path / "box"
    up = Updater(data_dir=box, factory=FACTORY, trust=trust_client(box, fleet.server.url, fleet.root), emit=emitter)
    try:
        out = up.update("digits", WRONG, rollout="r-signed")
    finally:
        sink.close()
    assert (out.state, out.reason) == ("rolled_back", "wrong_outputs")

    sealed = outbox.pending(0, 1000)
    envelopes = [open_envelope(data, device_key.public_key(), DEFAULT_LIMITS) for _, data in sealed]
    events = [r for env in envelopes for r in env.records if isinstance(r, EventRecord)]
    assert [e.kind for e in events] == TRIAL_FAILED  # every transition, each sealed as it happened
    assert events[-1].data == {
        "model": "digits",
        "version": WRONG,
        "from": "digits@1.0.0",
        "slot": "a",
        "reason": "wrong_outputs",
        "rollout": "r-signed",
    }
    assert all(env.device_id == "health-box" for env in envelopes)
    assert [env.counter for env in envelopes] == list(range(1, len(envelopes) + 1))
    assert [env.prev for env in envelopes] == [GENESIS_PREV, *(env.hash for env in envelopes[:-1])]
    # Signed by the box: the same bytes do not open under another key.
    with pytest.raises(BadSignatureError):
        open_envelope(sealed[-1][1], Ed25519PrivateKey.generate().public_key(), DEFAULT_LIMITS)
    outbox.close()
