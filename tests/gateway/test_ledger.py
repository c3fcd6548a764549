"""Ledger exports: written from the store, re-verified from the file alone; each kind of tampering is caught."""

from __future__ import annotations

import base64
import json

import pytest

from edge.gateway.errors import LedgerExportError, UnknownDeviceError
from edge.gateway.ledger import LedgerTotals, export_ledger, verify_export

T0 = 1_700_000_000.0
MIDNIGHT = 1_700_006_400.0  # 2023-11-15 00:00:00 UTC


@pytest.fixture
def worked(store, fleet):
    """cam-a's work: inferences of two models, readings, a loss notice; one envelope on the next day."""
    a = fleet.device("cam-a")
    b = fleet.device("cam-b")
    store.ingest([
        a.msg(a.seal_inferences(5, "digits@1.0.0"), T0),
        a.msg(a.seal_inferences(2, "digits@2.0.0"), T0 + 1),
        a.msg(a.seal(3), T0 + 2),
        b.msg(b.seal(4), T0 + 3),
        a.msg(a.seal_loss(90, 91), MIDNIGHT + 1),
    ])  # fmt: skip
    return a


def lines(path):
    return path.read_text().splitlines()


def rewrite(path, content):
    path.write_text("\n".join(content) + "\n")


def test_export_then_verify_round_trip(store, worked, tmp_path):
    path = tmp_path / "cam-a.jsonl"
    totals = export_ledger(store, "cam-a", path)
    assert totals == LedgerTotals(
        device_id="cam-a",
        did=worked.did,
        envelopes=4,
        records=12,
        inferences={"digits@1.0.0": 5, "digits@2.0.0": 2},
        readings=3,
        events=1,
        announced_lost=2,
        first_counter=1,
        last_counter=4,
        gaps=0,
    )
    assert verify_export(path) == totals
    header = json.loads(lines(path)[0])
    assert (header["device_id"], header["did"], header["day_from"], header["day_to"]) == (
        "cam-a", worked.did, None, None
    )  # fmt: skip
    stored = [e.data for e in store.envelopes("cam-a")]
    assert [base64.b64decode(json.loads(x)["envelope"]) for x in lines(path)[1:]] == stored  # the exact bytes
    # A day range exports only what was received on those days.
    day1 = export_ledger(store, "cam-a", tmp_path / "day1.jsonl", day_from="2023-11-15", day_to="2023-11-15")
    assert (day1.envelopes, day1.first_counter, day1.events) == (1, 4, 1)
    assert verify_export(tmp_path / "day1.jsonl") == day1
    with pytest.raises(UnknownDeviceError):
        export_ledger(store, "cam-z", tmp_path / "z.jsonl")


def test_revoked_device_work_still_exportable(store, worked, tmp_path):
    store.revoke_device("cam-a", MIDNIGHT + 60)
    totals = export_ledger(store, "cam-a", tmp_path / "a.jsonl")
    assert totals.envelopes == 4 and verify_export(tmp_path / "a.jsonl") == totals


def test_tampered_line_detected(store, worked, tmp_path):
    path = tmp_path / "cam-a.jsonl"
    export_ledger(store, "cam-a", path)
    content = lines(path)
    line = json.loads(content[2])
    data = bytearray(base64.b64decode(line["envelope"]))
    data[-67] ^= 0x01  # the payload's last byte: signed, so the signature fails
    line["envelope"] = base64.b64encode(bytes(data)).decode()
    content[2] = json.dumps(line)
    rewrite(path, content)
    with pytest.raises(LedgerExportError, match=r"^line 3: envelope does not verify"):
        verify_export(path)


def test_forged_envelope_of_another_key_detected(store, worked, tmp_path, make_fleet):
    path = tmp_path / "cam-a.jsonl"
    export_ledger(store, "cam-a", path)
    mallory = make_fleet(store).device("cam-a", register=False)  # the same id, another key
    mallory.counter, mallory.prev = worked.counter, worked.prev
    content = lines(path)
    forged = mallory.seal_inferences(100)  # inflate the work
    content.append(
        json.dumps({"counter": 5, "received_at": MIDNIGHT + 2, "envelope": base64.b64encode(forged).decode()})
    )
    rewrite(path, content)
    with pytest.raises(LedgerExportError, match=r"^line 6: envelope does not verify"):
        verify_export(path)


def test_totals_mismatch_detected(store, worked, tmp_path):
    path = tmp_path / "cam-a.jsonl"
    export_ledger(store, "cam-a", path)
    content = lines(path)
    header = json.loads(content[0])
    header["totals"]["inferences"]["digits@1.0.0"] += 100
    content[0] = json.dumps(header)
    rewrite(path, content)
    with pytest.raises(LedgerExportError, match=r"total 'inferences': the header claims"):
        verify_export(path)


def test_removed_line_detected(store, worked, tmp_path):
    path = tmp_path / "cam-a.jsonl"
    export_ledger(store, "cam-a", path)
    content = lines(path)
    rewrite(path, [content[0], content[1], content[3], content[4]])  # envelope 2 withheld
    with pytest.raises(LedgerExportError, match=r"total 'envelopes': the header claims 4, the envelopes give 3"):
        verify_export(path)


def test_reordered_or_repeated_lines_detected(store, worked, tmp_path):
    path = tmp_path / "cam-a.jsonl"
    export_ledger(store, "cam-a", path)
    content = lines(path)
    rewrite(path, [content[0], content[2], content[1], content[3], content[4]])
    with pytest.raises(LedgerExportError, match=r"^line 3: counter 1 does not follow 2"):
        verify_export(path)
    rewrite(path, [content[0], content[1], content[1], *content[2:]])
    with pytest.raises(LedgerExportError, match=r"^line 3: counter 1 does not follow 1"):
        verify_export(path)


def test_gap_shows_in_totals(store, fleet, tmp_path):
    a = fleet.device("cam-a")
    e = [a.seal(1) for _ in range(6)]
    store.ingest([a.msg(e[0]), a.msg(e[1]), a.msg(e[4]), a.msg(e[5])])  # 3 and 4 never arrive
    path = tmp_path / "cam-a.jsonl"
    totals = export_ledger(store, "cam-a", path)
    assert (totals.envelopes, totals.first_counter, totals.last_counter, totals.gaps) == (4, 1, 6, 2)
    assert verify_export(path) == totals


def test_malformed_export_files_rejected(store, worked, tmp_path):
    path = tmp_path / "cam-a.jsonl"
    export_ledger(store, "cam-a", path)
    good = lines(path)
    header = json.loads(good[0])
    bad_files = {
        "line 1: not JSON": ["{nope", *good[1:]],
        "line 1: not an edge-ledger-export header": [json.dumps({**header, "format": "x"}), *good[1:]],
        "line 1: invalid device id": [json.dumps({**header, "device_id": "a/b"}), *good[1:]],
        "line 1: not an Ed25519 did:key": [json.dumps({**header, "did": "did:web:example.com"}), *good[1:]],
        "line 2: envelope is not valid base64": [good[0], good[1].replace('"envelope":"', '"envelope":"!')],
        "line 3: expected exactly the keys": [good[0], good[1], json.dumps({"counter": 2})],
        "line 2: line says counter 9": [good[0], good[1].replace('"counter":1', '"counter":9'), *good[2:]],
        "line 5: received on 2023-11-15, outside": [json.dumps({**header, "day_to": "2023-11-14"}), *good[1:]],
    }
    for message, content in bad_files.items():
        rewrite(path, content)
        with pytest.raises(LedgerExportError, match=f"^{message}"):
            verify_export(path)
    path.write_text("\n".join(good))  # the last line lacks its end of line: cut short
    with pytest.raises(LedgerExportError, match=r"^line 5: truncated"):
        verify_export(path)
