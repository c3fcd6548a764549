"""Ledger exports: written and signed from the store, re-verified from the file and the ledger key alone; each kind
of tampering or forgery is caught, and the credit of every inference is recomputed with the gateway's rules."""

from __future__ import annotations

import base64
import hashlib
import json
import re

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.fleet.errors import LedgerExportError, UnknownDeviceError
from edge.fleet.ledger import LedgerTotals, export_ledger, ledger_key, verify_export

T0 = 1_700_000_000.0
MIDNIGHT = 1_700_006_400.0  # 2023-11-15 00:00:00 UTC
CONTEXT = b"edge-ledger-export/2\x00"


@pytest.fixture
def key(tmp_path):
    return ledger_key(tmp_path)


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


def resign(path, key, content):
    """Write ``content`` (header and envelope lines) signed by ``key``: what a lying or buggy gateway would do."""
    body = ("\n".join(content) + "\n").encode()
    sig = key.sign(CONTEXT + hashlib.sha256(body).digest())
    path.write_bytes(body + json.dumps({"signature": base64.b64encode(sig).decode()}).encode() + b"\n")


def test_export_then_verify_round_trip(store, worked, tmp_path, key):
    path = tmp_path / "cam-a.jsonl"
    totals = export_ledger(store, "cam-a", path, key=key)
    assert totals == LedgerTotals(
        device_id="cam-a",
        did=worked.did,
        envelopes=4,
        records=12,
        inferences={"digits@1.0.0": 5, "digits@2.0.0": 2},
        credits={"digits@1.0.0": {"credited": 5}, "digits@2.0.0": {"credited": 2}},
        readings=3,
        events=1,
        announced_lost=2,
        announced_lost_records=7,
        first_counter=1,
        last_counter=92,  # the loss notice follows the 88 counters skipped (90 and 91 among them, dropped)
        gaps=88,
    )
    assert verify_export(path, ledger_key=key.public_key()) == totals
    header = json.loads(lines(path)[0])
    assert (header["device_id"], header["did"], header["day_from"], header["day_to"]) == (
        "cam-a", worked.did, None, None
    )  # fmt: skip
    stored = [e.data for e in store.envelopes("cam-a")]
    assert [base64.b64decode(json.loads(x)["envelope"]) for x in lines(path)[1:-1]] == stored  # the exact bytes
    # A day range exports only what was received on those days.
    day1 = export_ledger(store, "cam-a", tmp_path / "day1.jsonl", key=key, day_from="2023-11-15", day_to="2023-11-15")
    assert (day1.envelopes, day1.first_counter, day1.events) == (1, 92, 1)
    assert verify_export(tmp_path / "day1.jsonl", ledger_key=key.public_key()) == day1
    with pytest.raises(UnknownDeviceError):
        export_ledger(store, "cam-z", tmp_path / "z.jsonl", key=key)


def test_ledger_key_is_made_once_and_kept_private(tmp_path):
    k = ledger_key(tmp_path)
    assert (tmp_path / "ledger.key").stat().st_mode & 0o077 == 0
    assert ledger_key(tmp_path).public_key().public_bytes_raw() == k.public_key().public_bytes_raw()


def test_revoked_device_work_still_exportable(store, worked, tmp_path, key):
    store.revoke_device("cam-a", MIDNIGHT + 60)
    totals = export_ledger(store, "cam-a", tmp_path / "a.jsonl", key=key)
    assert totals.envelopes == 4 and verify_export(tmp_path / "a.jsonl", ledger_key=key.public_key()) == totals


def test_export_not_signed_by_the_gateway_refused(store, worked, tmp_path, key):
    path = tmp_path / "cam-a.jsonl"
    export_ledger(store, "cam-a", path, key=key)
    content = lines(path)
    # Signed by someone else: the header names that key, and the verifier's trusted key is not it.
    other = Ed25519PrivateKey.generate()
    with pytest.raises(LedgerExportError, match="signed by another ledger key"):
        verify_export(path, ledger_key=other.public_key())
    # The header renamed to the gateway's key, but signed with another: the signature fails.
    resign(path, other, content[:-1])
    with pytest.raises(LedgerExportError, match="signature does not verify"):
        verify_export(path, ledger_key=key.public_key())
    # No signature at all.
    rewrite(path, content[:-1])
    with pytest.raises(LedgerExportError, match="no signature line"):
        verify_export(path, ledger_key=key.public_key())
    # Anything after the signature.
    rewrite(path, [*content, content[1]])
    with pytest.raises(LedgerExportError, match="a line after the signature"):
        verify_export(path, ledger_key=key.public_key())


def test_inflated_totals_refused_even_when_signed(store, worked, tmp_path, key):
    path = tmp_path / "cam-a.jsonl"
    export_ledger(store, "cam-a", path, key=key)
    content = lines(path)
    header = json.loads(content[0])
    header["totals"]["inferences"]["digits@1.0.0"] += 100
    rewrite(path, [json.dumps(header), *content[1:]])  # the signature no longer covers it
    with pytest.raises(LedgerExportError, match="signature does not verify"):
        verify_export(path, ledger_key=key.public_key())
    resign(path, key, [json.dumps(header), *content[1:-1]])  # a gateway that lies is caught by the recount
    with pytest.raises(LedgerExportError, match=r"total 'inferences': the header claims"):
        verify_export(path, ledger_key=key.public_key())
    header["totals"]["credits"]["digits@1.0.0"]["credited"] = True  # 1 in disguise, and wrong anyway
    header["totals"]["inferences"]["digits@1.0.0"] -= 100
    resign(path, key, [json.dumps(header), *content[1:-1]])
    with pytest.raises(LedgerExportError, match=r"total 'credits'"):
        verify_export(path, ledger_key=key.public_key())


def test_tampered_line_detected(store, worked, tmp_path, key):
    path = tmp_path / "cam-a.jsonl"
    export_ledger(store, "cam-a", path, key=key)
    content = lines(path)
    line = json.loads(content[2])
    data = bytearray(base64.b64decode(line["envelope"]))
    data[-67] ^= 0x01  # the payload's last byte: signed, so the signature fails
    line["envelope"] = base64.b64encode(bytes(data)).decode()
    content[2] = json.dumps(line)
    rewrite(path, content)
    with pytest.raises(LedgerExportError, match=r"^line 3: envelope does not verify"):
        verify_export(path, ledger_key=key.public_key())


def test_forged_envelope_of_another_key_detected(store, worked, tmp_path, make_fleet, key):
    path = tmp_path / "cam-a.jsonl"
    export_ledger(store, "cam-a", path, key=key)
    mallory = make_fleet(store).device("cam-a", register=False)  # the same id, another key
    mallory.counter, mallory.prev = worked.counter, worked.prev
    content = lines(path)
    forged = mallory.seal_inferences(100)  # inflate the work
    line = json.dumps({"counter": 93, "received_at": MIDNIGHT + 2, "envelope": base64.b64encode(forged).decode()})
    resign(path, key, [*content[:-1], line])
    with pytest.raises(LedgerExportError, match=r"^line 6: envelope does not verify"):
        verify_export(path, ledger_key=key.public_key())


def test_removed_line_detected(store, worked, tmp_path, key):
    path = tmp_path / "cam-a.jsonl"
    export_ledger(store, "cam-a", path, key=key)
    content = lines(path)
    rewrite(path, [content[0], content[1], content[3], content[4], content[5]])  # envelope 2 withheld
    with pytest.raises(LedgerExportError, match="signature does not verify"):
        verify_export(path, ledger_key=key.public_key())
    resign(path, key, [content[0], content[1], content[3], content[4]])
    with pytest.raises(LedgerExportError, match=r"total 'envelopes': the header claims 4, the envelopes give 3"):
        verify_export(path, ledger_key=key.public_key())


def test_reordered_or_repeated_lines_detected(store, worked, tmp_path, key):
    path = tmp_path / "cam-a.jsonl"
    export_ledger(store, "cam-a", path, key=key)
    content = lines(path)
    resign(path, key, [content[0], content[2], content[1], content[3], content[4]])
    with pytest.raises(LedgerExportError, match=r"^line 3: counter 1 does not follow 2"):
        verify_export(path, ledger_key=key.public_key())
    resign(path, key, [content[0], content[1], content[1], *content[2:-1]])
    with pytest.raises(LedgerExportError, match=r"^line 3: counter 1 does not follow 1"):
        verify_export(path, ledger_key=key.public_key())


def test_gap_shows_in_totals(store, fleet, tmp_path, key):
    a = fleet.device("cam-a")
    e = [a.seal(1) for _ in range(6)]
    store.ingest([a.msg(e[0]), a.msg(e[1]), a.msg(e[4]), a.msg(e[5])])  # 3 and 4 never arrive
    path = tmp_path / "cam-a.jsonl"
    totals = export_ledger(store, "cam-a", path, key=key)
    assert (totals.envelopes, totals.first_counter, totals.last_counter, totals.gaps) == (4, 1, 6, 2)
    assert verify_export(path, ledger_key=key.public_key()) == totals


def test_malformed_export_files_rejected(store, worked, tmp_path, key):
    path = tmp_path / "cam-a.jsonl"
    export_ledger(store, "cam-a", path, key=key)
    good = lines(path)
    header = json.loads(good[0])
    dup_key = good[1].replace('{"counter":1,', '{"counter":1,"counter":1,')
    bad_files = {
        "line 1: not strict JSON": ["{nope", *good[1:]],
        "line 1: not an edge-ledger-export header": [json.dumps({**header, "format": "x"}), *good[1:]],
        "line 1: version": [json.dumps({**header, "version": 2.0}), *good[1:]],
        "line 1: invalid device id": [json.dumps({**header, "device_id": "a/b"}), *good[1:]],
        "line 1: not an Ed25519 did:key": [json.dumps({**header, "did": "did:web:example.com"}), *good[1:]],
        "line 1: enrolled_at": [json.dumps({**header, "enrolled_at": True}), *good[1:]],
        "line 2: envelope is not valid base64": [good[0], good[1].replace('"envelope":"', '"envelope":"!'), good[-1]],
        "line 3: expected exactly the keys": [good[0], good[1], json.dumps({"counter": 2}), good[-1]],
        "line 2: line says counter 9": [good[0], good[1].replace('"counter":1', '"counter":9'), *good[2:]],
        "line 2: not strict JSON: duplicate key": [good[0], dup_key, *good[2:]],
        "line 2: counter": [good[0], good[1].replace('"counter":1', '"counter":true'), *good[2:]],
        "line 2: not strict JSON: NaN": [
            good[0],
            good[1].replace('"received_at":', '"received_at":NaN,"y":'),
            good[-1],
        ],
        "line 5: received on 2023-11-15, outside": [json.dumps({**header, "day_to": "2023-11-14"}), *good[1:]],
        "line 6: signature is not 64 bytes": [*good[:-1], json.dumps({"signature": "AAAA"})],
    }
    for message, content in bad_files.items():
        rewrite(path, content)
        with pytest.raises(LedgerExportError, match=f"^{re.escape(message)}"):
            verify_export(path, ledger_key=key.public_key())
    deep = good[0][:-1] + ',"x":' + "[" * 100_000 + "]" * 100_000 + "}"
    rewrite(path, [deep, *good[1:]])
    with pytest.raises(LedgerExportError, match=r"^line 1"):
        verify_export(path, ledger_key=key.public_key())
    path.write_text("\n".join(good))  # the last line lacks its end of line: cut short
    with pytest.raises(LedgerExportError, match=r"^line 6: truncated"):
        verify_export(path, ledger_key=key.public_key())


# -------------------------------------------------------------------------------------------------------- credit


def test_credit_recomputed_from_the_export(store, fleet, tmp_path, key):
    """Duplicates, copies and implausible times are stated per record, and the verifier holds them to the rules."""
    a, b = fleet.device("cam-a"), fleet.device("cam-b")
    recs = a.inferences(3)
    store.ingest([
        a.msg(a.seal(records=recs), T0),
        a.msg(a.seal(records=recs[:1]), T0 + 1),  # re-sent: a duplicate, not new work
        b.msg(b.seal(records=recs[1:2]), T0 + 2),  # cam-b claims cam-a's input: copied
    ])  # fmt: skip
    late = a.inferences(1)
    store.ingest([a.msg(a.seal(records=[_with_ts(late[0], T0 - 40 * 86400)]), T0 + 3)])  # a month-old claim
    path = tmp_path / "cam-a.jsonl"
    totals = export_ledger(store, "cam-a", path, key=key)
    assert totals.credits == {"digits@1.0.0": {"credited": 3, "duplicate_input": 1, "implausible_time": 1}}
    assert verify_export(path, ledger_key=key.public_key()) == totals
    tb = export_ledger(store, "cam-b", tmp_path / "b.jsonl", key=key)
    assert tb.credits == {"digits@1.0.0": {"copied": 1}}
    assert json.loads(lines(tmp_path / "b.jsonl")[1])["credit"] == {"copied": [[0, "cam-a"]]}
    content = lines(path)
    # A gateway (or its key's thief) that credits the re-sent record too: the recount finds the input twice.
    second = json.loads(content[2])
    del second["credit"]
    header = json.loads(content[0])
    header["totals"]["credits"]["digits@1.0.0"] = {"credited": 4, "implausible_time": 1}
    resign(path, key, [json.dumps(header), content[1], json.dumps(second), *content[3:-1]])
    with pytest.raises(LedgerExportError, match="credited as new work more than once"):
        verify_export(path, ledger_key=key.public_key())
    # ... or that credits the month-old claim.
    fourth = json.loads(content[3])
    del fourth["credit"]
    resign(path, key, [content[0], content[1], content[2], json.dumps(fourth), *content[4:-1]])
    with pytest.raises(LedgerExportError, match="judge its time plausible=False"):
        verify_export(path, ledger_key=key.public_key())


def _with_ts(record, ts):
    from dataclasses import replace  # noqa: PLC0415

    return replace(record, timestamp=ts)
